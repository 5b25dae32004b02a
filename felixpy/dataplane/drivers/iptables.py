"""The iptables compatibility backend: one driver per iptables table, one for the IP sets, and
:class:`IptablesDataplane` to apply them in the right order. Same shape as the nftables driver.

:class:`IptablesTable` owns, in one table (nat, filter, mangle, raw):

- every chain whose name starts with ``cali-`` (``set_chain``); chain names are at most 28 characters;
- its own rules in kernel chains (``set_hooks(chain, insert=[...], append=[...])``): inserted rules at the
  top, in order, appended ones at the very end (Calico appends ``-j cali-POSTROUTING`` to nat POSTROUTING
  so that its MASQUERADE comes after kube-proxy's). Rules of other programs in those chains are left alone.

Every rule written carries ``-m comment --comment "cali:<hash>"`` (:func:`rule_hashes`; appended rules
hash with ``<chain>*appends*``). Reading back (``iptables-save -t <table>``) only parses those hashes, so
iptables' own normalisation of rule text never matters, and an agent restart with the right rules
present rewrites nothing. A rule in a kernel chain is ours if it has our hash comment or jumps to one of
our chains (older Felix versions); those that are not desired are removed.

``apply()`` writes one ``iptables-restore --noflush`` transaction: changed chains are flushed and refilled
(``:chain - [0:0]`` then ``-A``), hooks are fixed (``-D`` by the saved rule text, ``-I``, ``-A``), stale
chains deleted (``-X``) after every rule that jumped to them is gone. Removals, rewrites of chains that
exist with other content and hook repositioning wait for ``allow_removals()`` (see the nftables driver;
before that the driver only adds). A chain or hook that iptables-restore rejects (it names the line) is
left as the kernel has it, reported in ``errors`` and retried when set again or at the next resync.

:class:`IpSets` owns the ``ipset`` sets whose names start with ``cali40`` (``cali60`` for IPv6): created
with ``create``, members changed with ``add``/``del``, recreated through a temporary set and ``swap`` when
the type changes, destroyed once nothing uses them. :class:`IptablesDataplane` applies set additions,
then the tables, then set deletions, so a rule never refers to a set that does not exist.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from felixpy.dataplane.drivers.nftables import HASH_PREFIX, Rule, rule_hashes
from felixpy.dataplane.shims.iptables import Ipset, Iptables, IptablesError

log = logging.getLogger(__name__)

TABLES = ("filter", "nat", "mangle", "raw")
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
MAX_CHAIN_NAME = 28  # Felix's limit (iptables allows 28 usable characters)
MAX_COMMENT = 256
IPSET_TYPES = ("hash:ip", "hash:net", "hash:ip,port", "hash:net,net", "hash:net,port", "bitmap:port")
MAX_IPSET_NAME = 31
DEFAULT_MAXELEM = 1048576  # Felix's MaxIpsetSize

_CHAIN_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,28}$")
_IPSET_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,31}$")
_COMMANDS = {"-A", "--append", "-I", "--insert", "-D", "--delete", "-R", "--replace", "-N", "--new-chain",
             "-X", "--delete-chain", "-F", "--flush", "-P", "--policy", "-E", "--rename-chain", "-Z", "--zero",
             "-L", "--list", "-S", "--list-rules", "-t", "--table", "-C", "--check"}
_TARGET_FLAGS = {"-j", "--jump", "-g", "--goto"}
_SAVED_TARGET_RE = re.compile(r"(?:^|\s)(?:-j|--jump|-g|--goto)\s+(\S+)")
_HOOKS = "hooks"


def _check_rule(text: object) -> tuple[list[str], str | None]:
    """Validate the rule spec (what follows ``-A <chain>``); returns (tokens, jump/goto target)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"rule must be non-empty text, not {text!r}")
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError(f"rule must be one line: {text!r}")
    if "'" in text or "\\" in text:
        raise ValueError(f"rule {text!r}: iptables-restore quotes with double quotes only")
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"rule {text!r}: {e}") from None
    target = None
    for i, t in enumerate(tokens):
        if t in _COMMANDS:
            raise ValueError(f"rule {text!r}: {t} is a command, give only the rule spec")
        if t in _TARGET_FLAGS:
            if i + 1 >= len(tokens):
                raise ValueError(f"rule {text!r}: {t} without a target")
            target = tokens[i + 1]
    return tokens, target


