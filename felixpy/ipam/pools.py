"""IP pools: a validated view of IPPool resources and calico-node's default-pool rule.

:func:`parse_pool` raises :class:`InvalidPoolError` for a malformed pool so callers can log it and skip
that pool (one bad pool never blocks allocation from the good ones).
:func:`ensure_default_pool` is calico-node startup's ``configureIPPools`` for IPv4: it creates
``default-ipv4-ippool`` from the ``CALICO_IPV4POOL_*`` settings only when no IPv4 pool exists at all
(a disabled IPv4 pool counts: the admin removed the default on purpose).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from felixpy.datastore.api import KIND_IPPOOL, AlreadyExists, Backend, Key, Resource, new_resource
from felixpy.ipam.block import IPNetwork
from felixpy.ipam.errors import IPAMError
from felixpy.model.selector import SelectorError, parse_selector

log = logging.getLogger(__name__)

DEFAULT_IPV4_POOL_NAME = "default-ipv4-ippool"
DEFAULT_IPV6_POOL_NAME = "default-ipv6-ippool"
DEFAULT_BLOCK_SIZE_V4 = 26
DEFAULT_BLOCK_SIZE_V6 = 122

ENCAP_NEVER = "Never"
ENCAP_ALWAYS = "Always"
ENCAP_CROSS_SUBNET = "CrossSubnet"
_ENCAP_MODES = (ENCAP_NEVER, ENCAP_ALWAYS, ENCAP_CROSS_SUBNET)

USE_WORKLOAD = "Workload"
USE_TUNNEL = "Tunnel"
USE_LOAD_BALANCER = "LoadBalancer"
_USES = (USE_WORKLOAD, USE_TUNNEL, USE_LOAD_BALANCER)

ASSIGN_AUTOMATIC = "Automatic"
ASSIGN_MANUAL = "Manual"

# Calico's validator limits (libcalico-go/lib/validator/v3): blocks of /20../32 (v4), /116../128 (v6).
_BLOCK_RANGE = {4: (20, 32), 6: (116, 128)}
_LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}


class InvalidPoolError(IPAMError, ValueError):
    """A malformed IPPool resource, or bad default-pool settings."""


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: IPNetwork
    block_size: int
    ipip_mode: str = ENCAP_NEVER
    vxlan_mode: str = ENCAP_NEVER
    nat_outgoing: bool = False
    disabled: bool = False
    disable_bgp_export: bool = False
    node_selector: str = "all()"
    namespace_selector: str = ""
    allowed_uses: tuple[str, ...] = (USE_WORKLOAD, USE_TUNNEL)
    assignment_mode: str = ASSIGN_AUTOMATIC

    @property
    def version(self) -> int:
        return self.cidr.version

    def allows(self, use: str) -> bool:
        return use in self.allowed_uses

    def selects_node(self, labels: Mapping[str, str]) -> bool:
        """Raises :class:`InvalidPoolError` if the selector does not parse (never for a parsed pool)."""
        return _selects(self.node_selector, labels, self.name, "nodeSelector")

    def selects_namespace(self, labels: Mapping[str, str]) -> bool:
        return _selects(self.namespace_selector, labels, self.name, "namespaceSelector")

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "cidr": str(self.cidr), "blockSize": self.block_size, "ipipMode": self.ipip_mode,
            "vxlanMode": self.vxlan_mode, "natOutgoing": self.nat_outgoing,
            "nodeSelector": self.node_selector, "allowedUses": list(self.allowed_uses),
            "assignmentMode": self.assignment_mode,
        }
        if self.disabled:
            spec["disabled"] = True
        if self.disable_bgp_export:
            spec["disableBGPExport"] = True
        if self.namespace_selector:
            spec["namespaceSelector"] = self.namespace_selector
        return spec


def _selects(text: str, labels: Mapping[str, str], pool: str, what: str) -> bool:
    if not text.strip() or text.strip() == "all()":
        return True
    try:
        return bool(parse_selector(text).matches(labels))
    except SelectorError as e:
        raise InvalidPoolError(f"IPPool {pool}: invalid {what} {text!r}: {e}") from None


def _bool(spec: Mapping[str, Any], field: str, name: str) -> bool:
    v = spec.get(field, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidPoolError(f"IPPool {name}: {field} must be a boolean, got {v!r}")
    return v


def _encap(spec: Mapping[str, Any], field: str, name: str) -> str:
    v = spec.get(field) or ENCAP_NEVER
    if v not in _ENCAP_MODES:
        raise InvalidPoolError(f"IPPool {name}: {field} must be one of {', '.join(_ENCAP_MODES)}, got {v!r}")
    return str(v)


def _check_net(net: IPNetwork, block_size: int, where: str) -> None:
    lo, hi = _BLOCK_RANGE[net.version]
    if not lo <= block_size <= hi:
        raise InvalidPoolError(f"{where}: block size {block_size} is outside {lo}..{hi} for IPv{net.version}")
    if net.prefixlen > block_size:
        raise InvalidPoolError(f"{where}: the pool {net} is smaller than one block (/{block_size}); "
                               f"use a block size of at least {net.prefixlen}")
    if net.overlaps(_LINK_LOCAL[net.version]):  # type: ignore[arg-type]
        raise InvalidPoolError(f"{where}: {net} overlaps the link-local range {_LINK_LOCAL[net.version]}")
    if net.is_multicast or net.is_loopback:
        raise InvalidPoolError(f"{where}: {net} is a multicast or loopback range")


def parse_pool(resource: Resource) -> IPPool:
    md = resource.get("metadata") or {}
    name = str(md.get("name", "") or "") if isinstance(md, dict) else ""
    kind = resource.get("kind")
    if kind not in (None, "", KIND_IPPOOL):
        raise InvalidPoolError(f"{name or 'resource'} is a {kind}, not an IPPool")
    spec = resource.get("spec")
    if not isinstance(spec, dict):
        raise InvalidPoolError(f"IPPool {name}: spec is missing or not an object")
    raw_cidr = spec.get("cidr")
    try:
        net = ipaddress.ip_network(str(raw_cidr), strict=False)
    except ValueError as e:
        raise InvalidPoolError(f"IPPool {name}: invalid cidr {raw_cidr!r}: {e}") from None
    bs = spec.get("blockSize")
    if bs in (None, 0):
        bs = DEFAULT_BLOCK_SIZE_V4 if net.version == 4 else DEFAULT_BLOCK_SIZE_V6
    if not isinstance(bs, int) or isinstance(bs, bool):
        raise InvalidPoolError(f"IPPool {name}: blockSize must be an integer, got {bs!r}")
    _check_net(net, bs, f"IPPool {name}")
    ipip = _encap(spec, "ipipMode", name)
    vxlan = _encap(spec, "vxlanMode", name)
    if ipip != ENCAP_NEVER and vxlan != ENCAP_NEVER:
        raise InvalidPoolError(f"IPPool {name}: ipipMode and vxlanMode cannot both be enabled")
    if ipip != ENCAP_NEVER and net.version == 6:
        raise InvalidPoolError(f"IPPool {name}: IPIP is not supported on an IPv6 pool")
    node_sel = spec.get("nodeSelector") or "all()"
    ns_sel = spec.get("namespaceSelector") or ""
    for field, text in (("nodeSelector", node_sel), ("namespaceSelector", ns_sel)):
        if not isinstance(text, str):
            raise InvalidPoolError(f"IPPool {name}: {field} must be a string")
        _selects(text, {}, name, field)  # validates the syntax once, here
    uses_raw = spec.get("allowedUses") or [USE_WORKLOAD, USE_TUNNEL]
    if not isinstance(uses_raw, list) or any(u not in _USES for u in uses_raw):
        raise InvalidPoolError(f"IPPool {name}: allowedUses must be a list of {', '.join(_USES)}, "
                               f"got {uses_raw!r}")
    mode = spec.get("assignmentMode") or ASSIGN_AUTOMATIC
    if mode not in (ASSIGN_AUTOMATIC, ASSIGN_MANUAL):
        raise InvalidPoolError(f"IPPool {name}: assignmentMode must be Automatic or Manual, got {mode!r}")
    return IPPool(
        name=name, cidr=net, block_size=bs, ipip_mode=ipip, vxlan_mode=vxlan,
        nat_outgoing=_bool(spec, "natOutgoing", name), disabled=_bool(spec, "disabled", name),
        disable_bgp_export=_bool(spec, "disableBGPExport", name), node_selector=node_sel,
        namespace_selector=ns_sel, allowed_uses=tuple(dict.fromkeys(uses_raw)), assignment_mode=mode,
    )


def parse_encap_mode(value: str, env_name: str) -> str:
    """calico-node's reading of CALICO_IPV4POOL_IPIP / _VXLAN: case-insensitive, ``off`` = Never."""
    v = value.strip().lower()
    if v in ("", "off", "never"):
        return ENCAP_NEVER
    if v == "always":
        return ENCAP_ALWAYS
    if v in ("crosssubnet", "cross-subnet"):
        return ENCAP_CROSS_SUBNET
    raise InvalidPoolError(f"{env_name}: unrecognised mode {value!r} (expected Always, CrossSubnet or Never)")


