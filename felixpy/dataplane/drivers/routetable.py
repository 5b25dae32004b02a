"""The route-table driver: owns the routes of one table and family, applies only the difference.

Desired state comes from managers through cheap setters that only record it and mark keys dirty:

- ``set_iface_routes(ifname, routes)``: routes out of an interface (workload ``/32 scope link``). The
  interface index is filled in at apply time; routes to an interface that does not exist (yet) stay
  *pending* and are programmed by the first apply that finds it.
- ``set_routes(owner, routes)``: routes without an interface of their own (blackholes for affine
  blocks), grouped by an owner name so each manager replaces only its own set.

``apply()`` (dataplane thread) reconciles the kernel with that state. A route in the kernel is *ours*
(see :mod:`felixpy.names`) if its protocol is one of ``owned_protocols`` (default ``{80}``) or its
interface's name starts with one of ``iface_prefixes`` (default ``("cali",)``); ours-but-not-desired
routes are deleted, desired routes that are missing or differ are replaced, everything else is left
alone. Setters refuse routes that would not be recognised as ours after a restart, so nothing we
program can leak.

Kernel reads: the first apply, and any apply after ``queue_resync()``, dumps links and routes and
trusts nothing cached; other applies trust the cache and only look at dirty keys (plus a by-name
lookup of the interfaces whose routes changed, which catches a veth recreated with a new index).
A restart is a non-event: routes already right are not touched. ``iface_changed(name)`` (from a link
monitor) asks for such a lookup without a full resync. Errors on one route never block the others;
failed routes stay dirty and are retried by the next apply.

If two owners want the same key, interface routes win, then the lowest owner name. IPv6 routes are
stored the way the kernel reports them (scope universe, metric 1024 when unset) so re-dumps compare
equal and nothing churns.

Removals: the driver never deletes anything until ``removals_allowed`` is set (``allow_removals()``).
The agent must call it once the datastore is in sync; before that an empty desired state only means
"not loaded yet", and deleting would cut every running pod off.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from felixpy import names
from felixpy.dataplane.shims.netlink import (
    AF_INET,
    AF_INET6,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTN_NAMES,
    IPNetwork,
    Netlink,
    Route,
)

log = logging.getLogger(__name__)

RouteKey = tuple[int, int, int, int, int, int]  # Route.key: (table, version, dst int, prefixlen, tos, metric)
OwnerId = tuple[str, str]  # ("iface", ifname) or ("owner", name)

_IFACE = "iface"
_EMPTY: dict[RouteKey, Route] = {}
_V6_DEFAULT_METRIC = 1024  # the kernel gives IPv6 routes without a metric this one (IP6_RT_PRIO_USER)
_OWNER = "owner"
_LINK_DUMP_THRESHOLD = 32  # refresh more interfaces than this with one dump instead of one lookup each


def _with_oif(r: Route, idx: int) -> Route:
    # Route._replace() goes through Python-level _make; this is the same tuple, built directly.
    return tuple.__new__(Route, (r[0], r[1], r[2], r[3], r[4], idx, r[6], r[7], r[8], r[9]))


@dataclass
class ApplyStats:
    adds: int = 0
    dels: int = 0
    errors: int = 0
    pending: int = 0  # desired routes waiting for their interface to appear
    resynced: bool = False  # this apply re-read the kernel
    duration_s: float = 0.0
    dump_s: float = 0.0  # reading the kernel (links + routes)
    program_s: float = 0.0  # the netlink writes
    error_texts: list[str] = field(default_factory=list)


class RouteTable:
    def __init__(self, nl: Netlink, *, table: int = RT_TABLE_MAIN, family: int = AF_INET,
                 owned_protocols: Iterable[int] = (names.RTPROT_FELIX,),
                 iface_prefixes: Iterable[str] = (names.IFACE_PREFIX,),
                 iface_route_protocol: int = names.RTPROT_FELIX,
                 removals_allowed: bool = False) -> None:
        if family not in (AF_INET, AF_INET6):
            raise ValueError(f"family must be AF_INET or AF_INET6, not {family}")
        self._nl = nl
        self.table = table
        self.family = family
        self._version = 4 if family == AF_INET else 6
        self.owned_protocols = frozenset(owned_protocols)
        self.iface_prefixes = tuple(iface_prefixes)
        if not self.owned_protocols and not self.iface_prefixes:
            raise ValueError("a route table must own something: give owned_protocols or iface_prefixes")
        self.iface_route_protocol = iface_route_protocol
        self.removals_allowed = removals_allowed

        # Desired state. Each owner's dict is replaced, never mutated, so status readers in other
        # threads see a consistent one. Iface routes are stored with oif=None.
        self._owner_routes: dict[OwnerId, dict[RouteKey, Route]] = {}
        self._claims: dict[RouteKey, OwnerId] = {}  # key -> the owner whose route wins
        self._contenders: dict[RouteKey, set[OwnerId]] = {}  # only keys wanted by several owners
        # What we believe the kernel holds (every route of our table/family, foreign ones included).
        self._actual: dict[RouteKey, Route] = {}
        self._dup_deletes: list[Route] = []  # owned routes shadowed by another with the same key
        self._n_owned = 0
        self._ifindex: dict[str, int] = {}
        self._ifname: dict[int, str] = {}
        self._dirty: set[RouteKey] = set()
        self._dirty_ifaces: set[str] = set()  # re-check their index on the next apply
        self._pending_ifaces: set[str] = set()
        self._errors: dict[RouteKey, str] = {}
        self._resync = True

    # -- desired state (cheap: no kernel access) ----------------------------------------------------
    def set_iface_routes(self, ifname: str, routes: Iterable[Route | IPNetwork]) -> None:
        """Routes out of ``ifname``: Route objects (their ``oif``/``table`` are filled in) or bare
        networks, which become ``<net> dev <ifname> scope link proto <iface_route_protocol>``.
        An empty list removes the interface's routes. Raises ValueError (changing nothing) on bad input.
        """
        if not ifname or len(ifname.encode()) > 15 or "/" in ifname:
            raise ValueError(f"invalid interface name {ifname!r}")
        desired: dict[RouteKey, Route] = {}
        ours_by_name = ifname.startswith(self.iface_prefixes)
        table, version, proto = self.table, self._version, self.iface_route_protocol
        for item in routes:
            if isinstance(item, Route):
                r = item._replace(table=table, oif=None)
                self._validate(r)
                if version == 6:
                    r = _as_kernel_v6(r)
                if r.protocol not in self.owned_protocols and not ours_by_name:
                    raise ValueError(f"route {r.describe()} dev {ifname} would not be recognised as ours "
                                     f"after a restart (protocol not in {sorted(self.owned_protocols)}, "
                                     f"interface does not start with {self.iface_prefixes})")
                desired[r.key] = r
            elif isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network) and item.version == version:
                # The common case (a workload's /32s), kept cheap: 10k of these at a resync.
                if not ours_by_name and proto not in self.owned_protocols:
                    raise ValueError(f"routes via {ifname} would not be recognised as ours after a restart: "
                                     f"protocol {proto} is not owned and the name does not start with "
                                     f"{self.iface_prefixes}")
                metric, scope = (_V6_DEFAULT_METRIC, RT_SCOPE_UNIVERSE) if version == 6 else (0, RT_SCOPE_LINK)
                desired[(table, version, int(item.network_address), item.prefixlen, 0, metric)] = tuple.__new__(
                    Route, (item, table, proto, scope, "unicast", None, None, False, metric, 0))
            else:
                raise ValueError(f"route for {ifname}: expected a Route or an IPv{version} network, "
                                 f"got {item!r}")
        self._set_owner((_IFACE, ifname), desired)
        self._dirty_ifaces.add(ifname)

    def set_routes(self, owner: str, routes: Iterable[Route]) -> None:
        """Routes of ``owner`` that need no interface lookup (blackholes, routes with explicit oif).
        Replaces the owner's previous set. Raises ValueError (changing nothing) on bad input."""
        desired: dict[RouteKey, Route] = {}
        for item in routes:
            if not isinstance(item, Route):
                raise ValueError(f"routes of {owner!r} must be Route objects, got {item!r}")
            r = item._replace(table=self.table)
            self._validate(r)
            if self._version == 6:
                r = _as_kernel_v6(r)
            if r.protocol not in self.owned_protocols:
                raise ValueError(f"route {r.describe()} of {owner!r} would not be recognised as ours after a "
                                 f"restart: use one of protocols {sorted(self.owned_protocols)}")
            desired[r.key] = r
        self._set_owner((_OWNER, owner), desired)

    def _validate(self, r: Route) -> None:
        if not isinstance(r.dst, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ValueError(f"route destination must be an IP network, not {r.dst!r}")
        if r.dst.version != self._version:
            raise ValueError(f"route {r.describe()} is IPv{r.dst.version}, this table is IPv{self._version}")
        if r.type not in RTN_NAMES:
            raise ValueError(f"route {r.dst}: unknown type {r.type!r}")
        if r.gateway is not None and r.gateway.version != self._version:
            raise ValueError(f"route {r.dst}: gateway {r.gateway} is of the wrong family")

    def _set_owner(self, oid: OwnerId, desired: dict[RouteKey, Route]) -> None:
        old = self._owner_routes.get(oid)
        claims = self._claims
        dirty = self._dirty
        if desired:
            self._owner_routes[oid] = desired
        else:
            self._owner_routes.pop(oid, None)
        if old:
            for key in old.keys() - desired.keys():
                self._release(key, oid)
        old_get = (old if old is not None else _EMPTY).get
        for key, r in desired.items():
            cur = claims.get(key)
            if cur is None:
                claims[key] = oid
                dirty.add(key)
            elif cur == oid:
                if old_get(key) != r:
                    dirty.add(key)
            else:
                contenders = self._contenders.setdefault(key, {cur})
                if oid not in contenders:
                    contenders.add(oid)
                    winner = min(contenders, key=_precedence)
                    if winner != cur:
                        log.warning("route %s: %s/%s takes precedence over %s/%s", r.dst, *winner, *cur)
                    claims[key] = winner
                dirty.add(key)

    def _release(self, key: RouteKey, oid: OwnerId) -> None:
        self._dirty.add(key)
        contenders = self._contenders.get(key)
        if contenders is not None:
            contenders.discard(oid)
            if len(contenders) <= 1:
                del self._contenders[key]
            if contenders:
                self._claims[key] = min(contenders, key=_precedence)
                return
        if self._claims.get(key) == oid:
            del self._claims[key]

    def iface_changed(self, ifname: str) -> None:
        """A link of that name appeared, vanished or was re-created (from the kernel monitor): look
        its index up again on the next apply. Much cheaper than ``queue_resync`` for link events."""
        self._dirty_ifaces.add(ifname)

    def queue_resync(self) -> None:
        """The next apply re-reads links and routes from the kernel instead of trusting the cache."""
        self._resync = True

    def allow_removals(self, allowed: bool = True) -> None:
        """Permit deleting owned routes that are not desired (call once the datastore is in sync)."""
        if allowed and not self.removals_allowed:
            self._resync = True  # sweep everything stale on the next apply
        self.removals_allowed = allowed

    # -- status (safe to call from another thread: lookups in dicts that are replaced, not mutated) --
    def num_owned_routes(self) -> int:
        return self._n_owned

    def iface_problem(self, ifname: str) -> str:
        """"" if every desired route of ``ifname`` is in the kernel (as far as we know), else why not."""
        routes = self._owner_routes.get((_IFACE, ifname))
        if not routes:
            return ""
        if ifname in self._pending_ifaces:
            return f"interface {ifname} does not exist (its routes are pending)"
        problems = []
        for key, r in list(routes.items()):
            err = self._errors.get(key)
            if err:
                problems.append(err)
            elif self._actual.get(key) is None or key in self._dirty:
                problems.append(f"route {r.dst} dev {ifname} not programmed yet")
        return "; ".join(sorted(problems))

    @property
    def pending_ifaces(self) -> frozenset[str]:
        return frozenset(self._pending_ifaces)

    # -- reconciliation -----------------------------------------------------------------------------
    def _owns(self, r: Route) -> bool:
        if r.protocol in self.owned_protocols:
            return True
        if self._version == 6 and (r.dst.network_address.is_link_local or r.dst.network_address.is_multicast):
            return False  # the kernel's own per-interface v6 routes
        if r.oif is not None and self.iface_prefixes:
            name = self._ifname.get(r.oif)
            return name is not None and name.startswith(self.iface_prefixes)
        return False

    def _resolve(self, key: RouteKey) -> tuple[Route | None, str | None]:
        """(route the kernel should hold for key, name of the missing interface if it is pending)."""
        oid = self._claims.get(key)
        if oid is None:
            return None, None
        r = self._owner_routes[oid][key]
        if oid[0] == _IFACE:
            idx = self._ifindex.get(oid[1])
            if idx is None:
                return None, oid[1]
            if r.oif != idx:
                r = _with_oif(r, idx)
        return r, None

    def _set_iface_index(self, name: str, idx: int | None) -> None:
        old = self._ifindex.get(name)
        if old == idx:
            return
        if old is not None:
            del self._ifindex[name]
            if self._ifname.get(old) == name:
                del self._ifname[old]
            # The kernel dropped the routes of the old link with it. (Only this interface's keys are
            # checked: a stray cached route elsewhere costs at most a harmless ESRCH until the resync.)
            for key in self._owner_routes.get((_IFACE, name), {}):
                cached = self._actual.get(key)
                if cached is not None and cached.oif == old:
                    self._drop_actual(key)
        if idx is not None:
            self._ifindex[name] = idx
            self._ifname[idx] = name
        self._dirty.update(self._owner_routes.get((_IFACE, name), {}))

    def _refresh_ifaces(self, ifnames: set[str]) -> None:
        if not ifnames:
            return
        if len(ifnames) > _LINK_DUMP_THRESHOLD:
            current = {ln.name: ln.index for ln in self._nl.links()}
            for name in ifnames:
                self._set_iface_index(name, current.get(name))
            return
        for name in ifnames:
            ln = self._nl.link(name)
            self._set_iface_index(name, ln.index if ln is not None else None)

    def _drop_actual(self, key: RouteKey) -> None:
        r = self._actual.pop(key, None)
        if r is not None and self._owns(r):
            self._n_owned -= 1

    def _read_kernel(self) -> None:
        # Cleared before the dump: a queue_resync() arriving (from the event loop) during it must not be lost.
        self._resync = False
        links = self._nl.links()
        self._ifindex = {ln.name: ln.index for ln in links}
        self._ifname = {ln.index: ln.name for ln in links}
        actual: dict[RouteKey, Route] = {}
        owned: list[RouteKey] = []
        dups: list[Route] = []
        owns = self._owns
        for r in self._nl.routes(self.table, self.family):
            d = r.dst
            key = (r.table, d.version, int(d.network_address), d.prefixlen, r.tos, r.metric)
            mine = owns(r)
            if key in actual:
                if mine:
                    dups.append(r)
                continue
            actual[key] = r
            if mine:
                owned.append(key)
        self._actual = actual
        self._dup_deletes = dups
        self._n_owned = len(owned)
        self._dirty = set(self._claims)
        self._dirty.update(owned)
        self._dirty_ifaces.clear()

    def apply(self) -> ApplyStats:
        stats = ApplyStats()
        t0 = time.perf_counter()
        try:
            self._apply(stats)
        except BaseException:
            self._resync = True  # we no longer know what the kernel holds
            raise
        stats.duration_s = time.perf_counter() - t0
        return stats

    def _apply(self, stats: ApplyStats) -> None:
        t0 = time.perf_counter()
        if self._resync:
            self._read_kernel()
            stats.resynced = True
        else:
            check = self._dirty_ifaces | self._pending_ifaces
            self._dirty_ifaces = set()
            self._refresh_ifaces(check)
        stats.dump_s = time.perf_counter() - t0

        adds: list[Route] = []
        add_keys: list[RouteKey] = []
        dels: list[Route] = []
        pending: set[str] = set()
        dirty, self._dirty = self._dirty, set()
        removals = self.removals_allowed
        actual_get = self._actual.get
        claims_get = self._claims.get
        owner_routes = self._owner_routes
        ifindex_get = self._ifindex.get
        errors_pop = self._errors.pop
        for key in dirty:
            have = actual_get(key)
            want: Route | None = None
            oid = claims_get(key)
            if oid is not None:
                # Inlined _resolve: this loop runs over every route at a resync.
                want = owner_routes[oid][key]
                if oid[0] == _IFACE:
                    idx = ifindex_get(oid[1])
                    if idx is None:
                        pending.add(oid[1])
                        stats.pending += 1
                        want = None
                    elif want.oif != idx:
                        want = _with_oif(want, idx)
            if want is not None:
                if have != want:
                    adds.append(want)
                    add_keys.append(key)
                else:
                    errors_pop(key, None)
            elif have is not None and removals and self._owns(have):
                dels.append(have)
            else:
                errors_pop(key, None)
        if removals and self._dup_deletes:
            dels.extend(self._dup_deletes)
        self._dup_deletes = []
        self._pending_ifaces = pending
        if not adds and not dels:
            return

        t1 = time.perf_counter()
        errors = self._nl.apply_routes(adds, dels, ifnames=self._ifname)
        stats.program_s = time.perf_counter() - t1
        failed: set[int] = set()
        for e in errors:
            r = e.obj
            assert isinstance(r, Route)
            failed.add(id(r))
            key = r.key
            self._errors[key] = str(e)
            self._dirty.add(key)  # retried on the next apply
            stats.error_texts.append(str(e))
            if e.errno == errno.ENODEV and r.oif is not None:
                name = self._ifname.get(r.oif)
                if name is not None:
                    self._dirty_ifaces.add(name)  # the link went away: look it up again
        for r in dels:
            if id(r) not in failed:
                d = r.dst
                key = (r.table, d.version, int(d.network_address), d.prefixlen, r.tos, r.metric)
                if actual_get(key) == r:
                    self._drop_actual(key)
                errors_pop(key, None)
                stats.dels += 1
        actual = self._actual
        owned_protocols = self.owned_protocols
        for key, r in zip(add_keys, adds, strict=True):
            if id(r) not in failed:
                old = actual_get(key)
                if old is not None and self._owns(old):
                    self._n_owned -= 1
                actual[key] = r
                if r.protocol in owned_protocols or self._owns(r):
                    self._n_owned += 1
                errors_pop(key, None)
                stats.adds += 1
        stats.errors = len(errors)
        if errors:
            log.warning("route table %d: %d of %d route changes failed (will retry); first: %s", self.table,
                        len(errors), len(adds) + len(dels), errors[0])
            if any(e.errno == errno.ENOBUFS for e in errors):
                self._resync = True  # replies were lost: re-read the kernel


def _as_kernel_v6(r: Route) -> Route:
    """An IPv6 route as the kernel reports it back: it has no route scopes (always universe) and
    gives routes without a metric 1024. Desired routes are stored this way so re-dumps compare equal."""
    return r._replace(scope=RT_SCOPE_UNIVERSE, metric=r.metric or _V6_DEFAULT_METRIC)


def _precedence(oid: OwnerId) -> tuple[bool, str]:
    # When two owners want the same key: interface routes first, then the lowest owner name.
    return (oid[0] != _IFACE, oid[1])