def _check_comment(comment: object) -> str:
    if not isinstance(comment, str) or '"' in comment or "\\" in comment or any(ord(c) < 32 for c in comment):
        raise ValueError(f"rule comment {comment!r} must be text without quotes, backslashes or control characters")
    if len(comment.encode()) > MAX_COMMENT - 1:
        raise ValueError(f"rule comment {comment!r} too long (max {MAX_COMMENT - 1} bytes)")
    return comment


@dataclass
class _Chain:
    lines: tuple[str, ...]  # rule specs, hash comment first
    hashes: tuple[str, ...]
    jumps: frozenset[str]
    texts: tuple[str, ...]
    targets: tuple[str | None, ...]

    def krules(self) -> list[_KRule]:
        """These rules as the kernel will hold them (our line works as a -D spec too)."""
        return [_KRule(h, True, ln, t) for h, ln, t in zip(self.hashes, self.lines, self.targets, strict=True)]


@dataclass
class _Hooks:
    insert: _Chain
    append: _Chain


@dataclass
class _KRule:
    hash: str | None
    ours: bool  # has our hash, or jumps to one of our chains
    spec: str  # the saved rule spec (after "-A <chain> ")
    target: str | None


@dataclass
class _KChain:
    builtin: bool
    rules: list[_KRule] = field(default_factory=list)

    def jumps(self) -> set[str]:
        return {r.target for r in self.rules if r.target}


@dataclass
class IptablesApplyStats:
    transactions: int = 0
    lines: int = 0
    chains_written: int = 0
    chains_deleted: int = 0
    hooks_written: int = 0
    deferred: int = 0
    resynced: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0


@dataclass
class _Plan:
    declare: list[tuple[str, str]] = field(default_factory=list)  # (line, unit)
    hook_dels: list[tuple[str, str]] = field(default_factory=list)
    rules: list[tuple[str, str]] = field(default_factory=list)
    hook_adds: list[tuple[str, str]] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    written: set[str] = field(default_factory=set)
    hooks_written: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    deferred: int = 0

    def lines(self) -> list[tuple[str, str]]:
        return [*self.declare, *self.hook_dels, *self.rules, *self.hook_adds, *self.deletes]

    def render(self, table: str) -> tuple[str, list[str]]:
        """(restore input, unit of each input line: "" for the framing lines)."""
        body = self.lines()
        text = "\n".join([f"*{table}", *(ln for ln, _ in body), "COMMIT", ""])
        return text, ["", *(u for _, u in body), ""]


