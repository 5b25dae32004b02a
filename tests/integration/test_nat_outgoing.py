"""NAT outgoing with real packets, for the nftables backend and both iptables backends.

Topology (three namespaces): pod (10.65.0.2/32, default via 169.254.1.1 as Calico pods) --veth--
node (ip_forward, proxy ARP on the cali veth, 192.0.2.1/24 towards external) --veth-- external
(192.0.2.2/24 and 198.51.100.2/32, with a route back to the pod network, so replies return either way).

The external side runs a UDP and a TCP server in its namespace and reports the peer address it saw:
the node's 192.0.2.1 when masqueraded, the pod's 10.65.0.2 otherwise. Sockets are created inside each
namespace by this thread (a socket stays in the netns it was created in), so no helper processes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from felixpy.calc.messages import HostTunnelUpdate, InSync
from felixpy.dataplane.drivers.iptables import IptablesDataplane
from felixpy.dataplane.drivers.nftables import NftTable
from felixpy.dataplane.loop import Dataplane
from felixpy.dataplane.masq_mgr import IPPoolRemove, IPPoolUpdate, MasqManager, make_nat_backend
from felixpy.dataplane.shims.netns import in_netns, write_sysctl

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxnat{os.getpid() % 100000}{secrets.token_hex(2)}"
POD_IP = "10.65.0.2"
NODE_IP = "192.0.2.1"
EXT_IP = "192.0.2.2"
EXT_IN_POOL = "198.51.100.2"  # an external address inside another IP pool
N = ipaddress.ip_network


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Topo:
    pod: str
    node: str
    ext: str

    def path(self, name: str) -> str:
        return f"/run/netns/{name}"


@pytest.fixture
def topo(make_ns: Callable[[], str]) -> Topo:
    t = Topo(make_ns(), make_ns(), make_ns())
    sh("ip", "-n", t.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "cali-pod", "netns", t.node)
    sh("ip", "-n", t.node, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", t.ext)
    for n in (t.pod, t.node, t.ext):
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "-n", t.pod, "addr", "add", f"{POD_IP}/32", "dev", "eth0")
    sh("ip", "-n", t.pod, "link", "set", "eth0", "up")
    sh("ip", "-n", t.pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", t.pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", t.node, "link", "set", "cali-pod", "up")
    sh("ip", "-n", t.node, "addr", "add", f"{NODE_IP}/24", "dev", "eth1")
    sh("ip", "-n", t.node, "link", "set", "eth1", "up")
    sh("ip", "-n", t.node, "route", "add", f"{POD_IP}/32", "dev", "cali-pod", "scope", "link")
    # Proxy ARP answers for 169.254.1.1 only if the node routes it out another interface.
    sh("ip", "-n", t.node, "route", "add", "default", "via", EXT_IP, "dev", "eth1")
    sh("ip", "-n", t.node, "route", "add", f"{EXT_IN_POOL}/32", "via", EXT_IP, "dev", "eth1")
    with in_netns(t.path(t.node)):
        write_sysctl("net/ipv4/ip_forward", 1)
        write_sysctl("net/ipv4/conf/cali-pod/proxy_arp", 1)
        write_sysctl("net/ipv4/neigh/cali-pod/proxy_delay", 0)
    sh("ip", "-n", t.ext, "addr", "add", f"{EXT_IP}/24", "dev", "eth0")
    sh("ip", "-n", t.ext, "addr", "add", f"{EXT_IN_POOL}/32", "dev", "eth0")
    sh("ip", "-n", t.ext, "link", "set", "eth0", "up")
    sh("ip", "-n", t.ext, "route", "add", "10.65.0.0/16", "via", NODE_IP)
    return t


class Servers:
    """UDP and TCP servers in the external netns that tell which source address they saw."""

    def __init__(self, topo: Topo) -> None:
        self.topo = topo
        self.udp: dict[str, socket.socket] = {}
        with in_netns(topo.path(topo.ext)):
            # One UDP socket per address, so each reply leaves from the address the request went to
            # (conntrack only reverses the NAT for the exact reply tuple).
            for addr in (EXT_IP, EXT_IN_POOL):
                self.udp[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.udp[addr].bind((addr, 0))
                self.udp[addr].settimeout(3)
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.bind(("0.0.0.0", 0))
            self.tcp.listen(8)
        self.tcp.settimeout(3)

    def close(self) -> None:
        for u in self.udp.values():
            u.close()
        self.tcp.close()

    def seen_from_pod(self, dst: str) -> tuple[str, str]:
        """(source seen over UDP, over TCP) for a fresh flow from the pod to ``dst``. A new source port
        each time means a new conntrack entry, so the NAT decision is taken again."""
        with in_netns(self.topo.path(self.topo.pod)):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            u.settimeout(3)
            t.settimeout(3)
            server = self.udp[dst]
            u.sendto(b"who am i", (dst, server.getsockname()[1]))
            _, peer = server.recvfrom(100)
            udp_peer = peer[0]
            server.sendto(udp_peer.encode(), peer)
            assert u.recv(100).decode() == udp_peer  # the reply made it back through the NAT
            t.connect((dst, self.tcp.getsockname()[1]))  # the kernel completes the handshake
            conn, (tcp_peer, _) = self.tcp.accept()
            conn.close()
            return udp_peer, tcp_peer
        finally:
            u.close()
            t.close()


@pytest.fixture
def servers(topo: Topo) -> Iterator[Servers]:
    s = Servers(topo)
    yield s
    s.close()


def pool(cidr: str, nat: bool = False, disabled: bool = False) -> IPPoolUpdate:
    return IPPoolUpdate(cidr=N(cidr), nat_outgoing=nat, disabled=disabled, ipip_mode="Never", vxlan_mode="Never")


BACKENDS = ["nftables", "iptables-nft", "iptables-legacy"]


@dataclass
class Masq:
    kind: str  # "nftables" | "iptables"
    ipt_backend: str
    dp: NftTable | IptablesDataplane
    mgr: MasqManager

    def sync(self) -> object:
        self.mgr.complete_deferred_work()
        return self.dp.apply()

    def transactions(self, stats: object) -> int:
        if isinstance(stats, dict):
            return sum(s.transactions for s in stats.values())
        return int(getattr(stats, "transactions", -1))


@pytest.fixture(params=BACKENDS)
def masq(request: pytest.FixtureRequest, topo: Topo) -> Iterator[Masq]:
    kind, _, ipt_backend = str(request.param).partition("-")
    dp, mgr = make_nat_backend(kind, netns=topo.path(topo.node), iptables_backend=ipt_backend or "system")
    yield Masq(kind, ipt_backend or "system", dp, mgr)
    # Take everything down through the driver itself (the namespaces go afterwards anyway).
    if isinstance(dp, NftTable):
        dp.delete_table()
    else:
        nat = dp.table("nat")
        for c in nat.chain_names():
            nat.remove_chain(c)
        nat.set_hooks("POSTROUTING")
        assert dp.ipsets is not None
        for name in ("cali40masq-ipam-pools", "cali40all-ipam-pools"):
            dp.ipsets.remove_ipset(name)
        dp.allow_removals()
        dp.apply()
        assert nat.status() == ""


def test_masquerade_follows_the_pools(masq: Masq, servers: Servers) -> None:
    # No pools at all: plain routing, the external side sees the pod.
    masq.sync()
    assert servers.seen_from_pod(EXT_IP) == (POD_IP, POD_IP)
    # A natOutgoing pool: leaving the pools means masquerading to the node's address...
    masq.mgr.on_update(pool("10.65.0.0/16", nat=True))
    masq.mgr.on_update(pool("198.51.100.0/24"))
    masq.sync()
    assert servers.seen_from_pod(EXT_IP) == (NODE_IP, NODE_IP)
    # ...but not towards an address in another pool, even a disabled one.
    assert servers.seen_from_pod(EXT_IN_POOL) == (POD_IP, POD_IP)
    masq.mgr.on_update(pool("198.51.100.0/24", disabled=True))
    masq.sync()
    assert servers.seen_from_pod(EXT_IN_POOL) == (POD_IP, POD_IP)
    # Once that pool is deleted (and removals are allowed), its addresses are outside all pools.
    masq.dp.allow_removals()
    masq.mgr.on_update(IPPoolRemove(N("198.51.100.0/24")))
    masq.sync()
    assert servers.seen_from_pod(EXT_IN_POOL) == (NODE_IP, NODE_IP)
    # natOutgoing switched off: no masquerade at all.
    masq.mgr.on_update(pool("10.65.0.0/16", nat=False))
    masq.sync()
    assert servers.seen_from_pod(EXT_IP) == (POD_IP, POD_IP)


def test_agent_restart_keeps_nat_working_and_rewrites_nothing(masq: Masq, topo: Topo, servers: Servers) -> None:
    masq.mgr.on_update(pool("10.65.0.0/16", nat=True))
    masq.sync()
    assert servers.seen_from_pod(EXT_IP) == (NODE_IP, NODE_IP)
    dp2, mgr2 = make_nat_backend(masq.kind, netns=topo.path(topo.node), iptables_backend=masq.ipt_backend)
    again = Masq(masq.kind, masq.ipt_backend, dp2, mgr2)
    # The new agent applies before it has heard about any pool: nothing may be taken away.
    assert again.transactions(again.sync()) == 0
    assert servers.seen_from_pod(EXT_IP) == (NODE_IP, NODE_IP)
    # Then the pools arrive and the datastore is in sync: still nothing to rewrite.
    mgr2.on_update(pool("10.65.0.0/16", nat=True))
    dp2.allow_removals()
    assert again.transactions(again.sync()) == 0
    assert servers.seen_from_pod(EXT_IP) == (NODE_IP, NODE_IP)


def test_host_traffic_into_a_tunnel_gets_the_tunnel_address(masq: Masq, topo: Topo) -> None:
    """Felix's tunnel rule: a host packet leaving vxlan.calico with another local source address is
    masqueraded to the tunnel's address. A veth named vxlan.calico stands in for the VXLAN device."""
    tunnel_ip, far = "10.65.1.0", "10.66.0.1"
    sh("ip", "-n", topo.node, "link", "add", "vxlan.calico", "type", "veth", "peer", "name", "tun0",
       "netns", topo.ext)
    sh("ip", "-n", topo.node, "addr", "add", f"{tunnel_ip}/32", "dev", "vxlan.calico")
    sh("ip", "-n", topo.node, "link", "set", "vxlan.calico", "up")
    sh("ip", "-n", topo.node, "route", "add", f"{far}/32", "dev", "vxlan.calico")
    sh("ip", "-n", topo.ext, "addr", "add", f"{far}/32", "dev", "tun0")
    sh("ip", "-n", topo.ext, "link", "set", "tun0", "up")
    sh("ip", "-n", topo.ext, "route", "add", f"{tunnel_ip}/32", "dev", "tun0")

    def seen() -> str:
        with in_netns(topo.path(topo.ext)):
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with in_netns(topo.path(topo.node)):
            cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            srv.settimeout(3)
            srv.bind((far, 0))
            cli.bind((NODE_IP, 0))  # the "wrong" local address for this device
            cli.sendto(b"x", srv.getsockname())
            return str(srv.recvfrom(10)[1][0])
        finally:
            srv.close()
            cli.close()

    masq.sync()
    assert seen() == NODE_IP
    masq.dp.allow_removals()  # in sync: cali-POSTROUTING, already in the kernel, may now be rewritten
    masq.mgr.on_update(HostTunnelUpdate(
        node_ip=ipaddress.IPv4Interface(f"{NODE_IP}/24"), vxlan_enabled=True,
        vxlan_tunnel_ip=ipaddress.IPv4Address(tunnel_ip), vxlan_mac="66:00:00:00:00:01",
        ipip_enabled=False, ipip_tunnel_ip=None))
    masq.sync()
    assert seen() == tunnel_ip


async def test_in_the_dataplane_loop(masq: Masq, servers: Servers) -> None:
    """The manager and driver as the agent runs them: messages through submit(), applies in the loop's
    worker thread, removals only after InSync."""
    loop = Dataplane([masq.mgr], [masq.dp], refresh_interval=3600.0)
    task = asyncio.create_task(loop.run())
    try:
        loop.submit([pool("10.65.0.0/16", nat=True), pool("198.51.100.0/24")])
        await loop.barrier()
        assert loop.last_error == ""
        assert servers.seen_from_pod(EXT_IP) == (NODE_IP, NODE_IP)
        assert servers.seen_from_pod(EXT_IN_POOL) == (POD_IP, POD_IP)
        # Before the sync a removed pool stays in the sets; InSync lets the driver catch up.
        loop.submit([IPPoolRemove(N("198.51.100.0/24"))])
        await loop.barrier()
        assert servers.seen_from_pod(EXT_IN_POOL) == (POD_IP, POD_IP)
        loop.submit([InSync()])
        await loop.barrier()
        assert loop.last_error == ""
        assert servers.seen_from_pod(EXT_IN_POOL) == (NODE_IP, NODE_IP)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        loop.close()
