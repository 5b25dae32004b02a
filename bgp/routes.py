"""Calico's BGP route rules (pure): what a node announces, and which learned routes reach its kernel.

**Export** (:func:`announcements`, confd's ``calico_export_to_bgp_peers`` + ``bird_aggr.cfg``): every
confirmed block affine to this node, whole (never the /32s inside it), except blocks inside a pool with
``disableBGPExport``; plus the BGPConfiguration service ranges, advertised whole from every node:
``serviceClusterIPs`` (or ``CALICO_ADVERTISE_CLUSTER_IPS``), ``serviceExternalIPs`` and, unless
``serviceLoadBalancerAggregation: Disabled``, ``serviceLoadBalancerIPs``; single-address (/32) external and
load-balancer entries are per-service routes, not global ones, so they are left out. A node labelled
``node.kubernetes.io/exclude-from-external-load-balancers=true`` advertises no service range.

**Import** (:func:`kernel_routes`, confd's ``filter calico_kernel_programming`` plus the import safety the
ExaBGP lab asked for, pitfall P9). ExaBGP has no FIB, so this is the whole decision of what the agent
installs. A learned ``prefix -> next hop`` becomes a kernel route only if:

* the prefix lies inside an IPv4 IP pool. Calico accepts prefixes outside every pool (its filter ends in
  ``accept``), relying on BIRD never overwriting routes it did not install. The agent writes routes with
  ``replace`` semantics, so a peer announcing, say, the node's own subnet would clobber the connected
  route (seen in the lab: the node lost its pod routes). Pool-only import makes that impossible: a peer can
  never touch connected, host, default or service routes;
* the pool is not VXLAN (Felix, here the route resolver, programs VXLAN routes itself);
* it is not inside a service range this node rejects (``reject_cidrs``: the service ranges confd turns
  into ``/calico/rejectcidrs``), and it is not one of this node's own blocks (the node owns those; a /32
  inside one, for an address borrowed by another node, is still accepted as in Calico);
* its next hop is usable: not this node's own address, not inside the prefix itself, not unspecified,
  loopback, multicast or broadcast.

The route shape follows the pool: IPIP ``Always`` -> ``via <next hop> dev tunl0 onlink``; ``CrossSubnet``
-> the same unless the next hop is in this node's subnet, then a plain route; ``Never`` -> ``via <next
hop>`` resolved by the kernel. Without a usable ``tunl0`` (``ipip_available`` false: no ipip module), a
next hop in this node's subnet still gets a plain route (reachable without encapsulation) and any other
is rejected, since unencapsulated pod traffic to another subnet would be dropped by the underlay.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from bgp.peers import BgpGlobal
from felixpy.datastore.api import Resource
from felixpy.ipam import pools as ipam_pools

__all__ = [
    "EXCLUDE_LB_LABEL",
    "IPIP_DEVICE",
    "KernelRoute",
    "PoolInfo",
    "announcements",
    "kernel_routes",
    "parse_pool",
    "pool_info",
    "service_cidrs",
]

IPIP_DEVICE = "tunl0"
EXCLUDE_LB_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
ENCAP_NEVER = ipam_pools.ENCAP_NEVER
ENCAP_ALWAYS = ipam_pools.ENCAP_ALWAYS
ENCAP_CROSS_SUBNET = ipam_pools.ENCAP_CROSS_SUBNET

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


class PoolLike(Protocol):
    """What the route rules read from a pool; both :class:`PoolInfo` and ``felixpy.ipam.pools.IPPool`` fit."""

    @property
    def cidr(self) -> IPNet: ...
    @property
    def ipip_mode(self) -> str: ...
    @property
    def vxlan_mode(self) -> str: ...
    @property
    def disable_bgp_export(self) -> bool: ...


@dataclass(frozen=True)
class PoolInfo:
    """An IP pool as the BGP rules see it (a slim view of ``felixpy.ipam.pools.IPPool``)."""

    cidr: IPNet
    ipip_mode: str = ENCAP_NEVER  # Always | CrossSubnet | Never
    vxlan_mode: str = ENCAP_NEVER
    nat_outgoing: bool = False
    disabled: bool = False
    disable_bgp_export: bool = False
    node_selector: str = "all()"
    block_size: int = ipam_pools.DEFAULT_BLOCK_SIZE_V4


def pool_info(pool: ipam_pools.IPPool) -> PoolInfo:
    return PoolInfo(cidr=pool.cidr, ipip_mode=pool.ipip_mode, vxlan_mode=pool.vxlan_mode,
                    nat_outgoing=pool.nat_outgoing, disabled=pool.disabled,
                    disable_bgp_export=pool.disable_bgp_export, node_selector=pool.node_selector,
                    block_size=pool.block_size)


def parse_pool(res: Resource) -> PoolInfo:
    """IPAM's validating parser (raises ``InvalidPoolError``, a ValueError), as a :class:`PoolInfo`."""
    return pool_info(ipam_pools.parse_pool(res))


@dataclass(frozen=True)
class KernelRoute:
    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    device: str | None  # None = let the kernel resolve the next hop through the underlay
    onlink: bool


# ------------------------------------------------------------------------------------------- export


def _v4(nets: Iterable[IPNet]) -> list[ipaddress.IPv4Network]:
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def _ranges(cidrs: Iterable[IPNet]) -> list[ipaddress.IPv4Network]:
    """Service ranges advertised from every node: single addresses are per-service routes instead."""
    return [n for n in _v4(cidrs) if n.prefixlen < 32]


