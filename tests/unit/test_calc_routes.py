"""Route resolver scenarios: Nodes + pools + blocks -> VTEPs, remote block routes, host tunnel state."""

from __future__ import annotations

import ipaddress
from typing import Any

from felixpy import names
from felixpy.calc.graph import CalcGraph
from felixpy.calc.messages import (
    ROUTE_NOENCAP,
    ROUTE_VXLAN,
    HostTunnelUpdate,
    IPPoolRemove,
    IPPoolUpdate,
    RemoteBlockRoute,
    RemoteBlockRouteRemove,
    VtepRemove,
    VtepUpdate,
)
from felixpy.datastore.api import KIND_IPAM_BLOCK, KIND_IPPOOL, KIND_NODE, Key
from felixpy.datastore.syncer import Update


def node(name: str, ip: str, vxlan: str = "", mac: str = "") -> Update:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": ip}}
    if vxlan:
        spec["ipv4VXLANTunnelAddr"] = vxlan
    if mac:
        spec["vxlanTunnelMACAddr"] = mac
    return Update(Key(KIND_NODE, name), {"metadata": {"name": name}, "spec": spec}, "1")


def pool(name: str, cidr: str, vxlan: str = "Never", ipip: str = "Never", nat: bool = False) -> Update:
    return Update(Key(KIND_IPPOOL, name), {"metadata": {"name": name}, "spec": {
        "cidr": cidr, "blockSize": 26, "vxlanMode": vxlan, "ipipMode": ipip, "natOutgoing": nat}}, "1")


def block(cidr: str, host: str) -> Update:
    return Update(Key(KIND_IPAM_BLOCK, cidr.replace("/", "-")),
                  {"metadata": {"name": cidr.replace("/", "-")},
                   "spec": {"cidr": cidr, "affinity": f"host:{host}", "allocations": [], "unallocated": [],
                            "attributes": []}}, "1")


def delete(u: Update) -> Update:
    return Update(u.key, None, "2")


def run(g: CalcGraph, *updates: Update) -> list[Any]:
    g.on_updates(updates)
    return g.flush()


def test_vxlan_always_routes_via_remote_vtep() -> None:
    g = CalcGraph("n1")
    out = run(g, pool("p", "10.244.0.0/16", vxlan="Always", nat=True),
              node("n1", "172.31.1.1/24", vxlan="10.244.1.0"), node("n2", "172.31.1.2/24", vxlan="10.244.2.0"),
              block("10.244.1.0/26", "n1"), block("10.244.2.0/26", "n2"))
    host = [m for m in out if isinstance(m, HostTunnelUpdate)]
    assert host == [HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("172.31.1.1/24"), vxlan_enabled=True,
                                     vxlan_tunnel_ip=ipaddress.IPv4Address("10.244.1.0"),
                                     vxlan_mac=names.vtep_mac("n1"), ipip_enabled=False, ipip_tunnel_ip=None)]
    vteps = [m for m in out if isinstance(m, VtepUpdate)]
    assert vteps == [VtepUpdate("n2", ipaddress.IPv4Address("10.244.2.0"), names.vtep_mac("n2"),
                                ipaddress.IPv4Address("172.31.1.2"))]
    routes = [m for m in out if isinstance(m, RemoteBlockRoute)]
    assert routes == [RemoteBlockRoute(ipaddress.IPv4Network("10.244.2.0/26"), ROUTE_VXLAN,
                                       ipaddress.IPv4Address("10.244.2.0"), "n2")]
    assert next(m for m in out if isinstance(m, IPPoolUpdate)).nat_outgoing is True
    # Order: pools, host, VTEPs before the routes that use them.
    kinds = [type(m).__name__ for m in out]
    assert kinds.index("VtepUpdate") < kinds.index("RemoteBlockRoute")
    assert kinds.index("HostTunnelUpdate") < kinds.index("VtepUpdate")
    assert run(g) == []  # nothing changed, nothing emitted


def test_vxlan_cross_subnet_same_subnet_goes_direct() -> None:
    g = CalcGraph("n1")
    out = run(g, pool("p", "10.244.0.0/16", vxlan="CrossSubnet"),
              node("n1", "172.31.1.1/24", vxlan="10.244.1.0"), node("n2", "172.31.1.2/24", vxlan="10.244.2.0"),
              node("n3", "172.31.2.3/24", vxlan="10.244.3.0"),
              block("10.244.2.0/26", "n2"), block("10.244.3.0/26", "n3"))
    routes = {str(m.dst): m for m in out if isinstance(m, RemoteBlockRoute)}
    assert routes["10.244.2.0/26"].kind == ROUTE_NOENCAP
    assert routes["10.244.2.0/26"].gateway == ipaddress.IPv4Address("172.31.1.2")
    assert routes["10.244.3.0/26"].kind == ROUTE_VXLAN
    assert routes["10.244.3.0/26"].gateway == ipaddress.IPv4Address("10.244.3.0")