def default_ipv4_pool(*, cidr: str, block_size: int = DEFAULT_BLOCK_SIZE_V4, ipip_mode: str = ENCAP_NEVER,
                      vxlan_mode: str = ENCAP_NEVER, nat_outgoing: bool = True, node_selector: str = "all()",
                      disable_bgp_export: bool = False) -> IPPool:
    """Validate the CALICO_IPV4POOL_* settings into the pool calico-node would create (pure)."""
    try:
        # Host bits are masked off, as calico-node's ParseCIDR does.
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError as e:
        raise InvalidPoolError(f"CALICO_IPV4POOL_CIDR: invalid CIDR {cidr!r}: {e}") from None
    if net.version != 4:
        raise InvalidPoolError(f"CALICO_IPV4POOL_CIDR: {cidr!r} is not an IPv4 CIDR")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise InvalidPoolError(f"CALICO_IPV4POOL_BLOCK_SIZE: expected an integer, got {block_size!r}")
    _check_net(net, block_size, "CALICO_IPV4POOL_CIDR/CALICO_IPV4POOL_BLOCK_SIZE")
    ipip = parse_encap_mode(ipip_mode, "CALICO_IPV4POOL_IPIP")
    vxlan = parse_encap_mode(vxlan_mode, "CALICO_IPV4POOL_VXLAN")
    if ipip != ENCAP_NEVER and vxlan != ENCAP_NEVER:
        raise InvalidPoolError("CALICO_IPV4POOL_IPIP and CALICO_IPV4POOL_VXLAN cannot both be enabled")
    sel = node_selector.strip() or "all()"
    try:
        parse_selector(sel)
    except SelectorError as e:
        raise InvalidPoolError(f"CALICO_IPV4POOL_NODE_SELECTOR: invalid selector {sel!r}: {e}") from None
    return IPPool(name=DEFAULT_IPV4_POOL_NAME, cidr=net, block_size=block_size, ipip_mode=ipip,
                  vxlan_mode=vxlan, nat_outgoing=nat_outgoing, node_selector=sel,
                  disable_bgp_export=disable_bgp_export)


