"""TunnelManager against the real kernel, driven the way the agent drives it: the same driver objects as
``Agent.__init__`` (RouteTable owning protocols 80 and 12 plus the cali/vxlan.calico/tunl0 links,
VxlanDevice and IpipDevice telling the route table about link changes) inside a real :class:`Dataplane`
loop, fed with calc-layer messages through ``submit()`` + ``barrier()``.

Two "nodes" are network namespaces joined by a veth (``eth0``, 172.31.0.0/24). Each node's block
(10.244.<n>.0/26) has a "pod" address (.5/32 on ``lo``); pings between the pod addresses must cross the
VXLAN tunnel (or, for CrossSubnet same-subnet routes, the plain underlay).

"Writes nothing" is checked with an rtnetlink listener in the namespace (links, addresses, neighbours
and FDB, IPv4 routes): it must hear no notification at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from felixpy import names
from felixpy.calc.messages import (
    ROUTE_NOENCAP,
    ROUTE_VXLAN,
    HostTunnelUpdate,
    InSync,
    Message,
    RemoteBlockRoute,
    RemoteBlockRouteRemove,
    VtepRemove,
    VtepUpdate,
)
from felixpy.dataplane.bgp_route_mgr import BgpRouteManager
from felixpy.dataplane.drivers.ipip import IpipDevice
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.drivers.vxlan import VxlanDevice
from felixpy.dataplane.loop import Dataplane
from felixpy.dataplane.shims import netns
from felixpy.dataplane.shims.netlink import (
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
    Netlink,
)
from felixpy.dataplane.tunnel_mgr import TunnelManager

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxtm{os.getpid() % 100000}{secrets.token_hex(2)}"
A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
VX = names.VXLAN_IFACE
MACS = {1: "66:00:00:00:01:01", 2: "66:00:00:00:01:02"}


# -- helpers ---------------------------------------------------------------------------------------
def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def route_dump(ns: str) -> list[dict[str, Any]]:
    """The main IPv4 table as iproute2 sees it (numeric protocols/scopes), independent of our parser."""
    out: list[dict[str, Any]] = json.loads(ip(ns, "-N", "-j", "-4", "route", "show", "table", "main") or "[]")
    return out


def route(ns: str, dst: str) -> dict[str, Any] | None:
    found = [r for r in route_dump(ns) if r["dst"] == dst]
    assert len(found) <= 1, found
    return found[0] if found else None


def ping(ns: str, src: str, dst: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", "-I", src, dst],
                       capture_output=True, text=True)
    return r.returncode == 0


def rx_packets(ns: str, dev: str) -> int:
    stats = json.loads(ip(ns, "-s", "-j", "link", "show", dev))[0]["stats64"]["rx"]
    return int(stats["packets"])


class Events:
    """A raw rtnetlink listener in one netns, counting every notification it hears."""

    def __init__(self, ns: str) -> None:
        with netns.in_netns(f"/run/netns/{ns}"):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        mask = 0
        for g in (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE):
            mask |= 1 << (g - 1)
        self.sock.bind((0, mask))
        self.sock.setblocking(False)

    def count(self) -> int:
        n = 0
        while True:
            try:
                buf = self.sock.recv(1 << 16)
            except BlockingIOError:
                return n
            off = 0
            while off + 16 <= len(buf):
                mlen = int.from_bytes(buf[off:off + 4], "little")
                if mlen < 16:
                    break
                n += 1
                off += (mlen + 3) & ~3

    def close(self) -> None:
        self.sock.close()


class Stack:
    """The dataplane half of ``Agent.__init__`` in one namespace, with its Dataplane loop running."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.nl = Netlink(f"/run/netns/{ns}")
        self.rt = RouteTable(self.nl, owned_protocols=(names.RTPROT_FELIX, names.RTPROT_BIRD),
                             iface_prefixes=(names.IFACE_PREFIX, names.VXLAN_IFACE, names.IPIP_IFACE))
        self.vxlan = VxlanDevice(self.nl, on_link_change=self.rt.iface_changed)
        self.ipip = IpipDevice(self.nl, on_link_change=self.rt.iface_changed)
        self.tunnels = TunnelManager(self.nl, self.rt, self.vxlan, self.ipip, vxlan_mtu=1450, ipip_mtu=1480)
        self.bgp = BgpRouteManager(self.nl, self.rt)
        # Same order as the agent: devices before routes. No refresh timer: tests resync explicitly.
        self.dp = Dataplane([self.tunnels, self.bgp], [self.vxlan, self.ipip, self.bgp, self.rt],
                            refresh_interval=3600.0)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.dp.run())
        await self.dp.barrier()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.dp.close()
        self.nl.close()

    async def push(self, *msgs: Message) -> None:
        self.dp.submit(list(msgs))
        await self.dp.barrier()
        assert self.dp.last_error == ""

    async def resync(self) -> None:
        """What the refresh timer / kernel monitor do: every driver re-reads the kernel."""
        self.dp.queue_resync()
        await self.dp.barrier()
        assert self.dp.last_error == ""


