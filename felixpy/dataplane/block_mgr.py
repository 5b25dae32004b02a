"""Blackhole routes for this node's affine IPAM blocks (proto 80), so addresses of a local block that
have no pod are dropped here instead of following a default route back out."""

from __future__ import annotations

import ipaddress

from felixpy import metrics, names
from felixpy.calc.messages import LocalBlockRemove, LocalBlockUpdate, Message
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.shims.netlink import Route

OWNER = "local-blocks"


class BlockRouteManager:
    def __init__(self, route_table: RouteTable) -> None:
        self._rt = route_table
        self._blocks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        self._dirty = False

    def on_update(self, msg: Message) -> None:
        if isinstance(msg, LocalBlockUpdate):
            self._blocks.add(msg.cidr)
            self._dirty = True
        elif isinstance(msg, LocalBlockRemove):
            self._blocks.discard(msg.cidr)
            self._dirty = True

    def complete_deferred_work(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        routes = [Route(dst=c, protocol=names.RTPROT_FELIX, type="blackhole")
                  for c in sorted(self._blocks, key=str) if c.version == 4]
        self._rt.set_routes(OWNER, routes)
        metrics.local_blocks.set(len(self._blocks))
