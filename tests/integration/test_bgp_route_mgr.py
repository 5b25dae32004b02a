"""BgpRouteManager against the real kernel, driven the way the agent drives it: the driver objects of
``Agent.__init__`` (RouteTable owning protocols 80 and 12 plus the cali/vxlan.calico/tunl0 links) in a
real :class:`Dataplane` loop, fed :class:`BgpRoutesUpdate` snapshots through ``submit()`` + ``barrier()``.

Topology: "us" (n1, 172.31.0.1/24 on ``eth0``) and a peer/router namespace (n2) holding 172.31.0.2 and
172.31.0.3 on the other end, plus 10.0.0.1/32 (a gateway outside our subnet, reached ``onlink``). The
peer holds the "pod" addresses of the learned prefixes on ``lo`` (10.244.<n>.5) and routes our block
(10.244.1.0/26) back, so pings show the installed routes really carry traffic.
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
from felixpy.calc.messages import ROUTE_VXLAN, BgpRoutesUpdate, HostTunnelUpdate, InSync, Message, RemoteBlockRoute
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

RUN = f"fxbg{os.getpid() % 100000}{secrets.token_hex(2)}"
A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
BIRD = str(names.RTPROT_BIRD)

Learned = tuple[N, A, str | None, bool]


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


def bgp_route(dst: str, via: str, dev: str = "eth0", *, onlink: bool = False) -> dict[str, Any]:
    return {"dst": dst, "gateway": via, "dev": dev, "protocol": BIRD, "flags": ["onlink"] if onlink else []}


def ping(ns: str, src: str, dst: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", "-I", src, dst],
                       capture_output=True, text=True)
    return r.returncode == 0


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

    async def learned(self, *routes: Learned) -> None:
        await self.push(BgpRoutesUpdate(tuple(routes)))

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
class Net:
    us: str
    peer: str


@pytest.fixture
def net(make_ns: Callable[[], str]) -> Iterator[Net]:
    us, peer = make_ns(), make_ns()
    subprocess.run(["ip", "-n", us, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer],
                   check=True)
    for ns in (us, peer):
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "link", "set", "eth0", "up")
    ip(us, "addr", "add", "172.31.0.1/24", "dev", "eth0")
    ip(us, "addr", "add", "10.244.1.5/32", "dev", "lo")
    for a in ("172.31.0.2/24", "172.31.0.3/24", "10.0.0.1/32"):
        ip(peer, "addr", "add", a, "dev", "eth0")
    for n in (2, 7, 8, 9):
        ip(peer, "addr", "add", f"10.244.{n}.5/32", "dev", "lo")
    ip(peer, "route", "add", "10.244.1.0/26", "via", "172.31.0.1")
    yield Net(us, peer)


def learned(dst: str, nh: str, dev: str | None = None, onlink: bool = False) -> Learned:
    return (N(dst), A(nh), dev, onlink)


# -- resolution ------------------------------------------------------------------------------------
async def test_directly_connected_next_hop(net: Net) -> None:
    async with running(net.us) as s:
        await s.learned(learned("10.244.2.0/26", "172.31.0.2"))
        assert route(net.us, "10.244.2.0/26") == bgp_route("10.244.2.0/26", "172.31.0.2")
        assert s.bgp.unresolved == set()
        assert ping(net.us, "10.244.1.5", "10.244.2.5")
        # Only our route was added.
        assert [r for r in route_dump(net.us) if r.get("protocol") in ("80", BIRD)] == [
            bgp_route("10.244.2.0/26", "172.31.0.2")]


async def test_next_hop_behind_a_router_resolves_via_the_gateway(net: Net) -> None:
    # A peer in another subnet (say a route reflector's client two hops away): its address is reached
    # through a router, so the kernel route must use that router as gateway (BIRD's gateway recursive).
    ip(net.us, "route", "add", "192.168.50.7/32", "via", "172.31.0.2")
    async with running(net.us) as s:
        await s.learned(learned("10.244.7.0/26", "192.168.50.7"))
        assert route(net.us, "10.244.7.0/26") == bgp_route("10.244.7.0/26", "172.31.0.2")
        assert ping(net.us, "10.244.1.5", "10.244.7.5")

        # The underlay moves to another router: picked up by the next resync (refresh timer / monitor).
        ip(net.us, "route", "replace", "192.168.50.7/32", "via", "172.31.0.3")
        await s.resync()
        assert route(net.us, "10.244.7.0/26") == bgp_route("10.244.7.0/26", "172.31.0.3")
        assert ping(net.us, "10.244.1.5", "10.244.7.5")


async def test_gateway_reached_onlink_gives_an_onlink_route(net: Net) -> None:
    # Hosts with a /32 address and "default via <gw> dev eth0 onlink" (common with some cloud providers):
    # a route via that gateway without "onlink" is refused by the kernel ("Nexthop has invalid gateway").
    ip(net.us, "route", "add", "192.168.60.7/32", "via", "10.0.0.1", "dev", "eth0", "onlink")
    async with running(net.us) as s:
        await s.learned(learned("10.244.8.0/26", "192.168.60.7"), learned("10.244.2.0/26", "172.31.0.2"))
        assert route(net.us, "10.244.8.0/26") == bgp_route("10.244.8.0/26", "10.0.0.1", onlink=True)
        assert route(net.us, "10.244.2.0/26") == bgp_route("10.244.2.0/26", "172.31.0.2")
        assert s.bgp.unresolved == set()
        assert ping(net.us, "10.244.1.5", "10.244.8.5")
        ev = Events(net.us)
        try:
            await s.resync()  # the kernel's copy compares equal to what we want: no rewrite
            assert ev.count() == 0
        finally:
            ev.close()


async def test_unresolvable_next_hops_are_skipped_and_reported(net: Net,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    ip(net.us, "route", "add", "unreachable", "203.0.113.0/24")
    ip(net.us, "route", "add", "blackhole", "203.0.114.0/24")
    snapshot = (learned("10.244.2.0/26", "172.31.0.2"),
                learned("10.244.9.0/26", "198.51.100.9"),  # no route at all (no default route here)
                learned("10.244.10.0/26", "203.0.113.1"),  # unreachable route
                learned("10.244.11.0/26", "203.0.114.1"),  # blackhole route
                learned("10.244.12.0/26", "172.31.0.1"),  # our own address
                learned("10.244.13.0/26", "172.31.0.2", "eth9", True))  # a device that is not ours: ignored
    async with running(net.us) as s:
        with caplog.at_level("WARNING", logger="felixpy.dataplane.bgp_route_mgr"):
            await s.learned(*snapshot)
            await s.learned(*snapshot[::-1])  # same next hops: not logged again
        assert s.bgp.unresolved == {A("198.51.100.9"), A("203.0.113.1"), A("203.0.114.1"), A("172.31.0.1")}
        texts = [r.getMessage() for r in caplog.records if "BGP next hops with no route" in r.getMessage()]
        assert len(texts) == 1 and "198.51.100.9" in texts[0]
        assert any("via device eth9" in r.getMessage() for r in caplog.records)
        assert route(net.us, "10.244.2.0/26") == bgp_route("10.244.2.0/26", "172.31.0.2")
        for dst in ("10.244.9.0/26", "10.244.10.0/26", "10.244.11.0/26", "10.244.12.0/26", "10.244.13.0/26"):
            assert route(net.us, dst) is None

        # The underlay learns a way there: the next resync installs it.
        ip(net.us, "route", "add", "198.51.100.0/24", "via", "172.31.0.2", "proto", "static")
        await s.resync()
        assert s.bgp.unresolved == {A("203.0.113.1"), A("203.0.114.1"), A("172.31.0.1")}
        assert route(net.us, "10.244.9.0/26") == bgp_route("10.244.9.0/26", "172.31.0.2")
        assert ping(net.us, "10.244.1.5", "10.244.9.5")
        # ... and losing it again withdraws the route (once removals are allowed).
        await s.push(InSync())
        ip(net.us, "route", "del", "198.51.100.0/24")
        await s.resync()
        assert A("198.51.100.9") in s.bgp.unresolved and route(net.us, "10.244.9.0/26") is None


# -- ownership -------------------------------------------------------------------------------------
async def test_removals_wait_for_in_sync_and_foreign_routes_are_never_touched(net: Net) -> None:
    ip(net.us, "route", "add", "10.50.0.0/24", "via", "172.31.0.2", "proto", "static")
    ip(net.us, "route", "add", "10.51.0.0/24", "via", "172.31.0.2")  # proto boot
    ip(net.us, "route", "add", "10.52.0.0/24", "dev", "eth0", "proto", "static")
    ip(net.us, "route", "add", "10.244.20.0/26", "via", "172.31.0.3", "proto", "static")
    foreign = [r for r in route_dump(net.us) if r.get("protocol") not in ("80", BIRD)]
    two = (learned("10.244.2.0/26", "172.31.0.2"), learned("10.244.7.0/26", "172.31.0.3"))
    async with running(net.us) as s:
        await s.learned(*two)
        await s.push(InSync())
    assert route(net.us, "10.244.7.0/26") == bgp_route("10.244.7.0/26", "172.31.0.3")

    async with running(net.us) as s:  # restart: 10.244.7.0/26 was withdrawn meanwhile
        await s.learned(two[0])
        await s.resync()
        assert route(net.us, "10.244.7.0/26") is not None  # not in sync yet: kept
        await s.push(InSync())
        assert route(net.us, "10.244.7.0/26") is None
        assert route(net.us, "10.244.2.0/26") == bgp_route("10.244.2.0/26", "172.31.0.2")
        # Every session gone: an empty snapshot removes everything learned, nothing else.
        await s.learned()
        await s.resync()
        assert [r for r in route_dump(net.us) if r.get("protocol") in ("80", BIRD)] == []
    assert [r for r in route_dump(net.us) if r.get("protocol") not in ("80", BIRD)] == foreign


async def test_takeover_from_bird_and_restart_write_nothing(net: Net) -> None:
    # What calico-node's BIRD leaves behind: the same routes, proto bird, plus one it no longer wants.
    ip(net.us, "route", "add", "10.244.2.0/26", "via", "172.31.0.2", "dev", "eth0", "proto", "bird")
    ip(net.us, "route", "add", "10.244.7.0/26", "via", "172.31.0.3", "dev", "eth0", "proto", "bird")
    ip(net.us, "route", "add", "10.244.99.0/26", "via", "172.31.0.3", "dev", "eth0", "proto", "bird")
    snapshot = (learned("10.244.2.0/26", "172.31.0.2"), learned("10.244.7.0/26", "172.31.0.3"))
    ev = Events(net.us)
    try:
        async with running(net.us) as s:
            await s.learned(*snapshot)
            await s.resync()
            assert ev.count() == 0  # adopted, not rewritten
            await s.push(InSync())
            assert ev.count() == 1 and route(net.us, "10.244.99.0/26") is None  # the stale one went
        dump = route_dump(net.us)
        async with running(net.us) as s:  # our own restart
            await s.learned(*snapshot)
            await s.push(InSync())
            await s.learned(*snapshot)  # the same snapshot again
            await s.resync()
            assert ev.count() == 0 and route_dump(net.us) == dump
    finally:
        ev.close()


async def test_bgp_and_vxlan_managers_share_the_table(net: Net) -> None:
    # VXLAN routes (TunnelManager) and BGP routes live in the same table: replacing one owner's set must
    # never remove the other's.
    host = HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("172.31.0.1/24"), vxlan_enabled=True,
                            vxlan_tunnel_ip=A("10.244.1.0"), vxlan_mac="66:00:00:00:02:01", ipip_enabled=False,
                            ipip_tunnel_ip=None)
    vx = RemoteBlockRoute(dst=N("10.244.30.0/26"), kind=ROUTE_VXLAN, gateway=A("10.244.30.0"), node="node30")
    async with running(net.us) as s:
        await s.push(host, vx, BgpRoutesUpdate((learned("10.244.2.0/26", "172.31.0.2"),)), InSync())
        await s.learned()
        await s.resync()
        assert route(net.us, "10.244.2.0/26") is None
        assert route(net.us, "10.244.30.0/26") == {"dst": "10.244.30.0/26", "gateway": "10.244.30.0",
                                                   "dev": names.VXLAN_IFACE, "protocol": "80", "flags": ["onlink"]}


# -- tunl0 -----------------------------------------------------------------------------------------
async def test_tunl0_routes_where_ipip_is_supported(net: Net) -> None:
    with Netlink(f"/run/netns/{net.us}") as nl:
        ok, reason = nl.ipip_supported()
    if not ok:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    host = HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("172.31.0.1/24"), vxlan_enabled=False,
                            vxlan_tunnel_ip=None, vxlan_mac="", ipip_enabled=True, ipip_tunnel_ip=A("10.244.1.1"))
    async with running(net.us) as s:
        await s.push(host, BgpRoutesUpdate((learned("10.244.2.0/26", "172.31.0.2", names.IPIP_IFACE, True),)),
                     InSync())
        assert route(net.us, "10.244.2.0/26") == bgp_route("10.244.2.0/26", "172.31.0.2", names.IPIP_IFACE,
                                                           onlink=True)
        assert s.ipip.status() == "" and s.rt.iface_problem(names.IPIP_IFACE) == ""
        await s.learned()
        assert route(net.us, "10.244.2.0/26") is None


async def test_tunl0_routes_without_ipip_stay_pending_and_harm_nothing(net: Net) -> None:
    with Netlink(f"/run/netns/{net.us}") as nl:
        ok, reason = nl.ipip_supported()
    if ok:
        pytest.skip(f"this kernel supports IPIP ({reason}); the unsupported path cannot be exercised")
    host = HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("172.31.0.1/24"), vxlan_enabled=False,
                            vxlan_tunnel_ip=None, vxlan_mac="", ipip_enabled=True, ipip_tunnel_ip=A("10.244.1.1"))
    async with running(net.us) as s:
        await s.push(host, BgpRoutesUpdate((learned("10.244.2.0/26", "172.31.0.2", names.IPIP_IFACE, True),
                                            learned("10.244.7.0/26", "172.31.0.3"))), InSync())
        assert route(net.us, "10.244.2.0/26") is None
        assert route(net.us, "10.244.7.0/26") == bgp_route("10.244.7.0/26", "172.31.0.3")
        assert s.rt.pending_ifaces == {names.IPIP_IFACE}
        assert "does not exist" in s.rt.iface_problem(names.IPIP_IFACE)
        assert s.ipip.status() == f"IPIP is enabled but unavailable: {reason}"
        assert s.nl.link(names.IPIP_IFACE) is None
        # The pool goes away: the pending routes are dropped with it.
        await s.learned(learned("10.244.7.0/26", "172.31.0.3"))
        assert s.rt.pending_ifaces == frozenset() and s.rt.iface_problem(names.IPIP_IFACE) == ""