def test_block_and_node_removal_withdraws_route_then_vtep() -> None:
    g = CalcGraph("n1")
    n2 = node("n2", "172.31.1.2/24", vxlan="10.244.2.0", mac="66:00:00:00:00:02")
    b2 = block("10.244.2.0/26", "n2")
    run(g, pool("p", "10.244.0.0/16", vxlan="Always"), node("n1", "172.31.1.1/24", vxlan="10.244.1.0"), n2, b2)
    out = run(g, delete(b2))
    assert out == [RemoteBlockRouteRemove(ipaddress.IPv4Network("10.244.2.0/26"))]
    out = run(g, b2)
    assert [type(m) for m in out] == [RemoteBlockRoute]
    out = run(g, delete(n2))
    assert out == [RemoteBlockRouteRemove(ipaddress.IPv4Network("10.244.2.0/26")), VtepRemove("n2")]


def test_bgp_pools_get_no_felix_routes_and_malformed_inputs_are_skipped() -> None:
    g = CalcGraph("n1")
    bad_node = Update(Key(KIND_NODE, "bad"), {"metadata": {"name": "bad"},
                                              "spec": {"bgp": {"ipv4Address": "not-an-ip"}}}, "1")
    bad_pool = Update(Key(KIND_IPPOOL, "badpool"), {"metadata": {"name": "badpool"}, "spec": {"cidr": "x"}}, "1")
    out = run(g, pool("p", "10.244.0.0/16", ipip="Always"), node("n1", "172.31.1.1/24"),
              node("n2", "172.31.1.2/24"), block("10.244.2.0/26", "n2"), bad_node, bad_pool)
    assert not [m for m in out if isinstance(m, RemoteBlockRoute | VtepUpdate)]
    host = next(m for m in out if isinstance(m, HostTunnelUpdate))
    assert host.ipip_enabled and not host.vxlan_enabled
    assert g.invalid_resources == 2
    # The pool going away is announced, and VXLAN stays off.
    out = run(g, delete(pool("p", "10.244.0.0/16")))
    assert IPPoolRemove(ipaddress.IPv4Network("10.244.0.0/16")) in out


def test_vtep_mac_matches_calico_derivation() -> None:
    mac = names.vtep_mac("node-a")
    assert mac.startswith("66:") and len(mac.split(":")) == 6
    assert names.vtep_mac("node-a") != names.vtep_mac("node-b")


def test_bgp_calc_full_mesh_and_announcements() -> None:
    from felixpy.calc.messages import BgpAnnounceUpdate, BgpConfigUpdate

    g = CalcGraph("n1", bgp_enabled=True)
    b1 = block("10.244.1.0/26", "n1")
    out = run(g, pool("p", "10.244.0.0/16"), node("n1", "172.31.1.1/24"), node("n2", "172.31.1.2/24"),
              node("n3", "172.31.1.3/24"), b1, block("10.244.2.0/26", "n2"))
    cfgs = [m for m in out if isinstance(m, BgpConfigUpdate)]
    assert len(cfgs) == 1 and cfgs[0].config is not None
    cfg = cfgs[0].config
    assert cfg.asn == 64512 and str(cfg.local_ip) == "172.31.1.1"
    assert sorted(str(p.address) for p in cfg.peers) == ["172.31.1.2", "172.31.1.3"]
    # Calico marks a mesh peer passive when its address sorts above ours: n1 waits for both to connect.
    assert all(p.passive for p in cfg.peers)
    anns = [m for m in out if isinstance(m, BgpAnnounceUpdate)]
    assert anns and anns[-1].prefixes == frozenset({ipaddress.IPv4Network("10.244.1.0/26")})
    # Releasing the block withdraws it; the peers are unchanged so no new config is emitted.
    out = run(g, delete(b1))
    assert [m for m in out if isinstance(m, BgpConfigUpdate)] == []
    assert [m for m in out if isinstance(m, BgpAnnounceUpdate)][-1].prefixes == frozenset()
    # Mesh off: no peers.
    out = run(g, Update(Key("BGPConfiguration", "default"), {"metadata": {"name": "default"},
                                                             "spec": {"nodeToNodeMeshEnabled": False}}, "3"))
    cfg2 = next(m for m in out if isinstance(m, BgpConfigUpdate)).config
    assert cfg2 is not None and cfg2.peers == ()
