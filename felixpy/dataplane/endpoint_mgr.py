"""Endpoint manager: a local WorkloadEndpoint becomes /32 routes on its cali veth plus the veth sysctls.

``on_update`` only records the message; ``complete_deferred_work`` (in the dataplane thread) pushes the
desired routes into the route-table driver and re-asserts per-interface sysctls for new interfaces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from felixpy import metrics, names
from felixpy.calc.messages import Message, WorkloadEndpointRemove, WorkloadEndpointUpdate
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.shims.netlink import Route
from felixpy.datastore.api import Key

log = logging.getLogger(__name__)

RT_SCOPE_LINK = 253


class EndpointManager:
    def __init__(self, route_table: RouteTable, configure_iface: Callable[[str], None]) -> None:
        self._rt = route_table
        self._configure_iface = configure_iface
        self._pending: dict[Key, WorkloadEndpointUpdate | None] = {}
        self._active: dict[Key, WorkloadEndpointUpdate] = {}
        self._iface_users: dict[str, Key] = {}
        self._configured: set[str] = set()
        self.errors: dict[Key, str] = {}

    def on_update(self, msg: Message) -> None:
        if isinstance(msg, WorkloadEndpointUpdate):
            self._pending[msg.key] = msg
        elif isinstance(msg, WorkloadEndpointRemove):
            self._pending[msg.key] = None

    def complete_deferred_work(self) -> None:
        if self.errors:
            self._retry_configure()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for key, msg in pending.items():
            old = self._active.get(key)
            if (old is not None and (msg is None or old.iface != msg.iface)
                    and self._iface_users.get(old.iface) == key):
                self._rt.set_iface_routes(old.iface, [])
                del self._iface_users[old.iface]
                self._configured.discard(old.iface)
            if msg is None:
                self._active.pop(key, None)
                self.errors.pop(key, None)
                continue
            self._active[key] = msg
            self._iface_users[msg.iface] = key
            routes = [Route(dst=net, protocol=names.RTPROT_FELIX, scope=RT_SCOPE_LINK)
                      for net in msg.ipv4_nets]
            self._rt.set_iface_routes(msg.iface, routes)
            if msg.iface not in self._configured:
                try:
                    self._configure_iface(msg.iface)
                    self._configured.add(msg.iface)
                    self.errors.pop(key, None)
                except OSError as e:
                    # Interface not there (yet): routes stay pending in the driver; retried later.
                    self.errors[key] = f"interface {msg.iface}: {e}"
        metrics.active_local_endpoints.set(len(self._active))

    def _retry_configure(self) -> None:
        """An endpoint can arrive before its veth (the CNI server writes the WorkloadEndpoint while the veth
        is being created, and the watch may deliver it first): configure those interfaces on every apply
        until they exist, so the ADD that waits for the next apply sees them done."""
        for key in list(self.errors):
            msg = self._active.get(key)
            if msg is None:
                self.errors.pop(key, None)
                continue
            try:
                self._configure_iface(msg.iface)
            except OSError as e:
                self.errors[key] = f"interface {msg.iface}: {e}"
                continue
            self._configured.add(msg.iface)
            del self.errors[key]

    def status(self, key: Key) -> str:
        """"" if the endpoint is fully programmed, else what is missing.

        Called from the event loop after a barrier: the apply it waited for handled the caller's update, so
        an entry still pending is a newer one (e.g. the watch's copy of the same endpoint, being applied
        right now) and does not make an endpoint that is already active "not yet applied"."""
        msg = self._active.get(key)
        if msg is None:
            return "not yet applied" if key in self._pending else ""
        if key in self.errors:
            return self.errors[key]
        return self._rt.iface_problem(msg.iface)
