"""The nftables driver: owns one nft table (default ``ip calico``, as Calico's nft mode), applies only
the difference, in one atomic transaction per apply.

Desired state comes from managers through cheap setters (no kernel access, they only record and mark
names dirty):

- ``set_chain(name, rules, base=None)``: a chain and its rules (nft rule text, or :class:`Rule` with a
  comment). ``base`` makes it a base chain (type, hook, priority, policy).
- ``set_set(name, type, elements, flags=())`` / ``set_map(name, key_type, value_type, elements)``: named
  sets and maps (verdict maps for dispatch). Interval sets of addresses take CIDRs; overlapping or
  adjacent CIDRs are collapsed first (the kernel refuses overlapping intervals, and membership is the same).
- ``remove_chain`` / ``remove_set``; ``add_set_elements`` / ``remove_set_elements`` for big sets.
- ``set_counter(name)`` / ``remove_counter(name)``: named counters, which rules use as
  ``counter name "<name>"`` (created before, deleted after, the chains that use them);
  ``read_counters()`` reads them all in one ``list counters`` call.

Ownership: the whole table is ours (:mod:`felixpy.names`); nothing outside it is ever touched, and the
table itself is never flushed or deleted by ``apply`` (only by an explicit :meth:`NftTable.delete_table`).

Comparing with the kernel: nft normalises rule text when it lists it, so rules are never compared by
text. Each rule carries a comment ``cali:<hash>`` (plus ``; <comment>`` if the rule has one), where the
hash chains the chain name and every rule text up to this one (:func:`rule_hashes`, same idea as Calico's
rule hashes). A chain is right when the kernel's list of hashes equals the expected one, which catches a
changed, missing, extra, reordered or foreign rule. After an agent restart with the right state present,
nothing is rewritten. Sets are compared element by element (canonical forms on both sides).

``apply()`` writes one nft transaction: changed chains are flushed and refilled, set elements are added
and removed incrementally, new objects are declared before anything refers to them, stale ones are
deleted after everything stopped referring to them. It trusts its cache of what the kernel holds, except
on the first apply and after ``queue_resync()``, which re-read the table as JSON and repair drift.

Removals: until ``allow_removals()`` (the datastore is in sync) the driver only *adds*: missing sets,
elements, chains and rules into empty chains. It does not delete stale chains, sets or elements, and it
does not rewrite a chain that exists with other content: before the sync a manager's view may be partial,
and replacing a working chain with a partial one would drop traffic. Those changes are counted as
``deferred`` and done by the first apply after ``allow_removals()``.

Bad input: setters raise ValueError (changing nothing) on malformed names, types, elements or rule text
that would break out of its rule (``;``, ``#``, newlines, its own ``comment``). A chain that refers to a
chain or set that is not desired, or that nft rejects, is left as the kernel has it, reported in
``errors`` and retried when it is set again or at the next resync; everything else is still applied.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from felixpy.dataplane.shims.nft import Nft, NftError

log = logging.getLogger(__name__)

HASH_PREFIX = "cali:"
HASH_LEN = 16
MAX_COMMENT = 128  # nft's limit for the whole comment (hash + user comment)

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
CHAIN_TYPES = ("filter", "nat", "route")
HOOKS = ("prerouting", "input", "forward", "output", "postrouting")  # netdev hooks need a device: not supported
POLICIES = ("accept", "drop")
SET_FLAGS = ("interval", "constant", "timeout", "dynamic")
# Priorities of the netfilter hook stages, for BaseChain.priority (nft's named priorities).
PRIO_RAW = -300
PRIO_MANGLE = -150
PRIO_DSTNAT = -100
PRIO_FILTER = 0
PRIO_SRCNAT = 100

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,254}$")
_SET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,254}$")  # no ":" in nft names: see legal_set_name
_JUMP_RE = re.compile(r"\b(?:jump|goto)\s+([A-Za-z_][A-Za-z0-9_./-]*)")
# "@name" refers to a set or map; "@th,16,8" (a raw payload base) does not.
_SETREF_RE = re.compile(r"@([A-Za-z_][A-Za-z0-9_.-]*)(?![A-Za-z0-9_.-]|\s*,)")
# A named counter reference; the driver tracks it like a set reference, as "%<name>".
_COUNTERREF_RE = re.compile(r'\bcounter\s+name\s+"?([A-Za-z_][A-Za-z0-9_.-]*)"?')
_COMMENT_WORD_RE = re.compile(r"(?<![A-Za-z0-9_-])comment(?![A-Za-z0-9_-])")
_BAD_COMMENT_RE = re.compile(r'["\x00-\x1f]')  # quotes and control characters
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@+*-]{1,16}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_VERDICT_RE = re.compile(r"^(accept|drop|return|continue|(jump|goto) ([A-Za-z_][A-Za-z0-9_./-]*))$")
_PROTOS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58,
           "sctp": 132, "udplite": 136}
# Errors that mean the kernel is not as we believe (someone changed it), not that the input is bad.
_KERNEL_STATE_ERRORS = ("No such file or directory", "Device or resource busy", "File exists")
_ELEM_TYPES = ("ipv4_addr", "ipv6_addr", "inet_proto", "inet_service", "ifname", "mark", "ether_addr")


@dataclass(frozen=True)
class Rule:
    """One rule: nft rule text (matches and statements, no ``comment``) and an optional comment."""

    text: str
    comment: str = ""


@dataclass(frozen=True)
class BaseChain:
    """What makes a chain a base chain: ``type <type> hook <hook> priority <priority>; policy <policy>``."""

    type: str
    hook: str
    priority: int
    policy: str = "accept"

    def validate(self) -> None:
        if self.type not in CHAIN_TYPES:
            raise ValueError(f"base chain type must be one of {CHAIN_TYPES}, not {self.type!r}")
        if self.hook not in HOOKS:
            raise ValueError(f"base chain hook must be one of {HOOKS}, not {self.hook!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or abs(self.priority) > 2**31:
            raise ValueError(f"base chain priority must be an integer, not {self.priority!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"base chain policy must be one of {POLICIES}, not {self.policy!r}")

    def render(self) -> str:
        return f"{{ type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy}; }}"


def legal_set_name(ipset_name: str) -> str:
    """An ipset name as an nft set name: nft refuses ":" (``cali40s:abc`` -> ``cali40s-abc``, as Calico)."""
    return ipset_name.replace(":", "-")


def rule_hashes(chain: str, rules: Sequence[str]) -> list[str]:
    """The hash of each rule: sha256 chained over the chain name and every rule text so far, as the
    first 16 characters of URL-safe base64 (96 bits). A change to a rule changes its hash and those of
    all rules after it, so comparing the hash lists compares whole chains."""
    sha256, b64 = hashlib.sha256, base64.urlsafe_b64encode
    h = sha256(b"felixpy-rule\x00" + chain.encode()).digest()
    out: list[str] = []
    for r in rules:
        h = sha256(h + b"\x00" + r.encode()).digest()
        out.append(b64(h[:_HASH_BYTES]).decode())  # 12 bytes are exactly the first 16 base64 characters
    return out


_HASH_BYTES = HASH_LEN * 3 // 4


def unquoted(text: str) -> str:
    """``text`` with the contents of double-quoted strings blanked (they may hold ``;``, ``#``...).
    Raises ValueError on an unterminated string."""
    parts = text.split('"')
    if len(parts) % 2 == 0:
        raise ValueError(f"unbalanced double quotes in {text!r}")
    return '""'.join(parts[0::2])


def check_nft_rule(text: object) -> tuple[frozenset[str], frozenset[str]]:
    """Validate one rule text; returns (chains it jumps to, sets/maps it refers to)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"rule must be non-empty text, not {text!r}")
    if len(text) > 8192:
        raise ValueError(f"rule too long ({len(text)} characters)")
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError(f"rule must be one line: {text!r}")
    bare = unquoted(text) if '"' in text else text
    for bad, why in ((";", "';' would end the rule"), ("#", "'#' would start a comment")):
        if bad in bare:
            raise ValueError(f"rule {text!r}: {why}")
    # The substring tests are cheap pre-checks: most rules neither jump, use a set nor say "comment".
    if "comment" in bare and _COMMENT_WORD_RE.search(bare):
        raise ValueError(f"rule {text!r}: put comments in Rule.comment, the driver adds its own")
    jumps = frozenset(_JUMP_RE.findall(bare)) if "jump" in bare or "goto" in bare else _EMPTY
    sets = frozenset(_SETREF_RE.findall(bare)) if "@" in bare else _EMPTY
    if "counter" in text:
        sets |= {"%" + c for c in _COUNTERREF_RE.findall(text)}
    return jumps, sets


