"""Pure IPAM block logic, byte-compatible with Calico's IPAMBlock / BlockAffinity / IPAMHandle CRDs.

No I/O here: a :class:`Block` is parsed from an IPAMBlock ``spec`` dict, changed in memory, and written
back with :meth:`Block.to_spec`; the client (:mod:`felixpy.ipam.client`) does the compare-and-swap.

Block layout (Calico ``libcalico-go/lib/ipam/ipam_block.go``):

* ``allocations[ordinal]`` is ``None`` (free) or an index into ``attributes``;
* ``unallocated`` is the ordered free list: assignment pops from the front, release appends to the end,
  so a released address is reused last (FIFO), which keeps a just-freed IP away from a new pod;
* ``attributes`` holds ``{"handle_id", "secondary"}`` entries shared by allocations with equal owners;
  when the last allocation using an entry goes, the entry is removed and the indexes renumbered;
* ``sequenceNumber`` goes up on every write; ``sequenceNumberForAllocation[ordinal]`` remembers it at
  assignment time so a stale release can be detected.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from felixpy.ipam.errors import AddressInUseError, InvalidBlockError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

WINDOWS_RESERVED_HANDLE = "windows-reserved-ipam-handle"
AFFINITY_TYPE_HOST = "host"
AFFINITY_HOST_PREFIX = "host:"

STATE_PENDING = "pending"
STATE_CONFIRMED = "confirmed"
STATE_PENDING_DELETION = "pendingDeletion"

LABEL_HOSTNAME_HASH = "projectcalico.org/hostname-hash"
LABEL_AFFINITY_TYPE = "projectcalico.org/affinity-type"
LABEL_IP_VERSION = "projectcalico.org/ip-version"

# Kubernetes object names are DNS subdomains: at most 253 characters.
_MAX_NAME = 253

# Attribute keys Calico writes (libcalico-go/lib/backend/model/block.go).
ATTR_NODE = "node"
ATTR_NAMESPACE = "namespace"
ATTR_POD = "pod"
ATTR_TIMESTAMP = "timestamp"
ATTR_TYPE = "type"


# -- names and labels ---------------------------------------------------------------------------------
def cidr_to_name(cidr: IPNetwork | str) -> str:
    """Calico's CIDRToName: ``10.244.1.0/26`` -> ``10-244-1-0-26``."""
    return str(cidr).replace(".", "-").replace(":", "-").replace("/", "-")


def affinity_name(host: str, cidr: IPNetwork | str) -> str:
    """BlockAffinity object name ``<host>-<cidrname>``, shortened with a hash when it would not fit."""
    cidrname = cidr_to_name(cidr)
    name = f"{host}-{cidrname}"
    if len(name) >= _MAX_NAME:
        digest = hashlib.sha256(f"{host}+{cidrname}".encode()).hexdigest()[:11]
        # 252 = room for the name; 13 = the hash and the two separators.
        name = f"{host[:252 - len(cidrname) - 13]}-{cidrname}-{digest}"
    return name


def hostname_hash(host: str) -> str:
    """Label value for ``projectcalico.org/hostname-hash``: base32(sha3-256(host)) without padding.

    Hostnames may be longer than the 63 characters a label value allows; 256 bits fit in 52.
    """
    return base64.b32encode(hashlib.sha3_256(host.encode()).digest()).decode().rstrip("=")


def affinity_labels(host: str, cidr: IPNetwork, affinity_type: str = AFFINITY_TYPE_HOST) -> dict[str, str]:
    return {
        LABEL_HOSTNAME_HASH: hostname_hash(host),
        LABEL_AFFINITY_TYPE: affinity_type,
        LABEL_IP_VERSION: str(cidr.version),
    }


def affinity_spec(host: str, cidr: IPNetwork, state: str, *, deleted: bool = False) -> dict[str, Any]:
    # ``deleted`` is a bool in the v3 form; the Kubernetes backend writes the CRD's string "true"/"false".
    return {"state": state, "node": host, "cidr": str(cidr), "type": AFFINITY_TYPE_HOST, "deleted": deleted}


def affinity_is_deleted(spec: Mapping[str, Any]) -> bool:
    """Accepts the v3 bool and the CRD's string form."""
    d = spec.get("deleted", False)
    if isinstance(d, str):
        return d.strip().lower() == "true"
    return bool(d)


