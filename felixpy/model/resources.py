"""Typed, validated views of the v3 resources the calculation layer consumes (pure code).

Each ``parse_*`` raises :class:`InvalidResource` with a clear message; the calculation layer logs it and
treats the object as absent, so one malformed resource never stops the agent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from felixpy.datastore.api import Resource


class InvalidResource(ValueError):
    pass


def _spec(res: Resource) -> dict[str, Any]:
    spec = res.get("spec")
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise InvalidResource("spec is not an object")
    return spec


def _labels(res: Resource) -> dict[str, str]:
    md = res.get("metadata") or {}
    labels = md.get("labels") or {}
    if not isinstance(labels, dict):
        raise InvalidResource("metadata.labels is not an object")
    return {str(k): str(v) for k, v in labels.items()}


@dataclass(frozen=True)
class WorkloadEndpoint:
    namespace: str
    name: str
    node: str
    pod: str
    container_id: str
    iface: str
    ipv4_nets: tuple[ipaddress.IPv4Network, ...]
    ipv6_nets: tuple[ipaddress.IPv6Network, ...]
    mac: str
    profiles: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]


def parse_wep(res: Resource) -> WorkloadEndpoint:
    spec = _spec(res)
    md = res.get("metadata") or {}
    iface = spec.get("interfaceName", "")
    if not isinstance(iface, str) or not iface or len(iface) > 15 or "/" in iface:
        raise InvalidResource(f"invalid interfaceName {iface!r}")
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    nets = spec.get("ipNetworks") or []
    if not isinstance(nets, list):
        raise InvalidResource("ipNetworks is not a list")
    for n in nets:
        try:
            net = ipaddress.ip_network(str(n), strict=False)
        except ValueError as e:
            raise InvalidResource(f"invalid ipNetworks entry {n!r}: {e}") from None
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    profiles = spec.get("profiles") or []
    if not isinstance(profiles, list):
        raise InvalidResource("profiles is not a list")
    return WorkloadEndpoint(
        namespace=str(md.get("namespace", "")), name=str(md.get("name", "")),
        node=str(spec.get("node", "")), pod=str(spec.get("pod", "")),
        container_id=str(spec.get("containerID", "")), iface=iface,
        ipv4_nets=tuple(v4), ipv6_nets=tuple(v6), mac=str(spec.get("mac", "") or ""),
        profiles=tuple(str(p) for p in profiles), labels=tuple(sorted(_labels(res).items())),
    )


@dataclass(frozen=True)
class BlockInfo:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    affinity_node: str  # "" when not host-affine
    deleted: bool


def parse_block(res: Resource) -> BlockInfo:
    spec = _spec(res)
    try:
        cidr = ipaddress.ip_network(str(spec.get("cidr", "")), strict=True)
    except ValueError as e:
        raise InvalidResource(f"invalid block cidr: {e}") from None
    aff = spec.get("affinity") or ""
    node = aff[5:] if isinstance(aff, str) and aff.startswith("host:") else ""
    return BlockInfo(cidr=cidr, affinity_node=node, deleted=bool(spec.get("deleted", False)))


@dataclass(frozen=True)
class NodeInfo:
    """The parts of a Calico Node that routing needs (spec.bgp, tunnel addresses, labels)."""

    name: str
    ipv4: ipaddress.IPv4Interface | None  # spec.bgp.ipv4Address: node IP with its subnet's prefix
    asn: int | None
    rr_cluster_id: str
    vxlan_tunnel_ip: ipaddress.IPv4Address | None
    vxlan_mac: str  # spec.vxlanTunnelMACAddr, or "" (then derived from the name, see vtep_mac)
    ipip_tunnel_ip: ipaddress.IPv4Address | None
    labels: tuple[tuple[str, str], ...]


def _opt_addr(value: Any, what: str) -> ipaddress.IPv4Address | None:
    if value in (None, ""):
        return None
    try:
        # Calico stores tunnel addresses bare; tolerate a /32 suffix.
        return ipaddress.IPv4Interface(str(value)).ip
    except ValueError as e:
        raise InvalidResource(f"invalid {what} {value!r}: {e}") from None


def parse_node(res: Resource) -> NodeInfo:
    spec = _spec(res)
    md = res.get("metadata") or {}
    name = str(md.get("name", "") or "")
    if not name:
        raise InvalidResource("Node has no name")
    bgp = spec.get("bgp") or {}
    if not isinstance(bgp, dict):
        raise InvalidResource("spec.bgp is not an object")
    ipv4: ipaddress.IPv4Interface | None = None
    if bgp.get("ipv4Address"):
        try:
            ipv4 = ipaddress.IPv4Interface(str(bgp["ipv4Address"]))
        except ValueError as e:
            raise InvalidResource(f"invalid spec.bgp.ipv4Address {bgp['ipv4Address']!r}: {e}") from None
    asn_raw = bgp.get("asNumber")
    asn: int | None = None
    if asn_raw not in (None, "", 0):
        asn = parse_asn(asn_raw)
    mac = str(spec.get("vxlanTunnelMACAddr", "") or "").lower()
    return NodeInfo(
        name=name, ipv4=ipv4, asn=asn, rr_cluster_id=str(bgp.get("routeReflectorClusterID", "") or ""),
        vxlan_tunnel_ip=_opt_addr(spec.get("ipv4VXLANTunnelAddr"), "spec.ipv4VXLANTunnelAddr"),
        vxlan_mac=mac, ipip_tunnel_ip=_opt_addr(bgp.get("ipv4IPIPTunnelAddr"), "spec.bgp.ipv4IPIPTunnelAddr"),
        labels=tuple(sorted(_labels(res).items())),
    )


def parse_asn(value: Any) -> int:
    """A BGP AS number: an integer, or asdot ("1.10" = 1*65536 + 10) as Calico accepts."""
    text = str(value).strip()
    try:
        if "." in text:
            hi, lo = text.split(".", 1)
            n = (int(hi) << 16) + int(lo)
        else:
            n = int(text)
    except ValueError:
        raise InvalidResource(f"invalid AS number {value!r}") from None
    if not 0 < n < 1 << 32:
        raise InvalidResource(f"AS number {value!r} is out of range")
    return n