def announcements(
    local_blocks: Iterable[ipaddress.IPv4Network],
    pools: Sequence[PoolLike],
    global_cfg: BgpGlobal | None,
    *,
    exclude_services: bool = False,
    cluster_ips_override: Sequence[ipaddress.IPv4Network] | None = None,
) -> set[ipaddress.IPv4Network]:
    """Every IPv4 prefix this node announces. ``local_blocks`` are its confirmed affine blocks;
    ``exclude_services`` is true when the node carries :data:`EXCLUDE_LB_LABEL` = ``true``;
    ``cluster_ips_override`` is ``CALICO_ADVERTISE_CLUSTER_IPS`` (it replaces ``serviceClusterIPs``)."""
    out: set[ipaddress.IPv4Network] = {b for b in local_blocks if b.version == 4}
    if global_cfg is not None and not exclude_services:
        if cluster_ips_override is not None:
            out.update(_v4(cluster_ips_override))
        else:
            out.update(_v4(global_cfg.service_cluster_ips))
        out.update(_ranges(global_cfg.service_external_ips))
        if global_cfg.service_lb_aggregation:
            out.update(_ranges(global_cfg.service_load_balancer_ips))
    # calico_export_to_bgp_peers rejects anything inside a non-exported pool before accepting the rest.
    blocked = [p.cidr for p in pools if p.disable_bgp_export and isinstance(p.cidr, ipaddress.IPv4Network)]
    return {n for n in out if not any(n.subnet_of(b) for b in blocked)}


def service_cidrs(global_cfg: BgpGlobal | None) -> set[ipaddress.IPv4Network]:
    """Every configured IPv4 service range (single addresses too): never installed from a peer, whatever
    this node advertises (Calico's reject CIDRs; including /32s is the stricter choice)."""
    if global_cfg is None:
        return set()
    return set(_v4((*global_cfg.service_cluster_ips, *global_cfg.service_external_ips,
                    *global_cfg.service_load_balancer_ips)))


# ------------------------------------------------------------------------------------------- import


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _bad_next_hop(nh: ipaddress.IPv4Address) -> bool:
    return nh.is_unspecified or nh.is_loopback or nh.is_multicast or nh == _BROADCAST


def _pool_for(prefix: ipaddress.IPv4Network, pools: Sequence[PoolLike]) -> PoolLike | None:
    best: PoolLike | None = None
    for p in pools:
        c = p.cidr
        if isinstance(c, ipaddress.IPv4Network) and prefix.subnet_of(c) and (
                best is None or c.prefixlen > best.cidr.prefixlen):
            best = p  # the most specific pool decides, for nested pools
    return best


def kernel_routes(
    learned: Mapping[ipaddress.IPv4Network, ipaddress.IPv4Address],
    pools: Sequence[PoolLike],
    *,
    my_subnet: ipaddress.IPv4Interface | None,
    local_blocks: Iterable[ipaddress.IPv4Network],
    reject_cidrs: Iterable[ipaddress.IPv4Network],
    ipip_available: bool,
    my_addresses: Iterable[ipaddress.IPv4Address] = (),
    rejected: MutableMapping[ipaddress.IPv4Network, str] | None = None,
) -> dict[ipaddress.IPv4Network, KernelRoute]:
    """The kernel routes for the learned ``prefix -> next hop`` map (see the module docstring).

    ``my_subnet`` is this node's address with its subnet (Node ``spec.bgp.ipv4Address``); ``my_addresses``
    any other addresses of this node. If ``rejected`` is given, it receives ``prefix -> reason`` for every
    learned route left out (for logs and status)."""
    own = set(my_addresses)
    if my_subnet is not None:
        own.add(my_subnet.ip)
    blocks = set(local_blocks)
    rejects = [r for r in reject_cidrs if r.version == 4]
    out: dict[ipaddress.IPv4Network, KernelRoute] = {}

    def no(prefix: ipaddress.IPv4Network, why: str) -> None:
        if rejected is not None:
            rejected[prefix] = why

    for prefix, nh in learned.items():
        if prefix.version != 4 or nh.version != 4:
            no(prefix, "not IPv4")
            continue
        if _bad_next_hop(nh):
            no(prefix, f"unusable next hop {nh}")
            continue
        if nh in own:
            no(prefix, f"next hop {nh} is this node")
            continue
        if nh in prefix:
            no(prefix, f"next hop {nh} is inside the prefix")
            continue
        if any(prefix.subnet_of(r) for r in rejects):
            no(prefix, "inside a service range")
            continue
        if prefix in blocks:
            no(prefix, "one of this node's own blocks")
            continue
        pool = _pool_for(prefix, pools)
        if pool is None:
            no(prefix, "outside every IP pool")
            continue
        if pool.vxlan_mode != ENCAP_NEVER:
            no(prefix, "in a VXLAN pool (programmed from the datastore, not BGP)")
            continue
        same_subnet = my_subnet is not None and nh in my_subnet.network
        tunnel = pool.ipip_mode == ENCAP_ALWAYS or (pool.ipip_mode == ENCAP_CROSS_SUBNET and not same_subnet)
        if tunnel and ipip_available:
            out[prefix] = KernelRoute(prefix, nh, IPIP_DEVICE, True)
        elif tunnel and not same_subnet:
            no(prefix, f"IPIP pool but no {IPIP_DEVICE}, and next hop {nh} is not in this node's subnet")
        else:
            out[prefix] = KernelRoute(prefix, nh, None, False)
    return out
