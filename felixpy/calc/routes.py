"""Route resolver (pure): Nodes + IPPools + IPAM blocks -> what this node needs to reach other nodes'
pods without BGP, plus the pool and tunnel facts the dataplane managers need.

What it derives (Calico's l3_route_resolver, vxlan_resolver and encapsulation_resolver in one small
calculator; the whole state is tiny, so it is recomputed wholesale when an input changes and only the
difference is emitted):

- :class:`HostTunnelUpdate`: this node's IP and tunnel addresses, and whether VXLAN / IPIP are on (on
  when any IPv4 pool uses them).
- :class:`VtepUpdate` per remote node with a VXLAN tunnel address (MAC from the Node, else Calico's
  derived one), while VXLAN is on.
- :class:`RemoteBlockRoute` per remote block in a VXLAN pool: via the remote tunnel IP on
  ``vxlan.calico``, or, for ``CrossSubnet`` pools when the remote node is in this node's subnet, straight
  to the node IP (no encapsulation). Blocks of IPIP and no-encapsulation pools are routed by BGP.
- :class:`IPPoolUpdate` per pool (NAT outgoing, BGP export, encapsulation).
"""

from __future__ import annotations

import ipaddress

from felixpy import names
from felixpy.calc.messages import (
    ROUTE_NOENCAP,
    ROUTE_VXLAN,
    HostTunnelUpdate,
    IPPoolRemove,
    IPPoolUpdate,
    Message,
    RemoteBlockRoute,
    RemoteBlockRouteRemove,
    VtepRemove,
    VtepUpdate,
)
from felixpy.datastore.api import Key
from felixpy.ipam.pools import ENCAP_CROSS_SUBNET, ENCAP_NEVER, IPPool
from felixpy.model.resources import BlockInfo, NodeInfo

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


