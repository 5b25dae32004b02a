"""Releasing leaked addresses safely (``felixpy ipam release``).

An address is released only when two observations agree that nobody uses it:

1. the report (``ipam check -o``) saw it allocated and unused, and the report is at least ``min_age``
   seconds old, so an address whose pod was still being set up then has had time to show up;
2. a fresh read now, just before the write: the block is read, *then* the workloads and nodes are listed,
   and the address must still be allocated to the same handle with the same sequence number (the same
   allocation the report saw, not a reuse), must not be used by any workload/node/pod named in its
   attributes, and its allocation must be at least ``min_age`` old.

The write is a compare-and-swap on the block revision that was read in step 2, so a block changed in
between (e.g. a new assignment) makes the release start over from step 2. Handles are decremented
after the block write (a crash in between leaves an over-counting handle, which is harmless).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_CLUSTER_INFO,
    KIND_IPAM_BLOCK,
    KIND_IPAM_HANDLE,
    KIND_IPPOOL,
    KIND_NODE,
    KIND_WEP,
    Backend,
    Conflict,
    Key,
    KVPair,
    ListOptions,
    NotFound,
)
from felixpy.ipam.block import Block, handle_spec, parse_time
from felixpy.ipam.check import Allocation, Analysis, HandleInfo, analyse
from felixpy.ipam.client import handle_key

DEFAULT_MIN_AGE = 60.0  # seconds; far longer than a CNI ADD may take between IPAM and the endpoint write
_RETRIES = 20

# Workload listing for "is this address in use?": on the Kubernetes datastore a pod whose annotations do
# not convert is still listed (as a minimal owner record), so its addresses never look leaked.
OWNERS = ListOptions(extra={"owners": "true"})


class ReportError(Exception):
    """The report cannot be used (malformed, of another cluster, too recent)."""


@dataclass
class Snapshot:
    blocks: list[KVPair]
    handles: list[KVPair]
    affinities: list[KVPair]
    pools: list[KVPair]
    weps: list[KVPair]
    nodes: list[KVPair]
    cluster_info: KVPair | None

    def analyse(self) -> Analysis:
        return analyse(blocks=[kv.value for kv in self.blocks],
                       handles=[(kv.value, kv.revision, kv.uid) for kv in self.handles],
                       affinities=[kv.value for kv in self.affinities], pools=[kv.value for kv in self.pools],
                       weps=[kv.value for kv in self.weps], nodes=[kv.value for kv in self.nodes])


async def load_snapshot(backend: Backend) -> Snapshot:
    """Every kind the check needs. Workloads and nodes are listed last, after the IPAM objects, so an
    allocation made before its endpoint was written is seen together with that endpoint."""
    blocks = (await backend.list(KIND_IPAM_BLOCK)).items
    handles = (await backend.list(KIND_IPAM_HANDLE)).items
    affinities = (await backend.list(KIND_BLOCK_AFFINITY)).items
    pools = (await backend.list(KIND_IPPOOL)).items
    ci: KVPair | None = None
    with contextlib.suppress(NotFound):
        ci = await backend.get(Key(KIND_CLUSTER_INFO, "default"))
    weps = (await backend.list(KIND_WEP, OWNERS)).items
    nodes = (await backend.list(KIND_NODE)).items
    return Snapshot(blocks, handles, affinities, pools, weps, nodes, ci)


@dataclass(frozen=True)
class Outcome:
    ip: str
    released: bool
    reason: str  # why not released ("" when released)
    refused: bool = False  # not released because it is (or may be) in use, or changed since the report


_GO_TIME = re.compile(r"^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)(\.\d+)? \+0000 UTC$")


def parse_timestamp(text: str) -> float | None:
    """The allocation ``timestamp`` attribute: Go's ``time.Now().UTC().String()`` or RFC 3339."""
    m = _GO_TIME.match(text.strip()) if text else None
    if m:
        frac = (m.group(3) or "")[:7]
        with contextlib.suppress(ValueError):
            return dt.datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}{frac}+00:00").timestamp()
        return None
    return parse_time(text)


def candidates(report: Mapping[str, Any]) -> dict[str, Allocation]:
    """Addresses the report found allocated and unused (every allocation of the address unused)."""
    allocs = report.get("allocations")
    if not isinstance(allocs, dict):
        raise ReportError("the report has no 'allocations' object (is it an `ipam check -o` report?)")
    out: dict[str, Allocation] = {}
    for ip, lst in allocs.items():
        if not isinstance(lst, list) or not lst or not all(isinstance(a, dict) for a in lst):
            raise ReportError(f"the report's entry for {ip!r} is not a list of allocations")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ReportError(f"the report lists {ip!r}, which is not an IP address") from None
        parsed = [Allocation.from_json(a) for a in lst]
        if len(parsed) == 1 and not parsed[0].in_use:
            out[str(ip)] = parsed[0]
    return out


