"""BIRD config rendering (bgp.bird_conf), validated by BIRD itself (``bird -p``), and the pure parts of
the route-reflector runner (bgp.rr): ``birdc show protocols`` parsing and the reflector's own Node."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bgp.bird_conf import render_calico_node, render_route_reflector
from bgp.model import LocalBgpConfig, PeerSpec
from bgp.peers import compute_local_config, parse_bgp_configuration, parse_bgp_node, parse_bgp_peer
from bgp.routes import PoolInfo
from bgp.rr import ensure_node, parse_show_protocols
from felixpy.datastore.api import KIND_NODE, Key, new_resource
from felixpy.datastore.memory import MemoryBackend

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
BIRD = shutil.which("bird")
needs_bird = pytest.mark.skipif(BIRD is None, reason="bird (BIRD 2) is not installed")


def bird_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bird.cfg"
    path.write_text(text)
    assert BIRD is not None
    return subprocess.run([BIRD, "-p", "-c", str(path)], capture_output=True, text=True, timeout=30)


def assert_valid(tmp_path: Path, text: str) -> None:
    r = bird_check(tmp_path, text)
    assert r.returncode == 0, f"bird -p refused the config: {r.stderr}{r.stdout}\n{text}"


def rr_config(**rr_kw: Any) -> LocalBgpConfig:
    def node(name: str, ip: str, **bgp: Any) -> Any:
        labels = {"route-reflector": "true"} if bgp.get("routeReflectorClusterID") else {}
        return parse_bgp_node({"kind": "Node", "metadata": {"name": name, "labels": labels},
                               "spec": {"bgp": {"ipv4Address": ip, **bgp}}})
    nodes = {n.name: n for n in [node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24", asNumber=65002),
                                 node("rr", "10.0.0.254/24", routeReflectorClusterID="1.0.0.1")]}
    g = parse_bgp_configuration({"kind": "BGPConfiguration", "metadata": {"name": "default"},
                                 "spec": {"nodeToNodeMeshEnabled": False, **rr_kw}})
    rule = parse_bgp_peer({"kind": "BGPPeer", "metadata": {"name": "to-rr"},
                           "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}})
    cfg = compute_local_config("rr", nodes, g, None, [rule])
    assert cfg is not None
    return cfg


def peer(name: str, ip: str, **kw: Any) -> PeerSpec:
    return PeerSpec(name=name, address=A(ip), asn=kw.pop("asn", 64512), local_asn=kw.pop("local_asn", 64512), **kw)


def base(*peers: PeerSpec, **kw: Any) -> LocalBgpConfig:
    return LocalBgpConfig(node="rr", router_id=A("10.0.0.254"), local_ip=A("10.0.0.254"), asn=64512,
                          peers=peers, **kw)


# ------------------------------------------------------------------------------------------- reflector


@needs_bird
def test_route_reflector_from_calico_rules(tmp_path: Path) -> None:
    text = render_route_reflector(rr_config())
    assert_valid(tmp_path, text)
    assert "router id 10.0.0.254;" in text
    n1 = text[text.index("protocol bgp Node_10_0_0_1 {"):text.index("protocol bgp Node_10_0_0_2 {")]
    assert "rr client;" in n1 and "rr cluster id 1.0.0.1;" in n1
    assert "neighbor 10.0.0.1 as 64512;" in n1 and "local 10.0.0.254 as 64512;" in n1
    assert "graceful restart on;" in n1 and "graceful restart time 120;" in n1
    n2 = text[text.index("protocol bgp Node_10_0_0_2 {"):]
    assert "rr client" not in n2  # eBGP peer
    # P9: only BGP routes are exported, nothing goes to the kernel.
    assert "export all" not in text
    assert text.count("export where source = RTS_BGP;") == 2
    kernel = text[text.index("protocol kernel {"):]
    assert "export none;" in kernel[:kernel.index("}")]


@needs_bird
def test_route_reflector_peer_options(tmp_path: Path) -> None:
    cfg = base(
        peer("Node_10_0_0_1", "10.0.0.1", passive=True, rr_client=True, rr_cluster_id="1.0.0.1", hold_time=9,
             keepalive_time=3, graceful_restart_time=300, password="s3cret", port=1790, next_hop_keep=True),
        peer("Global_192_0_2_1", "192.0.2.1", asn=65000, ttl_security=2, num_allow_local_as=1, next_hop_self=True,
             keepalive_time=600, graceful_restart_time=9999),
        listen_port=1791, listen_address=A("10.0.0.254"), log_level="debug")
    text = render_route_reflector(cfg, gr_wait=30)
    assert_valid(tmp_path, text)
    for line in ("passive on;", "hold time 9;", "keepalive time 3;", "graceful restart time 300;",
                 'password "s3cret";', "neighbor 10.0.0.1 port 1790 as 64512;", "next hop keep;",
                 "local 10.0.0.254 port 1791 as 64512;", "strict bind on;", "debug all;",
                 "ttl security on;", "multihop 2;", "allow local as 1;", "next hop self;",
                 "graceful restart wait 30;"):
        assert line in text, line
    assert "keepalive time 30;" in text  # 600 > hold 90: lowered to hold/3
    assert "graceful restart time 4095;" in text  # the capability has 12 bits
    assert "debug" not in render_route_reflector(base(log_level="none"))


@needs_bird
def test_bad_peers_are_left_out_not_fatal(tmp_path: Path) -> None:
    cfg = base(peer("Node_10_0_0_1", "10.0.0.1"), peer("bad name", "10.0.0.2"),
               peer("Node_10_0_0_3", "10.0.0.3", password='a"b'), peer("Node_10_0_0_4", "10.0.0.4", hold_time=2),
               peer("Node_10_0_0_5", "10.0.0.5", rr_client=True, rr_cluster_id="cluster-a"),
               peer("Node_10_0_0_254", "10.0.0.254"), peer("Node_10_0_0_1", "10.0.0.6"))
    text = render_route_reflector(cfg)
    assert_valid(tmp_path, text)
    assert text.count("protocol bgp ") == 1 and "neighbor 10.0.0.1 as" in text


@needs_bird
def test_no_peers(tmp_path: Path) -> None:
    text = render_route_reflector(base())
    assert_valid(tmp_path, text)
    assert "protocol bgp" not in text


@needs_bird
def test_bird_check_can_fail(tmp_path: Path) -> None:
    assert bird_check(tmp_path, render_route_reflector(base()) + "protocol bgp broken {\n").returncode != 0


# ------------------------------------------------------------------------------------------- Calico-style node


@needs_bird
def test_calico_node(tmp_path: Path) -> None:
    cfg = LocalBgpConfig(node="n1", router_id=A("10.0.0.1"), local_ip=A("10.0.0.1"), asn=64512, peers=(
        peer("Mesh_10_0_0_2", "10.0.0.2", kind="mesh", passive=True),
        peer("Node_10_0_0_254", "10.0.0.254", kind="node"),
        peer("Global_192_0_2_1", "192.0.2.1", asn=65000, kind="global")))
    pools = [PoolInfo(N("10.244.0.0/16"), ipip_mode="Always"), PoolInfo(N("10.245.0.0/16"), vxlan_mode="Always"),
             PoolInfo(N("10.246.0.0/16"), disable_bgp_export=True), PoolInfo(ipaddress.ip_network("fd00::/48"))]
    text = render_calico_node(cfg, local_blocks=[N("10.244.1.0/26"), N("10.244.9.7/32")], pools=pools,
                              reject_cidrs=[N("10.96.0.0/12")], static_routes=[N("10.96.0.0/12")], kernel_table=100)
    assert_valid(tmp_path, text)
    assert "route 10.244.1.0/26 blackhole;" in text
    assert "route 10.244.9.7/32" not in text  # /32 blocks get no blackhole, as in bird_aggr.cfg
    assert "if ( net = 10.244.1.0/26 ) then { accept; }" in text
    assert "route 10.96.0.0/12 blackhole;" in text
    assert "kernel table 100;" in text and "export filter calico_kernel_programming;" in text
    assert "if ( net ~ 10.246.0.0/16 ) then { reject; }  # BGP export is disabled." in text
    assert "if ( net ~ 10.245.0.0/16 ) then { reject; }  # VXLAN routes are handled by Felix." in text
    assert "fd00" not in text
    assert "protocol bgp Mesh_10_0_0_2 from bgp_template {" in text
    assert "calico_export_to_bgp_peers(true)" in text and "calico_export_to_bgp_peers(false)" in text


@needs_bird
def test_calico_node_without_blocks(tmp_path: Path) -> None:
    cfg = LocalBgpConfig(node="n1", router_id=A("10.0.0.1"), local_ip=A("10.0.0.1"), asn=64512)
    text = render_calico_node(cfg)
    assert_valid(tmp_path, text)
    assert "protocol static" not in text


# ------------------------------------------------------------------------------------------- rr.py pure parts

SHOW_PROTOCOLS = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     09:58:31.996
kernel1    Kernel     master4    up     09:58:31.996
Node_10_0_0_1 BGP        ---        up     09:58:33.010  Established
Node_10_0_0_2 BGP        ---        start  2026-11-25 09:58:31  Active        Socket: Connection refused
"""