class RouteResolver:
    def __init__(self, node: str) -> None:
        self.node = node
        self.nodes: dict[str, NodeInfo] = {}
        self.pools: dict[str, IPPool] = {}
        self.blocks: dict[Key, BlockInfo] = {}
        self._dirty = False
        self._host: HostTunnelUpdate | None = None
        self._vteps: dict[str, VtepUpdate] = {}
        self._routes: dict[ipaddress.IPv4Network, RemoteBlockRoute] = {}
        self._pools: dict[IPNet, IPPoolUpdate] = {}

    # -- inputs (cheap) -----------------------------------------------------------------------------
    def set_node(self, name: str, info: NodeInfo | None) -> None:
        if info is None:
            self._dirty |= self.nodes.pop(name, None) is not None
        elif self.nodes.get(name) != info:
            self.nodes[name] = info
            self._dirty = True

    def set_pool(self, name: str, pool: IPPool | None) -> None:
        if pool is None:
            self._dirty |= self.pools.pop(name, None) is not None
        elif self.pools.get(name) != pool:
            self.pools[name] = pool
            self._dirty = True

    def set_block(self, key: Key, block: BlockInfo | None) -> None:
        if block is None:
            self._dirty |= self.blocks.pop(key, None) is not None
        elif self.blocks.get(key) != block:
            self.blocks[key] = block
            self._dirty = True

    # -- derivation ---------------------------------------------------------------------------------
    def pool_for(self, net: IPNet) -> IPPool | None:
        best: IPPool | None = None
        for p in self.pools.values():
            if (p.cidr.version == net.version and net.subnet_of(p.cidr)  # type: ignore[arg-type]
                    and (best is None or p.cidr.prefixlen > best.cidr.prefixlen)):
                best = p
        return best

    def host(self) -> HostTunnelUpdate:
        me = self.nodes.get(self.node)
        v4pools = [p for p in self.pools.values() if p.cidr.version == 4]
        vxlan_on = any(p.vxlan_mode != ENCAP_NEVER for p in v4pools)
        ipip_on = any(p.ipip_mode != ENCAP_NEVER for p in v4pools)
        mac = ""
        if me is not None and me.vxlan_tunnel_ip is not None:
            mac = me.vxlan_mac or names.vtep_mac(self.node)
        return HostTunnelUpdate(
            node_ip=me.ipv4 if me else None, vxlan_enabled=vxlan_on,
            vxlan_tunnel_ip=me.vxlan_tunnel_ip if me else None, vxlan_mac=mac,
            ipip_enabled=ipip_on, ipip_tunnel_ip=me.ipip_tunnel_ip if me else None)

    def _desired(self) -> tuple[HostTunnelUpdate, dict[str, VtepUpdate],
                                dict[ipaddress.IPv4Network, RemoteBlockRoute], dict[IPNet, IPPoolUpdate]]:
        host = self.host()
        vteps: dict[str, VtepUpdate] = {}
        if host.vxlan_enabled:
            for n in self.nodes.values():
                if n.name == self.node or n.vxlan_tunnel_ip is None or n.ipv4 is None:
                    continue
                vteps[n.name] = VtepUpdate(node=n.name, tunnel_ip=n.vxlan_tunnel_ip,
                                           mac=n.vxlan_mac or names.vtep_mac(n.name), node_ip=n.ipv4.ip)
        routes: dict[ipaddress.IPv4Network, RemoteBlockRoute] = {}
        my_net = host.node_ip.network if host.node_ip is not None else None
        for blk in self.blocks.values():
            cidr = blk.cidr
            if (blk.deleted or not blk.affinity_node or blk.affinity_node == self.node
                    or not isinstance(cidr, ipaddress.IPv4Network)):
                continue
            pool = self.pool_for(cidr)
            if pool is None or pool.vxlan_mode == ENCAP_NEVER:
                continue
            remote = self.nodes.get(blk.affinity_node)
            if remote is None or remote.ipv4 is None:
                continue
            if pool.vxlan_mode == ENCAP_CROSS_SUBNET and my_net is not None and remote.ipv4.ip in my_net:
                routes[cidr] = RemoteBlockRoute(cidr, ROUTE_NOENCAP, remote.ipv4.ip, remote.name)
            elif remote.name in vteps:
                routes[cidr] = RemoteBlockRoute(cidr, ROUTE_VXLAN, vteps[remote.name].tunnel_ip, remote.name)
        pools = {p.cidr: IPPoolUpdate(cidr=p.cidr, nat_outgoing=p.nat_outgoing, disabled=p.disabled,
                                      ipip_mode=p.ipip_mode, vxlan_mode=p.vxlan_mode,
                                      disable_bgp_export=p.disable_bgp_export)
                 for p in self.pools.values()}
        return host, vteps, routes, pools

    def flush(self) -> tuple[list[Message], list[Message]]:
        """(removals, updates) since the last flush. Updates are ordered pools, host, VTEPs, routes so a
        consumer applying them in order never routes via a tunnel endpoint it does not know yet."""
        if not self._dirty:
            return [], []
        self._dirty = False
        host, vteps, routes, pools = self._desired()
        removes: list[Message] = []
        updates: list[Message] = []
        for dst in self._routes.keys() - routes.keys():
            removes.append(RemoteBlockRouteRemove(dst))
        for node in self._vteps.keys() - vteps.keys():
            removes.append(VtepRemove(node))
        for cidr in self._pools.keys() - pools.keys():
            removes.append(IPPoolRemove(cidr))
        updates.extend(u for c, u in sorted(pools.items(), key=lambda kv: str(kv[0])) if self._pools.get(c) != u)
        if host != self._host:
            updates.append(host)
        updates.extend(v for n, v in sorted(vteps.items()) if self._vteps.get(n) != v)
        updates.extend(r for d, r in sorted(routes.items()) if self._routes.get(d) != r)
        self._host, self._vteps, self._routes, self._pools = host, vteps, routes, pools
        return removes, updates
