"""Pure IPAM consistency check over lists of IPAMBlocks, IPAMHandles and BlockAffinities (v3 resources).

The basis of ``felixpy ipam check``: the caller lists the three kinds (one consistent-enough snapshot)
and reports the problems. Nothing here writes; each :class:`Problem` says what is wrong and why it
matters, so an operator can decide what to release.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from felixpy.datastore.api import Resource
from felixpy.ipam.block import (
    Block,
    IPAddress,
    IPNetwork,
    affinity_is_deleted,
    check_block,
    sanitize_handle,
)
from felixpy.ipam.errors import InvalidBlockError

# Problem kinds.
BAD_BLOCK = "bad-block"  # a block that does not parse or breaks its own invariants
OVERLAPPING_BLOCKS = "overlapping-blocks"  # two blocks cover the same addresses
DUPLICATE_OWNER = "duplicate-owner"  # one IP allocated in two blocks
NO_HANDLE = "allocation-without-handle"  # cannot be released by handle
MISSING_HANDLE = "missing-handle"  # allocation whose IPAMHandle does not exist: a leaked IP
HANDLE_UNDERCOUNT = "handle-undercount"  # handle does not list a block that holds its allocations
HANDLE_OVERCOUNT = "handle-overcount"  # handle counts more than the blocks hold (harmless)
DANGLING_HANDLE = "dangling-handle"  # handle with no allocation anywhere
STALE_AFFINITY = "stale-affinity"  # BlockAffinity whose block is missing or affine to another node
MISSING_AFFINITY = "missing-affinity"  # block affine to a node that has no BlockAffinity for it
DUPLICATE_AFFINITY = "duplicate-affinity"  # two nodes hold an affinity for one block


@dataclass(frozen=True)
class Problem:
    kind: str
    message: str
    block: str = ""
    ip: str = ""
    handle: str = ""


def _spec(res: Resource) -> dict[str, Any]:
    s = res.get("spec")
    return s if isinstance(s, dict) else {}


def _name(res: Resource) -> str:
    md = res.get("metadata")
    return str(md.get("name", "")) if isinstance(md, dict) else ""


def check_ipam(blocks: Iterable[Resource], handles: Iterable[Resource],
               affinities: Iterable[Resource] | None = None) -> list[Problem]:
    """Every problem found; ``affinities=None`` skips the affinity checks."""
    problems: list[Problem] = []
    parsed: list[Block] = []
    for res in blocks:
        spec = _spec(res)
        if spec.get("deleted"):
            continue  # half-deleted: readers treat it as absent
        try:
            b = Block.from_spec(spec)
        except InvalidBlockError as e:
            problems.append(Problem(BAD_BLOCK, str(e), block=_name(res)))
            continue
        for msg in check_block(b):
            problems.append(Problem(BAD_BLOCK, msg, block=str(b.cidr)))
        parsed.append(b)

    # Overlaps and duplicate owners.
    nets = sorted(parsed, key=lambda b: (b.cidr.version, int(b.cidr.network_address), b.cidr.prefixlen))
    for a, b in itertools.pairwise(nets):
        if a.cidr.version == b.cidr.version and a.cidr.overlaps(b.cidr):  # type: ignore[arg-type]
            problems.append(Problem(OVERLAPPING_BLOCKS, f"blocks {a.cidr} and {b.cidr} overlap",
                                    block=str(b.cidr)))
    owners: dict[IPAddress, list[str]] = defaultdict(list)
    actual: dict[str, Counter[str]] = defaultdict(Counter)  # handle -> block cidr -> allocations
    for b in parsed:
        for o in b.allocated_ordinals():
            ip = b.ordinal_to_ip(o)
            owners[ip].append(str(b.cidr))
            h = b.handle_of(o)
            if h is None:
                problems.append(Problem(NO_HANDLE, f"{ip} in block {b.cidr} is allocated without a handle",
                                        block=str(b.cidr), ip=str(ip)))
            else:
                actual[h][str(b.cidr)] += 1
    for ip, where in owners.items():
        if len(where) > 1:
            problems.append(Problem(DUPLICATE_OWNER, f"{ip} is allocated in blocks {', '.join(where)}",
                                    ip=str(ip)))

    # Handles against allocations.
    counted: dict[str, dict[str, int]] = {}
    for res in handles:
        spec = _spec(res)
        if spec.get("deleted"):
            continue
        hid = sanitize_handle(str(spec.get("handleID") or _name(res)))
        raw = spec.get("block") or {}
        counted[hid] = ({str(k): v for k, v in raw.items() if isinstance(v, int)}
                        if isinstance(raw, dict) else {})
    for hid, per_block in actual.items():
        have = counted.get(hid)
        if have is None:
            n = sum(per_block.values())
            problems.append(Problem(MISSING_HANDLE, f"handle {hid} has {n} allocation(s) in "
                                    f"{', '.join(sorted(per_block))} but no IPAMHandle: release by handle "
                                    "cannot find them", handle=hid))
            continue
        for cidr, n in per_block.items():
            if have.get(cidr, 0) < n:
                problems.append(Problem(HANDLE_UNDERCOUNT, f"handle {hid} counts {have.get(cidr, 0)} in "
                                        f"block {cidr} but the block holds {n}", handle=hid, block=cidr))
    for hid, have in counted.items():
        per_block = actual.get(hid, Counter())
        if not per_block:
            problems.append(Problem(DANGLING_HANDLE, f"handle {hid} points at no allocation", handle=hid))
            continue
        for cidr, n in have.items():
            if n > per_block.get(cidr, 0):
                problems.append(Problem(HANDLE_OVERCOUNT, f"handle {hid} counts {n} in block {cidr} but the "
                                        f"block holds {per_block.get(cidr, 0)}", handle=hid, block=cidr))

    # Affinities against blocks.
    by_cidr = {str(b.cidr): b for b in parsed}
    aff_hosts: dict[str, list[str]] = defaultdict(list)
    for res in affinities or ():
        spec = _spec(res)
        if affinity_is_deleted(spec):
            continue
        host = str(spec.get("node", ""))
        try:
            net: IPNetwork = ipaddress.ip_network(str(spec.get("cidr")), strict=True)
        except ValueError:
            problems.append(Problem(STALE_AFFINITY, f"BlockAffinity {_name(res)} has an invalid cidr"))
            continue
        cidr = str(net)
        aff_hosts[cidr].append(host)
        blk = by_cidr.get(cidr)
        if blk is None:
            problems.append(Problem(STALE_AFFINITY, f"{host} has an affinity for {cidr} but the block "
                                    "does not exist", block=cidr))
        elif blk.host != host:
            problems.append(Problem(STALE_AFFINITY, f"{host} has an affinity for {cidr} but the block is "
                                    f"affine to {blk.affinity or 'no node'}", block=cidr))
    for cidr, hosts in aff_hosts.items():
        if len(set(hosts)) > 1:
            problems.append(Problem(DUPLICATE_AFFINITY, f"block {cidr} has affinities for "
                                    f"{', '.join(sorted(hosts))} (routes to it would be split between nodes)",
                                    block=cidr))
    if affinities is not None:
        for cidr, blk in by_cidr.items():
            if blk.host is not None and blk.host not in aff_hosts.get(cidr, []):
                problems.append(Problem(MISSING_AFFINITY, f"block {cidr} is affine to {blk.host} but that "
                                        "node has no BlockAffinity for it", block=cidr))
    return problems


# == leak analysis (``felixpy ipam check``) ===========================================================
# The report keeps calicoctl's ``ipam check -o`` shape (version, clusterGUID, datastoreLocked,
# clusterInformationRevision, clusterType, allocations {ip: [Allocation]}, leakedHandles [{ID, UID,
# Revision}]) so either tool can read the other's report; felixpy adds generatedAt, problems and
# orphanedAffinities. Deciding "in use" errs towards in use: an address that is wrongly called leaked
# could be released under a running pod, one wrongly called in use only stays allocated.

REPORT_VERSION = "felixpy-1"
WINDOWS_OWNER = "Reserved for Windows"
TUNNEL_TYPES = frozenset({"ipipTunnelAddress", "vxlanTunnelAddress", "vxlanV6TunnelAddress",
                          "wireguardTunnelAddress", "wireguardV6TunnelAddress"})
ORPHANED_AFFINITY = "orphaned-affinity"  # BlockAffinity (or block affinity) for a node that no longer exists
DUPLICATE_USE = "duplicate-use"  # one address used by two workloads/nodes


@dataclass
class Allocation:
    """One allocated address (calicoctl's ``Allocation``, plus the block it lives in)."""

    ip: str
    block: str
    handle: str = ""
    sequence_number: int | None = None
    pod: str = ""
    namespace: str = ""
    node: str = ""
    type: str = ""
    creation_timestamp: str = ""
    in_use: bool = False
    borrowed: bool = False
    owners: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ip": self.ip}
        if self.handle:
            d["handle"] = self.handle
        if self.sequence_number is not None:
            d["sequenceNumber"] = self.sequence_number
        for k, v in (("pod", self.pod), ("namespace", self.namespace), ("node", self.node), ("type", self.type),
                     ("creationTimestamp", self.creation_timestamp)):
            if v:
                d[k] = v
        d["inUse"] = self.in_use
        if self.borrowed:
            d["borrowed"] = True
        d["owners"] = list(self.owners or [])
        d["block"] = self.block
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Allocation:
        seq = d.get("sequenceNumber")
        owners = d.get("owners")
        return cls(ip=str(d.get("ip", "")), block=str(d.get("block", "")), handle=str(d.get("handle", "") or ""),
                   sequence_number=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                   pod=str(d.get("pod", "") or ""), namespace=str(d.get("namespace", "") or ""),
                   node=str(d.get("node", "") or ""), type=str(d.get("type", "") or ""),
                   creation_timestamp=str(d.get("creationTimestamp", "") or ""), in_use=bool(d.get("inUse", True)),
                   borrowed=bool(d.get("borrowed", False)),
                   owners=[str(o) for o in owners] if isinstance(owners, list) else [])


@dataclass(frozen=True)
class HandleInfo:
    id: str
    uid: str
    revision: str

    def to_json(self) -> dict[str, Any]:
        # calicoctl's HandleInfo has no JSON tags: Go writes the field names as they are.
        return {"ID": self.id, "UID": self.uid or None, "Revision": self.revision}


@dataclass
class Analysis:
    """Everything ``ipam check`` found; :meth:`report` is the JSON written by ``-o``."""

    blocks: list[tuple[str, str]]  # (cidr, affinity or "<none>")
    active_pools: list[str]
    allocations: dict[str, list[Allocation]]
    in_use_ips: dict[str, list[str]]  # ip -> owners (workloads, nodes)
    node_tunnel_ips: int
    workload_ips: int
    handles: dict[str, HandleInfo]
    leaked_handles: list[HandleInfo]
    missing_handles: list[str]  # handles allocations name that have no IPAMHandle
    not_in_use: list[str]  # allocated, but no workload/node uses them (leak candidates)
    in_use_not_in_pool: list[str]
    in_use_not_allocated: list[str]
    orphaned_affinities: list[dict[str, str]]
    problems: list[Problem]  # structural problems from :func:`check_ipam` and duplicate uses
    allocations_by_node: dict[str, int]

    @property
    def num_problems(self) -> int:
        # calicoctl's count (leaks, in-use-without-allocation, leaked handles) plus what felixpy also checks.
        return (len(self.not_in_use) + len(self.in_use_not_in_pool) + len(self.in_use_not_allocated)
                + len(self.leaked_handles) + len(self.orphaned_affinities)
                + sum(1 for p in self.problems if p.kind not in (MISSING_HANDLE, DANGLING_HANDLE)))

    def report(self, *, cluster_info: Resource | None, revision: str, generated_at: str) -> dict[str, Any]:
        spec = _spec(cluster_info) if cluster_info else {}
        ready = spec.get("datastoreReady")
        return {
            "version": REPORT_VERSION,
            "clusterGUID": str(spec.get("clusterGUID", "") or ""),
            "datastoreLocked": ready is False,
            "clusterInformationRevision": revision,
            "clusterType": str(spec.get("clusterType", "") or ""),
            "generatedAt": generated_at,
            "allocations": {ip: [a.to_json() for a in allocs] for ip, allocs in sorted(self.allocations.items())},
            "leakedHandles": [h.to_json() for h in self.leaked_handles],
            "orphanedAffinities": list(self.orphaned_affinities),
            "problems": [{"kind": p.kind, "message": p.message, "block": p.block, "ip": p.ip, "handle": p.handle}
                         for p in self.problems],
        }


def _ip_of(text: Any) -> str | None:
    try:
        return str(ipaddress.ip_interface(str(text)).ip)
    except ValueError:
        return None


def node_ips(node: Resource) -> list[str]:
    """Tunnel addresses a Node uses (calicoctl ``getNodeIPs``: VXLAN, WireGuard, IPIP)."""
    spec = _spec(node)
    bgp = spec.get("bgp") if isinstance(spec.get("bgp"), dict) else {}
    wg = spec.get("wireguard") if isinstance(spec.get("wireguard"), dict) else {}
    raw = [spec.get("ipv4VXLANTunnelAddr"), spec.get("ipv6VXLANTunnelAddr"), (wg or {}).get("interfaceIPv4Address"),
           (wg or {}).get("interfaceIPv6Address"), (bgp or {}).get("ipv4IPIPTunnelAddr")]
    return [ip for r in raw if r and (ip := _ip_of(r)) is not None]


def wep_ips(wep: Resource) -> list[str]:
    nets = _spec(wep).get("ipNetworks") or []
    return [ip for n in nets if (ip := _ip_of(n)) is not None] if isinstance(nets, list) else []


def _wep_owner(wep: Resource) -> str:
    md = wep.get("metadata") or {}
    return f"Workload({md.get('namespace', '')}/{md.get('name', '')})"


def analyse(*, blocks: Iterable[Resource], handles: Iterable[tuple[Resource, str, str]],
            affinities: Iterable[Resource], pools: Iterable[Resource], weps: Iterable[Resource],
            nodes: Iterable[Resource]) -> Analysis:
    """Cross-check IPAM against what uses addresses. ``handles`` are (resource, revision, storage uid).

    An allocation is in use when its address is a workload's or a node's (as calicoctl decides), and
    also (stricter, so a pod in the middle of its CNI ADD is never called leaked) when its attributes or
    handle name a pod that exists, or it is a tunnel address or Windows reservation of a node that exists.
    """
    blocks = list(blocks)
    weps = list(weps)
    nodes = list(nodes)
    handles = list(handles)
    affinities = list(affinities)
    node_names = {_name(n) for n in nodes}
    in_use: dict[str, list[str]] = defaultdict(list)
    n_tunnel = 0
    for n in nodes:
        for ip in node_ips(n):
            in_use[ip].append(f"Node({_name(n)})")
            n_tunnel += 1
    n_wep = 0
    pods: dict[tuple[str, str], str] = {}
    container_ids: dict[str, str] = {}
    for w in weps:
        owner = _wep_owner(w)
        for ip in wep_ips(w):
            in_use[ip].append(owner)
            n_wep += 1
        spec = _spec(w)
        ns = str((w.get("metadata") or {}).get("namespace", "") or "")
        if spec.get("pod"):
            pods[(ns, str(spec["pod"]))] = owner
        if spec.get("containerID"):
            container_ids[str(spec["containerID"])] = owner

    problems = check_ipam(blocks, [h for h, _, _ in handles], affinities)
    allocations: dict[str, list[Allocation]] = defaultdict(list)
    by_node: Counter[str] = Counter()
    block_rows: list[tuple[str, str]] = []
    used_handles: set[str] = set()
    for res in blocks:
        spec = _spec(res)
        if spec.get("deleted"):
            continue
        try:
            b = Block.from_spec(spec)
        except InvalidBlockError:
            continue  # already a BAD_BLOCK problem
        block_rows.append((str(b.cidr), b.affinity or "<none>"))
        aff_node = b.host or ""
        for o in b.allocated_ordinals():
            ip = str(b.ordinal_to_ip(o))
            idx = b.allocations[o]
            attr = b.attributes[idx] if idx is not None else {}
            sec = attr.get("secondary") if isinstance(attr.get("secondary"), dict) else {}
            sec = {str(k): str(v) for k, v in (sec or {}).items()}
            handle = b.handle_of(o) or ""
            seq = b.seq_for_allocation.get(str(o))
            a = Allocation(ip=ip, block=str(b.cidr), handle=handle, sequence_number=seq,
                           pod=sec.get("pod", ""), namespace=sec.get("namespace", ""),
                           node=sec.get("node", "") or aff_node, type=sec.get("type", ""),
                           creation_timestamp=sec.get("timestamp", ""), owners=[])
            a.borrowed = a.node != aff_node
            if handle.lower() == "windows-reserved-ipam-handle":
                in_use[ip].append(WINDOWS_OWNER)
            elif handle:
                used_handles.add(handle)
            extra = _extra_owner(a, pods, container_ids, node_names)
            if extra and extra not in in_use.get(ip, []):
                a.owners = [extra]
            allocations[ip].append(a)
            by_node[a.node] += 1

    for ip, allocs in allocations.items():
        for a in allocs:
            a.owners = sorted(set(in_use.get(ip, [])) | set(a.owners or []))
            a.in_use = bool(a.owners)
    for ip, owners in in_use.items():
        if len(owners) > 1 and WINDOWS_OWNER not in owners:
            problems.append(Problem(DUPLICATE_USE, f"{ip} is used by {', '.join(sorted(owners))}", ip=ip))

    active: list[IPNetwork] = []
    for p in pools:
        spec = _spec(p)
        if spec.get("disabled"):
            continue
        try:
            active.append(ipaddress.ip_network(str(spec.get("cidr", "")), strict=False))
        except ValueError:
            continue
    not_in_pool: list[str] = []
    not_allocated: list[str] = []
    for ip in sorted(in_use):
        if ip in allocations:
            continue
        addr = ipaddress.ip_address(ip)
        if any(addr.version == n.version and addr in n for n in active):
            not_allocated.append(ip)
        else:
            not_in_pool.append(ip)

    infos: dict[str, HandleInfo] = {}
    for res, rev, uid in handles:
        spec = _spec(res)
        if spec.get("deleted"):
            continue
        hid = sanitize_handle(str(spec.get("handleID") or _name(res)))
        infos[hid] = HandleInfo(id=hid, uid=uid, revision=rev)
    leaked = [h for hid, h in sorted(infos.items()) if hid not in used_handles]
    missing = sorted(h for h in used_handles if h not in infos)

    orphaned: list[dict[str, str]] = []
    for res in affinities:
        spec = _spec(res)
        if affinity_is_deleted(spec):
            continue
        host = str(spec.get("node", ""))
        if spec.get("type", "host") in ("host", "") and host not in node_names:
            orphaned.append({"name": _name(res), "node": host, "cidr": str(spec.get("cidr", ""))})
    for cidr, aff in block_rows:
        if aff.startswith("host:") and aff[5:] not in node_names:
            problems.append(Problem(ORPHANED_AFFINITY, f"block {cidr} is affine to {aff[5:]}, which is not a "
                                    "node any more", block=cidr))

    return Analysis(
        blocks=block_rows, active_pools=[str(n) for n in active], allocations=dict(allocations),
        in_use_ips=dict(in_use), node_tunnel_ips=n_tunnel, workload_ips=n_wep, handles=infos,
        leaked_handles=leaked, missing_handles=missing,
        not_in_use=sorted((ip for ip, al in allocations.items() if not any(a.in_use for a in al)),
                          key=lambda s: (ipaddress.ip_address(s).version, ipaddress.ip_address(s))),
        in_use_not_in_pool=not_in_pool, in_use_not_allocated=not_allocated, orphaned_affinities=orphaned,
        problems=problems, allocations_by_node=dict(by_node))


def _extra_owner(a: Allocation, pods: dict[tuple[str, str], str], container_ids: dict[str, str],
                 node_names: set[str]) -> str:
    """An owner found by name rather than by address (see :func:`analyse`), or ""."""
    if a.pod and (a.namespace, a.pod) in pods:
        return pods[(a.namespace, a.pod)]
    # Pod handles are "<network>.<containerID>"; an endpoint with that container owns the address.
    cid = a.handle.rsplit(".", 1)[-1] if "." in a.handle else a.handle
    if cid and cid in container_ids:
        return container_ids[cid]
    if a.type in TUNNEL_TYPES and a.node in node_names:
        return f"Node({a.node}) {a.type}"
    return ""


def format_check(an: Analysis, *, show_all_ips: bool = False, show_problem_ips: bool = False) -> list[str]:
    """The text ``ipam check`` prints (calicoctl's wording, plus felixpy's extra checks at the end)."""
    show_problem_ips = show_problem_ips or show_all_ips
    out = ["Checking IPAM for inconsistencies...", "", "Loading all IPAM blocks...",
           f"Found {len(an.blocks)} IPAM blocks."]
    n_allocs = 0
    for cidr, aff in an.blocks:
        out.append(f" IPAM block {cidr} affinity={aff}:")
        for ip, allocs in sorted(an.allocations.items()):
            for a in allocs:
                if a.block == cidr:
                    n_allocs += 1
                    if show_all_ips:
                        out.append(f"  {ip} allocated; attrs {_attr_string(a)}")
    out += [f"IPAM blocks record {n_allocs} allocations.", "", "Loading all IPAM pools..."]
    out += [f"  {p}" for p in an.active_pools]
    out += [f"Found {len(an.active_pools)} active IP pools.", "", "Loading all nodes.",
            f"Found {an.node_tunnel_ips} node tunnel IPs.", "", "Loading all workload endpoints.",
            f"Found {an.workload_ips} workload IPs.", f"Workloads and nodes are using {len(an.in_use_ips)} IPs.", ""]
    if show_all_ips:
        out += [f"  {ip} belongs to {o}" for ip, owners in sorted(an.in_use_ips.items()) for o in owners]
    out.append("Looking for top (up to 20) nodes by allocations...")
    ranked = sorted(an.allocations_by_node.items(), key=lambda kv: (-kv[1], kv[0]))
    out += [f"  {n} has {c} allocations" for n, c in ranked[:20]]
    if ranked:
        out.append(f"Node with most allocations has {ranked[0][1]}; median is {ranked[len(ranked) // 2][1]}")
    out += ["", "Scanning for IPs that are allocated but not actually in use..."]
    if show_problem_ips:
        out += [f"  {ip} leaked; attrs {_attr_string(a)}" for ip in an.not_in_use for a in an.allocations[ip]]
    out.append(f"Found {len(an.not_in_use)} IPs that are allocated in IPAM but not actually in use.")
    out.append("Scanning for IPs that are in use by a workload or node but not allocated in IPAM...")
    if show_problem_ips:
        out += [f"  {ip} has multiple owners." for ip, o in sorted(an.in_use_ips.items()) if len(o) > 1]
        out += [f"  {ip} in use by {o} is not in any active IP pool."
                for ip in an.in_use_not_in_pool for o in an.in_use_ips[ip]]
        out += [f"  {ip} in use by {o} and in active IPAM pool but has no IPAM allocation."
                for ip in an.in_use_not_allocated for o in an.in_use_ips[ip]]
    out += [f"Found {len(an.in_use_not_in_pool)} in-use IPs that are not in active IP pools.",
            f"Found {len(an.in_use_not_allocated)} in-use IPs that are in active IP pools but have no "
            "corresponding IPAM allocation.", "", "Scanning for IPAM handles with no matching IPs..."]
    if show_all_ips:
        out += [f"  {h.id} doesn't have any active IPs." for h in an.leaked_handles]
    out.append(f"Found {len(an.leaked_handles)} handles with no matching IPs (and "
               f"{len(an.handles) - len(an.leaked_handles)} handles with matches).")
    out.append("Scanning for IPs with missing handle...")
    if show_problem_ips:
        out += [f"  {h} is in use in a block but doesn't exist." for h in an.missing_handles]
    out.append(f"Found {len(an.missing_handles)} handles mentioned in blocks with no matching handle resource.")
    out.append("Scanning for block affinities of nodes that no longer exist...")
    out += [f"  {o['name']}: node {o['node']} (block {o['cidr']})" for o in an.orphaned_affinities]
    out.append(f"Found {len(an.orphaned_affinities)} block affinities of missing nodes.")
    other = [p for p in an.problems if p.kind not in (MISSING_HANDLE, DANGLING_HANDLE)]
    out.append("Scanning IPAM blocks and handles for inconsistencies...")
    out += [f"  [{p.kind}] {p.message}" for p in other]
    out.append(f"Found {len(other)} other inconsistencies.")
    out.append(f"Check complete; found {an.num_problems} problems.")
    return out


def _attr_string(a: Allocation) -> str:
    extra = {k: v for k, v in (("namespace", a.namespace), ("node", a.node), ("pod", a.pod),
                               ("timestamp", a.creation_timestamp), ("type", a.type)) if v}
    return f"Main:{a.handle or '<none>'} Extra:{','.join(f'{k}={v}' for k, v in sorted(extra.items()))}"