class IptablesTable:
    def __init__(self, table: str = "nat", ipt: Iptables | None = None, *, chain_prefix: str = "cali-",
                 hash_prefix: str = HASH_PREFIX, removals_allowed: bool = False) -> None:
        if table not in TABLES:
            raise ValueError(f"iptables table must be one of {TABLES}, not {table!r}")
        if not chain_prefix or not _CHAIN_RE.match(chain_prefix):
            raise ValueError(f"invalid chain prefix {chain_prefix!r}")
        self._ipt = ipt if ipt is not None else Iptables()
        self.table = table
        self.chain_prefix = chain_prefix
        self.hash_prefix = hash_prefix
        self.removals_allowed = removals_allowed
        self._hash_re = re.compile(r'--comment "?' + re.escape(hash_prefix) + r'([A-Za-z0-9_-]{16})')
        self._chains: dict[str, _Chain] = {}
        self._hooks: dict[str, _Hooks] = {}
        self._dirty: set[str] = set()  # our chain names and kernel chain names (hooks)
        self._failed: dict[str, str] = {}
        self._bad: dict[str, str] = {}
        self._logged: dict[str, str] = {}
        self.deferred = 0
        self._kchains: dict[str, _KChain] = {}
        self._resync = True

    def owns(self, chain: str) -> bool:
        return chain.startswith(self.chain_prefix)

    # -- desired state (cheap: no kernel access) ----------------------------------------------------
    def _render(self, hash_key: str, rules: Sequence[str | Rule], what: str) -> _Chain:
        if isinstance(rules, str | Rule):
            raise ValueError(f"rules of {what} must be a sequence of rules, not one rule")
        texts: list[str] = []
        comments: list[str] = []
        targets: list[str | None] = []
        for r in rules:
            text, comment = (r.text, r.comment) if isinstance(r, Rule) else (r, "")
            try:
                _tokens, target = _check_rule(text)
                _check_comment(comment)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
            assert isinstance(text, str)
            targets.append(target)
            texts.append(" ".join(text.split()) if '"' not in text else text.strip())
            comments.append(comment)
        jumps = {t for t in targets if t is not None and self.owns(t)}
        hashes = rule_hashes(hash_key, [t + ("\x00" + c if c else "") for t, c in zip(texts, comments, strict=True)])
        lines = tuple(f'-m comment --comment "{self.hash_prefix}{h}"'
                      + (f' -m comment --comment "{c}"' if c else "") + f" {t}"
                      for t, c, h in zip(texts, comments, hashes, strict=True))
        return _Chain(lines, tuple(hashes), frozenset(jumps), tuple(texts), tuple(targets))

    def set_chain(self, name: str, rules: Sequence[str | Rule]) -> None:
        """Desired rules of our chain ``name`` (must start with the chain prefix)."""
        if not isinstance(name, str) or not _CHAIN_RE.match(name) or not self.owns(name):
            raise ValueError(f"invalid chain name {name!r}: {MAX_CHAIN_NAME} characters at most, "
                             f"starting with {self.chain_prefix!r}")
        spec = self._render(name, rules, f"chain {name}")
        old = self._chains.get(name)
        if old is not None and old.hashes == spec.hashes:
            return
        self._chains[name] = spec
        self._dirty.add(name)
        self._failed.pop(name, None)

    def remove_chain(self, name: str) -> None:
        if self._chains.pop(name, None) is not None:
            self._dirty.add(name)
            self._failed.pop(name, None)

    def set_hooks(self, chain: str, *, insert: Sequence[str | Rule] = (), append: Sequence[str | Rule] = ()) -> None:
        """Our rules in a chain we do not own (e.g. nat ``POSTROUTING``): ``insert`` at the top in order,
        ``append`` at the end. Empty lists remove them."""
        if not isinstance(chain, str) or not _CHAIN_RE.match(chain) or self.owns(chain):
            raise ValueError(f"invalid kernel chain {chain!r} (our own chains are set with set_chain)")
        ins = self._render(chain, insert, f"hooks in {chain}")
        app = self._render(chain + "*appends*", append, f"hooks in {chain}")
        old = self._hooks.get(chain)
        if old is not None and (old.insert.hashes, old.append.hashes) == (ins.hashes, app.hashes):
            return
        if ins.lines or app.lines:
            self._hooks[chain] = _Hooks(ins, app)
        else:
            self._hooks.pop(chain, None)
        self._dirty.add(chain)
        self._failed.pop(chain, None)

    # -- status -------------------------------------------------------------------------------------
    def chain_names(self) -> frozenset[str]:
        return frozenset(self._chains)

    def has_chain(self, name: str) -> bool:
        """Whether chain ``name`` is desired (cheaper than ``name in chain_names()``)."""
        return name in self._chains

    def desired_rules(self, name: str) -> tuple[str, ...] | None:
        spec = self._chains.get(name)
        return None if spec is None else spec.texts

    def desired_hooks(self, chain: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        h = self._hooks.get(chain)
        return ((), ()) if h is None else (h.insert.texts, h.append.texts)

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._bad)

    def status(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._bad.items()))

    # -- control ------------------------------------------------------------------------------------
    def queue_resync(self) -> None:
        self._resync = True

    def allow_removals(self, allowed: bool = True) -> None:
        if allowed and not self.removals_allowed:
            self._resync = True
        self.removals_allowed = allowed

    # -- reconciliation -----------------------------------------------------------------------------
    def _parse_save(self, text: str) -> dict[str, _KChain]:
        chains: dict[str, _KChain] = {}
        in_table = False
        for ln in text.splitlines():
            if ln.startswith("*"):
                in_table = ln[1:].strip() == self.table
            elif not in_table or not ln or ln.startswith("#"):
                continue
            elif ln.startswith(":"):
                parts = ln[1:].split()
                if parts:
                    chains[parts[0]] = _KChain(builtin=len(parts) > 1 and parts[1] != "-")
            elif ln.startswith("-A "):
                _, chain, *rest = ln.split(" ", 2)
                spec = rest[0] if rest else ""
                m = self._hash_re.search(spec)
                t = _SAVED_TARGET_RE.search(spec)
                target = t.group(1) if t else None
                ours = m is not None or (target is not None and self.owns(target))
                kc = chains.setdefault(chain, _KChain(builtin=False))
                kc.rules.append(_KRule(m.group(1) if m else None, ours, spec, target))
        return chains

    def save_with_counters(self) -> str:
        """The table as ``iptables-save -c`` prints it (one call; for reading rule counters)."""
        return self._ipt.save(self.table, counters=True)

    def _read_kernel(self) -> None:
        self._kchains = self._parse_save(self._ipt.save(self.table))
        self._dirty = set(self._chains) | set(self._hooks)
        self._dirty |= {c for c, k in self._kchains.items() if self.owns(c) or any(r.ours for r in k.rules)}
        self._failed = {}
        self._resync = False

    def apply(self) -> IptablesApplyStats:
        stats = IptablesApplyStats()
        t0 = time.perf_counter()
        try:
            self._apply(stats)
        except BaseException:
            self._resync = True
            raise
        finally:
            stats.duration_s = time.perf_counter() - t0
        return stats

    def _apply(self, stats: IptablesApplyStats) -> None:
        if self._resync:
            self._read_kernel()
            stats.resynced = True
        if not self._dirty:
            return
        while True:
            bad = self._unprogrammable()
            plan = self._plan(bad)
            stats.deferred = self.deferred = plan.deferred
            if not plan.lines():
                break
            text, units = plan.render(self.table)
            try:
                self._ipt.restore(text)
            except IptablesError as e:
                ok_line = e.line is not None and 0 < e.line <= len(units)
                unit = units[e.line - 1] if ok_line and e.line is not None else ""
                failed_line = text.splitlines()[e.line - 1] if ok_line and e.line is not None else ""
                if not unit or unit in bad or failed_line.startswith(("-D ", "-X ")):
                    # Not a bad rule but a kernel that is not as we believe (a rule to delete is gone, a
                    # chain to delete is still used): raising makes the next apply re-read the table.
                    raise IptablesError(f"iptables {self.table}: {e}", rc=e.rc, line=e.line) from e
                self._failed[unit] = str(e)  # bad input: leave it out and try again
                continue
            stats.transactions += 1
            stats.lines += len(plan.lines())
            stats.chains_written += len(plan.written)
            stats.chains_deleted += len(plan.deleted)
            stats.hooks_written += len(plan.hooks_written)
            self._committed(plan)
            break
        self._dirty = {c for c in self._dirty if c in bad}
        self._bad = bad
        for obj, why in bad.items():
            if self._logged.get(obj) != why:
                log.error("iptables %s: %s not programmed (the kernel keeps what it had): %s", self.table, obj, why)
        self._logged = dict(bad)
        stats.failed = dict(bad)

    def _unprogrammable(self) -> dict[str, str]:
        bad = dict(self._failed)
        for name, spec in [*self._chains.items(), *((k, h.insert) for k, h in self._hooks.items()),
                           *((k, h.append) for k, h in self._hooks.items())]:
            if name in bad:
                continue
            missing = sorted(j for j in spec.jumps if j not in self._chains)
            if missing:
                bad[name] = f"jumps to chain {missing[0]} which is not desired"
        changed = True
        while changed:
            changed = False
            for name, spec in [*self._chains.items(), *((k, h.insert) for k, h in self._hooks.items()),
                               *((k, h.append) for k, h in self._hooks.items())]:
                if name in bad:
                    continue
                j = next((j for j in sorted(spec.jumps) if j in bad and j not in self._kchains), None)
                if j is not None:
                    bad[name] = f"jumps to chain {j} which cannot be programmed"
                    changed = True
        return bad

    def _plan(self, bad: Mapping[str, str]) -> _Plan:
        p = _Plan()
        removals = self.removals_allowed
        stale: list[str] = []
        for name in sorted(self._dirty):
            if name in bad:
                continue
            if self.owns(name):
                want = self._chains.get(name)
                have = self._kchains.get(name)
                if want is not None:
                    if have is not None and [r.hash for r in have.rules] == list(want.hashes):
                        continue
                    if have is not None and have.rules and not removals:
                        p.deferred += 1
                        continue
                    p.declare.append((f":{name} - [0:0]", name))
                    p.rules.extend((f"-A {name} {ln}", name) for ln in want.lines)
                    p.written.add(name)
                elif have is not None:
                    stale.append(name)
            else:
                self._plan_hooks(p, name, removals)
        if stale:
            if not removals:
                p.deferred += len(stale)
            else:
                staying = [k for c, k in self._kchains.items() if c not in p.written and c not in stale]
                used = {j for k in staying for j in k.jumps()} - {  # our stale hooks are deleted too
                    r.target for c in p.hooks_written for r in self._kchains.get(c, _KChain(True)).rules
                    if r.ours and r.target}
                for name in stale:
                    if name in used:
                        p.deferred += 1
                        continue
                    p.declare.append((f":{name} - [0:0]", name))  # flushes it
                    p.deletes.append((f"-X {name}", name))
                    p.deleted.add(name)
        return p

    def _plan_hooks(self, p: _Plan, chain: str, removals: bool) -> None:
        h = self._hooks.get(chain)
        ins = list(h.insert.hashes) if h else []
        app = list(h.append.hashes) if h else []
        have = self._kchains.get(chain)
        rules = have.rules if have is not None else []
        ours = [r for r in rules if r.ours]
        expected: list[str | None] = [*ins, *([None] * (len(rules) - len(ours))), *app]
        if [r.hash if r.ours else None for r in rules] == expected and all(r.hash for r in ours):
            return
        if removals:
            p.hook_dels.extend((f"-D {chain} {r.spec}", chain) for r in ours)
            if h is not None:
                p.hook_adds.extend((f"-I {chain} {i + 1} {ln}", chain) for i, ln in enumerate(h.insert.lines))
                p.hook_adds.extend((f"-A {chain} {ln}", chain) for ln in h.append.lines)
            p.hooks_written.add(chain)
            return
        # Before the sync only add what is missing; deleting and repositioning wait.
        present = {r.hash for r in ours}
        missing_ins = [ln for hh, ln in zip(ins, h.insert.lines, strict=True) if hh not in present] if h else []
        missing_app = [ln for hh, ln in zip(app, h.append.lines, strict=True) if hh not in present] if h else []
        p.hook_adds.extend((f"-I {chain} 1 {ln}", chain) for ln in reversed(missing_ins))
        p.hook_adds.extend((f"-A {chain} {ln}", chain) for ln in missing_app)
        if missing_ins or missing_app:
            p.hooks_written.add(chain)
        if any(r.hash not in {*ins, *app} for r in ours) or not (missing_ins or missing_app):
            p.deferred += 1

    def _committed(self, plan: _Plan) -> None:
        for name in plan.written:
            self._kchains[name] = _KChain(False, self._chains[name].krules())
        for name in plan.deleted:
            self._kchains.pop(name, None)
        for chain in plan.hooks_written:
            # Predict the kernel chain: what it held, our rules removed (after the sync) or the missing
            # ones added (before), our inserts on top and our appends at the end.
            h = self._hooks.get(chain)
            old = self._kchains.get(chain, _KChain(True)).rules
            ins = h.insert.krules() if h else []
            app = h.append.krules() if h else []
            if self.removals_allowed:
                new = [*ins, *(r for r in old if not r.ours), *app]
            else:
                present = {r.hash for r in old if r.ours}
                new = [*(r for r in ins if r.hash not in present), *old, *(r for r in app if r.hash not in present)]
            self._kchains[chain] = _KChain(True, new)