@contextlib.asynccontextmanager
async def running(ns: str) -> AsyncIterator[Stack]:
    s = Stack(ns)
    try:
        await s.start()
        yield s
    finally:
        await s.stop()


@dataclass
class Node:
    n: int
    ns: str

    @property
    def name(self) -> str:
        return f"node{self.n}"

    @property
    def node_ip(self) -> A:
        return A(f"172.31.0.{self.n}")

    @property
    def tunnel_ip(self) -> A:
        return A(f"10.244.{self.n}.0")

    @property
    def block(self) -> N:
        return N(f"10.244.{self.n}.0/26")

    @property
    def pod_ip(self) -> str:
        return f"10.244.{self.n}.5"

    def host(self, *, vxlan: bool = True, node_ip: str | None = None) -> HostTunnelUpdate:
        return HostTunnelUpdate(node_ip=ipaddress.IPv4Interface(node_ip or f"{self.node_ip}/24"),
                                vxlan_enabled=vxlan, vxlan_tunnel_ip=self.tunnel_ip, vxlan_mac=MACS[self.n],
                                ipip_enabled=False, ipip_tunnel_ip=None)

    def vtep(self) -> VtepUpdate:
        return VtepUpdate(node=self.name, tunnel_ip=self.tunnel_ip, mac=MACS[self.n], node_ip=self.node_ip)

    def vxlan_route(self) -> RemoteBlockRoute:
        return RemoteBlockRoute(dst=self.block, kind=ROUTE_VXLAN, gateway=self.tunnel_ip, node=self.name)

    def noencap_route(self) -> RemoteBlockRoute:
        return RemoteBlockRoute(dst=self.block, kind=ROUTE_NOENCAP, gateway=self.node_ip, node=self.name)


def vxlan_state(me: Node, peer: Node) -> list[Message]:
    """What the calc layer sends a node of a two-node VXLAN cluster at startup, up to (excluding) InSync."""
    return [me.host(), peer.vtep(), peer.vxlan_route()]


def want_vxlan_route(peer: Node) -> dict[str, Any]:
    return {"dst": str(peer.block), "gateway": str(peer.tunnel_ip), "dev": VX, "protocol": "80",
            "flags": ["onlink"]}


def want_noencap_route(peer: Node, dev: str = "eth0") -> dict[str, Any]:
    return {"dst": str(peer.block), "gateway": str(peer.node_ip), "dev": dev, "protocol": "80",
            "flags": ["onlink"]}


def make_link(ns1: str, ns2: str) -> None:
    subprocess.run(["ip", "-n", ns1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                    "netns", ns2], check=True)
    for i, ns in ((1, ns1), (2, ns2)):
        ip(ns, "link", "set", "eth0", "up")
        ip(ns, "addr", "add", f"172.31.0.{i}/24", "dev", "eth0")


