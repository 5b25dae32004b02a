"""This node's routing identity in the datastore: what calico-node's startup and its tunnel-address
allocator keep in the Node resource.

- The node IPv4 address (``IP`` / ``IP_AUTODETECTION_METHOD``) goes to ``spec.bgp.ipv4Address`` (the
  ``projectcalico.org/IPv4Address`` annotation with the Kubernetes datastore), with ``AS`` to
  ``spec.bgp.asNumber``.
- Tunnel addresses come from IPAM like Calico's ``allocateip``: one address per encapsulation from a pool
  of that encapsulation that selects this node, under handle ``vxlan-tunnel-addr-<node>`` /
  ``ipip-tunnel-addr-<node>``; written to ``spec.ipv4VXLANTunnelAddr`` (+ the VTEP MAC
  ``spec.vxlanTunnelMACAddr``) and ``spec.bgp.ipv4IPIPTunnelAddr``. An address no longer in such a pool
  (or the encapsulation turned off) is released and cleared. Re-run whenever pools change; idempotent.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

from felixpy import names
from felixpy.datastore.api import KIND_NODE, Backend, Conflict, Key, KVPair, NotFound, Resource
from felixpy.ipam import IPAMClient
from felixpy.ipam.pools import ENCAP_NEVER, IPPool

log = logging.getLogger(__name__)

_CAS_RETRIES = 10


class NodeIdentityError(RuntimeError):
    pass


async def get_node(backend: Backend, nodename: str) -> KVPair:
    return await backend.get(Key(KIND_NODE, nodename))


async def update_node(backend: Backend, nodename: str, mutate: Callable[[Resource], bool]) -> bool:
    """Read-modify-write the Node with compare-and-swap; ``mutate`` edits the resource in place and returns
    whether it changed anything. Returns whether a write happened."""
    for _ in range(_CAS_RETRIES):
        kv = await get_node(backend, nodename)
        value = copy.deepcopy(kv.value)
        if not mutate(value):
            return False
        try:
            await backend.update(KVPair(kv.key, value, kv.revision, kv.uid))
            return True
        except Conflict:
            continue
    raise NodeIdentityError(f"Node {nodename}: gave up after {_CAS_RETRIES} conflicting updates")


def _bgp(spec: dict[str, Any]) -> dict[str, Any]:
    bgp = spec.get("bgp")
    if not isinstance(bgp, dict):
        bgp = {}
        spec["bgp"] = bgp
    return bgp


def _spec(res: Resource) -> dict[str, Any]:
    spec = res.get("spec")
    if not isinstance(spec, dict):
        spec = {}
        res["spec"] = spec
    return spec


async def set_node_address(backend: Backend, nodename: str, ip: ipaddress.IPv4Interface | None, *,
                           asn: int | None = None) -> bool:
    def mutate(res: Resource) -> bool:
        bgp = _bgp(_spec(res))
        changed = False
        want = str(ip) if ip is not None else None
        if bgp.get("ipv4Address") != want:
            if want is None:
                bgp.pop("ipv4Address", None)
            else:
                bgp["ipv4Address"] = want
            changed = True
        if asn is not None and bgp.get("asNumber") != asn:
            bgp["asNumber"] = asn
            changed = True
        return changed

    return await update_node(backend, nodename, mutate)


def node_internal_ips(res: Resource) -> list[str]:
    """Kubernetes InternalIP addresses of a Node (for ``kubernetes-internal-ip`` autodetection)."""
    out = []
    for a in (res.get("spec") or {}).get("addresses") or []:
        if isinstance(a, dict) and a.get("type") == "InternalIP" and a.get("address"):
            out.append(str(a["address"]))
    return out


def _labels(res: Resource) -> dict[str, str]:
    md = res.get("metadata") or {}
    labels = md.get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


async def reconcile_tunnel_addrs(backend: Backend, ipam: IPAMClient, nodename: str,
                                 pools: Sequence[IPPool]) -> dict[str, str]:
    """Make the Node's VXLAN and IPIP tunnel addresses match the pools. Returns {kind: address or ""}."""
    kv = await get_node(backend, nodename)
    labels = _labels(kv.value)
    spec = kv.value.get("spec") or {}
    result: dict[str, str] = {}
    for kind, attr_type, handle_fmt, field in (
            ("vxlan", "vxlanTunnelAddress", names.VXLAN_TUNNEL_HANDLE, "ipv4VXLANTunnelAddr"),
            ("ipip", "ipipTunnelAddress", names.IPIP_TUNNEL_HANDLE, "ipv4IPIPTunnelAddr")):
        eligible = [p for p in pools if p.version == 4 and not p.disabled and p.allows("Tunnel")
                    and (p.vxlan_mode if kind == "vxlan" else p.ipip_mode) != ENCAP_NEVER and _selects(p, labels)]
        handle = handle_fmt.format(node=nodename)
        cur_text = spec.get(field) if kind == "vxlan" else (spec.get("bgp") or {}).get(field)
        cur = None
        if cur_text:
            try:
                cur = ipaddress.IPv4Address(str(cur_text).split("/")[0])
            except ValueError:
                cur = None
        if cur is not None and any(cur in p.cidr for p in eligible):
            held = await ipam.ips_by_handle(handle)
            if cur in held:
                result[kind] = str(cur)
                continue
        # Wrong, stale or missing: release what the handle holds, then allocate afresh (or clear).
        await ipam.release_by_handle(handle)
        new: ipaddress.IPv4Address | None = None
        if eligible:
            got = await ipam.auto_assign(handle_id=handle, attrs={"node": nodename, "type": attr_type},
                                         num_v4=1, pools=[str(p.cidr) for p in eligible], use="Tunnel",
                                         node_labels=labels)
            if got:
                new = got[0].ip
        log.info("node %s: %s tunnel address %s -> %s", nodename, kind, cur, new)

        def mutate(res: Resource, kind: str = kind, field: str = field,
                   new: ipaddress.IPv4Address | None = new) -> bool:
            s = _spec(res)
            target = _bgp(s) if kind == "ipip" else s
            want = str(new) if new is not None else None
            changed = target.get(field) != want
            if want is None:
                target.pop(field, None)
            else:
                target[field] = want
            if kind == "vxlan":
                mac = names.vtep_mac(nodename) if want else None
                if s.get("vxlanTunnelMACAddr") != mac and (want is None or not s.get("vxlanTunnelMACAddr")):
                    if mac is None:
                        s.pop("vxlanTunnelMACAddr", None)
                    else:
                        s["vxlanTunnelMACAddr"] = mac
                    changed = True
            return changed

        await update_node(backend, nodename, mutate)
        result[kind] = str(new) if new is not None else ""
    return result


def _selects(p: IPPool, labels: dict[str, str]) -> bool:
    try:
        return p.selects_node(labels)
    except ValueError as e:
        log.error("%s", e)
        return False


async def node_exists(backend: Backend, nodename: str) -> bool:
    try:
        await get_node(backend, nodename)
        return True
    except NotFound:
        return False
