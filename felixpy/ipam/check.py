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