@pytest.fixture
def nodes(make_ns: Callable[[], str]) -> Iterator[tuple[Node, Node]]:
    ns1, ns2 = make_ns(), make_ns()
    make_link(ns1, ns2)
    for i, ns in ((1, ns1), (2, ns2)):
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "addr", "add", f"10.244.{i}.5/32", "dev", "lo")
    yield Node(1, ns1), Node(2, ns2)


# -- VXLAN -----------------------------------------------------------------------------------------
async def test_vxlan_routes_to_remote_blocks_carry_traffic(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1, running(n2.ns) as s2:
        await s1.push(*vxlan_state(n1, n2), InSync())
        await s2.push(*vxlan_state(n2, n1), InSync())
        for me, peer, s in ((n1, n2, s1), (n2, n1, s2)):
            assert route(me.ns, str(peer.block)) == want_vxlan_route(peer)
            link = json.loads(ip(me.ns, "-d", "-j", "link", "show", VX))[0]
            info = link["linkinfo"]["info_data"]
            assert (info["id"], info["port"], info["local"], link["mtu"], link["address"]) == (
                names.VXLAN_VNI, names.VXLAN_PORT, str(me.node_ip), 1450, MACS[me.n])
            assert f"inet {me.tunnel_ip}/32" in ip(me.ns, "-4", "addr", "show", "dev", VX)
            assert f"{peer.tunnel_ip} lladdr {MACS[peer.n]} PERMANENT" in ip(me.ns, "neigh", "show", "dev", VX)
            assert s.tunnels.parent_iface == "eth0" and s.tunnels.problem == ""
            assert s.vxlan.status() == "" and s.rt.iface_problem(VX) == ""
        before = rx_packets(n2.ns, VX)
        assert ping(n1.ns, n1.pod_ip, n2.pod_ip)
        assert ping(n2.ns, n2.pod_ip, n1.pod_ip)
        assert rx_packets(n2.ns, VX) > before  # really through the tunnel
        # Only the remote block's route is ours: no route for our own block, nothing else added.
        owned = [r for r in route_dump(n1.ns) if r.get("protocol") in ("80", "12") or r["dev"] == VX]
        assert owned == [want_vxlan_route(n2)]


async def test_reapply_and_restart_write_nothing(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2), InSync())
    dump = route_dump(n1.ns)
    assert want_vxlan_route(n2) in dump

    ev = Events(n1.ns)
    try:
        async with running(n1.ns) as s1:  # a restart: fresh driver objects over a correct kernel
            assert ev.count() == 0  # the first (empty) apply touched nothing
            await s1.push(*vxlan_state(n1, n2))
            await s1.push(InSync())
            assert ev.count() == 0 and route_dump(n1.ns) == dump
            # The same messages again, then a full resync: still nothing.
            await s1.push(*vxlan_state(n1, n2))
            await s1.resync()
            assert ev.count() == 0 and route_dump(n1.ns) == dump
            # The listener does hear a real change: a deleted route comes back with the next resync.
            ip(n1.ns, "route", "del", str(n2.block))
            assert ev.count() == 1
            await s1.resync()
            assert ev.count() == 1 and route(n1.ns, str(n2.block)) == want_vxlan_route(n2)
    finally:
        ev.close()