def leaked_handles(report: Mapping[str, Any]) -> list[HandleInfo]:
    raw = report.get("leakedHandles") or []
    if not isinstance(raw, list):
        raise ReportError("the report's 'leakedHandles' is not a list")
    out = []
    for h in raw:
        if not isinstance(h, dict) or not h.get("ID"):
            raise ReportError(f"bad leakedHandles entry {h!r}")
        out.append(HandleInfo(id=str(h["ID"]), uid=str(h.get("UID") or ""), revision=str(h.get("Revision") or "")))
    return out


def check_report_usable(report: Mapping[str, Any], *, report_time: float, now: float, min_age: float,
                        cluster_info: KVPair | None) -> None:
    """Raise ReportError unless the report belongs to this cluster and is old enough."""
    guid = str(report.get("clusterGUID") or "")
    have = str(((cluster_info.value.get("spec") or {}) if cluster_info else {}).get("clusterGUID") or "")
    if guid and have and guid != have:
        raise ReportError(f"the report is of another cluster (clusterGUID {guid}, this cluster {have}); "
                          "refusing to release")
    age = now - report_time
    if age < min_age:
        raise ReportError(f"the report is {max(age, 0):.0f}s old; it must be at least {min_age:g}s old so that an "
                          "address whose pod was being set up when it was written is not taken for a leak. "
                          "Run the release again later (or lower --min-age)")


