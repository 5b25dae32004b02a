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
A restart is a non-event: routes already right are not touched.

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
_OWNER = "owner"
_LINK_DUMP_THRESHOLD = 32  # refresh more interfaces than this with one dump instead of one lookup each
_V6_LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")
_V6_MULTICAST = ipaddress.IPv6Network("ff00::/8")


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

        # Desired state: key -> {owner: route}; iface routes are stored with oif=None.
        self._claims: dict[RouteKey, dict[OwnerId, Route]] = {}
        self._owner_keys: dict[OwnerId, frozenset[RouteKey]] = {}
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
        networks, which become ``<net> dev <ifname> scope link proto <iface_route_protocol>``."""
        if not ifname or len(ifname) > 15:
            raise ValueError(f"invalid interface name {ifname!r}")
        desired: dict[RouteKey, Route] = {}
        ours_by_name = ifname.startswith(self.iface_prefixes)
        bare = False
        table, version, proto = self.table, self._version, self.iface_route_protocol
        for item in routes:
            if isinstance(item, Route):
                r = item._replace(table=table, oif=None)
                self._validate(r)
            elif isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network) and item.version == version:
                # The common case (a workload's /32s), kept cheap: 10k of these at a resync.
                r = Route(item, table, proto, RT_SCOPE_LINK)
                desired[(table, version, int(item.network_address), item.prefixlen, 0, 0)] = r
                bare = True
                continue
            else:
                raise ValueError(f"route for {ifname}: expected a Route or an IPv{version} network, "
                                 f"got {item!r}")
            if r.protocol not in self.owned_protocols and not ours_by_name:
                raise ValueError(f"route {r.describe()} dev {ifname} would not be recognised as ours after a "
                                 f"restart (protocol not in {sorted(self.owned_protocols)}, interface does "
                                 f"not start with {self.iface_prefixes})")
            desired[r.key] = r
        if bare and not ours_by_name and proto not in self.owned_protocols:
            raise ValueError(f"routes via {ifname} would not be recognised as ours after a restart: protocol "
                             f"{proto} is not owned and the name does not start with {self.iface_prefixes}")
        self._set_owner((_IFACE, ifname), desired)
        self._dirty_ifaces.add(ifname)

    def set_routes(self, owner: str, routes: Iterable[Route]) -> None:
        """Routes of ``owner`` that need no interface lookup (blackholes, routes with explicit oif)."""
        desired: dict[RouteKey, Route] = {}
        for item in routes:
            r = item._replace(table=self.table)
            self._validate(r)
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
        old = self._owner_keys.get(oid, frozenset())
        for key in old - desired.keys():
            claims = self._claims.get(key)
            if claims is not None:
                claims.pop(oid, None)
                if not claims:
                    del self._claims[key]
            self._dirty.add(key)
        for key, r in desired.items():
            claims = self._claims.setdefault(key, {})
            if claims.get(oid) != r:
                claims[oid] = r
                self._dirty.add(key)
        if desired:
            self._owner_keys[oid] = frozenset(desired)
        else:
            self._owner_keys.pop(oid, None)

    def queue_resync(self) -> None:
        """The next apply re-reads links and routes from the kernel instead of trusting the cache."""
        self._resync = True

    def allow_removals(self, allowed: bool = True) -> None:
        """Permit deleting owned routes that are not desired (call once the datastore is in sync)."""
        if allowed and not self.removals_allowed:
            self._resync = True  # sweep everything stale on the next apply
        self.removals_allowed = allowed

    # -- status (safe to call from another thread: single dict lookups only) -----------------------
    def num_owned_routes(self) -> int:
        return self._n_owned

    def iface_problem(self, ifname: str) -> str:
        """"" if every desired route of ``ifname`` is in the kernel (as far as we know), else why not."""
        keys = self._owner_keys.get((_IFACE, ifname), frozenset())
        if keys and ifname in self._pending_ifaces:
            return f"interface {ifname} does not exist (its routes are pending)"
        problems = []
        for key in keys:
            err = self._errors.get(key)
            if err:
                problems.append(err)
            elif self._actual.get(key) is None or key in self._dirty:
                claim = (self._claims.get(key) or {}).get((_IFACE, ifname))
                problems.append(f"route {claim.dst if claim else key} dev {ifname} not programmed yet")
        return "; ".join(sorted(problems))

    @property
    def pending_ifaces(self) -> frozenset[str]:
        return frozenset(self._pending_ifaces)

    # -- reconciliation -----------------------------------------------------------------------------
    def _owns(self, r: Route) -> bool:
        if self._version == 6 and (r.dst.subnet_of(_V6_LINK_LOCAL) or r.dst.subnet_of(_V6_MULTICAST)):  # type: ignore[arg-type]
            return False  # the kernel's own per-interface v6 routes
        if r.protocol in self.owned_protocols:
            return True
        if r.oif is not None and self.iface_prefixes:
            name = self._ifname.get(r.oif)
            return name is not None and name.startswith(self.iface_prefixes)
        return False

    def _resolve(self, key: RouteKey) -> tuple[Route | None, str | None]:
        """(route the kernel should hold for key, name of the missing interface if it is pending)."""
        claims = self._claims.get(key)
        if not claims:
            return None, None
        if len(claims) == 1:
            (oid, r), = claims.items()
        else:
            # Two owners want the same key: interface routes win, then the lowest owner name.
            oid = min(claims, key=lambda o: (o[0] != _IFACE, o[1]))
            r = claims[oid]
        if oid[0] == _IFACE:
            idx = self._ifindex.get(oid[1])
            if idx is None:
                return None, oid[1]
            return _with_oif(r, idx), None
        return r, None

    def _set_iface_index(self, name: str, idx: int | None) -> None:
        old = self._ifindex.get(name)
        if old == idx:
            return
        if old is not None:
            del self._ifindex[name]
            if self._ifname.get(old) == name:
                del self._ifname[old]
            # The kernel dropped the routes of the old link with it. (Only our keys are checked: a
            # stray cached route elsewhere merely costs a harmless ESRCH or waits for a resync.)
            for key in self._owner_keys.get((_IFACE, name), frozenset()):
                cached = self._actual.get(key)
                if cached is not None and cached.oif == old:
                    self._drop_actual(key)
        if idx is not None:
            self._ifindex[name] = idx
            self._ifname[idx] = name
        self._dirty |= self._owner_keys.get((_IFACE, name), frozenset())

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

    def _put_actual(self, key: RouteKey, r: Route) -> None:
        self._drop_actual(key)
        self._actual[key] = r
        if self._owns(r):
            self._n_owned += 1

    def _read_kernel(self) -> None:
        links = self._nl.links()
        self._ifindex = {ln.name: ln.index for ln in links}
        self._ifname = {ln.index: ln.name for ln in links}
        actual: dict[RouteKey, Route] = {}
        dups: list[Route] = []
        n_owned = 0
        owns = self._owns
        for r in self._nl.routes(self.table, self.family):
            key = r.key
            mine = owns(r)
            if key in actual:
                if mine:
                    dups.append(r)
                continue
            actual[key] = r
            n_owned += mine
        self._actual = actual
        self._dup_deletes = dups
        self._n_owned = n_owned
        self._dirty = set(self._claims)
        self._dirty.update(k for k, r in actual.items() if owns(r))
        self._dirty_ifaces.clear()
        self._resync = False

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
        dels: list[Route] = []
        pending: set[str] = set()
        dirty, self._dirty = self._dirty, set()
        removals = self.removals_allowed
        actual_get = self._actual.get
        claims_get = self._claims.get
        ifindex_get = self._ifindex.get
        errors_pop = self._errors.pop
        for key in dirty:
            have = actual_get(key)
            claims = claims_get(key)
            want: Route | None
            if claims is not None and len(claims) == 1:
                # Inlined _resolve for the common single-owner case (the hot loop of a resync).
                for (kind, name), want in claims.items():
                    if kind == _IFACE:
                        idx = ifindex_get(name)
                        if idx is None:
                            pending.add(name)
                            stats.pending += 1
                            want = None
                        elif want.oif != idx:
                            want = _with_oif(want, idx)
            else:
                want, missing_iface = self._resolve(key)
                if missing_iface is not None:
                    pending.add(missing_iface)
                    stats.pending += 1
            if want is not None:
                if have != want:
                    adds.append(want)
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
                key = r.key
                if self._actual.get(key) == r:
                    self._drop_actual(key)
                self._errors.pop(key, None)
                stats.dels += 1
        for r in adds:
            if id(r) not in failed:
                key = r.key
                self._put_actual(key, r)
                self._errors.pop(key, None)
                stats.adds += 1
        stats.errors = len(errors)
        if errors:
            log.warning("route table %d: %d of %d route changes failed (will retry); first: %s", self.table,
                        len(errors), len(adds) + len(dels), errors[0])
            if any(e.errno == errno.ENOBUFS for e in errors):
                self._resync = True  # replies were lost: re-read the kernel