_EMPTY: frozenset[str] = frozenset()


def _check_comment(comment: object) -> str:
    if not isinstance(comment, str):
        raise ValueError(f"rule comment must be text, not {comment!r}")
    if not comment:
        return comment
    if _BAD_COMMENT_RE.search(comment):
        raise ValueError(f"rule comment {comment!r} must not contain quotes or control characters")
    if len(comment.encode()) > _MAX_USER_COMMENT:
        raise ValueError(f"rule comment {comment!r} too long (max {MAX_COMMENT - HASH_LEN - 7} bytes)")
    return comment


_MAX_USER_COMMENT = MAX_COMMENT - len((HASH_PREFIX + "x" * HASH_LEN + "; ").encode())


def _check_name(kind: str, name: object, pattern: re.Pattern[str] = _NAME_RE) -> str:
    if not isinstance(name, str) or not pattern.match(name):
        raise ValueError(f"invalid {kind} name {name!r}")
    return name


# -- set elements: one canonical text per element, the same from desired input and from kernel JSON ----
def _split_type(t: object) -> tuple[str, ...]:
    if not isinstance(t, str):
        raise ValueError(f"set type must be text, not {t!r}")
    comps = tuple(c.strip() for c in t.split("."))
    for c in comps:
        if c not in _ELEM_TYPES:
            raise ValueError(f"unsupported set element type {c!r} in {t!r} (supported: {_ELEM_TYPES})")
    return comps