def _pool_version(res: Resource) -> int | None:
    spec = res.get("spec")
    if not isinstance(spec, dict):
        return None
    try:
        return ipaddress.ip_network(str(spec.get("cidr")), strict=False).version
    except ValueError:
        return None


async def ensure_default_pool(backend: Backend, *, cidr: str, block_size: int = DEFAULT_BLOCK_SIZE_V4,
                              ipip_mode: str = ENCAP_NEVER, vxlan_mode: str = ENCAP_NEVER,
                              nat_outgoing: bool = True, node_selector: str = "all()",
                              disable_bgp_export: bool = False) -> IPPool | None:
    """Create ``default-ipv4-ippool`` if (and only if) no IPv4 pool exists.

    Returns the pool created (or the one another node created a moment earlier), or None when an IPv4
    pool already existed. The settings are validated before the datastore is touched; a bad value raises
    :class:`InvalidPoolError` naming the environment variable.
    """
    pool = default_ipv4_pool(cidr=cidr, block_size=block_size, ipip_mode=ipip_mode, vxlan_mode=vxlan_mode,
                             nat_outgoing=nat_outgoing, node_selector=node_selector,
                             disable_bgp_export=disable_bgp_export)
    existing = await backend.list(KIND_IPPOOL)
    for kv in existing.items:
        if _pool_version(kv.value) == 4:
            log.debug("IPv4 pool %s exists; not creating %s", kv.key.name, DEFAULT_IPV4_POOL_NAME)
            return None
    key = Key(KIND_IPPOOL, DEFAULT_IPV4_POOL_NAME)
    try:
        kv = await backend.create(key, new_resource(key, pool.to_spec()))
    except AlreadyExists:
        # Another node's startup won the race; its pool came from the same kind of settings.
        kv = await backend.get(key)
        log.info("default IPv4 pool was created concurrently by another node")
        return parse_pool(kv.value)
    log.info("created default IPv4 pool %s (%s, /%d blocks, ipip=%s, vxlan=%s, natOutgoing=%s)",
             DEFAULT_IPV4_POOL_NAME, pool.cidr, pool.block_size, pool.ipip_mode, pool.vxlan_mode,
             pool.nat_outgoing)
    return parse_pool(kv.value)
