"""Overlay and cross-node routes that Felix (not BGP) owns: the ``vxlan.calico`` device with its VTEPs,
``tunl0``, routes to remote VXLAN blocks, and the same-subnet shortcut of CrossSubnet pools.

``on_update`` only records; ``complete_deferred_work`` (dataplane thread) pushes desired state into the
VXLAN and IPIP device drivers and the route table. Routes:

- ``<block> via <remote tunnel IP> dev vxlan.calico onlink proto 80`` (ours by link name and protocol);
- ``<block> via <remote node IP> dev <parent> onlink proto 80`` for CrossSubnet pools within our subnet
  (the parent is the link holding the node IP, found by address whenever our host update changes; the
  route table resolves its index, so the routes follow a re-created link).
"""

from __future__ import annotations

import ipaddress
import logging

from felixpy import names
from felixpy.calc.messages import (
    ROUTE_NOENCAP,
    HostTunnelUpdate,
    Message,
    RemoteBlockRoute,
    RemoteBlockRouteRemove,
    VtepRemove,
    VtepUpdate,
)
from felixpy.dataplane.drivers.ipip import IpipDevice, IpipParams
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.drivers.vxlan import Vtep, VxlanDevice, VxlanParams
from felixpy.dataplane.shims.netlink import AF_INET, Netlink, Route

log = logging.getLogger(__name__)


class TunnelManager:
    def __init__(self, nl: Netlink, route_table: RouteTable, vxlan: VxlanDevice, ipip: IpipDevice, *,
                 vxlan_mtu: int, ipip_mtu: int) -> None:
        self._nl = nl
        self._rt = route_table
        self.vxlan = vxlan
        self.ipip = ipip
        self._vxlan_mtu = vxlan_mtu
        self._ipip_mtu = ipip_mtu
        self._host: HostTunnelUpdate | None = None
        self._vteps: dict[str, VtepUpdate] = {}
        self._routes: dict[ipaddress.IPv4Network, RemoteBlockRoute] = {}
        self._dirty_host = False
        self._dirty_vteps = False
        self._dirty_routes = False
        self.parent_iface = ""
        self._noencap_iface = ""  # the link our same-subnet routes were last set on
        self.problem = ""

    def set_mtus(self, *, vxlan_mtu: int, ipip_mtu: int) -> None:
        if (vxlan_mtu, ipip_mtu) != (self._vxlan_mtu, self._ipip_mtu):
            self._vxlan_mtu, self._ipip_mtu = vxlan_mtu, ipip_mtu
            self._dirty_host = True

    def on_update(self, msg: Message) -> None:
        if isinstance(msg, HostTunnelUpdate):
            self._host = msg
            self._dirty_host = self._dirty_routes = True
        elif isinstance(msg, VtepUpdate):
            self._vteps[msg.node] = msg
            self._dirty_vteps = True
        elif isinstance(msg, VtepRemove):
            if self._vteps.pop(msg.node, None) is not None:
                self._dirty_vteps = True
        elif isinstance(msg, RemoteBlockRoute):
            self._routes[msg.dst] = msg
            self._dirty_routes = True
        elif isinstance(msg, RemoteBlockRouteRemove) and self._routes.pop(msg.dst, None) is not None:
            self._dirty_routes = True

    def _find_parent(self) -> str:
        host = self._host
        if host is None or host.node_ip is None:
            return ""
        want = host.node_ip.ip
        for a in self._nl.addrs(family=AF_INET):
            if a.address.ip == want:
                ln = self._nl.link(a.index)
                return ln.name if ln is not None else ""
        return ""

    def complete_deferred_work(self) -> None:
        host = self._host
        if self._dirty_host:
            self._dirty_host = False
            parent = self._find_parent()
            if parent != self.parent_iface:
                self.parent_iface = parent
                self._dirty_routes = True
            self.problem = ""
            if host is not None and host.vxlan_enabled:
                if host.node_ip is None or host.vxlan_tunnel_ip is None or not self.parent_iface:
                    self.problem = ("VXLAN is on but this node has no " + (
                        "IPv4 address" if host.node_ip is None else
                        "VXLAN tunnel address yet" if host.vxlan_tunnel_ip is None else
                        f"interface holding {host.node_ip.ip}"))
                    # Leave any existing device alone: it may be carrying traffic while the tunnel
                    # address is (re)allocated.
                    if host.node_ip is not None and not self.parent_iface:
                        # Our address may come (back) later without a new host update (DHCP, a
                        # re-plumbed NIC): look again on each apply until it is found.
                        self._dirty_host = True
                else:
                    try:
                        self.vxlan.set_device(VxlanParams(
                            vni=names.VXLAN_VNI, port=names.VXLAN_PORT, local_ip=host.node_ip.ip,
                            parent_iface=self.parent_iface, mtu=self._vxlan_mtu, mac=host.vxlan_mac,
                            tunnel_addr=host.vxlan_tunnel_ip))
                    except ValueError as e:  # e.g. a malformed MAC in our own Node resource
                        self.problem = f"VXLAN device settings rejected: {e}"
                        log.error("%s", self.problem)
            elif host is not None:
                self.vxlan.set_device(None)
            if host is not None and host.ipip_enabled and host.ipip_tunnel_ip is not None:
                self.ipip.set_device(IpipParams(mtu=self._ipip_mtu, tunnel_addr=host.ipip_tunnel_ip))
            elif host is not None and not host.ipip_enabled:
                self.ipip.set_device(None)
        if self._dirty_vteps:
            self._dirty_vteps = False
            vteps: dict[str, Vtep] = {}
            for n, v in self._vteps.items():
                try:
                    vteps[n] = Vtep(tunnel_ip=v.tunnel_ip, mac=v.mac, node_ip=v.node_ip)
                except ValueError as e:  # one bad Node must not cut the others off
                    log.error("skipping VTEP of node %s: %s", n, e)
            self.vxlan.set_vteps(vteps)
        if self._dirty_routes:
            self._dirty_routes = False
            vx: list[Route] = []
            direct: list[Route] = []
            for r in self._routes.values():
                route = Route(dst=r.dst, protocol=names.RTPROT_FELIX, gateway=r.gateway, onlink=True)
                (direct if r.kind == ROUTE_NOENCAP else vx).append(route)
            self._rt.set_iface_routes(names.VXLAN_IFACE, vx)
            # Same-subnet routes are interface routes of the parent (by name, not a cached index), so
            # the route table re-resolves the link when it is re-created and the kernel has dropped them.
            parent = self.parent_iface
            if self._noencap_iface and self._noencap_iface != parent:
                self._rt.set_iface_routes(self._noencap_iface, [])
            self._noencap_iface = parent
            if parent:
                self._rt.set_iface_routes(parent, direct)
