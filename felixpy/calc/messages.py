"""Dataplane messages: the plain, serialisable output of the calculation layer."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bgp.model import LocalBgpConfig
from felixpy.datastore.api import Key
from felixpy.model.policy import (
    ActivePolicyRemove,
    ActivePolicyUpdate,
    ActiveProfileRemove,
    ActiveProfileUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    IPSetDeltaUpdate,
    IPSetRemove,
    IPSetUpdate,
)


@dataclass(frozen=True)
class WorkloadEndpointUpdate:
    key: Key
    iface: str
    ipv4_nets: tuple[ipaddress.IPv4Network, ...]
    mac: str
    container_id: str


@dataclass(frozen=True)
class WorkloadEndpointRemove:
    key: Key


@dataclass(frozen=True)
class LocalBlockUpdate:
    """An IPAM block affine to this node: gets a blackhole route so unused addresses never leak out."""

    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LocalBlockRemove:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class InSync:
    """The datastore view is complete: drivers may now remove stale kernel objects they own."""


@dataclass(frozen=True)
class HostTunnelUpdate:
    """This node's own routing identity and which encapsulations are on (Calico's encapsulation
    resolver: an encapsulation is on when any pool uses it)."""

    node_ip: ipaddress.IPv4Interface | None
    vxlan_enabled: bool
    vxlan_tunnel_ip: ipaddress.IPv4Address | None
    vxlan_mac: str
    ipip_enabled: bool
    ipip_tunnel_ip: ipaddress.IPv4Address | None


@dataclass(frozen=True)
class VtepUpdate:
    """A remote node's VXLAN tunnel endpoint: ARP for tunnel_ip -> mac, FDB mac -> node_ip."""

    node: str
    tunnel_ip: ipaddress.IPv4Address
    mac: str
    node_ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class VtepRemove:
    node: str


ROUTE_VXLAN = "vxlan"  # <block> via <remote tunnel IP> dev vxlan.calico onlink
ROUTE_NOENCAP = "noencap"  # <block> via <remote node IP> dev <parent> onlink (CrossSubnet, same subnet)


@dataclass(frozen=True)
class RemoteBlockRoute:
    """A route to a remote node's block that Felix (not BGP) programs: VXLAN pools."""

    dst: ipaddress.IPv4Network
    kind: str  # ROUTE_VXLAN | ROUTE_NOENCAP
    gateway: ipaddress.IPv4Address
    node: str


@dataclass(frozen=True)
class RemoteBlockRouteRemove:
    dst: ipaddress.IPv4Network


@dataclass(frozen=True)
class IPPoolUpdate:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    nat_outgoing: bool
    disabled: bool
    ipip_mode: str
    vxlan_mode: str
    disable_bgp_export: bool = False


@dataclass(frozen=True)
class IPPoolRemove:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BgpRoutesUpdate:
    """Every route learned over BGP that passed the import rules, as (dst, next hop, device, onlink);
    a full snapshot (the speaker's RIB is small and replaced wholesale)."""

    routes: tuple[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address, str | None, bool], ...]


@dataclass(frozen=True)
class BgpConfigUpdate:
    """Control plane (not dataplane): the BGP speaker's identity and sessions, None = no BGP here."""

    config: LocalBgpConfig | None


@dataclass(frozen=True)
class BgpAnnounceUpdate:
    """Control plane: every prefix this node should announce (affine blocks, service ranges)."""

    prefixes: frozenset[ipaddress.IPv4Network]
    reject_cidrs: frozenset[ipaddress.IPv4Network] = frozenset()  # never installed from peers (services)


CONTROL_PLANE_MESSAGES = (BgpConfigUpdate, BgpAnnounceUpdate)

Message = (WorkloadEndpointUpdate | WorkloadEndpointRemove | LocalBlockUpdate | LocalBlockRemove | InSync
           | HostTunnelUpdate | VtepUpdate | VtepRemove | RemoteBlockRoute | RemoteBlockRouteRemove
           | IPPoolUpdate | IPPoolRemove | BgpRoutesUpdate | BgpConfigUpdate | BgpAnnounceUpdate
           # Policy (felixpy.model.policy, from felixpy.calc.policy):
           | IPSetUpdate | IPSetDeltaUpdate | IPSetRemove | ActivePolicyUpdate | ActivePolicyRemove
           | ActiveProfileUpdate | ActiveProfileRemove | EndpointPolicyUpdate | EndpointPolicyRemove)