def _canon_comp(comp: str, v: object, *, interval: bool) -> str:
    """Canonical text of one element component of type ``comp``. Raises ValueError."""
    if comp in ("ipv4_addr", "ipv6_addr"):
        want = 4 if comp == "ipv4_addr" else 6
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(f"{v!r} is not an IPv{want} address")
        if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
            net = v  # already a canonical network: no need to print and parse it again
        else:
            try:
                net = ipaddress.ip_network(str(v), strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an IPv{want} address or CIDR") from None
        if net.version != want:
            raise ValueError(f"{v!r} is not IPv{want}")
        if interval:
            return str(net)
        if net.prefixlen != net.max_prefixlen:
            raise ValueError(f"{v!r}: a CIDR needs a set with flags interval")
        return str(net.network_address)
    if comp == "ifname":
        if not isinstance(v, str) or not _IFNAME_RE.match(v):
            raise ValueError(f"invalid interface name {v!r}")
        return v
    if comp == "ether_addr":
        s = str(v).lower()
        if not _MAC_RE.match(s):
            raise ValueError(f"invalid MAC address {v!r}")
        return s
    if isinstance(v, bool):
        raise ValueError(f"invalid {comp} value {v!r}")
    if comp == "inet_proto" and isinstance(v, str) and v.lower() in _PROTOS:
        return str(_PROTOS[v.lower()])
    n = _as_int(v)
    if n is None:
        raise ValueError(f"invalid {comp} value {v!r}")
    limit = {"inet_proto": 255, "inet_service": 65535, "mark": 2**32 - 1}[comp]
    if not 0 <= n <= limit:
        raise ValueError(f"{comp} value {v!r} out of range")
    return str(n)


def _as_int(v: object) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        for base in (10, 0):
            try:
                return int(v.strip(), base)
            except ValueError:
                pass
    return None


def _canon_elem(comps: tuple[str, ...], v: object, *, interval: bool) -> str:
    if len(comps) == 1:
        return _canon_comp(comps[0], v, interval=interval)
    parts = v if isinstance(v, tuple | list) else str(v).split(" . ")
    if len(parts) != len(comps):
        raise ValueError(f"element {v!r} does not have the {len(comps)} parts of type {' . '.join(comps)}")
    return " . ".join(_canon_comp(c, p, interval=False) for c, p in zip(comps, parts, strict=True))


def _canon_verdict(v: object) -> str:
    s = " ".join(str(v).split()) if isinstance(v, str) else ""
    if not _VERDICT_RE.match(s):
        raise ValueError(f"invalid verdict {v!r} (accept, drop, return, continue, jump <chain>, goto <chain>)")
    return s


def _render_elem(comps: tuple[str, ...], key: str) -> str:
    if comps == ("ifname",):
        return f'"{key}"'
    if "ifname" in comps:
        parts = key.split(" . ")
        return " . ".join(f'"{p}"' if c == "ifname" else p for c, p in zip(comps, parts, strict=True))
    return key


def _json_value(v: Any) -> str:
    """A kernel JSON element (or component) as canonical text."""
    if isinstance(v, dict):
        if "elem" in v:
            return _json_value(v["elem"].get("val"))
        if "prefix" in v:
            p = v["prefix"]
            return str(ipaddress.ip_network(f"{p['addr']}/{p['len']}", strict=False))
        if "range" in v:
            a, b = v["range"]
            return f"{_json_value(a)}-{_json_value(b)}"
        if "concat" in v:
            return " . ".join(_json_value(x) for x in v["concat"])
        for verdict in ("jump", "goto"):
            if verdict in v:
                return f"{verdict} {v[verdict]['target']}"
        if len(v) == 1:
            return str(next(iter(v)))  # {"accept": null}
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


@dataclass
class _ChainSpec:
    base: BaseChain | None
    lines: tuple[str, ...]  # rule bodies as written, hash comment included
    hashes: tuple[str, ...]
    jumps: frozenset[str]
    sets: frozenset[str]
    texts: tuple[str, ...]
    raw: tuple[object, ...] = ()  # the rules as given to set_chain, to skip an unchanged set_chain cheaply

    def refs(self) -> frozenset[str]:
        """What the chain refers to, as reference keys: chain names and ``@set`` names."""
        return self.jumps | {"@" + s for s in self.sets} if self.sets else self.jumps


@dataclass
class _SetSpec:
    comps: tuple[str, ...]
    type: str  # canonical: components joined by " . "
    flags: tuple[str, ...]
    map_type: str  # "" for a set
    members: dict[str, str]  # canonical key -> canonical value ("" for sets), before collapsing
    _elements: dict[str, str] | None = None
    _targets: frozenset[str] | None = None

    @property
    def interval(self) -> bool:
        return "interval" in self.flags

    @property
    def keyword(self) -> str:
        return "map" if self.map_type else "set"

    def reset(self) -> None:
        """Forget what is derived from ``members`` (call after changing them)."""
        self._elements = None
        self._targets = None

    def elements(self) -> dict[str, str]:
        """The elements as the kernel will hold them (interval CIDRs collapsed)."""
        if self._elements is None:
            if self.interval:
                self._elements = dict.fromkeys(_collapse_cidrs(self.members, self.comps[0] == "ipv6_addr"), "")
            else:
                self._elements = dict(self.members)
        return self._elements

    def verdict_targets(self) -> frozenset[str]:
        """The chains a verdict map's values jump or go to (cached until ``reset``)."""
        if self._targets is None:
            if self.map_type != "verdict":
                self._targets = _EMPTY
            else:
                self._targets = frozenset(v.split(" ", 1)[1] for v in self.members.values() if " " in v)
        return self._targets

    def same_kind(self, o: _SetSpec) -> bool:
        return (self.type, self.flags, self.map_type) == (o.type, o.flags, o.map_type)

    def declare(self) -> str:
        flags = f" flags {','.join(self.flags)};" if self.flags else ""
        kind = f"{self.type} : {self.map_type}" if self.map_type else self.type
        return f"{{ type {kind};{flags} }}"

    def render(self, keys: Iterable[str], elems: Mapping[str, str]) -> str:
        if self.map_type:
            return ", ".join(f"{_render_elem(self.comps, k)} : {elems[k]}" for k in keys)
        return self.render_keys(keys)

    def render_keys(self, keys: Iterable[str]) -> str:
        return ", ".join(_render_elem(self.comps, k) for k in keys)


def _collapse_cidrs(keys: Iterable[str], v6: bool) -> list[str]:
    """Canonical CIDR keys collapsed to the fewest CIDRs covering the same addresses (what
    ``ipaddress.collapse_addresses`` gives), computed on integers: sort the ranges, merge the overlapping
    or adjacent ones, split each merged range into aligned CIDRs."""
    family, bits = (socket.AF_INET6, 128) if v6 else (socket.AF_INET, 32)
    ranges: list[tuple[int, int]] = []
    for k in keys:
        addr, _, plen = k.partition("/")
        start = int.from_bytes(socket.inet_pton(family, addr), "big")
        size = 1 << (bits - int(plen)) if plen else 1
        ranges.append((start, start + size - 1))
    ranges.sort()
    out: list[str] = []
    cur_s = cur_e = -2
    for a, b in ranges:
        if a <= cur_e + 1:
            if b > cur_e:
                cur_e = b
            continue
        if cur_e >= 0:
            _range_cidrs(cur_s, cur_e, bits, out)
        cur_s, cur_e = a, b
    if cur_e >= 0:
        _range_cidrs(cur_s, cur_e, bits, out)
    return out


def _range_cidrs(start: int, end: int, bits: int, out: list[str]) -> None:
    """Append the aligned CIDRs that exactly cover [start, end], lowest first."""
    while start <= end:
        # The biggest block aligned at start (its lowest set bit) that does not pass end.
        size = start & -start if start else 1 << bits
        while start + size - 1 > end:
            size >>= 1
        plen = bits - size.bit_length() + 1
        if bits == 32:
            addr = f"{start >> 24}.{(start >> 16) & 255}.{(start >> 8) & 255}.{start & 255}"
        else:
            addr = str(ipaddress.IPv6Address(start))  # the same text as the kernel side's parse
        out.append(f"{addr}/{plen}")
        start += size


@dataclass
class _KChain:
    base: BaseChain | None
    hashes: list[str | None]
    sets: set[str] = field(default_factory=set)  # sets/maps its rules refer to
    jumps: set[str] = field(default_factory=set)  # chains its rules jump/goto

    def refs(self) -> set[str]:
        return self.jumps | {"@" + s for s in self.sets}


@dataclass
class NftApplyStats:
    transactions: int = 0
    commands: int = 0
    chains_written: int = 0
    chains_deleted: int = 0
    sets_written: int = 0
    sets_deleted: int = 0
    elements_added: int = 0
    elements_removed: int = 0
    deferred: int = 0  # changes held back until allow_removals() (or while something still uses them)
    resynced: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # chain or @set -> why it was not programmed
    duration_s: float = 0.0


# Phases of one transaction, in order: create the table; create sets and delete set elements; declare
# new chains (so jumps between them resolve in any order); flush chains to be rewritten or deleted;
# recreate sets/base chains whose kind changed; add set elements and rules; delete stale maps, sets, chains.
_P_TABLE, _P_CREATE, _P_DECLARE, _P_FLUSH, _P_RECREATE, _P_FILL, _P_DELETE = range(7)


@dataclass
class _Plan:
    phases: list[list[str]] = field(default_factory=lambda: [[] for _ in range(7)])
    chain_units: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # chain -> its own commands
    written: set[str] = field(default_factory=set)
    deleted_chains: set[str] = field(default_factory=set)
    set_full: set[str] = field(default_factory=set)  # created or recreated with all elements
    set_adds: dict[str, list[str]] = field(default_factory=dict)
    set_dels: dict[str, list[str]] = field(default_factory=dict)
    deleted_sets: set[str] = field(default_factory=set)
    counters_added: set[str] = field(default_factory=set)
    counters_deleted: set[str] = field(default_factory=set)
    deferred: int = 0
    new_table: bool = False

    def add(self, phase: int, cmd: str, unit: str | None = None) -> None:
        self.phases[phase].append(cmd)
        if unit is not None:
            self.chain_units.setdefault(unit, []).append((phase, cmd))

    def text(self) -> str:
        return "\n".join(c for p in self.phases for c in p) + "\n"

    def n_commands(self) -> int:
        return sum(len(p) for p in self.phases)


class NftTable:
    def __init__(self, nft: Nft | None = None, *, family: str = "ip", name: str = "calico",
                 hash_prefix: str = HASH_PREFIX, removals_allowed: bool = False) -> None:
        if family not in FAMILIES:
            raise ValueError(f"nft family must be one of {FAMILIES}, not {family!r}")
        _check_name("table", name)
        if not hash_prefix or '"' in hash_prefix or ";" in hash_prefix:
            raise ValueError(f"invalid hash prefix {hash_prefix!r}")
        self._nft = nft if nft is not None else Nft()  # lazy: touches nothing until the first apply
        self.family = family
        self.name = name
        self.hash_prefix = hash_prefix
        self.removals_allowed = removals_allowed
        self._chains: dict[str, _ChainSpec] = {}
        self._sets: dict[str, _SetSpec] = {}
        self._dirty_chains: set[str] = set()
        self._dirty_sets: set[str] = set()
        self._counters: set[str] = set()
        self._kcounters: set[str] = set()
        self._dirty_counters: set[str] = set()
        # Reference key (chain name or "@set") -> desired chains ("name") and maps ("@name") referring to
        # it, so an apply re-checks only what changed and what refers to it.
        self._referrers: dict[str, set[str]] = {}
        self._failed: dict[str, str] = {}  # rejected by nft: not retried until set again or resync
        self._bad: dict[str, str] = {}  # everything not programmable at the last apply (incl. _failed)
        self._logged: dict[str, str] = {}
        self.deferred = 0
        # What we believe the kernel holds.
        self._table_exists = False
        self._kchains: dict[str, _KChain] = {}
        self._ksets: dict[str, _SetSpec] = {}
        self._kreferrers: dict[str, set[str]] = {}  # the same index for the chains in the kernel
        self._resync = True

    @property
    def target(self) -> str:
        return f"{self.family} {self.name}"

    # -- desired state (cheap: no kernel access) ----------------------------------------------------
    def set_chain(self, name: str, rules: Sequence[str | Rule], *, base: BaseChain | None = None) -> None:
        """Desired rules of chain ``name`` (replacing any previous ones). Raises ValueError, changing
        nothing, on a bad name, base spec or rule."""
        _check_name("chain", name)
        if base is not None:
            if not isinstance(base, BaseChain):
                raise ValueError(f"base must be a BaseChain, not {base!r}")
            base.validate()
        if isinstance(rules, str | Rule):
            raise ValueError(f"rules of chain {name} must be a sequence of rules, not one rule")
        raw = tuple(rules)
        old = self._chains.get(name)
        if old is not None and old.base == base and old.raw == raw:
            return  # the same rules as last time: already validated, nothing changes
        texts: list[str] = []
        comments: list[str] = []
        jumps: set[str] = set()
        sets: set[str] = set()
        for r in raw:
            text, comment = (r.text, r.comment) if isinstance(r, Rule) else (r, "")
            try:
                j, s = check_nft_rule(text)
                _check_comment(comment)
            except ValueError as e:
                raise ValueError(f"chain {name}: {e}") from None
            assert isinstance(text, str)
            texts.append(" ".join(text.split()) if '"' not in text else text.strip())
            comments.append(comment)
            jumps |= j
            sets |= s
        hashes = rule_hashes(name, [t + ("\x00" + c if c else "") for t, c in zip(texts, comments, strict=True)])
        lines = tuple(f'{t} comment "{self.hash_prefix}{h}' + (f"; {c}" if c else "") + '"'
                      for t, c, h in zip(texts, comments, hashes, strict=True))
        if old is not None and old.hashes == tuple(hashes) and old.base == base:
            old.raw = raw
            return
        spec = _ChainSpec(base, lines, tuple(hashes), frozenset(jumps), frozenset(sets), tuple(texts), raw)
        self._chains[name] = spec
        old_refs = old.refs() if old is not None else _EMPTY
        new_refs = spec.refs()
        if old_refs != new_refs:
            _unlink(self._referrers, name, old_refs)
            _link(self._referrers, name, new_refs)
        self._dirty_chains.add(name)
        self._failed.pop(name, None)

    def has_chain(self, name: str) -> bool:
        """Whether chain ``name`` is desired (cheaper than ``name in chain_names()``)."""
        return name in self._chains

    def remove_chain(self, name: str) -> None:
        old = self._chains.pop(name, None)
        if old is not None:
            _unlink(self._referrers, name, old.refs())
            self._dirty_chains.add(name)
            self._failed.pop(name, None)

    def set_set(self, name: str, type: str, elements: Iterable[object] = (), *,
                flags: Iterable[str] = ()) -> None:
        """Desired set ``name`` of ``type`` (e.g. ``ipv4_addr``, ``ipv4_addr . inet_proto . inet_service``)
        holding exactly ``elements``. Use ``flags=("interval",)`` for CIDRs."""
        spec = self._make_set(name, type, flags, "")
        interval = spec.interval
        try:
            spec.members = {_canon_elem(spec.comps, e, interval=interval): "" for e in elements}
        except ValueError as e:
            raise ValueError(f"set {name}: {e}") from None
        self._store_set(name, spec)

    def set_map(self, name: str, key_type: str, value_type: str, elements: Mapping[object, object], *,
                flags: Iterable[str] = ()) -> None:
        """Desired map ``name``: ``key_type : value_type``; ``value_type`` ``verdict`` makes a verdict map
        (values ``accept``, ``drop``, ``return``, ``jump <chain>``, ``goto <chain>``)."""
        spec = self._make_set(name, key_type, flags, value_type)
        if spec.interval:
            raise ValueError(f"map {name}: interval maps are not supported")
        members: dict[str, str] = {}
        try:
            vcomps = () if value_type == "verdict" else _split_type(value_type)
            for k, v in elements.items():
                key = _canon_elem(spec.comps, k, interval=False)
                members[key] = _canon_verdict(v) if not vcomps else _canon_elem(vcomps, v, interval=False)
        except ValueError as e:
            raise ValueError(f"map {name}: {e}") from None
        spec.members = members
        self._store_set(name, spec)

    def add_set_elements(self, name: str, elements: Iterable[object]) -> None:
        """Add elements to a desired set (cheaper than re-sending a big set)."""
        spec = self._set_for_update(name)
        try:
            new = {_canon_elem(spec.comps, e, interval=spec.interval): "" for e in elements}
        except ValueError as e:
            raise ValueError(f"set {name}: {e}") from None
        if new.keys() - spec.members.keys():
            spec.members = {**spec.members, **new}
            spec.reset()
            self._dirty_sets.add(name)

    def remove_set_elements(self, name: str, elements: Iterable[object]) -> None:
        spec = self._set_for_update(name)
        try:
            gone = {_canon_elem(spec.comps, e, interval=spec.interval) for e in elements}
        except ValueError as e:
            raise ValueError(f"set {name}: {e}") from None
        if gone & spec.members.keys():
            spec.members = {k: v for k, v in spec.members.items() if k not in gone}
            spec.reset()
            self._dirty_sets.add(name)

    def remove_set(self, name: str) -> None:
        """Remove a set or map."""
        old = self._sets.pop(name, None)
        if old is not None:
            _unlink(self._referrers, "@" + name, old.verdict_targets())
            self._dirty_sets.add(name)
            self._failed.pop("@" + name, None)

    def set_counter(self, name: str) -> None:
        """Desired named counter ``name`` (rules refer to it as ``counter name "<name>"``)."""
        _check_name("counter", name, _SET_NAME_RE)
        if name not in self._counters:
            self._counters.add(name)
            self._dirty_counters.add(name)
            for r in self._referrers.get("@%" + name, ()):
                self._dirty_chains.add(r)  # a chain left out for want of it can go in now

    def remove_counter(self, name: str) -> None:
        if name in self._counters:
            self._counters.discard(name)
            self._dirty_counters.add(name)
            self._dirty_chains.update(self._referrers.get("@%" + name, ()))

    def counter_names(self) -> frozenset[str]:
        return frozenset(self._counters)

    def read_counters(self) -> dict[str, tuple[int, int]]:
        """Every named counter of the table in the kernel: name -> (packets, bytes). One nft call."""
        try:
            objs = self._nft.list_json(f"counters table {self.target}")
        except NftError as e:
            if e.not_found:
                return {}
            raise
        out: dict[str, tuple[int, int]] = {}
        for o in objs:
            c = o.get("counter")
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                out[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        return out

    def _set_for_update(self, name: str) -> _SetSpec:
        spec = self._sets.get(name)
        if spec is None or spec.map_type:
            raise ValueError(f"no desired set {name!r}")
        return spec

    def _make_set(self, name: str, type: str, flags: Iterable[str], map_type: str) -> _SetSpec:
        _check_name("set", name, _SET_NAME_RE)
        comps = _split_type(type)
        if isinstance(flags, str):
            raise ValueError(f"set {name}: flags must be a list of flags, not {flags!r}")
        fl = tuple(sorted(set(flags)))
        for f in fl:
            if f not in SET_FLAGS:
                raise ValueError(f"set {name}: unknown flag {f!r} (known: {SET_FLAGS})")
        if "interval" in fl and (len(comps) != 1 or comps[0] not in ("ipv4_addr", "ipv6_addr")):
            raise ValueError(f"set {name}: interval is supported for ipv4_addr/ipv6_addr sets only")
        if map_type and map_type != "verdict":
            _split_type(map_type)
        return _SetSpec(comps, " . ".join(comps), fl, map_type, {})

    def _store_set(self, name: str, spec: _SetSpec) -> None:
        old = self._sets.get(name)
        if old is not None and old.same_kind(spec) and old.members == spec.members:
            return
        self._sets[name] = spec
        old_targets = old.verdict_targets() if old is not None else _EMPTY
        if old_targets or spec.map_type == "verdict":
            _unlink(self._referrers, "@" + name, old_targets)
            _link(self._referrers, "@" + name, spec.verdict_targets())
        self._dirty_sets.add(name)
        self._failed.pop("@" + name, None)

    # -- status (read by managers and health; not thread-safe against a running apply) ---------------
    def chain_names(self) -> frozenset[str]:
        return frozenset(self._chains)

    def set_names(self) -> frozenset[str]:
        return frozenset(self._sets)

    def desired_rules(self, name: str) -> tuple[str, ...] | None:
        """The desired rule texts of a chain (no comments), None if the chain is not desired."""
        spec = self._chains.get(name)
        return None if spec is None else spec.texts

    def desired_base(self, name: str) -> BaseChain | None:
        spec = self._chains.get(name)
        return None if spec is None else spec.base

    def desired_elements(self, name: str) -> dict[str, str] | None:
        """Desired elements of a set (values "") or map, canonical, before interval collapsing."""
        spec = self._sets.get(name)
        return None if spec is None else dict(spec.members)

    @property
    def errors(self) -> dict[str, str]:
        """Chains (and ``@set``s) that could not be programmed at the last apply, and why."""
        return dict(self._bad)

    def status(self) -> str:
        """"" when everything desired is programmed (as far as we know), else what is not."""
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._bad.items()))

    # -- control ------------------------------------------------------------------------------------
    def queue_resync(self) -> None:
        """Re-read the table on the next apply and repair any drift; retry objects nft rejected."""
        self._resync = True

    def allow_removals(self, allowed: bool = True) -> None:
        """Permit deleting and rewriting (call once the datastore is in sync)."""
        if allowed and not self.removals_allowed:
            self._resync = True
        self.removals_allowed = allowed

    def delete_table(self) -> None:
        """Delete the whole table now (uninstall, switching backends, tests). Desired state is kept."""
        try:
            self._nft.run(f"delete table {self.target}")
        except NftError as e:
            if not e.not_found:
                raise
        self._table_exists = False
        self._kchains = {}
        self._ksets = {}
        self._kreferrers = {}
        self._resync = True

    # -- reconciliation -----------------------------------------------------------------------------
    def _read_kernel(self) -> None:
        try:
            objs = self._nft.list_json(f"table {self.target}")
            exists = True
        except NftError as e:
            if not e.not_found:
                raise
            objs, exists = [], False
        chains: dict[str, _KChain] = {}
        sets: dict[str, _SetSpec] = {}
        counters: set[str] = set()
        for o in objs:
            if "counter" in o and isinstance(o["counter"], dict):
                counters.add(str(o["counter"].get("name")))
            elif "chain" in o:
                c = o["chain"]
                base = None
                if "hook" in c:
                    base = BaseChain(str(c.get("type", "")), str(c["hook"]), int(c.get("prio", 0)),
                                     str(c.get("policy", "accept")))
                chains.setdefault(c["name"], _KChain(None, [])).base = base
            elif "rule" in o:
                r = o["rule"]
                kc = chains.setdefault(r["chain"], _KChain(None, []))
                comment = r.get("comment")
                h: str | None = None
                if isinstance(comment, str) and comment.startswith(self.hash_prefix):
                    h = comment[len(self.hash_prefix):].split(";", 1)[0].strip()
                kc.hashes.append(h)
                _collect_refs(r.get("expr"), kc.sets, kc.jumps)
            elif "set" in o or "map" in o:
                s = o.get("set") or o["map"]
                sets[s["name"]] = _kernel_set(s)
        self._table_exists = exists
        self._kchains = chains
        self._ksets = sets
        self._kreferrers = {}
        for name, kc in chains.items():
            _link(self._kreferrers, name, kc.refs())
        self._dirty_chains = set(self._chains) | set(chains)
        self._dirty_sets = set(self._sets) | set(sets)
        self._kcounters = counters
        self._dirty_counters = set(self._counters) | counters
        self._failed = {}
        self._resync = False

    def apply(self) -> NftApplyStats:
        stats = NftApplyStats()
        t0 = time.perf_counter()
        try:
            self._apply(stats)
        except BaseException:
            self._resync = True  # we no longer know what the kernel holds
            raise
        finally:
            stats.duration_s = time.perf_counter() - t0
        return stats

    def _apply(self, stats: NftApplyStats) -> None:
        if self._resync:
            self._read_kernel()
            stats.resynced = True
        if not self._dirty_chains and not self._dirty_sets and not self._dirty_counters:
            return
        while True:
            bad = self._unprogrammable()
            plan = self._plan(bad)
            stats.deferred = self.deferred = plan.deferred
            if not plan.n_commands():
                break
            try:
                self._nft.run(plan.text())
            except NftError as e:
                newly = {u: why for u, why in self._isolate(plan, bad).items() if u not in bad}
                if not newly or any(m in why for why in newly.values() for m in _KERNEL_STATE_ERRORS):
                    # Not the input's fault (or not found): our picture of the kernel is off. Raising
                    # makes the next apply re-read the table.
                    raise NftError(f"nft transaction on table {self.target} failed: {e}", rc=e.rc,
                                   commands=e.commands) from e
                self._failed.update(newly)  # bad input: leave those out and try again
                continue
            stats.transactions += 1
            stats.commands += plan.n_commands()
            stats.chains_written += len(plan.written)
            stats.chains_deleted += len(plan.deleted_chains)
            stats.sets_written += len(plan.set_full)
            stats.sets_deleted += len(plan.deleted_sets)
            stats.elements_added += sum(len(v) for v in plan.set_adds.values())
            stats.elements_removed += sum(len(v) for v in plan.set_dels.values())
            self._committed(plan)
            break
        # Unprogrammable objects stay dirty so they are looked at again (cheaply) on every apply.
        # So do deletions that were deferred (something staying still refers to them): they go as soon as
        # the blocker does, not only at the next resync.
        kc, ks = self._kchains, self._ksets
        self._dirty_chains = {c for c in self._dirty_chains if c in bad or (c in kc and c not in self._chains)}
        self._dirty_sets = {s for s in self._dirty_sets if "@" + s in bad or (s in ks and s not in self._sets)}
        self._dirty_counters = {c for c in self._dirty_counters if c in self._counters ^ self._kcounters}
        self._bad = bad
        for obj, why in bad.items():
            if self._logged.get(obj) != why:
                log.error("nft table %s: %s not programmed (the kernel keeps what it had): %s",
                          self.target, obj, why)
        self._logged = dict(bad)
        stats.failed = dict(bad)

    def _unprogrammable(self) -> dict[str, str]:
        """Desired chains/maps that cannot be written: nft rejected them, or they refer to objects
        that are not desired (or cannot be written themselves and are not in the kernel).

        Only what may have changed is looked at: dirty objects, rejected and previously unprogrammable
        ones (those stay dirty), and everything that refers to them, transitively. Anything else was
        programmable at the last apply and nothing it refers to has changed since."""
        chains, sets, referrers = self._chains, self._sets, self._referrers
        affected = {*self._dirty_chains, *("@" + s for s in self._dirty_sets), *self._failed, *self._bad}
        todo = list(affected)
        while todo:
            for r in referrers.get(todo.pop(), ()):
                if r not in affected:
                    affected.add(r)
                    todo.append(r)
        bad = dict(self._failed)
        for key in affected:
            if key[0] == "@":
                sspec = sets.get(key[1:])
                if sspec is None:
                    continue
                missing = [t for t in sspec.verdict_targets() if t not in chains]
                if missing:
                    bad[key] = f"a verdict refers to chain {min(missing)} which is not desired"
                continue
            spec = chains.get(key)
            if spec is None or key in bad:
                continue
            for j in sorted(spec.jumps) if len(spec.jumps) > 1 else spec.jumps:
                jspec = chains.get(j)
                if jspec is None:
                    bad[key] = f"jumps to chain {j} which is not desired"
                    break
                if jspec.base is not None:
                    bad[key] = f"jumps to base chain {j}"
                    break
            else:
                for s in sorted(spec.sets):
                    if s[0] == "%":
                        if s[1:] not in self._counters:
                            bad[key] = f"refers to counter {s[1:]} which is not desired"
                            break
                    elif s not in sets:
                        bad[key] = f"refers to set @{s} which is not desired"
                        break
        if not bad:
            return bad
        # Spread unprogrammability to referrers, in the desired objects' order (as a full walk would).
        chain_order = [n for n in chains if n in affected]
        set_order = [n for n in sets if "@" + n in affected]
        changed = True
        while changed:
            changed = False
            for name in chain_order:
                if name in bad:
                    continue
                spec = chains[name]
                why = next((f"jumps to chain {j} which cannot be programmed" for j in sorted(spec.jumps)
                            if j in bad and j not in self._kchains), None)
                why = why or next((f"refers to set @{s} which cannot be programmed" for s in sorted(spec.sets)
                                   if "@" + s in bad and s not in self._ksets), None)
                if why:
                    bad[name] = why
                    changed = True
            for name in set_order:
                if "@" + name in bad:
                    continue
                sspec = sets[name]
                t = next((t for t in sorted(sspec.verdict_targets()) if t in bad and t not in self._kchains), None)
                if t is not None:
                    bad["@" + name] = f"a verdict refers to chain {t} which cannot be programmed"
                    changed = True
        return bad

    def _plan(self, bad: Mapping[str, str]) -> _Plan:
        p = _Plan()
        fam_t = self.target
        removals = self.removals_allowed
        force_rewrite: set[str] = set()  # chains to refill because a set they use is recreated
        set_deletes: list[tuple[str, str]] = []  # (keyword, name) candidates
        chain_deletes: list[str] = []

        for name in sorted(self._dirty_sets):
            if "@" + name in bad:
                continue
            want = self._sets.get(name)
            have = self._ksets.get(name)
            if want is not None and have is None:
                p.add(_P_CREATE, f"add {want.keyword} {fam_t} {name} {want.declare()}")
                self._fill_set(p, name, want)
            elif want is not None and have is not None and not want.same_kind(have):
                if not removals:
                    p.deferred += 1
                    continue
                force_rewrite |= self._referrers.get("@" + name, set())  # only chains refer to sets
                force_rewrite |= self._kreferrers.get("@" + name, set())
                p.add(_P_RECREATE, f"delete {have.keyword} {fam_t} {name}")
                p.add(_P_RECREATE, f"add {want.keyword} {fam_t} {name} {want.declare()}")
                self._fill_set(p, name, want)
            elif want is not None and have is not None:
                welems, helems = want.elements(), have.members
                adds = [k for k, v in welems.items() if helems.get(k) != v]
                changed = [k for k in adds if k in helems]  # map values that change: delete, then add
                gone = [k for k in helems if k not in welems]
                if gone and not removals:
                    p.deferred += 1
                    if want.interval:
                        # The kernel refuses an interval overlapping one we may not delete yet.
                        stale = [n for k in gone for n in _nets(k)]
                        adds = [k for k in adds if not any(_nets(k)[0].overlaps(s) for s in stale)]  # type: ignore[arg-type]
                    gone = []
                dels = gone + changed
                if dels:
                    p.add(_P_CREATE, f"delete element {fam_t} {name} {{ {have.render_keys(dels)} }}")
                    p.set_dels[name] = dels
                if adds:
                    p.add(_P_FILL, f"add element {fam_t} {name} {{ {want.render(adds, welems)} }}")
                    p.set_adds[name] = adds
            elif have is not None:
                set_deletes.append((have.keyword, name))

        counter_deletes: list[str] = []
        for name in sorted(self._dirty_counters):
            if name in self._counters and name not in self._kcounters:
                p.add(_P_CREATE, f"add counter {fam_t} {name}")
                p.counters_added.add(name)
            elif name not in self._counters and name in self._kcounters:
                counter_deletes.append(name)

        for name in sorted(self._dirty_chains | force_rewrite):
            if name in bad:
                continue
            want_c = self._chains.get(name)
            have_c = self._kchains.get(name)
            if want_c is not None and have_c is None:
                decl = f" {want_c.base.render()}" if want_c.base is not None else ""
                p.add(_P_DECLARE, f"add chain {fam_t} {name}{decl}", name)
                self._fill_chain(p, name, want_c)
            elif want_c is not None and have_c is not None:
                same_base = want_c.base == have_c.base
                if same_base and list(want_c.hashes) == have_c.hashes and name not in force_rewrite:
                    continue
                if not removals and (have_c.hashes or not same_base):
                    p.deferred += 1  # rewriting a working chain before the sync could drop traffic
                    continue
                p.add(_P_FLUSH, f"flush chain {fam_t} {name}", name)
                if not same_base:
                    decl = f" {want_c.base.render()}" if want_c.base is not None else ""
                    p.add(_P_RECREATE, f"delete chain {fam_t} {name}", name)
                    p.add(_P_RECREATE, f"add chain {fam_t} {name}{decl}", name)
                self._fill_chain(p, name, want_c)
            elif have_c is not None:
                chain_deletes.append(name)

        # Deletions: only with removals allowed, and never of something that chains or maps staying in
        # the kernel as they are (not rewritten, e.g. rejected ones) still refer to.
        if set_deletes or chain_deletes or counter_deletes:
            if not removals:
                p.deferred += len(set_deletes) + len(chain_deletes) + len(counter_deletes)
            else:
                deleted_set_names = {n for _, n in set_deletes}
                # A deletion is deferred while something that stays refers to the object: a chain that is
                # neither rewritten nor deleted, or a verdict map that stays (not deleted, not rewritten
                # whole) and still jumps to the chain once this transaction's element deletions are done.
                # Deferring a chain or a map keeps everything it refers to as well, so iterate to a fixpoint.
                dropping = set(chain_deletes)
                dropping_sets = set(deleted_set_names)

                def used_by_staying_chain(key: str) -> bool:
                    return any(c not in p.written and c not in dropping for c in self._kreferrers.get(key, ()))

                def staying_map_targets() -> set[str]:
                    out: set[str] = set()
                    for n, ks in self._ksets.items():
                        if ks.map_type != "verdict" or n in dropping_sets or n in p.set_full:
                            continue
                        gone_keys = set(p.set_dels.get(n, ()))
                        out.update(v.split(" ", 1)[1] for k, v in ks.members.items() if " " in v and k not in gone_keys)
                    return out

                while True:
                    before = (len(dropping), len(dropping_sets))
                    dropping_sets = {n for n in dropping_sets if not used_by_staying_chain("@" + n)}
                    targets = staying_map_targets()
                    dropping = {c for c in dropping if not used_by_staying_chain(c) and c not in targets}
                    if (len(dropping), len(dropping_sets)) == before:
                        break
                for kw, name in sorted(set_deletes, key=lambda kn: kn[0] != "map"):  # maps refer to chains
                    if name not in dropping_sets:
                        p.deferred += 1
                        continue
                    p.add(_P_DELETE, f"delete {kw} {fam_t} {name}")
                    p.deleted_sets.add(name)
                for name in chain_deletes:
                    if name not in dropping:
                        p.deferred += 1
                        continue
                    p.add(_P_FLUSH, f"flush chain {fam_t} {name}")
                    p.add(_P_DELETE, f"delete chain {fam_t} {name}")
                    p.deleted_chains.add(name)
                for name in counter_deletes:
                    if used_by_staying_chain("@%" + name):
                        p.deferred += 1
                        continue
                    p.add(_P_DELETE, f"delete counter {fam_t} {name}")
                    p.counters_deleted.add(name)

        if p.n_commands() and not self._table_exists:
            p.add(_P_TABLE, f"add table {fam_t}")
            p.new_table = True
        return p

    def _fill_chain(self, p: _Plan, name: str, spec: _ChainSpec) -> None:
        for line in spec.lines:
            p.add(_P_FILL, f"add rule {self.target} {name} {line}", name)
        p.written.add(name)

    def _fill_set(self, p: _Plan, name: str, spec: _SetSpec) -> None:
        elems = spec.elements()
        if elems:
            p.add(_P_FILL, f"add element {self.target} {name} {{ {spec.render(elems, elems)} }}")
        p.set_full.add(name)

    def _isolate(self, plan: _Plan, bad: Mapping[str, str]) -> dict[str, str]:
        """After a failed transaction: dry-run each chain write on its own, over a prelude that creates
        the table, the new sets and declares the new chains, to find the chains nft rejects."""
        prelude = [*plan.phases[_P_TABLE], *(c for c in plan.phases[_P_CREATE] if c.startswith("add "))]
        prelude += [cmd for unit, cmds in plan.chain_units.items() if unit not in bad
                    for ph, cmd in cmds if ph == _P_DECLARE]
        found: dict[str, str] = {}
        for unit, cmds in sorted(plan.chain_units.items()):
            own = [cmd for ph, cmd in sorted(cmds, key=lambda pc: pc[0]) if ph != _P_DECLARE]
            try:
                self._nft.run("\n".join(prelude + own) + "\n", dry_run=True)
            except NftError as e:
                found[unit] = str(e)
        return found

    def _committed(self, plan: _Plan) -> None:
        if plan.new_table:
            self._table_exists = True
        krefs = self._kreferrers
        for name in plan.written:
            spec = self._chains[name]
            old = self._kchains.get(name)
            if old is not None:
                _unlink(krefs, name, old.refs())
            kc = self._kchains[name] = _KChain(spec.base, list(spec.hashes), set(spec.sets), set(spec.jumps))
            _link(krefs, name, kc.refs())
        for name in plan.deleted_chains:
            old = self._kchains.pop(name, None)
            if old is not None:
                _unlink(krefs, name, old.refs())
        for name in plan.set_full:
            w = self._sets[name]
            self._ksets[name] = _SetSpec(w.comps, w.type, w.flags, w.map_type, dict(w.elements()))
        for name, dels in plan.set_dels.items():
            ks = self._ksets[name]
            for k in dels:
                ks.members.pop(k, None)
            ks.reset()
        for name, adds in plan.set_adds.items():
            welems = self._sets[name].elements()
            ks = self._ksets[name]
            for k in adds:
                ks.members[k] = welems[k]
            ks.reset()
        for name in plan.deleted_sets:
            self._ksets.pop(name, None)
        self._kcounters |= plan.counters_added
        self._kcounters -= plan.counters_deleted


