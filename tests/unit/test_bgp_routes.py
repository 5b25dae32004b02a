"""Calico's BGP route rules (bgp.routes): what a node announces and which learned routes it installs."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from bgp.peers import parse_bgp_configuration
from bgp.routes import (
    IPIP_DEVICE,
    KernelRoute,
    PoolInfo,
    announcements,
    kernel_routes,
    parse_pool,
    pool_info,
    service_cidrs,
)
from felixpy.ipam.pools import InvalidPoolError, IPPool

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
MY = ipaddress.IPv4Interface("192.168.1.10/24")


def pool(cidr: str, **kw: Any) -> PoolInfo:
    return PoolInfo(cidr=N(cidr), **kw)


def gcfg(**spec: Any) -> Any:
    return parse_bgp_configuration({"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": spec})


def test_parse_pool_reuses_ipam_validation() -> None:
    p = parse_pool({"kind": "IPPool", "metadata": {"name": "p"},
                    "spec": {"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet", "natOutgoing": True,
                             "disableBGPExport": True, "blockSize": 24}})
    assert p == PoolInfo(cidr=N("10.244.0.0/16"), ipip_mode="CrossSubnet", nat_outgoing=True,
                         disable_bgp_export=True, block_size=24)
    with pytest.raises(InvalidPoolError):
        parse_pool({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.244.0.0/16", "ipipMode": "x"}})
    assert issubclass(InvalidPoolError, ValueError)
    ip_pool = IPPool(name="p", cidr=N("10.1.0.0/16"), block_size=26, vxlan_mode="Always", disabled=True)
    assert pool_info(ip_pool) == PoolInfo(cidr=N("10.1.0.0/16"), vxlan_mode="Always", disabled=True)


# ------------------------------------------------------------------------------------------- export


def test_announces_local_blocks_except_non_exported_pools() -> None:
    pools = [pool("10.244.0.0/16"), pool("10.250.0.0/16", disable_bgp_export=True)]
    blocks = [N("10.244.1.0/26"), N("10.250.3.0/26"), N("10.99.0.0/26")]
    # A block outside every pool is still announced: calico_aggr accepts it before the pool checks.
    assert announcements(blocks, pools, None) == {N("10.244.1.0/26"), N("10.99.0.0/26")}


def test_announces_service_ranges() -> None:
    g = gcfg(serviceClusterIPs=[{"cidr": "10.96.0.0/12"}, {"cidr": "fd00::/108"}],
             serviceExternalIPs=[{"cidr": "203.0.113.0/24"}, {"cidr": "203.0.113.77/32"}],
             serviceLoadBalancerIPs=[{"cidr": "198.51.100.0/24"}, {"cidr": "198.51.100.9/32"}])
    got = announcements([N("10.244.1.0/26")], [], g)
    # Single addresses are per-service routes (only where the service has endpoints), never global.
    assert got == {N("10.244.1.0/26"), N("10.96.0.0/12"), N("203.0.113.0/24"), N("198.51.100.0/24")}


def test_lb_aggregation_disabled_and_excluded_nodes() -> None:
    g = gcfg(serviceClusterIPs=[{"cidr": "10.96.0.0/12"}], serviceLoadBalancerIPs=[{"cidr": "198.51.100.0/24"}],
             serviceLoadBalancerAggregation="Disabled")
    assert announcements([], [], g) == {N("10.96.0.0/12")}
    assert announcements([N("10.244.1.0/26")], [], g, exclude_services=True) == {N("10.244.1.0/26")}


def test_cluster_ips_override() -> None:
    g = gcfg(serviceClusterIPs=[{"cidr": "10.96.0.0/12"}])
    assert announcements([], [], g, cluster_ips_override=[N("10.100.0.0/16")]) == {N("10.100.0.0/16")}


def test_service_cidrs_reject_everything_configured() -> None:
    g = gcfg(serviceClusterIPs=[{"cidr": "10.96.0.0/12"}], serviceExternalIPs=[{"cidr": "203.0.113.77/32"}],
             serviceLoadBalancerIPs=[{"cidr": "fd00::/64"}])
    assert service_cidrs(g) == {N("10.96.0.0/12"), N("203.0.113.77/32")}
    assert service_cidrs(None) == set()


# ------------------------------------------------------------------------------------------- import

NEVER = [pool("10.244.0.0/16")]


def kr(learned: dict[str, str], pools: Any = NEVER, *, subnet: ipaddress.IPv4Interface | None = MY,
       ipip: bool = True, blocks: tuple[str, ...] = (), rejects: tuple[str, ...] = (),
       why: dict[N, str] | None = None) -> dict[N, KernelRoute]:
    return kernel_routes({N(k): A(v) for k, v in learned.items()}, pools, my_subnet=subnet,
                         local_blocks=[N(b) for b in blocks], reject_cidrs=[N(r) for r in rejects],
                         ipip_available=ipip, rejected=why)


def test_no_encapsulation_pool_plain_route() -> None:
    assert kr({"10.244.2.0/26": "192.168.1.11"}) == {
        N("10.244.2.0/26"): KernelRoute(N("10.244.2.0/26"), A("192.168.1.11"), None, False)}


def test_ipip_always_goes_through_tunl0_onlink() -> None:
    got = kr({"10.244.2.0/26": "192.168.1.11"}, [pool("10.244.0.0/16", ipip_mode="Always")])
    assert got[N("10.244.2.0/26")] == KernelRoute(N("10.244.2.0/26"), A("192.168.1.11"), IPIP_DEVICE, True)


def test_ipip_cross_subnet() -> None:
    pools = [pool("10.244.0.0/16", ipip_mode="CrossSubnet")]
    got = kr({"10.244.2.0/26": "192.168.1.11", "10.244.3.0/26": "192.168.2.11"}, pools)
    assert got[N("10.244.2.0/26")].device is None  # same subnet: no tunnel
    assert got[N("10.244.3.0/26")] == KernelRoute(N("10.244.3.0/26"), A("192.168.2.11"), IPIP_DEVICE, True)
    # Without knowing our own subnet, every next hop is "another subnet".
    assert kr({"10.244.2.0/26": "192.168.1.11"}, pools, subnet=None)[N("10.244.2.0/26")].device == IPIP_DEVICE


def test_ipip_without_tunl0() -> None:
    why: dict[N, str] = {}
    got = kr({"10.244.2.0/26": "192.168.1.11", "10.244.3.0/26": "192.168.2.11"},
             [pool("10.244.0.0/16", ipip_mode="Always")], ipip=False, why=why)
    assert got == {N("10.244.2.0/26"): KernelRoute(N("10.244.2.0/26"), A("192.168.1.11"), None, False)}
    assert "no tunl0" in why[N("10.244.3.0/26")]


def test_vxlan_pools_are_not_bgp_routed() -> None:
    why: dict[N, str] = {}
    assert kr({"10.244.2.0/26": "192.168.1.11"}, [pool("10.244.0.0/16", vxlan_mode="Always")], why=why) == {}
    assert "VXLAN" in why[N("10.244.2.0/26")]


def test_import_safety_p9_nothing_outside_the_pools() -> None:
    # A reflector exporting its connected subnet, a default route, a host route: none may reach the kernel.
    why: dict[N, str] = {}
    learned = {"192.168.1.0/24": "192.168.2.254", "0.0.0.0/0": "192.168.1.254", "192.168.1.254/32": "192.168.1.11",
               "10.0.0.0/8": "192.168.1.11", "10.244.2.0/26": "192.168.1.11"}
    got = kr(learned, why=why)
    assert list(got) == [N("10.244.2.0/26")]
    assert why[N("192.168.1.0/24")] == "outside every IP pool"
    assert why[N("10.0.0.0/8")] == "outside every IP pool"  # covering a pool is not being inside one


def test_service_ranges_and_own_blocks_rejected() -> None:
    why: dict[N, str] = {}
    learned = {"10.244.96.0/20": "192.168.1.11", "10.244.1.0/26": "192.168.1.11", "10.244.1.7/32": "192.168.1.12"}
    got = kr(learned, blocks=("10.244.1.0/26",), rejects=("10.244.96.0/19",), why=why)
    assert why[N("10.244.96.0/20")] == "inside a service range"
    assert why[N("10.244.1.0/26")] == "one of this node's own blocks"
    assert list(got) == [N("10.244.1.7/32")]  # an address borrowed by another node, as in Calico


@pytest.mark.parametrize("nh, reason", [
    ("192.168.1.10", "is this node"), ("10.9.9.9", "is this node"), ("0.0.0.0", "unusable"),
    ("127.0.0.1", "unusable"), ("224.0.0.5", "unusable"), ("255.255.255.255", "unusable"),
    ("10.244.2.1", "inside the prefix"),
])
def test_bad_next_hops(nh: str, reason: str) -> None:
    why: dict[N, str] = {}
    got = kernel_routes({N("10.244.2.0/26"): A(nh)}, NEVER, my_subnet=MY, local_blocks=[], reject_cidrs=[],
                        ipip_available=True, my_addresses=[A("10.9.9.9")], rejected=why)
    assert got == {}
    assert reason in why[N("10.244.2.0/26")]


def test_most_specific_pool_decides() -> None:
    pools = [pool("10.244.0.0/16", ipip_mode="Always"), pool("10.244.128.0/17", vxlan_mode="Always")]
    got = kr({"10.244.2.0/26": "192.168.1.11", "10.244.130.0/26": "192.168.1.11"}, pools)
    assert list(got) == [N("10.244.2.0/26")]


def test_accepts_ipam_pool_objects_and_ignores_ipv6_pools() -> None:
    pools = [IPPool(name="v6", cidr=ipaddress.ip_network("fd00::/48"), block_size=122),
             IPPool(name="v4", cidr=N("10.244.0.0/16"), block_size=26, ipip_mode="Always")]
    got = kr({"10.244.2.0/26": "192.168.1.11"}, pools)
    assert got[N("10.244.2.0/26")].device == IPIP_DEVICE
