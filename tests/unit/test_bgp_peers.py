"""Calico's BGP peering rules (bgp.peers): parsing and compute_local_config, one small scenario each."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
from typing import Any

import pytest

from bgp.model import DEFAULT_GR_TIME, BgpNode, LocalBgpConfig, PeerSpec
from bgp.peers import (
    BgpGlobal,
    BgpPeerRule,
    SecretRef,
    compute_local_config,
    parse_bgp_configuration,
    parse_bgp_node,
    parse_bgp_peer,
    parse_duration,
    router_id,
)

IP = ipaddress.IPv4Address


def node_res(name: str, ip: str | None = None, *, asn: Any = None, cluster: str = "",
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    bgp: dict[str, Any] = {}
    if ip is not None:
        bgp["ipv4Address"] = ip
    if asn is not None:
        bgp["asNumber"] = asn
    if cluster:
        bgp["routeReflectorClusterID"] = cluster
    return {"apiVersion": "projectcalico.org/v3", "kind": "Node",
            "metadata": {"name": name, "labels": labels or {}}, "spec": {"bgp": bgp}}


def node(name: str, ip: str | None = None, **kw: Any) -> BgpNode:
    return parse_bgp_node(node_res(name, ip, **kw))


def nodes(*ns: BgpNode) -> dict[str, BgpNode]:
    return {n.name: n for n in ns}


def cfg_res(name: str = "default", **spec: Any) -> dict[str, Any]:
    return {"kind": "BGPConfiguration", "metadata": {"name": name}, "spec": spec}


def peer_res(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "BGPPeer", "metadata": {"name": name}, "spec": spec}


def rule(name: str, **spec: Any) -> BgpPeerRule:
    return parse_bgp_peer(peer_res(name, **spec))


NO_MESH = parse_bgp_configuration(cfg_res(nodeToNodeMeshEnabled=False))


def by_name(cfg: LocalBgpConfig | None) -> dict[str, PeerSpec]:
    assert cfg is not None
    return {p.name: p for p in cfg.peers}


# ------------------------------------------------------------------------------------------- parsing


def test_parse_node_fields() -> None:
    n = node("n1", "10.0.0.1/24", asn="1.10", cluster="224.0.0.1", labels={"rr": "yes"})
    assert n.ipv4 == ipaddress.IPv4Interface("10.0.0.1/24")
    assert n.asn == 65536 + 10  # asdot
    assert n.rr_cluster_id == "224.0.0.1"
    assert n.labels == (("rr", "yes"),)


def test_parse_node_without_bgp_and_bare_ip() -> None:
    assert parse_bgp_node({"kind": "Node", "metadata": {"name": "n"}, "spec": {}}).ipv4 is None
    assert node("n", "10.0.0.7").ipv4 == ipaddress.IPv4Interface("10.0.0.7/32")


@pytest.mark.parametrize("res, message", [
    (node_res("n", "10.0.0.300/24"), "ipv4Address"),
    (node_res("n", "10.0.0.1/24", asn="x"), "asNumber"),
    (node_res("n", "10.0.0.1/24", asn=1 << 32), "asNumber"),
    (node_res("n", "10.0.0.1/24", cluster="not-an-ip"), "routeReflectorClusterID"),
    ({"kind": "Node", "metadata": {"name": "n"}, "spec": {"bgp": "x"}}, "spec.bgp"),
    ({"kind": "Node", "metadata": {}, "spec": {}}, "name"),
    ({"kind": "IPPool", "metadata": {"name": "n"}, "spec": {}}, "not a Node"),
    ({"kind": "Node", "metadata": {"name": "n", "labels": ["a=b"]}, "spec": {}}, "labels"),
    ({"kind": "Node", "metadata": {"name": "n"}, "spec": []}, "spec"),
])
def test_parse_node_rejects_malformed(res: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bgp_node(res)


def test_parse_configuration_defaults() -> None:
    g = parse_bgp_configuration(cfg_res())
    assert g == BgpGlobal()
    assert g.node_to_node_mesh is True and g.asn is None and g.node == ""


def test_parse_configuration_fields() -> None:
    g = parse_bgp_configuration(cfg_res(
        asNumber=64600, nodeToNodeMeshEnabled=False, nodeMeshMaxRestartTime="2m30s", listenPort=1790,
        logSeverityScreen="Warning", bindMode="NodeIP",
        serviceClusterIPs=[{"cidr": "10.96.0.0/12"}, {}], serviceExternalIPs=[{"cidr": "192.0.2.7/32"}],
        serviceLoadBalancerIPs=[{"cidr": "198.51.100.0/24"}], serviceLoadBalancerAggregation="Disabled",
        nodeMeshPassword={"secretKeyRef": {"name": "bgp", "key": "mesh"}}))
    assert g.asn == 64600 and g.node_to_node_mesh is False
    assert g.node_mesh_max_restart_time == 150
    assert g.listen_port == 1790
    assert g.log_severity == "none"  # confd: anything but debug/info
    assert g.bind_mode == "NodeIP"
    assert g.service_cluster_ips == (ipaddress.ip_network("10.96.0.0/12"),)  # the empty entry is skipped
    assert g.service_external_ips == (ipaddress.ip_network("192.0.2.7/32"),)
    assert g.service_lb_aggregation is False
    assert g.node_mesh_password == SecretRef("bgp", "mesh")
    assert parse_bgp_configuration(cfg_res(logSeverityScreen="DEBUG")).log_severity == "debug"


def test_parse_node_specific_configuration() -> None:
    g = parse_bgp_configuration(cfg_res("node.worker-1", listenPort=1791))
    assert g.node == "worker-1" and g.listen_port == 1791


@pytest.mark.parametrize("res, message", [
    (cfg_res("global"), "name must be"),
    (cfg_res("node."), "name must be"),
    (cfg_res(listenPort=0), "listenPort"),
    (cfg_res(listenPort=70000), "listenPort"),
    (cfg_res(nodeToNodeMeshEnabled="yes"), "nodeToNodeMeshEnabled"),
    (cfg_res(nodeMeshMaxRestartTime="soon"), "nodeMeshMaxRestartTime"),
    (cfg_res(serviceClusterIPs=[{"cidr": "10.96.0.0/33"}]), "serviceClusterIPs"),
    (cfg_res(serviceClusterIPs="10.96.0.0/12"), "serviceClusterIPs"),
    (cfg_res(bindMode="Any"), "bindMode"),
    (cfg_res(asNumber=-1), "asNumber"),
])
def test_parse_configuration_rejects_malformed(res: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bgp_configuration(res)


def test_parse_peer_fields() -> None:
    r = rule("p", peerIP="192.0.2.1:1790", asNumber=65001, node="n1", localASNumber=64999,
             maxRestartTime="300s", keepaliveTime="20s", nextHopMode="Self", ttlSecurity=2,
             numAllowedLocalASNumbers=1, password={"secretKeyRef": {"name": "s", "key": "k"}},
             reversePeering="Manual", sourceAddress="None")
    assert r.peer_ip == IP("192.0.2.1") and r.peer_port == 1790 and r.asn == 65001
    assert r.node == "n1" and not r.is_global
    assert (r.local_asn, r.max_restart_time, r.keepalive_time) == (64999, 300, 20)
    assert (r.next_hop_mode, r.ttl_security, r.num_allowed_local_as) == ("Self", 2, 1)
    assert r.password == SecretRef("s", "k") and r.reverse_peering == "Manual" and r.source_address == "None"
    assert rule("v6", peerIP="[2001:db8::1]:179", asNumber=1).peer_ip == ipaddress.ip_address("2001:db8::1")
    assert rule("g", peerSelector="rr == 'true'").is_global


@pytest.mark.parametrize("spec, message", [
    ({"node": "a", "nodeSelector": "all()", "peerIP": "192.0.2.1", "asNumber": 1}, "node and nodeSelector"),
    ({"peerIP": "192.0.2.1", "peerSelector": "all()", "asNumber": 1}, "peerIP and peerSelector"),
    ({"peerSelector": "all()", "asNumber": 1}, "asNumber must be empty"),
    ({"node": "a"}, "needs peerIP or peerSelector"),
    ({"peerIP": "192.0.2.1"}, "needs asNumber"),
    ({"peerIP": "192.0.2.300", "asNumber": 1}, "not an IP address"),
    ({"peerIP": "192.0.2.1:99999", "asNumber": 1}, "port"),
    ({"peerSelector": "rr ==="}, "invalid peerSelector"),
    ({"nodeSelector": "has(", "peerIP": "192.0.2.1", "asNumber": 1}, "invalid nodeSelector"),
    ({"peerIP": "192.0.2.1", "asNumber": 1, "nextHopMode": "Sometimes"}, "nextHopMode"),
    ({"peerIP": "192.0.2.1", "asNumber": 1, "maxRestartTime": "1 minute"}, "maxRestartTime"),
    ({"peerIP": "192.0.2.1", "asNumber": 1, "ttlSecurity": 300}, "ttlSecurity"),
    ({"peerSelector": "all()", "reachableBy": "10.0.0.1"}, "reachableBy"),
    ({"peerIP": "192.0.2.1", "asNumber": 1, "keepOriginalNextHop": "yes"}, "keepOriginalNextHop"),
])
def test_parse_peer_rejects_malformed(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bgp_peer(peer_res("bad", **spec))


@pytest.mark.parametrize("text, seconds", [
    ("120s", 120), ("2m", 120), ("1h2m3s", 3723), ("1.5m", 90), ("300ms", 0.3), ("0", 0), (45, 45),
])
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10", "5 s", "-1s", True, None])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_restart_time_rounds_half_up() -> None:
    assert rule("p", peerIP="192.0.2.1", asNumber=1, maxRestartTime="1500ms").max_restart_time == 2


# ------------------------------------------------------------------------------------------- router id


def test_router_id_default_explicit_and_hash() -> None:
    assert router_id("n", IP("10.0.0.1")) == IP("10.0.0.1")
    assert router_id("n", ipaddress.IPv4Interface("10.0.0.1/24")) == IP("10.0.0.1")
    assert router_id("n", IP("10.0.0.1"), "192.0.2.9") == IP("192.0.2.9")
    h = router_id("node-a", None, "hash")
    d = hashlib.sha256(b"node-a").digest()
    assert h.packed[1:] == d[1:4]
    assert h == router_id("node-a", IP("10.0.0.1"), "hash")  # independent of the address
    with pytest.raises(ValueError):
        router_id("n", IP("10.0.0.1"), "bogus")
    with pytest.raises(ValueError):
        router_id("n", None, "")


def test_router_id_hash_moves_high_first_byte_out_of_class_d_e() -> None:
    # Find names whose hash starts above 223: Calico subtracts 32 so the id is never multicast/reserved.
    for i in range(10000):
        name = f"node-{i}"
        first = hashlib.sha256(name.encode()).digest()[0]
        if first > 223:
            assert router_id(name, None, "hash").packed[0] == first - 32
            return
    pytest.fail("no name with a high first byte found")


# ------------------------------------------------------------------------------------------- mesh


def test_no_ipv4_means_no_config() -> None:
    assert compute_local_config("n1", nodes(node("n1")), None, None, []) is None
    assert compute_local_config("missing", nodes(node("n1", "10.0.0.1/24")), None, None, []) is None


def test_full_mesh_defaults() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"), node("n3", "10.0.0.3/24"), node("v6only"))
    cfg = compute_local_config("n2", ns, None, None, [])
    assert cfg is not None
    assert (cfg.node, cfg.asn, cfg.router_id, cfg.local_ip) == ("n2", 64512, IP("10.0.0.2"), IP("10.0.0.2"))
    assert [p.name for p in cfg.peers] == ["Mesh_10_0_0_1", "Mesh_10_0_0_3"]
    p1, p3 = cfg.peers
    assert (p1.address, p1.asn, p1.local_asn, p1.port, p1.kind) == (IP("10.0.0.1"), 64512, 64512, 179, "mesh")
    assert not p1.passive and p3.passive  # the higher address waits
    assert p1.graceful_restart_time == DEFAULT_GR_TIME and not p1.rr_client


def test_mesh_passive_uses_string_order_so_exactly_one_side_connects() -> None:
    # 10.0.0.9 > 10.0.0.10 as strings although not as numbers: Calico compares strings.
    ips = ["10.0.0.9", "10.0.0.10", "10.0.0.100", "10.0.1.2", "9.0.0.1"]
    ns = nodes(*(node(f"n{i}", f"{ip}/16") for i, ip in enumerate(ips)))
    cfgs = {name: by_name(compute_local_config(name, ns, None, None, [])) for name in ns}
    assert cfgs["n1"]["Mesh_10_0_0_9"].passive  # on 10.0.0.10, the peer 10.0.0.9 is the "greater" one
    for a, b in itertools.combinations(ns, 2):
        ip_a, ip_b = str(ns[a].ipv4.ip), str(ns[b].ipv4.ip)  # type: ignore[union-attr]
        a_to_b = cfgs[a][f"Mesh_{ip_b.replace('.', '_')}"]
        b_to_a = cfgs[b][f"Mesh_{ip_a.replace('.', '_')}"]
        assert a_to_b.passive != b_to_a.passive


def test_mesh_skips_reflectors_and_reflectors_skip_the_mesh() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"), node("rr", "10.0.0.9/24", cluster="1.0.0.1"))
    assert list(by_name(compute_local_config("n1", ns, None, None, []))) == ["Mesh_10_0_0_2"]
    assert by_name(compute_local_config("rr", ns, None, None, [])) == {}


def test_mesh_disabled() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    assert by_name(compute_local_config("n1", ns, NO_MESH, None, [])) == {}


def test_mesh_duplicate_addresses_keep_one_session() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("a", "10.0.0.2/24"), node("b", "10.0.0.2/24"))
    assert list(by_name(compute_local_config("n1", ns, None, None, []))) == ["Mesh_10_0_0_2"]


def test_mesh_never_peers_with_a_node_sharing_my_address() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("clone", "10.0.0.1/24"))
    assert by_name(compute_local_config("n1", ns, None, None, [])) == {}


def test_as_precedence() -> None:
    ns = nodes(node("n1", "10.0.0.1/24", asn=65001), node("n2", "10.0.0.2/24"), node("n3", "10.0.0.3/24"))
    g = parse_bgp_configuration(cfg_res(asNumber=64600))
    c1 = compute_local_config("n1", ns, g, None, [])
    c2 = compute_local_config("n2", ns, g, None, [])
    c3 = compute_local_config("n3", ns, None, None, [])
    assert c1 is not None and c2 is not None and c3 is not None
    assert (c1.asn, c2.asn, c3.asn) == (65001, 64600, 64512)  # node > BGPConfiguration > 64512
    assert by_name(c2)["Mesh_10_0_0_1"].asn == 65001
    assert by_name(c1)["Mesh_10_0_0_2"].asn == 64600  # a peer without its own AS has the global one
    assert by_name(c1)["Mesh_10_0_0_2"].local_asn == 65001


def test_listen_ports_global_and_per_node() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"), node("n3", "10.0.0.3/24"))
    g = parse_bgp_configuration(cfg_res(listenPort=1790))
    n3cfg = parse_bgp_configuration(cfg_res("node.n3", listenPort=1793))
    n1cfg = parse_bgp_configuration(cfg_res("node.n1", listenPort=1791, logSeverityScreen="Debug"))
    cfg = compute_local_config("n1", ns, g, n1cfg, [], node_cfgs=[g, n1cfg, n3cfg])
    assert cfg is not None
    assert cfg.listen_port == 1791 and cfg.log_level == "debug"
    peers = by_name(cfg)
    assert peers["Mesh_10_0_0_2"].port == 1790 and peers["Mesh_10_0_0_3"].port == 1793  # mesh names: no port
    assert compute_local_config("n2", ns, None, None, []).listen_port == 179  # type: ignore[union-attr]


def test_mesh_restart_time_and_password() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    g = parse_bgp_configuration(cfg_res(nodeMeshMaxRestartTime="300s",
                                        nodeMeshPassword={"secretKeyRef": {"name": "s", "key": "k"}}))
    cfg = compute_local_config("n1", ns, g, None, [], secrets=lambda ref: f"pw-{ref.name}-{ref.key}")
    assert cfg is not None and cfg.graceful_restart_time == 300
    p = by_name(cfg)["Mesh_10_0_0_2"]
    assert p.graceful_restart_time == 300 and p.password == "pw-s-k"
    unresolved = compute_local_config("n1", ns, g, None, [])
    assert by_name(unresolved)["Mesh_10_0_0_2"].password == ""


# ------------------------------------------------------------------------------------------- BGPPeer


def test_global_peer_ip_and_port_suffix() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"))
    rules = [rule("tor", peerIP="192.0.2.1", asNumber=65000), rule("tor2", peerIP="192.0.2.2:1790", asNumber=65000)]
    peers = by_name(compute_local_config("n1", ns, NO_MESH, None, rules))
    assert list(peers) == ["Global_192_0_2_1", "Global_192_0_2_2_port_1790"]
    p = peers["Global_192_0_2_1"]
    assert (p.address, p.asn, p.local_asn, p.port, p.kind, p.passive) == (IP("192.0.2.1"), 65000, 64512, 179,
                                                                           "global", False)
    assert peers["Global_192_0_2_2_port_1790"].port == 1790


def test_global_peer_ip_to_a_calico_node_uses_the_string_passive_rule() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    rules = [rule("p", peerIP="10.0.0.2", asNumber=64512), rule("q", peerIP="10.0.0.1", asNumber=64512)]
    on1 = by_name(compute_local_config("n1", ns, NO_MESH, None, rules))
    on2 = by_name(compute_local_config("n2", ns, NO_MESH, None, rules))
    assert list(on1) == ["Global_10_0_0_2"] and list(on2) == ["Global_10_0_0_1"]  # never myself
    assert on1["Global_10_0_0_2"].passive and not on2["Global_10_0_0_1"].passive


def test_peer_ip_of_a_node_with_listen_port_gets_that_port() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    n2cfg = parse_bgp_configuration(cfg_res("node.n2", listenPort=1792))
    cfg = compute_local_config("n1", ns, NO_MESH, None, [rule("p", peerIP="10.0.0.2", asNumber=64512)],
                               node_cfgs=[n2cfg])
    assert list(by_name(cfg)) == ["Global_10_0_0_2_port_1792"]


def test_node_scoped_peers() -> None:
    ns = nodes(node("n1", "10.0.0.1/24", labels={"rack": "a"}), node("n2", "10.0.0.2/24", labels={"rack": "b"}))
    rules = [rule("only-n2", node="n2", peerIP="192.0.2.1", asNumber=65000),
             rule("rack-a", nodeSelector="rack == 'a'", peerIP="192.0.2.2", asNumber=65000)]
    on1 = by_name(compute_local_config("n1", ns, NO_MESH, None, rules))
    on2 = by_name(compute_local_config("n2", ns, NO_MESH, None, rules))
    assert list(on1) == ["Node_192_0_2_2"] and on1["Node_192_0_2_2"].kind == "node"
    assert list(on2) == ["Node_192_0_2_1"]
    assert not on1["Node_192_0_2_2"].passive  # the string rule is only for mesh and global peerings


def test_node_peer_suppressed_by_identical_global() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"))
    rules = [rule("a-node", node="n1", peerIP="192.0.2.1", asNumber=65000, keepaliveTime="10s"),
             rule("z-global", peerIP="192.0.2.1", asNumber=65000)]
    peers = by_name(compute_local_config("n1", ns, NO_MESH, None, rules))
    assert list(peers) == ["Global_192_0_2_1"]
    assert peers["Global_192_0_2_1"].keepalive_time is None  # the global rule's values
    # A different port is a different peering.
    rules.append(rule("b-node", node="n1", peerIP="192.0.2.1:1790", asNumber=65000))
    assert list(by_name(compute_local_config("n1", ns, NO_MESH, None, rules))) == [
        "Global_192_0_2_1", "Node_192_0_2_1_port_1790"]


def rr_cluster() -> dict[str, BgpNode]:
    return nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24", asn=65002),
                 node("rr1", "10.0.0.253/24", cluster="1.0.0.1", labels={"route-reflector": "true"}),
                 node("rr2", "10.0.0.254/24", cluster="1.0.0.1", labels={"route-reflector": "true"}),
                 node("rr3", "10.0.1.254/24", cluster="1.0.0.3", labels={"route-reflector": "true"}))


RR_RULE = rule("to-rr", nodeSelector="all()", peerSelector="route-reflector == 'true'")


def test_peer_selector_to_reflectors_from_clients() -> None:
    peers = by_name(compute_local_config("n1", rr_cluster(), NO_MESH, None, [RR_RULE]))
    assert list(peers) == ["Node_10_0_0_253", "Node_10_0_0_254", "Node_10_0_1_254"]
    assert all(not p.rr_client and not p.passive for p in peers.values())
    assert all(p.asn == 64512 for p in peers.values())


def test_reflector_clients_by_cluster_id_and_as() -> None:
    peers = by_name(compute_local_config("rr1", rr_cluster(), NO_MESH, None, [RR_RULE]))
    # The reverse peering gives rr1 a session to every node the rule's nodeSelector (all()) selects.
    assert list(peers) == ["Node_10_0_0_1", "Node_10_0_0_2", "Node_10_0_0_254", "Node_10_0_1_254"]
    n1, n2, rr2, rr3 = (peers[k] for k in peers)
    assert n1.rr_client and n1.rr_cluster_id == "1.0.0.1"
    assert not n2.rr_client and n2.asn == 65002  # eBGP is never an RR client
    assert not rr2.rr_client and rr2.rr_cluster_id == ""  # same cluster: a peer reflector, not a client
    assert rr3.rr_client and rr3.rr_cluster_id == "1.0.0.1"  # another cluster's reflector is a client


def test_reverse_peering_manual() -> None:
    manual = rule("to-rr", nodeSelector="all()", peerSelector="route-reflector == 'true'", reversePeering="Manual")
    # rr1 is itself selected by nodeSelector all(), so it still peers with the other reflectors, but the
    # clients get no session back.
    assert list(by_name(compute_local_config("rr1", rr_cluster(), NO_MESH, None, [manual]))) == [
        "Node_10_0_0_254", "Node_10_0_1_254"]


def test_global_peer_selector() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24", labels={"edge": "true"}))
    r = rule("edge", peerSelector="edge == 'true'")
    on1 = by_name(compute_local_config("n1", ns, NO_MESH, None, [r]))
    assert list(on1) == ["Global_10_0_0_2"] and not on1["Global_10_0_0_2"].passive  # selector peers: no rule
    # Reverse: n2 is selected, so it peers back with every node (the rule has no nodeSelector).
    assert list(by_name(compute_local_config("n2", ns, NO_MESH, None, [r]))) == ["Node_10_0_0_1"]


def test_reverse_peering_for_peer_ip_of_a_calico_node() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24", asn=65002))
    same_as = rule("p", node="n1", peerIP="10.0.0.2", asNumber=65002)
    wrong_as = rule("p", node="n1", peerIP="10.0.0.2", asNumber=65009)
    assert list(by_name(compute_local_config("n1", ns, NO_MESH, None, [same_as]))) == ["Node_10_0_0_2"]
    back = by_name(compute_local_config("n2", ns, NO_MESH, None, [same_as]))
    assert list(back) == ["Node_10_0_0_1"] and back["Node_10_0_0_1"].asn == 64512
    assert by_name(compute_local_config("n2", ns, NO_MESH, None, [wrong_as])) == {}


def test_explicit_peering_wins_over_reverse() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    rules = [rule("a", node="n1", peerIP="10.0.0.2", asNumber=64512),
             rule("b", node="n2", peerIP="10.0.0.1", asNumber=64512, keepaliveTime="7s")]
    on2 = by_name(compute_local_config("n2", ns, NO_MESH, None, rules))
    assert on2["Node_10_0_0_1"].keepalive_time == 7


def test_peer_options() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"))
    rules = [rule("a", peerIP="192.0.2.1", asNumber=65000, maxRestartTime="10m", keepaliveTime="30s",
                  localASNumber=64999, ttlSecurity=3, numAllowedLocalASNumbers=2,
                  password={"secretKeyRef": {"name": "s", "key": "k"}}),
             rule("b", peerIP="192.0.2.2", asNumber=65000, keepOriginalNextHop=True),
             rule("c", peerIP="192.0.2.3", asNumber=64512, keepOriginalNextHop=True),
             rule("d", peerIP="192.0.2.4", asNumber=64512, nextHopMode="Keep"),
             rule("e", peerIP="192.0.2.5", asNumber=65000, nextHopMode="Self", keepOriginalNextHop=True)]
    peers = by_name(compute_local_config("n1", ns, NO_MESH, None, rules, secrets=lambda r: "secret"))
    a = peers["Global_192_0_2_1"]
    assert (a.graceful_restart_time, a.keepalive_time, a.local_asn) == (600, 30, 64999)
    assert (a.ttl_security, a.num_allow_local_as, a.password) == (3, 2, "secret")
    assert peers["Global_192_0_2_2"].next_hop_keep  # keepOriginalNextHop: eBGP only
    assert not peers["Global_192_0_2_3"].next_hop_keep
    assert peers["Global_192_0_2_4"].next_hop_keep
    e = peers["Global_192_0_2_5"]
    assert e.next_hop_self and not e.next_hop_keep  # nextHopMode overrides keepOriginalNextHop


def test_selector_peers_ignore_local_as() -> None:
    # confd builds selector peerings from the node (its AS, its port) and ignores localASNumber there.
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24", labels={"x": "y"}))
    r = BgpPeerRule(name="sel", peer_selector="x == 'y'", local_asn=65555, num_allowed_local_as=3)
    p = by_name(compute_local_config("n1", ns, NO_MESH, None, [r]))["Global_10_0_0_2"]
    assert p.local_asn == 64512 and p.num_allow_local_as == 0


def test_sorted_by_name_and_local_workload_rules_ignored() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    rules = [rule("z", peerIP="9.9.9.9", asNumber=1), rule("a", peerIP="1.1.1.1", asNumber=1),
             rule("lw", localWorkloadSelector="app == 'x'", asNumber=1)]
    cfg = compute_local_config("n1", ns, None, None, rules)
    assert cfg is not None
    names = [p.name for p in cfg.peers]
    assert names == sorted(names) == ["Global_1_1_1_1", "Global_9_9_9_9", "Mesh_10_0_0_2"]


def test_ipv6_rules_are_ignored() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"))
    assert by_name(compute_local_config("n1", ns, NO_MESH, None, [rule("v6", peerIP="2001:db8::1", asNumber=1)])) == {}


def test_router_id_setting_and_fallback() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"))
    assert compute_local_config("n1", ns, None, None, [], router_id_setting="192.0.2.1").router_id == IP(  # type: ignore[union-attr]
        "192.0.2.1")
    hashed = compute_local_config("n1", ns, None, None, [], router_id_setting="hash")
    assert hashed is not None and hashed.router_id == router_id("n1", None, "hash")
    bad = compute_local_config("n1", ns, None, None, [], router_id_setting="nonsense")
    assert bad is not None and bad.router_id == IP("10.0.0.1")


def test_bind_mode_and_hold_time() -> None:
    ns = nodes(node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24"))
    g = parse_bgp_configuration(cfg_res(bindMode="NodeIP"))
    cfg = compute_local_config("n1", ns, g, None, [], hold_time=9)
    assert cfg is not None and cfg.listen_address == IP("10.0.0.1")
    assert cfg.hold_time == 9 and cfg.peers[0].hold_time == 9
    assert compute_local_config("n1", ns, None, None, []).listen_address is None  # type: ignore[union-attr]


def test_result_is_deterministic_and_comparable() -> None:
    ns = rr_cluster()
    a = compute_local_config("rr1", ns, NO_MESH, None, [RR_RULE])
    b = compute_local_config("rr1", dict(reversed(list(ns.items()))), NO_MESH, None, [RR_RULE])
    assert a == b