def _link(index: dict[str, set[str]], referrer: str, targets: Iterable[str]) -> None:
    for t in targets:
        index.setdefault(t, set()).add(referrer)


def _unlink(index: dict[str, set[str]], referrer: str, targets: Iterable[str]) -> None:
    for t in targets:
        refs = index.get(t)
        if refs is not None:
            refs.discard(referrer)
            if not refs:
                del index[t]


def _nets(key: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """An interval-set key as networks (a range key "a-b", left by someone else, as several)."""
    if "-" in key:
        a, b = (ipaddress.ip_address(x) for x in key.split("-", 1))
        return list(ipaddress.summarize_address_range(a, b))  # type: ignore[type-var]
    return [ipaddress.ip_network(key)]


def _collect_refs(expr: Any, sets: set[str], jumps: set[str]) -> None:
    """What a rule's JSON expression refers to: sets/maps (``"@name"``) and chains (jump/goto)."""
    if isinstance(expr, str):
        if expr.startswith("@"):
            sets.add(expr[1:])
    elif isinstance(expr, dict) and isinstance(expr.get("counter"), str):
        sets.add("%" + expr["counter"])  # a named counter reference
    elif isinstance(expr, list):
        for x in expr:
            _collect_refs(x, sets, jumps)
    elif isinstance(expr, dict):
        for k, x in expr.items():
            if k in ("jump", "goto") and isinstance(x, dict) and isinstance(x.get("target"), str):
                jumps.add(x["target"])
            else:
                _collect_refs(x, sets, jumps)


def _kernel_set(s: dict[str, Any]) -> _SetSpec:
    t = s.get("type", "")
    comps = tuple(t) if isinstance(t, list) else (str(t),)
    flags = tuple(sorted(str(f) for f in s.get("flags", []) if f in SET_FLAGS))
    map_type = s.get("map", "")
    if isinstance(map_type, list):
        map_type = " . ".join(map_type)
    interval = "interval" in flags and len(comps) == 1 and comps[0] in ("ipv4_addr", "ipv6_addr")
    members: dict[str, str] = {}
    for e in s.get("elem", []):
        if map_type and isinstance(e, list) and len(e) == 2:
            members[_json_value(e[0])] = _json_value(e[1])
            continue
        key = _json_value(e)
        if interval and "/" not in key and "-" not in key:
            key = str(ipaddress.ip_network(key))  # a single address in an interval set
        elif "inet_proto" in comps:
            # nft lists protocols by name ("tcp"), the desired side holds numbers.
            with contextlib.suppress(ValueError):
                key = _canon_elem(comps, key, interval=False)
        members[key] = ""
    return _SetSpec(comps, " . ".join(comps), flags, str(map_type), members)
