"""Routes learned over BGP, programmed by the agent (ExaBGP has no FIB; the agent owns every route).

Input: :class:`BgpRoutesUpdate` snapshots (already through the import rules of ``bgp.routes``). Output:
kernel routes with ``proto bird`` (12, the protocol Calico's BIRD uses, so a node taken over from
calico-node adopts its routes instead of duplicating them):

- next hop on a tunnel device (IPIP pools): ``<block> via <node IP> dev tunl0 onlink``;
- otherwise resolved like BIRD's ``gateway recursive``: the kernel's route to the next hop gives the
  egress link and, when the next hop is not directly connected (peers across a router), the gateway
  (``onlink`` when that gateway is not directly connected either). Next hops without a usable route
  (none, unreachable, blackhole, a local address) are skipped and listed in ``unresolved``.
  Resolutions are cached per next hop and redone on every resync (refresh timer, kernel events).
"""

from __future__ import annotations

import ipaddress
import logging

from felixpy import names
from felixpy.calc.messages import BgpRoutesUpdate, Message
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.shims.netlink import Netlink, NetlinkError, Route

log = logging.getLogger(__name__)

OWNER = "bgp"

_Learned = tuple[ipaddress.IPv4Network, ipaddress.IPv4Address, str | None, bool]
_Hop = tuple[int, ipaddress.IPv4Address, bool]  # (egress link index, gateway, onlink)


class BgpRouteManager:
    def __init__(self, nl: Netlink, route_table: RouteTable) -> None:
        self._nl = nl
        self._rt = route_table
        self._routes: tuple[_Learned, ...] = ()
        self._dirty = False
        self._stale = False  # drop the resolutions on the next pass (set by queue_resync)
        self._resolved: dict[ipaddress.IPv4Address, _Hop | None] = {}
        self.unresolved: set[ipaddress.IPv4Address] = set()

    def on_update(self, msg: Message) -> None:
        if isinstance(msg, BgpRoutesUpdate):
            self._routes = msg.routes
            self._dirty = True

    def queue_resync(self) -> None:
        """Next hops may now resolve differently (links or underlay routes changed)."""
        # The dataplane loop calls this from the event loop while its worker thread may be resolving:
        # only flags here (stale first), the cache itself is dropped by the worker.
        self._stale = True
        self._dirty = True

    def apply(self) -> None:
        """Driver-shaped hook so the dataplane loop's resync reaches us; the work is in complete_deferred_work."""

    def _lookup(self, addr: ipaddress.IPv4Address) -> Route | None:
        """The kernel's unicast route towards ``addr`` (``ip route get``), or None."""
        try:
            r = self._nl.route_get(addr)
        except (NetlinkError, OSError) as e:
            log.warning("cannot resolve BGP next hop %s: %s", addr, e)
            return None
        if r is None or r.oif is None or r.type != "unicast":
            return None  # no route, or local / unreachable / blackhole
        return r

    def _resolve(self, nh: ipaddress.IPv4Address) -> _Hop | None:
        if nh in self._resolved:
            return self._resolved[nh]
        res: _Hop | None = None
        r = self._lookup(nh)
        if r is not None and r.oif is not None:
            if r.gateway is None:
                res = (r.oif, nh, False)  # directly connected
            elif isinstance(r.gateway, ipaddress.IPv4Address):
                # Behind a router: our route goes via that router. The kernel takes it without "onlink"
                # only if the router is itself directly connected on that link (it is not on hosts with
                # "default via <gw> dev eth0 onlink"); the lookup's answer does not carry the onlink flag
                # of the route it came from, so look the router up too.
                g = self._lookup(r.gateway)
                direct = g is not None and g.gateway is None and g.oif == r.oif
                res = (r.oif, r.gateway, not direct)
            else:
                log.warning("BGP next hop %s is reached via IPv6 gateway %s, which IPv4 routes here cannot use",
                            nh, r.gateway)
        self._resolved[nh] = res
        return res

    def complete_deferred_work(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        if self._stale:
            self._stale = False
            self._resolved.clear()
        plain: list[Route] = []
        by_dev: dict[str, list[Route]] = {}
        unresolved: set[ipaddress.IPv4Address] = set()
        for dst, nh, dev, onlink in self._routes:
            if dev:
                by_dev.setdefault(dev, []).append(Route(dst=dst, protocol=names.RTPROT_BIRD, gateway=nh,
                                                        onlink=onlink))
                continue
            hop = self._resolve(nh)
            if hop is None:
                unresolved.add(nh)
                continue
            oif, gw, hop_onlink = hop
            plain.append(Route(dst=dst, protocol=names.RTPROT_BIRD, gateway=gw, oif=oif,
                               onlink=onlink or hop_onlink))
        self._rt.set_routes(OWNER, plain)
        self._rt.set_iface_routes(names.IPIP_IFACE, by_dev.pop(names.IPIP_IFACE, []))
        for dev, rs in by_dev.items():  # only tunl0 is ours to route through; anything else is a bug upstream
            log.warning("ignoring %d BGP route(s) via device %s (only %s is supported), e.g. %s", len(rs), dev,
                        names.IPIP_IFACE, rs[0].dst)
        if unresolved != self.unresolved and unresolved:
            log.warning("BGP next hops with no route: %s (their prefixes are not programmed)",
                        ", ".join(map(str, sorted(unresolved))))
        self.unresolved = unresolved