def test_parse_show_protocols() -> None:
    rows = parse_show_protocols(SHOW_PROTOCOLS)
    assert [r.name for r in rows] == ["device1", "kernel1", "Node_10_0_0_1", "Node_10_0_0_2"]
    assert rows[2].established and not rows[3].established and not rows[0].established
    assert rows[3].since == "2026-11-25 09:58:31"
    assert rows[3].info == "Active Socket: Connection refused"
    assert rows[1].table == "master4" and rows[0].info == ""
    assert parse_show_protocols("") == []


async def test_ensure_node_creates_then_repairs() -> None:
    be = MemoryBackend()
    ip = ipaddress.IPv4Interface("10.0.0.254/24")
    kv = await ensure_node(be, "rr", ip, "1.0.0.1", {"route-reflector": "true"})
    assert kv.value["spec"]["bgp"] == {"ipv4Address": "10.0.0.254/24", "routeReflectorClusterID": "1.0.0.1"}
    assert kv.value["metadata"]["labels"] == {"route-reflector": "true"}
    # Someone drops the cluster id and relabels: ensure puts ours back and keeps the rest.
    cur = await be.get(Key(KIND_NODE, "rr"))
    cur.value["spec"]["bgp"] = {"ipv4Address": "10.0.0.254/24", "asNumber": 65000}
    cur.value["metadata"]["labels"] = {"zone": "a"}
    await be.update(cur)
    fixed = await ensure_node(be, "rr", ip, "1.0.0.1", {"route-reflector": "true"})
    assert fixed.value["spec"]["bgp"]["routeReflectorClusterID"] == "1.0.0.1"
    assert fixed.value["spec"]["bgp"]["asNumber"] == 65000
    assert fixed.value["metadata"]["labels"] == {"zone": "a", "route-reflector": "true"}
    writes = be.ops("update")
    again = await ensure_node(be, "rr", ip, "1.0.0.1", {"route-reflector": "true"})
    assert be.ops("update") == writes and again.revision == fixed.revision  # nothing to do, nothing written