async def test_removals_wait_for_in_sync(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    n3 = Node(3, "")
    peer3: list[Message] = [
        VtepUpdate(node="node3", tunnel_ip=n3.tunnel_ip, mac="66:00:00:00:01:03", node_ip=n3.node_ip),
        n3.vxlan_route()]
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2), *peer3, InSync())
        assert route(n1.ns, str(n3.block)) == want_vxlan_route(n3)

    # Node 3 left the cluster while we were down: until the datastore is in sync its route and VTEP stay.
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2))
        await s1.resync()
        assert route(n1.ns, str(n3.block)) == want_vxlan_route(n3)
        assert str(n3.tunnel_ip) in ip(n1.ns, "neigh", "show", "dev", VX)
        await s1.push(InSync())
        assert route(n1.ns, str(n3.block)) is None
        assert str(n3.tunnel_ip) not in ip(n1.ns, "neigh", "show", "dev", VX)
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2)

        # In sync, a removal is immediate; removing what is not there is harmless.
        await s1.push(RemoteBlockRouteRemove(n2.block), VtepRemove(n2.name))
        assert route(n1.ns, str(n2.block)) is None
        assert ip(n1.ns, "neigh", "show", "dev", VX) == ""
        await s1.push(RemoteBlockRouteRemove(n2.block), VtepRemove("nobody"))
        assert s1.dp.last_error == ""


async def test_foreign_routes_are_left_alone(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    ip(n1.ns, "route", "add", "10.50.0.0/24", "via", "172.31.0.2", "proto", "static")
    ip(n1.ns, "route", "add", "10.51.0.0/24", "via", "172.31.0.2")  # proto boot
    ip(n1.ns, "route", "add", "10.52.0.0/24", "dev", "eth0", "proto", "static")
    foreign = [r for r in route_dump(n1.ns) if r["dst"].startswith("10.5")]
    assert len(foreign) == 3
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2), InSync())
        await s1.push(RemoteBlockRouteRemove(n2.block))
        await s1.resync()
    assert [r for r in route_dump(n1.ns) if r["dst"].startswith("10.5")] == foreign


async def test_vxlan_device_recreated_behind_our_back_gets_its_routes_back(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2), InSync())
        ip(n1.ns, "link", "del", VX)  # the kernel drops its routes with it
        assert route(n1.ns, str(n2.block)) is None
        await s1.resync()  # the agent's kernel monitor asks for this when a vxlan.calico link vanishes
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2)
        assert s1.vxlan.status() == ""


# -- CrossSubnet -----------------------------------------------------------------------------------
async def test_cross_subnet_same_subnet_routes_use_the_parent_link(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1, running(n2.ns) as s2:
        for me, peer, s in ((n1, n2, s1), (n2, n1, s2)):
            # CrossSubnet: the tunnel exists (other nodes may be in other subnets), but the peer is in
            # ours, so its block is routed directly.
            await s.push(me.host(), peer.vtep(), peer.noencap_route(), InSync())
            assert route(me.ns, str(peer.block)) == want_noencap_route(peer)
        before = rx_packets(n2.ns, VX)
        assert ping(n1.ns, n1.pod_ip, n2.pod_ip)
        assert rx_packets(n2.ns, VX) == before  # not through the tunnel

        # The pool switches to VXLAN Always and back: the route is replaced in place (one key, new owner).
        await s1.push(n2.vxlan_route())
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2)
        await s1.push(n2.noencap_route())
        assert route(n1.ns, str(n2.block)) == want_noencap_route(n2)

        ev = Events(n1.ns)
        try:
            await s1.push(n1.host(), n2.noencap_route())  # a repeated host update: nothing to do
            await s1.resync()
            assert ev.count() == 0
        finally:
            ev.close()
        await s1.push(RemoteBlockRouteRemove(n2.block))
        assert route(n1.ns, str(n2.block)) is None