# -- IP sets ----------------------------------------------------------------------------------------
@dataclass
class _IpsetSpec:
    type: str
    family: str
    members: frozenset[str]


def _canon_member(set_type: str, m: object) -> str:
    """Canonical text of a member as ``ipset save`` prints it (hosts of hash:net without /32)."""
    s = str(m).strip() if isinstance(m, str | ipaddress.IPv4Network | ipaddress.IPv6Network |
                                       ipaddress.IPv4Address | ipaddress.IPv6Address) else ""
    if not s or any(c.isspace() for c in s) or '"' in s:
        raise ValueError(f"invalid {set_type} member {m!r}")
    if set_type in ("hash:ip", "hash:net"):
        try:
            net = ipaddress.ip_network(s, strict=False)
        except ValueError:
            raise ValueError(f"invalid {set_type} member {m!r}") from None
        if set_type == "hash:ip" and net.num_addresses != 1:
            raise ValueError(f"hash:ip member {m!r} must be a single address")
        return str(net.network_address) if net.num_addresses == 1 else str(net)
    return s.lower()


class IpSets:
    """The ipset sets of one IP version whose names start with ``prefix`` (Felix: ``cali40``)."""

    def __init__(self, ipset: Ipset | None = None, *, ip_version: int = 4, prefix: str | None = None,
                 max_size: int = DEFAULT_MAXELEM, removals_allowed: bool = False) -> None:
        if ip_version not in (4, 6):
            raise ValueError(f"ip_version must be 4 or 6, not {ip_version}")
        self._ipset = ipset if ipset is not None else Ipset()
        self.ip_version = ip_version
        self.family = "inet" if ip_version == 4 else "inet6"
        self.prefix = prefix if prefix is not None else f"cali{ip_version}0"
        self._temp = f"cali{ip_version}t"
        self.max_size = max_size
        self.removals_allowed = removals_allowed
        self._sets: dict[str, _IpsetSpec] = {}
        self._ksets: dict[str, _IpsetSpec] = {}
        self._dirty: set[str] = set()
        self._resync = True
        self._busy: set[str] = set()  # stale sets the kernel refused to destroy (still in use)
        self.deferred = 0

    def set_ipset(self, name: str, set_type: str, members: Iterable[object]) -> None:
        if not isinstance(name, str) or not _IPSET_RE.match(name) or not name.startswith(self.prefix):
            raise ValueError(f"invalid ipset name {name!r}: at most {MAX_IPSET_NAME} characters, "
                             f"starting with {self.prefix!r}")
        if set_type not in IPSET_TYPES:
            raise ValueError(f"ipset {name}: type must be one of {IPSET_TYPES}, not {set_type!r}")
        try:
            canon = frozenset(_canon_member(set_type, m) for m in members)
        except ValueError as e:
            raise ValueError(f"ipset {name}: {e}") from None
        if set_type in ("hash:ip", "hash:net"):
            for c in canon:
                if ipaddress.ip_network(c).version != self.ip_version:
                    raise ValueError(f"ipset {name}: {c} is not IPv{self.ip_version}")
        if len(canon) > self.max_size:
            raise ValueError(f"ipset {name}: {len(canon)} members, more than {self.max_size}")
        spec = _IpsetSpec(set_type, self.family, canon)
        if self._sets.get(name) == spec:
            return
        self._sets[name] = spec
        self._dirty.add(name)

    def remove_ipset(self, name: str) -> None:
        if self._sets.pop(name, None) is not None:
            self._dirty.add(name)

    def desired_members(self, name: str) -> frozenset[str] | None:
        spec = self._sets.get(name)
        return None if spec is None else spec.members

    def queue_resync(self) -> None:
        self._resync = True

    def allow_removals(self, allowed: bool = True) -> None:
        if allowed and not self.removals_allowed:
            self._resync = True
        self.removals_allowed = allowed

    def _read_kernel(self) -> None:
        sets: dict[str, _IpsetSpec] = {}
        members: dict[str, set[str]] = {}
        for ln in self._ipset.save().splitlines():
            parts = ln.split()
            if len(parts) < 3 or not parts[1].startswith((self.prefix, self._temp)):
                continue
            if parts[0] == "create":
                fam = parts[parts.index("family") + 1] if "family" in parts else self.family
                sets[parts[1]] = _IpsetSpec(parts[2], fam, frozenset())
                members[parts[1]] = set()
            elif parts[0] == "add" and parts[1] in members:
                try:
                    members[parts[1]].add(_canon_member(sets[parts[1]].type, parts[2]))
                except ValueError:
                    members[parts[1]].add(parts[2])
        self._ksets = {n: _IpsetSpec(s.type, s.family, frozenset(members[n])) for n, s in sets.items()}
        self._dirty = set(self._sets) | set(self._ksets)
        self._busy = set()
        self._resync = False

    def _create(self, name: str, spec: _IpsetSpec) -> str:
        return f"create {name} {spec.type} family {spec.family} maxelem {self.max_size}"

    def apply_updates(self) -> int:
        """Create missing sets and bring members up to date (deletes of members only once removals are
        allowed). Returns the number of ipset commands run."""
        if self._resync:
            self._read_kernel()
        lines: list[str] = []
        done: dict[str, _IpsetSpec] = {}
        deferred = 0
        for name in sorted(self._dirty):
            want = self._sets.get(name)
            if want is None:
                continue
            have = self._ksets.get(name)
            if have is None:
                lines.append(self._create(name, want))
                lines.extend(f"add {name} {m}" for m in sorted(want.members))
                done[name] = want
            elif (have.type, have.family) != (want.type, want.family):
                if not self.removals_allowed:
                    deferred += 1
                    continue
                # ipset cannot swap sets of different types: destroy and create (fails, and is retried,
                # while a rule still uses the set; set IDs encode their type, so this is rare).
                lines += [f"destroy {name}", self._create(name, want)]
                lines.extend(f"add {name} {m}" for m in sorted(want.members))
                done[name] = want
            else:
                adds = sorted(want.members - have.members)
                dels = sorted(have.members - want.members)
                if dels and not self.removals_allowed:
                    deferred += 1
                    dels = []
                lines.extend(f"add {name} {m}" for m in adds)
                lines.extend(f"del {name} {m}" for m in dels)
                if adds or dels:
                    done[name] = _IpsetSpec(want.type, want.family, (have.members | set(adds)) - set(dels))
        self.deferred = deferred
        if lines:
            try:
                self._ipset.restore("\n".join(lines) + "\n")
            except IptablesError:
                self._resync = True  # ipset restore is not atomic: re-read what happened
                raise
        self._ksets.update(done)
        # Still dirty: sets to delete and changes held back until removals are allowed.
        self._dirty = {n for n in self._dirty if n not in self._sets or self._ksets.get(n) != self._sets[n]}
        return len(lines)

    def apply_deletions(self) -> int:
        """Destroy our sets that are no longer desired (after the tables stopped using them). A set the
        kernel still uses (a rule we could not rewrite refers to it) is kept until the next resync."""
        if not self.removals_allowed:
            return 0
        done = 0
        while True:
            gone = sorted(n for n in self._ksets if n not in self._sets and n not in self._busy)
            if not gone:
                return done
            try:
                self._ipset.restore("".join(f"destroy {n}\n" for n in gone))
            except IptablesError as e:
                self._resync = True
                if e.line is None or not 0 < e.line <= len(gone):
                    raise
                ok, busy = gone[:e.line - 1], gone[e.line - 1]
                log.warning("ipset %s cannot be destroyed yet (kept until the next resync): %s", busy, e)
                self._busy.add(busy)
            else:
                ok = gone
            for n in ok:
                self._ksets.pop(n, None)
                self._dirty.discard(n)
            done += len(ok)

    def apply(self) -> int:
        return self.apply_updates() + self.apply_deletions()


