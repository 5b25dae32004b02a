"""Rendering of exabgp.conf / exabgp.env (pure). `exabgp validate` on the output runs in
tests/integration/test_exabgp_speaker.py."""

from __future__ import annotations

import logging
import os
import re
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bgp.exabgp_conf import ExabgpConfigError, render_config, render_env
from bgp.model import LocalBgpConfig, PeerSpec
from bgp.sidecar import exabgp_pid, write_config

A = IPv4Address
RELAY = [sys.executable, "-m", "bgp.relay", "--socket", "/run/felixpy/bgp/agent.sock"]


def peer(addr: str, **kw: object) -> PeerSpec:
    name = kw.pop("name", "Mesh_" + addr.replace(".", "_"))
    return PeerSpec(name=str(name), address=A(addr), asn=int(kw.pop("asn", 64512)), local_asn=64512, **kw)  # type: ignore[arg-type]


def cfg(*peers: PeerSpec) -> LocalBgpConfig:
    return LocalBgpConfig(node="node-1", router_id=A("10.0.0.1"), local_ip=A("10.0.0.1"), asn=64512, peers=peers)


def block(text: str, addr: str) -> str:
    m = re.search(rf"^neighbor {re.escape(addr)} \{{\n(.*?)^\}}", text, re.S | re.M)
    assert m, f"no neighbor block for {addr}"
    return m.group(1)


def test_process_and_neighbor_blocks() -> None:
    text = render_config(
        cfg(peer("10.0.0.3"), peer("10.0.0.2", passive=True, hold_time=9, graceful_restart_time=60)),
        relay_argv=RELAY,
    )
    assert f"run {' '.join(RELAY)};" in text
    assert "encoder json;" in text
    b2 = block(text, "10.0.0.2")
    for want in (
        'description "Mesh_10_0_0_2";',
        "router-id 10.0.0.1;",
        "local-address 10.0.0.1;",
        "local-as 64512;",
        "peer-as 64512;",
        "hold-time 9;",
        "passive true;",
        "manual-eor true;",
        "graceful-restart 60;",
        "route-refresh;",
        "processes [ felixpy ];",
        "neighbor-changes;",
        "parsed;",
        "update;",
        "open;",
        "notification;",
        "refresh;",
        "ipv4 unicast;",
    ):
        assert want in b2, want
    b3 = block(text, "10.0.0.3")
    assert "passive false;" in b3 and "graceful-restart 120;" in b3 and "hold-time 90;" in b3
    assert "connect " not in b3 and "md5-password" not in b3
    # sorted by name: Mesh_10_0_0_2 first
    assert text.index("neighbor 10.0.0.2 ") < text.index("neighbor 10.0.0.3 ")


def test_peer_options() -> None:
    text = render_config(
        cfg(
            peer(
                "10.0.9.9",
                name="Global_10_0_9_9_port_1790",
                asn=65001,
                port=1790,
                password="s3cr et",
                source_address=A("10.0.0.100"),
                graceful_restart_time=0,
            )
        ),
        relay_argv=RELAY,
    )
    b = block(text, "10.0.9.9")
    assert "peer-as 65001;" in b
    assert "connect 1790;" in b
    assert 'md5-password "s3cr et";' in b
    assert "local-address 10.0.0.100;" in b
    assert "graceful-restart" not in b  # 0 = no GR capability


def test_bad_peers_are_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    text = render_config(
        cfg(
            peer("10.0.0.2"),
            peer("10.0.0.3", password='has"quote'),
            peer("10.0.0.4", hold_time=2),
            peer("10.0.0.2", name="Node_10_0_0_2"),  # same address again
            peer("10.0.0.1"),  # ourselves
            peer("10.0.0.5", asn=0),
        ),
        relay_argv=RELAY,
    )
    assert text.count("\nneighbor ") == 1
    assert "neighbor 10.0.0.2 " in text
    msgs = " ".join(r.getMessage() for r in caplog.records)
    for addr in ("10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.5"):
        assert addr in msgs
    assert "same address" in msgs


def test_no_peers_still_has_the_process() -> None:
    text = render_config(cfg(), relay_argv=RELAY)
    assert "process felixpy" in text and "neighbor" not in text


@pytest.mark.parametrize("argv", [[], ["relative/python"], ["/usr/bin/python3", "has space"], ["/x", "a;b"]])
def test_bad_relay_argv(argv: list[str]) -> None:
    with pytest.raises(ExabgpConfigError):
        render_config(cfg(), relay_argv=argv)


def test_env() -> None:
    text = render_env(bind_ip="10.0.0.1", pipename="node1")
    for want in (
        "[exabgp.daemon]",
        "user = 'root'",
        "drop = false",
        "daemonize = false",
        "ack = true",
        "cli = false",
        "encoder = json",
        "respawn = true",
        "show-routes-format = v2",
        "bind = '10.0.0.1'",
        "port = 179",
        "statistics = false",
        "processes = false",
        "pipename = 'node1'",
    ):
        assert want in text, want
    assert "bind = ''" in render_env(bind_ip=None)
    assert "port = 1790" in render_env(bind_ip="10.0.0.1", port=1790)
    with pytest.raises(ValueError):
        render_env(bind_ip="not-an-ip")
    with pytest.raises(ExabgpConfigError):
        render_env(bind_ip="10.0.0.1", log_level="chatty")


def test_write_config_is_atomic_and_reports_changes(tmp_path: Path) -> None:
    d = str(tmp_path) + "/bgp"
    assert write_config(d, "conf-1", "env-1") is True
    assert write_config(d, "conf-1", "env-1") is False
    assert write_config(d, "conf-2", "env-1") is True
    assert write_config(d, "conf-2", "env-2") is True
    with open(d + "/exabgp.conf") as f:
        assert f.read() == "conf-2"
    assert os.stat(d + "/exabgp.conf").st_mode & 0o777 == 0o600
    assert sorted(os.listdir(d)) == ["exabgp.conf", "exabgp.env"]  # no temp files left
    assert exabgp_pid(d) is None