async def test_parent_link_recreated_noencap_routes_follow(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(n1.host(), n2.vtep(), n2.noencap_route(), Node(3, "").vxlan_route(), InSync())
        assert route(n1.ns, str(n2.block)) == want_noencap_route(n2)
        # The underlay link is replaced (say a NIC re-plumbed by the host): same name and address, new
        # index. The kernel drops every route on the old link and the vxlan device built on it.
        ip(n1.ns, "link", "del", "eth0")
        make_link(n1.ns, n2.ns)
        assert route(n1.ns, str(n2.block)) is None and s1.nl.link(VX) is None
        await s1.resync()
        assert route(n1.ns, str(n2.block)) == want_noencap_route(n2)
        assert route(n1.ns, "10.244.3.0/26") == want_vxlan_route(Node(3, ""))
        assert s1.vxlan.status() == "" and s1.tunnels.problem == ""


async def test_node_ip_moves_to_another_link(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(n1.host(), n2.vtep(), n2.noencap_route(), InSync())
        # A second underlay link holding a new node IP: the calc layer sends a new HostTunnelUpdate.
        subprocess.run(["ip", "-n", n1.ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
                        "netns", n2.ns], check=True)
        ip(n1.ns, "link", "set", "eth1", "up")
        ip(n2.ns, "link", "set", "eth1", "up")
        ip(n1.ns, "addr", "add", "172.31.1.1/24", "dev", "eth1")
        await s1.push(n1.host(node_ip="172.31.1.1/24"))
        assert s1.tunnels.parent_iface == "eth1"
        assert route(n1.ns, str(n2.block)) == want_noencap_route(n2, dev="eth1")
        assert "local 172.31.1.1 dev eth1" in ip(n1.ns, "-d", "link", "show", VX)


# -- problems --------------------------------------------------------------------------------------
async def test_missing_node_address_is_reported_and_nothing_is_broken(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(n1.host(node_ip="172.31.9.9/24"), n2.vtep(), n2.vxlan_route(), n2.noencap_route())
        assert s1.tunnels.problem == "VXLAN is on but this node has no interface holding 172.31.9.9"
        assert s1.nl.link(VX) is None and route(n1.ns, str(n2.block)) is None
        assert s1.rt.pending_ifaces == frozenset()  # the noencap route replaced the VXLAN one

        await s1.push(HostTunnelUpdate(node_ip=None, vxlan_enabled=True, vxlan_tunnel_ip=None, vxlan_mac="",
                                       ipip_enabled=False, ipip_tunnel_ip=None))
        assert s1.tunnels.problem == "VXLAN is on but this node has no IPv4 address"
        await s1.push(HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("172.31.0.1/24"), vxlan_enabled=True,
                                       vxlan_tunnel_ip=None, vxlan_mac="", ipip_enabled=False,
                                       ipip_tunnel_ip=None))
        assert s1.tunnels.problem == "VXLAN is on but this node has no VXLAN tunnel address yet"
        assert s1.nl.link(VX) is None

        # A malformed MAC in our own Node resource: reported, the agent keeps going.
        bad = HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("172.31.0.1/24"), vxlan_enabled=True,
                               vxlan_tunnel_ip=n1.tunnel_ip, vxlan_mac="not-a-mac", ipip_enabled=False,
                               ipip_tunnel_ip=None)
        await s1.push(bad)
        assert s1.tunnels.problem.startswith("VXLAN device settings rejected")
        # A malformed VTEP of another node is skipped; the good one still goes in.
        await s1.push(n1.host(), VtepUpdate(node="node7", tunnel_ip=A("10.244.7.0"), mac="zz",
                                            node_ip=A("172.31.0.7")), n2.vxlan_route())
        assert s1.tunnels.problem == ""
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2)
        neigh = ip(n1.ns, "neigh", "show", "dev", VX)
        assert str(n2.tunnel_ip) in neigh and "10.244.7.0" not in neigh


