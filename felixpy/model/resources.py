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