async def test_ensure_node_fixes_a_malformed_node() -> None:
    be = MemoryBackend()
    key = Key(KIND_NODE, "rr")
    await be.create(key, new_resource(key, {"bgp": "garbage"}))
    kv = await ensure_node(be, "rr", ipaddress.IPv4Interface("10.0.0.254/24"), "1.0.0.1", {})
    assert parse_bgp_node(kv.value).rr_cluster_id == "1.0.0.1"


async def test_runner_survives_a_missing_bird(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from bgp.rr import RouteReflector

    be = MemoryBackend()
    rr = RouteReflector(be, "rr", str(tmp_path / "run"), node_ip=ipaddress.IPv4Interface("10.0.0.254/24"),
                        cluster_id="1.0.0.1", labels={"route-reflector": "true"}, bird_bin=str(tmp_path / "no-bird"))
    task = asyncio.create_task(rr.run())
    try:
        for _ in range(200):
            if "BIRD refused the generated config" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "cannot run" in caplog.text and not task.done()
        assert rr.config is not None and rr.rendered is None and not rr.bird.running
        assert not (tmp_path / "run" / "bird.cfg").exists()  # nothing written that BIRD did not accept
    finally:
        task.cancel()
        await asyncio.wait([task])
    with pytest.raises(ValueError):
        RouteReflector(be, "rr", str(tmp_path), node_ip=ipaddress.IPv4Interface("10.0.0.254/24"),
                       cluster_id="cluster-a", labels={})