async def test_node_address_appearing_later_is_picked_up(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    ip(n1.ns, "addr", "del", "172.31.0.1/24", "dev", "eth0")  # say DHCP has not configured it yet
    async with running(n1.ns) as s1:
        await s1.push(n1.host(), n2.vtep(), n2.noencap_route(), Node(3, "").vxlan_route(), InSync())
        assert s1.tunnels.problem == "VXLAN is on but this node has no interface holding 172.31.0.1"
        assert s1.nl.link(VX) is None and route(n1.ns, str(n2.block)) is None
        ip(n1.ns, "addr", "add", "172.31.0.1/24", "dev", "eth0")
        await s1.resync()  # no new message: the next apply (here the refresh timer's) finds it
        assert s1.tunnels.problem == "" and s1.tunnels.parent_iface == "eth0"
        assert route(n1.ns, str(n2.block)) == want_noencap_route(n2)
        assert route(n1.ns, "10.244.3.0/26") == want_vxlan_route(Node(3, ""))
        ev = Events(n1.ns)
        try:
            await s1.resync()  # found: nothing rewritten
            assert ev.count() == 0
        finally:
            ev.close()


async def test_vxlan_disabled_removes_the_device_once_in_sync(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2), InSync())
    async with running(n1.ns) as s1:
        # Restarted with VXLAN off (the last VXLAN pool is gone): kept until in sync, then deleted.
        await s1.push(n1.host(vxlan=False))
        assert s1.nl.link(VX) is not None and route(n1.ns, str(n2.block)) == want_vxlan_route(n2)
        await s1.push(InSync())
        assert s1.nl.link(VX) is None and route(n1.ns, str(n2.block)) is None
        assert s1.tunnels.problem == ""


async def test_mtu_change_is_applied_in_place(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    async with running(n1.ns) as s1:
        await s1.push(*vxlan_state(n1, n2), InSync())
        index = s1.nl.link(VX).index  # type: ignore[union-attr]
        s1.tunnels.set_mtus(vxlan_mtu=1400, ipip_mtu=1480)
        await s1.dp.barrier()
        link = s1.nl.link(VX)
        assert link is not None and link.mtu == 1400 and link.index == index
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2)


# -- IPIP ------------------------------------------------------------------------------------------
def ipip_host(n: Node, *, enabled: bool = True) -> HostTunnelUpdate:
    return HostTunnelUpdate(node_ip=ipaddress.IPv4Interface(f"{n.node_ip}/24"), vxlan_enabled=True,
                            vxlan_tunnel_ip=n.tunnel_ip, vxlan_mac=MACS[n.n], ipip_enabled=enabled,
                            ipip_tunnel_ip=A(f"10.244.{n.n}.1") if enabled else None)


async def test_ipip_on_a_kernel_without_it_is_harmless(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    with Netlink(f"/run/netns/{n1.ns}") as nl:
        ok, reason = nl.ipip_supported()
    if ok:
        pytest.skip(f"this kernel supports IPIP ({reason}); the unsupported path cannot be exercised")
    async with running(n1.ns) as s1:
        await s1.push(ipip_host(n1), n2.vtep(), n2.vxlan_route(), InSync())
        assert s1.ipip.status() == f"IPIP is enabled but unavailable: {reason}"
        assert s1.nl.link(names.IPIP_IFACE) is None
        # VXLAN is unaffected.
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2) and s1.tunnels.problem == ""
        await s1.push(ipip_host(n1, enabled=False))
        assert s1.ipip.status() == ""


async def test_ipip_tunnel_address_where_supported(nodes: tuple[Node, Node]) -> None:
    n1, n2 = nodes
    with Netlink(f"/run/netns/{n1.ns}") as nl:
        ok, reason = nl.ipip_supported()
    if not ok:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    async with running(n1.ns) as s1:
        await s1.push(ipip_host(n1), n2.vtep(), n2.vxlan_route(), InSync())
        assert s1.ipip.status() == ""
        text = ip(n1.ns, "-4", "addr", "show", "dev", names.IPIP_IFACE)
        assert "inet 10.244.1.1/32" in text and "mtu 1480" in text
        await s1.push(ipip_host(n1, enabled=False))
        assert "10.244.1.1" not in ip(n1.ns, "-4", "addr", "show", "dev", names.IPIP_IFACE)
        assert route(n1.ns, str(n2.block)) == want_vxlan_route(n2)