class IptablesDataplane:
    """The iptables backend as one driver: IP set updates, then each table, then IP set deletions."""

    def __init__(self, tables: Sequence[IptablesTable], ipsets: IpSets | None = None) -> None:
        self.tables = {t.table: t for t in tables}
        if len(self.tables) != len(tables):
            raise ValueError("one IptablesTable per table")
        self.ipsets = ipsets
        self.ip_version = ipsets.ip_version if ipsets is not None else 4

    def table(self, name: str) -> IptablesTable:
        return self.tables[name]

    def apply(self) -> dict[str, IptablesApplyStats]:
        failures: list[Exception] = []
        if self.ipsets is not None:
            self.ipsets.apply_updates()  # a rule must never refer to a missing set: stop here if this fails
        out: dict[str, IptablesApplyStats] = {}
        for name, t in self.tables.items():
            try:
                out[name] = t.apply()
            except IptablesError as e:
                log.error("iptables %s apply failed (will retry): %s", name, e)
                failures.append(e)
        if self.ipsets is not None and not failures:
            self.ipsets.apply_deletions()
        if failures:
            raise failures[0]
        return out

    def queue_resync(self) -> None:
        for t in self.tables.values():
            t.queue_resync()
        if self.ipsets is not None:
            self.ipsets.queue_resync()

    def allow_removals(self, allowed: bool = True) -> None:
        for t in self.tables.values():
            t.allow_removals(allowed)
        if self.ipsets is not None:
            self.ipsets.allow_removals(allowed)

    def status(self) -> str:
        return "; ".join(f"{n}: {s}" for n, t in self.tables.items() if (s := t.status()))
