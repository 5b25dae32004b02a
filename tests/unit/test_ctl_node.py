"""``felixpy node status`` / ``felixpy status`` presentation and verdicts (pure), plus the path from ExaBGP's
event lines through the real speaker and BgpControl.status() to the rendered peer table."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

from bgp.model import PeerSpec
from felixpy.bgpctl import BgpControl
from felixpy.ctl import node, status
from felixpy.ipam.pools import IPPool
from tests.unit.test_exabgp_speaker import P1, P2, P3, state

CALICO_EXAMPLE = """\
+--------------+-------------------+-------+----------+-------------+
| PEER ADDRESS |     PEER TYPE     | STATE |  SINCE   |    INFO     |
+--------------+-------------------+-------+----------+-------------+
| 172.17.8.102 | node-to-node mesh | up    | 23:30:04 | Established |
+--------------+-------------------+-------+----------+-------------+"""


def test_table_matches_calicoctl_layout() -> None:
    rows = [("172.17.8.102", "node-to-node mesh", "up", "23:30:04", "Established")]
    assert node.render_table(node.PEER_HEADERS, rows) == CALICO_EXAMPLE


def test_table_widens_to_longest_cell() -> None:
    out = node.render_table(("A", "B"), [("x", "a much longer cell"), ("yyyy", "z")]).splitlines()
    assert len({len(ln) for ln in out}) == 1
    assert out[1] == "|  A   |         B          |"
    assert out[4] == "| yyyy | z                  |"


def test_peer_types_from_calico_protocol_names() -> None:
    assert node.peer_type("Mesh_10_0_0_2") == "node-to-node mesh"
    assert node.peer_type("Node_10_0_0_9_port_1790") == "node specific"
    assert node.peer_type("Global_10_0_0_9") == "global"
    assert node.peer_type("") == "unknown"


def test_reasons_in_birds_words() -> None:
    assert node.describe_reason("notification sent (4,0)") == "Error: Hold timer expired"
    assert node.describe_reason("notification received (6,2)") == "Received: Cease / Administrative shutdown"
    assert (node.describe_reason("notification received (2,2) bad AS")
            == "Received: OPEN message error / Bad peer AS (bad AS)")
    assert node.describe_reason("closing connection") == "Socket: Connection closed"
    assert node.describe_reason("connection to 10.0.0.2:179 failed") == "Socket: Connection failed"
    assert node.describe_reason("no connection to ExaBGP") == "BGP speaker (ExaBGP) unreachable"
    assert node.describe_reason("") == ""


def test_since_is_time_today_else_date() -> None:
    now = time.time()
    assert node.format_since(now - 60, now=now) == time.strftime("%H:%M:%S", time.localtime(now - 60))
    assert node.format_since(now - 3 * 86400, now=now) == time.strftime("%Y-%m-%d", time.localtime(now - 3 * 86400))
    assert node.format_since(None) == "-"


def test_no_bgp_and_no_peers() -> None:
    out = node.render_node_status(None, networking_backend="vxlan")
    assert out.startswith("Calico process is running.\n")
    assert "CALICO_NETWORKING_BACKEND=vxlan" in out
    out = node.render_node_status({"connected": True, "peers": []})
    assert "No IPv4 peers found." in out and "No IPv6 peers found." in out


def _control(tmp: Path) -> BgpControl:
    pools = [IPPool(name="p", cidr=ipaddress.IPv4Network("10.244.0.0/16"), block_size=26)]
    ctl = BgpControl(str(tmp), submit=lambda _m: None, pools=lambda: pools, ipip_available=lambda: False,
                     sync_timeout=0.0)
    specs = [PeerSpec(name="Mesh_" + a.replace(".", "_"), address=ipaddress.IPv4Address(a), asn=64512,
                      local_asn=64512) for a in (P1, P2)]
    specs.append(PeerSpec(name="Global_" + P3.replace(".", "_"), address=ipaddress.IPv4Address(P3), asn=64513,
                          local_asn=64512))
    ctl.speaker.set_peers(specs)
    return ctl


def test_speaker_events_to_node_status_table(tmp_path: Path) -> None:
    ctl = _control(tmp_path)
    for line in (state(P1, "up"), state(P2, "up"), state(P2, "down", "notification sent (4,0)"),
                 state(P3, "connected")):
        ctl.speaker._on_line(line)
    st = ctl.status()
    by_addr = {p["address"]: p for p in st["peers"]}
    assert by_addr[P2]["info"] == "notification sent (4,0)" and by_addr[P2]["since"] > 0
    out = node.render_node_status(st)
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
             for ln in out.splitlines() if ln.startswith("| 10.")}
    assert lines[P1] == ["node-to-node mesh", "up", lines[P1][2], "Established"]
    assert lines[P2][:2] == ["node-to-node mesh", "start"]
    assert lines[P2][3] == "Active Error: Hold timer expired"
    assert lines[P3] == ["global", "start", lines[P3][2], "Connect"]
    # A session that comes back clears the reason.
    ctl.speaker._on_line(state(P2, "up"))
    assert next(p for p in ctl.status()["peers"] if p["address"] == P2)["info"] == ""


def test_status_file_fallback_only_when_fresh(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"peers": [], "connected": true}')
    assert node.read_status_file(str(tmp_path)) == {"peers": [], "connected": True}
    assert node.read_status_file(str(tmp_path), now=time.time() + 3600) is None
    assert node.read_status_file(str(tmp_path / "missing")) is None


def test_agent_url_from_felix_env() -> None:
    assert node.agent_url({}) == "http://localhost:9099"
    assert node.agent_url({"FELIX_HEALTHHOST": "0.0.0.0", "felix_healthport": "9199"}) == "http://127.0.0.1:9199"


# -- felixpy status verdicts -------------------------------------------------------------------------------------
def healthy_report(**over: Any) -> dict[str, Any]:
    rep: dict[str, Any] = {
        "node": "n1", "uptime": 120.0, "live": True, "ready": True, "reporters": [],
        "networking_backend": "bird",
        "datastore": {"type": "etcdv3", "connected": True, "state": "in-sync", "errors": 0, "relists": 0,
                      "last_error_age": None},
        "dataplane": {"in_sync": True, "applies_ok": 10, "failures": 0, "last_error": "", "routes": 5,
                      "local_endpoints": 2, "endpoint_errors": {}, "tunnel_problem": ""},
        "bgp": {"connected": True, "ready": True, "detail": "", "peers": [
            {"address": P1, "name": "Mesh_10_0_0_2", "state": "established", "info": "", "since": 1.0},
            {"address": P2, "name": "Mesh_10_0_0_3", "state": "established", "info": "", "since": 1.0}]},
        "ipam": {"local_blocks": [{"cidr": "10.244.1.0/26", "total": 64, "allocated": 3}],
                 "pools": [{"name": "p", "cidr": "10.244.0.0/16", "total": 65536, "allocated": 9, "blocks": 3,
                            "in_blocks": 192}]},
        "policy": {"enabled": True, "backend": "nftables", "policies": 1, "profiles": 1, "endpoints": 2,
                   "ipsets": 1, "errors": {}, "invalid_resources": 0},
    }
    for k, v in over.items():
        rep[k] = {**rep[k], **v} if isinstance(rep.get(k), dict) and isinstance(v, dict) else v
    return rep


def verdicts(rep: dict[str, Any] | None, **kw: Any) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.reason) for c in status.evaluate(rep, **kw)}


def test_healthy_node_is_all_ok() -> None:
    checks = status.evaluate(healthy_report(), datastore_error="")
    assert [c.status for c in checks] == ["OK"] * 6, checks
    assert status.overall(checks) == "OK"
    v = verdicts(healthy_report())
    assert v["bgp"] == ("OK", "2/2 peers established")
    assert "3/64 (5%)" in v["ipam"][1]


def test_bgp_down_after_grace_fails_with_reason() -> None:
    peers = [{"address": P1, "name": "Mesh_10_0_0_2", "state": "down", "info": "notification sent (4,0)"},
             {"address": P2, "name": "Mesh_10_0_0_3", "state": "down", "info": "closing connection"}]
    v = verdicts(healthy_report(bgp={"ready": False, "peers": peers}))
    assert v["bgp"][0] == "FAIL"
    assert "0/2 peers established" in v["bgp"][1] and "Hold timer expired" in v["bgp"][1]
    one_down = verdicts(healthy_report(bgp={"peers": [{**peers[0]}, {"address": P2, "state": "established"}]}))
    assert one_down["bgp"][0] == "WARN" and P1 in one_down["bgp"][1]
    no_sidecar = verdicts(healthy_report(bgp={"connected": False}))
    assert no_sidecar["bgp"][0] == "FAIL" and "ExaBGP" in no_sidecar["bgp"][1]
    assert verdicts(healthy_report(bgp=None, networking_backend="vxlan"))["bgp"][0] == "OK"


def test_dataplane_policy_datastore_verdicts() -> None:
    assert verdicts(healthy_report(dataplane={"last_error": "OSError: boom", "failures": 3}))["dataplane"][0] == "FAIL"
    assert verdicts(healthy_report(dataplane={"applies_ok": 0}))["dataplane"][0] == "WARN"
    assert verdicts(healthy_report(policy={"errors": {"policy default/x": "bad"}}))["policy"][0] == "FAIL"
    assert verdicts(healthy_report(policy={"invalid_resources": 2}))["policy"] == (
        "WARN", "nftables: 1 policies, 1 profiles, 2 endpoints, 1 IP sets programmed; 2 invalid datastore "
                "resources skipped (see the agent log)")
    assert verdicts(healthy_report(), datastore_error="no answer within 5s")["datastore"][0] == "FAIL"
    assert verdicts(healthy_report(datastore={"state": "resync"}))["datastore"][0] == "WARN"
    assert verdicts(healthy_report(datastore={"last_error_age": 3.0, "errors": 4}))["datastore"][0] == "WARN"
    full = {"local_blocks": [{"cidr": "10.244.1.0/26", "total": 64, "allocated": 64}]}
    assert verdicts(healthy_report(ipam=full))["ipam"][0] == "WARN"


def test_agent_down_fails() -> None:
    checks = status.evaluate(None, agent_error="connection refused", datastore_error="")
    assert [(c.name, c.status) for c in checks] == [("agent", "FAIL"), ("datastore", "OK")]
    assert status.overall(checks) == "FAIL"
    assert "connection refused" in status.render(checks)