class Releaser:
    def __init__(self, backend: Backend, *, now: float, min_age: float) -> None:
        self.b = backend
        self.now = now
        self.min_age = min_age
        self.etcd = getattr(backend, "type_name", "") == "etcdv3"

    # -- addresses ----------------------------------------------------------------------------------
    async def release_ips(self, expected: Mapping[str, Allocation | None]) -> list[Outcome]:
        """Release each address whose current allocation still matches ``expected`` (None: any handle/
        sequence) and is unused now. Returns one outcome per address."""
        outcomes: dict[str, Outcome] = {}
        by_block: dict[str, list[str]] = {}
        blocks = {str(Block.from_spec(kv.value["spec"]).cidr): kv for kv in (await self.b.list(KIND_IPAM_BLOCK)).items
                  if isinstance(kv.value.get("spec"), dict) and not kv.value["spec"].get("deleted")
                  and _parses(kv)}
        for ip in expected:
            addr = ipaddress.ip_address(ip)
            cidr = next((c for c in blocks if _in(addr, c)), None)
            if cidr is None:
                outcomes[ip] = Outcome(ip, False, f"{ip} is not assigned")
            else:
                by_block.setdefault(cidr, []).append(ip)
        for cidr, ips in by_block.items():
            for o in await self._release_in_block(blocks[cidr].key, cidr, {ip: expected[ip] for ip in ips}):
                outcomes[o.ip] = o
        return [outcomes[ip] for ip in expected]

    async def _release_in_block(self, key: Key, cidr: str, expected: Mapping[str, Allocation | None]) -> list[Outcome]:
        for _ in range(_RETRIES):
            try:
                bkv = await self.b.get(key)
            except NotFound:
                return [Outcome(ip, False, f"{ip} is not assigned (its block is gone)") for ip in expected]
            block = Block.from_spec(bkv.value["spec"])
            # Listed after the block read: an endpoint written for one of these addresses before now is seen.
            weps = (await self.b.list(KIND_WEP, OWNERS)).items
            nodes = (await self.b.list(KIND_NODE)).items
            an = analyse(blocks=[bkv.value], handles=[], affinities=[], pools=[],
                         weps=[kv.value for kv in weps], nodes=[kv.value for kv in nodes])
            outcomes: list[Outcome] = []
            ords: list[int] = []
            for ip, want in expected.items():
                o = self._judge(ip, want, an)
                if o is None:
                    ords.append(block.ip_to_ordinal(ipaddress.ip_address(ip)))
                else:
                    outcomes.append(o)
            if not ords:
                return outcomes
            released, _, by_handle = block.release(ords)
            try:
                if block.is_empty() and block.affinity is None:
                    await self._cas_delete(bkv)
                else:
                    block.bump_sequence()
                    await self.b.update(KVPair(bkv.key, {**bkv.value, "spec": block.to_spec()}, bkv.revision, bkv.uid))
            except (Conflict, NotFound):
                continue  # the block changed since it was read: judge again on a fresh read
            for h, n in by_handle.items():
                await self._handle_add(h, cidr, -n)
            outcomes += [Outcome(str(block.ordinal_to_ip(o)), True, "") for o in released]
            return outcomes
        return [Outcome(ip, False, f"block {cidr} kept changing; try again", refused=True) for ip in expected]

    def _judge(self, ip: str, want: Allocation | None, an: Analysis) -> Outcome | None:
        """None if ``ip`` may be released now, else why not."""
        now_allocs = an.allocations.get(ip) or []
        if not now_allocs:
            return Outcome(ip, False, f"{ip} is not assigned (already released)")
        a = now_allocs[0]
        if a.in_use:
            return Outcome(ip, False, f"refusing to release {ip}: it is in use by {', '.join(a.owners or [])}",
                           refused=True)
        if want is not None:
            if want.handle != a.handle:
                return Outcome(ip, False, f"refusing to release {ip}: it now belongs to handle {a.handle or '<none>'}, "
                               f"not {want.handle or '<none>'} as in the report (re-run ipam check)", refused=True)
            if want.sequence_number is not None and a.sequence_number is not None \
                    and want.sequence_number != a.sequence_number:
                return Outcome(ip, False, f"refusing to release {ip}: it was re-allocated since the report "
                               "(sequence number changed; re-run ipam check)", refused=True)
        ts = parse_timestamp(a.creation_timestamp)
        if ts is not None and self.now - ts < self.min_age:
            return Outcome(ip, False, f"refusing to release {ip}: allocated {max(self.now - ts, 0):.0f}s ago, less "
                           f"than --min-age {self.min_age:g}s (its pod may still be being set up)", refused=True)
        return None

    # -- handles ------------------------------------------------------------------------------------
    async def release_handles(self, infos: Iterable[HandleInfo], used: set[str]) -> list[tuple[str, bool, str]]:
        """Delete each leaked handle if it is unchanged since the report and still unused (``used``: handles
        named by allocations in a fresh read). (id, deleted, reason)."""
        out = []
        for h in infos:
            if h.id in used:
                out.append((h.id, False, "it has allocations now"))
                continue
            try:
                kv = await self.b.get(handle_key(h.id, exact=self.etcd))
            except NotFound:
                out.append((h.id, False, "already gone"))
                continue
            if h.revision and kv.revision != h.revision:
                out.append((h.id, False, "changed since the report"))
                continue
            try:
                await self._cas_delete(kv)
            except (Conflict, NotFound):
                out.append((h.id, False, "changed since the report"))
                continue
            out.append((h.id, True, ""))
        return out

    async def _handle_add(self, handle_id: str, cidr: str, delta: int) -> None:
        key = handle_key(handle_id, exact=self.etcd)
        for _ in range(_RETRIES):
            try:
                kv = await self.b.get(key)
            except NotFound:
                return
            spec = dict(kv.value.get("spec") or {})
            raw = spec.get("block") if isinstance(spec.get("block"), dict) else {}
            counts = Counter({str(k): v for k, v in (raw or {}).items() if isinstance(v, int) and v > 0})
            counts[cidr] += delta
            blocks = {k: v for k, v in counts.items() if v > 0}
            try:
                if not blocks:
                    await self._cas_delete(kv)
                else:
                    spec.update(handle_spec(str(spec.get("handleID") or handle_id), blocks))
                    await self.b.update(KVPair(kv.key, {**kv.value, "spec": spec}, kv.revision, kv.uid))
                return
            except (Conflict, NotFound):
                continue

    async def _cas_delete(self, kv: KVPair) -> None:
        """Delete only if unchanged; on Kubernetes first mark ``deleted`` (Calico's two-phase delete)."""
        if self.etcd:
            await self.b.delete(kv.key, revision=kv.revision)
            return
        spec = dict(kv.value.get("spec") or {})
        spec["deleted"] = True
        marked = await self.b.update(KVPair(kv.key, {**kv.value, "spec": spec}, kv.revision, kv.uid))
        with contextlib.suppress(NotFound):
            await self.b.delete(kv.key, revision=marked.revision, uid=marked.uid or kv.uid)


def _parses(kv: KVPair) -> bool:
    try:
        Block.from_spec(kv.value["spec"])
    except Exception:
        return False
    return True


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, cidr: str) -> bool:
    net = ipaddress.ip_network(cidr)
    return net.version == addr.version and addr in net