def handle_name(handle_id: str, *, exact: bool = False) -> str:
    """IPAMHandle object name: the handle ID lower-cased (Kubernetes names are lower case), or the
    exact ID where the store keys handles case-sensitively (etcd: ``/calico/ipam/v2/handle/<ID>``)."""
    return handle_id if exact else handle_id.lower()


def sanitize_handle(handle_id: str) -> str:
    """Drop the ``\\r...`` tail some host-local migrations wrote into handle IDs (Calico does the same)."""
    return handle_id.split("\r", 1)[0]


def handle_spec(handle_id: str, blocks: Mapping[str, int], *, deleted: bool = False) -> dict[str, Any]:
    return {"handleID": handle_id, "block": dict(blocks), "deleted": deleted}


def format_time(ts: float) -> str:
    """RFC 3339 in UTC with second precision, as a Kubernetes ``metav1.Time`` serialises."""
    return dt.datetime.fromtimestamp(int(ts), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- random block order (Calico randomBlockGenerator) -------------------------------------------------
def fnv1_32(data: bytes) -> int:
    """FNV-1 (not 1a) 32-bit, as Go's ``hash/fnv.New32``."""
    h = 0x811C9DC5
    for b in data:
        h = (h * 0x01000193) & 0xFFFFFFFF
        h ^= b
    return h


def block_cidrs(pool: IPNetwork, block_prefix: int, host: str, *,
                rng: random.Random | None = None) -> Iterator[IPNetwork]:
    """Every block of ``pool`` once, starting at a host-seeded random block and wrapping around.

    Seeding by the hostname makes concurrent claims on one node try the same block first (so they meet
    on the block's CAS rather than each claiming a block) and spreads nodes over the pool. Calico seeds
    Go's math/rand with fnv32(hostname); Python's generator differs, so the start differs from Calico's
    for the same host, which only matters for which free block is picked, not for correctness.
    """
    if block_prefix < pool.prefixlen:
        return
    nblocks = 1 << (block_prefix - pool.prefixlen)
    if rng is None:
        # /32 (or /128) blocks: one address per block, so avoid every host hammering the same ones.
        seed = random.SystemRandom().getrandbits(32) if block_prefix == pool.max_prefixlen else \
            fnv1_32(host.encode())
        rng = random.Random(seed)
    start = rng.randrange(nblocks)
    step = 1 << (pool.max_prefixlen - block_prefix)
    base = int(pool.network_address)
    net_cls = type(pool)
    for i in range(nblocks):
        idx = (start + i) % nblocks
        yield net_cls((base + idx * step, block_prefix))


def block_cidr_for(ip: IPAddress, block_prefix: int) -> IPNetwork:
    return ipaddress.ip_network((ip, block_prefix), strict=False)


# -- the block --------------------------------------------------------------------------------------
def _attr_handle(attr: Mapping[str, Any]) -> str | None:
    h = attr.get("handle_id")
    return sanitize_handle(h) if isinstance(h, str) else None


@dataclass
class Block:
    cidr: IPNetwork
    allocations: list[int | None]
    unallocated: list[int]
    attributes: list[dict[str, Any]]
    affinity: str | None = None
    affinity_claim_time: str | None = None
    sequence_number: int = 0
    seq_for_allocation: dict[str, int] = field(default_factory=dict)
    deleted: bool = False
    # Spec fields this code does not interpret, written back unchanged (forward compatibility).
    extra: dict[str, Any] = field(default_factory=dict)

    # -- construction / serialisation --
    @classmethod
    def new(cls, cidr: IPNetwork, *, host: str | None, claim_time: float | None,
            sequence_number: int) -> Block:
        """A fresh block with every ordinal free, in order (Calico ``newBlock``)."""
        n = cidr.num_addresses
        return cls(cidr=cidr, allocations=[None] * n, unallocated=list(range(n)), attributes=[],
                   affinity=f"{AFFINITY_HOST_PREFIX}{host}" if host else None,
                   affinity_claim_time=format_time(claim_time) if claim_time is not None else None,
                   sequence_number=sequence_number)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Block:
        """Parse and validate an IPAMBlock spec; raises :class:`InvalidBlockError`."""
        if not isinstance(spec, Mapping):
            raise InvalidBlockError("IPAMBlock spec is not an object")
        try:
            cidr = ipaddress.ip_network(str(spec.get("cidr", "")), strict=True)
        except ValueError as e:
            raise InvalidBlockError(f"IPAMBlock has an invalid cidr {spec.get('cidr')!r}: {e}") from None
        n = cidr.num_addresses
        if n > 1 << 16:
            raise InvalidBlockError(f"IPAMBlock {cidr} is too large ({n} addresses)")
        attrs_raw = spec.get("attributes") or []
        if not isinstance(attrs_raw, list) or not all(isinstance(a, dict) for a in attrs_raw):
            raise InvalidBlockError(f"IPAMBlock {cidr}: attributes is not a list of objects")
        attributes = [dict(a) for a in attrs_raw]
        allocs_raw = spec.get("allocations")
        if allocs_raw is None:
            allocs_raw = [None] * n
        if not isinstance(allocs_raw, list) or len(allocs_raw) != n:
            raise InvalidBlockError(f"IPAMBlock {cidr}: allocations must be a list of {n} entries")
        allocations: list[int | None] = []
        for o, a in enumerate(allocs_raw):
            if a is None:
                allocations.append(None)
            elif isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(attributes):
                allocations.append(a)
            else:
                raise InvalidBlockError(f"IPAMBlock {cidr}: allocation {o} has a bad attribute index {a!r}")
        unalloc_raw = spec.get("unallocated") or []
        if not isinstance(unalloc_raw, list):
            raise InvalidBlockError(f"IPAMBlock {cidr}: unallocated is not a list")
        seen: set[int] = set()
        for o in unalloc_raw:
            if not isinstance(o, int) or isinstance(o, bool) or not 0 <= o < n:
                raise InvalidBlockError(f"IPAMBlock {cidr}: unallocated has a bad ordinal {o!r}")
            if o in seen:
                raise InvalidBlockError(f"IPAMBlock {cidr}: ordinal {o} is listed twice as unallocated")
            if allocations[o] is not None:
                # Handing it out would give one address two owners: refuse the block instead.
                raise InvalidBlockError(f"IPAMBlock {cidr}: ordinal {o} is both allocated and unallocated")
            seen.add(o)
        seq_raw = spec.get("sequenceNumber", 0) or 0
        if not isinstance(seq_raw, int) or isinstance(seq_raw, bool):
            raise InvalidBlockError(f"IPAMBlock {cidr}: sequenceNumber is not an integer")
        sfa_raw = spec.get("sequenceNumberForAllocation") or {}
        if not isinstance(sfa_raw, dict):
            raise InvalidBlockError(f"IPAMBlock {cidr}: sequenceNumberForAllocation is not an object")
        try:
            sfa = {str(k): int(v) for k, v in sfa_raw.items()}
        except (TypeError, ValueError):
            raise InvalidBlockError(
                f"IPAMBlock {cidr}: sequenceNumberForAllocation has a non-integer") from None
        affinity = spec.get("affinity")
        if affinity is not None and not isinstance(affinity, str):
            raise InvalidBlockError(f"IPAMBlock {cidr}: affinity is not a string")
        claim = spec.get("affinityClaimTime")
        known = {"cidr", "allocations", "unallocated", "attributes", "affinity", "affinityClaimTime",
                 "sequenceNumber", "sequenceNumberForAllocation", "deleted", "strictAffinity"}
        extra = {k: v for k, v in spec.items() if k not in known}
        return cls(cidr=cidr, allocations=allocations, unallocated=list(unalloc_raw), attributes=attributes,
                   affinity=affinity or None, affinity_claim_time=claim if isinstance(claim, str) else None,
                   sequence_number=seq_raw, seq_for_allocation=sfa, deleted=bool(spec.get("deleted", False)),
                   extra=extra)

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = dict(self.extra)
        spec.update({
            "cidr": str(self.cidr),
            "allocations": list(self.allocations),
            "unallocated": list(self.unallocated),
            "attributes": [dict(a) for a in self.attributes],
            "sequenceNumber": self.sequence_number,
            "sequenceNumberForAllocation": dict(self.seq_for_allocation),
            "deleted": self.deleted,
            # Deprecated but required by the CRD schema; Calico always writes false.
            "strictAffinity": False,
        })
        # Omitted rather than null: the CRD types these as plain strings.
        if self.affinity is not None:
            spec["affinity"] = self.affinity
        if self.affinity_claim_time is not None:
            spec["affinityClaimTime"] = self.affinity_claim_time
        return spec

    def copy(self) -> Block:
        return Block.from_spec(self.to_spec())

    # -- addressing --
    @property
    def size(self) -> int:
        return len(self.allocations)

    def ordinal_to_ip(self, ordinal: int) -> IPAddress:
        if not 0 <= ordinal < self.size:
            raise ValueError(f"ordinal {ordinal} is outside block {self.cidr}")
        return self.cidr.network_address + ordinal

    def ip_to_ordinal(self, ip: IPAddress) -> int:
        if ip.version != self.cidr.version or ip not in self.cidr:
            raise ValueError(f"{ip} is not in block {self.cidr}")
        return int(ip) - int(self.cidr.network_address)

    def interface(self, ordinal: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """``<ip>/<block prefix>``, the form Calico's AutoAssign returns."""
        return ipaddress.ip_interface((self.ordinal_to_ip(ordinal), self.cidr.prefixlen))

    # -- affinity --
    @property
    def host(self) -> str | None:
        """The node this block is affine to, or None (not affine, or a non-host affinity)."""
        if self.affinity and self.affinity.startswith(AFFINITY_HOST_PREFIX):
            return self.affinity[len(AFFINITY_HOST_PREFIX):]
        return None

    def claim_time(self) -> float | None:
        return parse_time(self.affinity_claim_time)

    # -- queries --
    def num_free(self, skip: Callable[[IPAddress], bool] | None = None) -> int:
        if skip is None:
            return len(self.unallocated)
        return sum(1 for o in self.unallocated if not skip(self.ordinal_to_ip(o)))

    def is_empty(self) -> bool:
        """True when no address is in use (Windows' reserved addresses do not count)."""
        for idx in self.allocations:
            if idx is None:
                continue
            h = self.attributes[idx].get("handle_id")
            if not isinstance(h, str) or h.lower() != WINDOWS_RESERVED_HANDLE:
                return False
        return True

    def handle_of(self, ordinal: int) -> str | None:
        idx = self.allocations[ordinal]
        return None if idx is None else _attr_handle(self.attributes[idx])

    def attrs_of(self, ordinal: int) -> dict[str, str] | None:
        idx = self.allocations[ordinal]
        if idx is None:
            return None
        sec = self.attributes[idx].get("secondary")
        return dict(sec) if isinstance(sec, dict) else {}

    def ordinals_by_handle(self, handle_id: str) -> list[int]:
        handle_id = sanitize_handle(handle_id)
        idxs = {i for i, a in enumerate(self.attributes) if _attr_handle(a) == handle_id}
        if not idxs:
            return []
        return [o for o, idx in enumerate(self.allocations) if idx is not None and idx in idxs]

    def allocated_ordinals(self) -> list[int]:
        return [o for o, idx in enumerate(self.allocations) if idx is not None]

    # -- mutation --
    def bump_sequence(self) -> None:
        """Every write of a block advances its sequence number (Calico ``updateBlock``)."""
        self.sequence_number += 1

    def _find_or_add_attr(self, handle_id: str | None, attrs: Mapping[str, str] | None) -> int:
        want: dict[str, Any] = {}
        if handle_id is not None:
            want["handle_id"] = handle_id
        if attrs:
            want["secondary"] = dict(attrs)
        for i, a in enumerate(self.attributes):
            have = {k: v for k, v in a.items() if v not in (None, {}, "")}
            if have == want:
                return i
        self.attributes.append(want)
        return len(self.attributes) - 1

    def auto_assign(self, num: int, handle_id: str | None, attrs: Mapping[str, str] | None, *,
                    skip: Callable[[IPAddress], bool] | None = None) -> list[int]:
        """Take up to ``num`` ordinals from the front of the free list; returns them (maybe fewer)."""
        if num <= 0:
            return []
        out: list[int] = []
        keep: list[int] = []
        attr_idx: int | None = None
        for pos, o in enumerate(self.unallocated):
            if len(out) >= num:
                keep.extend(self.unallocated[pos:])
                break
            if skip is not None and skip(self.ordinal_to_ip(o)):
                keep.append(o)
                continue
            if attr_idx is None:
                attr_idx = self._find_or_add_attr(handle_id, attrs)
            self.allocations[o] = attr_idx
            self.seq_for_allocation[str(o)] = self.sequence_number
            out.append(o)
        self.unallocated = keep
        return out

    def assign(self, ordinal: int, handle_id: str | None, attrs: Mapping[str, str] | None) -> None:
        """Allocate one specific ordinal; raises :class:`AddressInUseError` if it is taken."""
        if not 0 <= ordinal < self.size:
            raise ValueError(f"ordinal {ordinal} is outside block {self.cidr}")
        if self.allocations[ordinal] is not None:
            owner = self.handle_of(ordinal)
            raise AddressInUseError(f"address {self.ordinal_to_ip(ordinal)} is already in use"
                                    + (f" (handle {owner})" if owner else ""))
        self.allocations[ordinal] = self._find_or_add_attr(handle_id, attrs)
        self.seq_for_allocation[str(ordinal)] = self.sequence_number
        if ordinal in self.unallocated:  # a free ordinal missing from the list has nothing to remove
            self.unallocated.remove(ordinal)

    def release(self, ordinals: list[int]) -> tuple[list[int], list[int], dict[str, int]]:
        """Free ``ordinals``. Returns (released, were_not_allocated, released count per handle)."""
        released: list[int] = []
        not_allocated: list[int] = []
        del_refs: Counter[int] = Counter()
        by_handle: Counter[str] = Counter()
        for o in dict.fromkeys(ordinals):
            if not 0 <= o < self.size:
                raise ValueError(f"ordinal {o} is outside block {self.cidr}")
            idx = self.allocations[o]
            if idx is None:
                not_allocated.append(o)
                continue
            released.append(o)
            del_refs[idx] += 1
            h = _attr_handle(self.attributes[idx])
            if h:
                by_handle[h] += 1
        refs = Counter(i for i in self.allocations if i is not None)
        dead = {i for i, n in del_refs.items() if refs[i] == n}
        for o in released:
            self.allocations[o] = None
            # Appended: the most recently freed address is the last to be reused.
            self.unallocated.append(o)
            self.seq_for_allocation.pop(str(o), None)
        self._delete_attributes(dead)
        return released, not_allocated, dict(by_handle)

    def release_by_handle(self, handle_id: str) -> list[int]:
        """Free every ordinal owned by ``handle_id``; returns them."""
        handle_id = sanitize_handle(handle_id)
        released, _, _ = self.release(self.ordinals_by_handle(handle_id))
        # Also drop entries of this handle that no allocation uses any more.
        refs = {i for i in self.allocations if i is not None}
        self._delete_attributes({i for i, a in enumerate(self.attributes)
                                 if _attr_handle(a) == handle_id and i not in refs})
        return released

    def _delete_attributes(self, dead: set[int]) -> None:
        if not dead:
            return
        remap: dict[int, int] = {}
        kept: list[dict[str, Any]] = []
        for i, a in enumerate(self.attributes):
            if i not in dead:
                remap[i] = len(kept)
                kept.append(a)
        self.attributes = kept
        for o, idx in enumerate(self.allocations):
            if idx is not None:
                # An allocation pointing at a deleted entry cannot happen: entries die only unreferenced.
                self.allocations[o] = remap[idx]


def check_block(block: Block) -> list[str]:
    """Invariant violations of one block (empty when consistent); used by tests and ``ipam check``."""
    problems: list[str] = []
    free = set(block.unallocated)
    if len(free) != len(block.unallocated):
        problems.append(f"{block.cidr}: duplicate ordinals in unallocated")
    for o, idx in enumerate(block.allocations):
        if idx is None and o not in free:
            problems.append(f"{block.cidr}: ordinal {o} is neither allocated nor in the free list")
        if idx is not None and o in free:
            problems.append(f"{block.cidr}: ordinal {o} is allocated and in the free list")
        if idx is not None and not 0 <= idx < len(block.attributes):
            problems.append(f"{block.cidr}: ordinal {o} points at missing attribute {idx}")
    used = {i for i in block.allocations if i is not None}
    for i in range(len(block.attributes)):
        if i not in used:
            problems.append(f"{block.cidr}: attribute {i} is not used by any allocation")
    return problems
