"""The VXLAN device driver against the real kernel: two "nodes" (network namespaces) joined by a veth,
each with a ``vxlan.calico`` programmed by a :class:`VxlanDevice`; packets must really cross the tunnel.

"Touches nothing" is checked two ways: the driver's write counter, and an rtnetlink listener in the
namespace that must hear no link, address, neighbour/FDB or route notification.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from felixpy.dataplane.drivers.vxlan import Vtep, VxlanDevice, VxlanParams
from felixpy.dataplane.shims import netns
from felixpy.dataplane.shims.netlink import (
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
    IPAddress,
    Netlink,
    NetlinkError,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxvx{os.getpid() % 100000}{secrets.token_hex(2)}"
A = ipaddress.IPv4Address
VX = "vxlan.calico"

MAC_A = "66:00:00:00:00:0a"
MAC_B = "66:00:00:00:00:0b"


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def fdb_show(ns: str, dev: str = VX) -> str:
    return subprocess.run(["bridge", "-n", ns, "fdb", "show", "dev", dev], check=True, capture_output=True,
                          text=True).stdout


def ping(ns: str, dst: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "3", dst], capture_output=True,
                       text=True)
    return r.returncode == 0


class Events:
    """A raw rtnetlink listener in one netns: counts every notification of the given groups."""

    def __init__(self, ns: str, groups: tuple[int, ...] = (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_IFADDR,
                                                           RTNLGRP_IPV4_ROUTE)) -> None:
        with netns.in_netns(f"/run/netns/{ns}"):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        mask = 0
        for g in groups:
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


@dataclass
class Node:
    ns: str
    nl: Netlink
    node_ip: ipaddress.IPv4Address
    tunnel_ip: ipaddress.IPv4Address
    mac: str

    def params(self, **over: object) -> VxlanParams:
        kw: dict[str, object] = dict(tunnel_addr=self.tunnel_ip, local_ip=self.node_ip, parent_iface="eth0",
                                     mac=self.mac, mtu=1450)
        kw.update(over)
        return VxlanParams(**kw)  # type: ignore[arg-type]

    def vtep(self) -> Vtep:
        return Vtep(tunnel_ip=self.tunnel_ip, mac=self.mac, node_ip=self.node_ip)


@pytest.fixture
def nodes(make_ns: Callable[[], str]) -> Iterator[tuple[Node, Node]]:
    a, b = make_ns(), make_ns()
    subprocess.run(["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b],
                   check=True)
    for ns, addr in ((a, "10.10.0.1/24"), (b, "10.10.0.2/24")):
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "link", "set", "eth0", "up")
        ip(ns, "addr", "add", addr, "dev", "eth0")
    with Netlink(f"/run/netns/{a}") as nla, Netlink(f"/run/netns/{b}") as nlb:
        yield (Node(a, nla, A("10.10.0.1"), A("10.244.1.0"), MAC_A),
               Node(b, nlb, A("10.10.0.2"), A("10.244.2.0"), MAC_B))


def program(n: Node, peer: Node, **kw: object) -> VxlanDevice:
    drv = VxlanDevice(n.nl, **kw)  # type: ignore[arg-type]
    drv.set_device(n.params())
    drv.set_vteps({"peer": peer.vtep()})
    stats = drv.apply()
    assert stats.errors == [] and stats.writes > 0
    return drv


def route_to_peer(n: Node, peer: Node) -> None:
    # The route table driver's job in the agent: "<remote tunnel IP>/32 dev vxlan.calico scope link".
    ip(n.ns, "route", "replace", f"{peer.tunnel_ip}/32", "dev", VX, "scope", "link")


# -- the happy path ----------------------------------------------------------------------------------
def test_two_nodes_ping_over_vxlan_and_reapply_touches_nothing(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    changed: list[str] = []
    drv_a = program(a, b, on_link_change=changed.append)
    drv_b = program(b, a)
    assert changed == [VX]
    for n, peer, drv in ((a, b, drv_a), (b, a, drv_b)):
        text = ip(n.ns, "-d", "link", "show", VX)
        assert f"vxlan id 4096 local {n.node_ip} dev eth0" in text
        assert "dstport 4789 nolearning" in text and "mtu 1450" in text and n.mac in text
        assert "state UNKNOWN" in text or ",UP" in text
        assert f"inet {n.tunnel_ip}/32" in ip(n.ns, "-4", "addr", "show", "dev", VX)
        assert f"{peer.tunnel_ip} lladdr {peer.mac} PERMANENT" in ip(n.ns, "neigh", "show", "dev", VX)
        assert f"{peer.mac} dst {peer.node_ip} self permanent" in fdb_show(n.ns)
        assert drv.status() == ""
        assert drv.ifindex() == n.nl.link(VX).index  # type: ignore[union-attr]
        route_to_peer(n, peer)
    assert ping(a.ns, str(b.tunnel_ip))
    assert ping(b.ns, str(a.tunnel_ip))
    # The packets really went through the tunnel: UDP/4789 on the underlay.
    rx = int(ip(b.ns, "-s", "-j", "link", "show", VX).split('"rx":{"bytes":', 1)[1].split(",", 1)[0])
    assert rx > 0

    # Re-applying with nothing new, or after a resync, writes nothing.
    ev = Events(a.ns)
    try:
        assert drv_a.apply().writes == 0
        drv_a.queue_resync()
        stats = drv_a.apply()
        assert stats.resynced and stats.writes == 0 and stats.errors == []
        # The same desired state again is a no-op too.
        drv_a.set_device(a.params())
        drv_a.set_vteps({"peer": b.vtep()})
        assert drv_a.apply().writes == 0
        # A restart: a fresh driver adopts what is there and changes nothing.
        fresh = VxlanDevice(a.nl)
        fresh.set_device(a.params())
        fresh.set_vteps({"peer": b.vtep()})
        fresh.allow_removals()
        stats = fresh.apply()
        assert stats.resynced and stats.writes == 0 and stats.errors == [] and not stats.recreated
        assert fresh.status() == ""
        assert ev.count() == 0
        # The listener does hear changes: a hand-deleted ARP entry and its repair.
        ip(a.ns, "neigh", "del", str(b.tunnel_ip), "dev", VX)
        fresh.queue_resync()
        assert fresh.apply().writes == 1
        assert ev.count() >= 2
    finally:
        ev.close()
    assert ping(a.ns, str(b.tunnel_ip))


def test_nothing_decided_touches_nothing(nodes: tuple[Node, Node]) -> None:
    a, _b = nodes
    ip(a.ns, "link", "add", VX, "type", "vxlan", "id", "9", "dstport", "8472")
    drv = VxlanDevice(a.nl, removals_allowed=True)
    stats = drv.apply()  # no set_device yet: not even a wrong device is changed
    assert stats.writes == 0 and "vxlan id 9 " in ip(a.ns, "-d", "link", "show", VX)
    assert drv.status() == ""
    drv.set_vteps({"x": Vtep(tunnel_ip=A("10.244.9.0"), mac="66:00:00:00:00:99", node_ip=A("10.10.0.9"))})
    assert drv.apply().writes == 0
    assert ip(a.ns, "neigh", "show", "dev", VX) == ""


# -- repairs ---------------------------------------------------------------------------------------
def test_incompatible_device_is_recreated_and_small_drift_fixed_in_place(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    # A leftover with the wrong VNI/port, learning on and a stray address.
    ip(a.ns, "link", "add", VX, "type", "vxlan", "id", "7", "dstport", "8472", "dev", "eth0", "local", "10.10.0.1")
    ip(a.ns, "addr", "add", "10.9.9.9/24", "dev", VX)
    old_index = a.nl.link(VX).index  # type: ignore[union-attr]
    changed: list[str] = []
    drv = VxlanDevice(a.nl, on_link_change=changed.append)
    drv.set_device(a.params())
    drv.set_vteps({"b": b.vtep()})
    stats = drv.apply()
    assert stats.recreated and stats.errors == []
    link = a.nl.link(VX)
    assert link is not None and link.index != old_index and link.vxlan is not None
    assert (link.vxlan.vni, link.vxlan.port, link.vxlan.learning) == (4096, 4789, False)
    assert drv.ifindex() == link.index and changed  # the route table must re-resolve the link
    assert "10.9.9.9" not in ip(a.ns, "addr", "show", "dev", VX)
    assert f"{b.mac} dst {b.node_ip}" in fdb_show(a.ns)

    # MTU, up-state and addresses drift: fixed in place (same ifindex), after a resync.
    ip(a.ns, "link", "set", VX, "mtu", "1300")
    ip(a.ns, "link", "set", VX, "down")
    ip(a.ns, "addr", "add", "10.8.8.8/32", "dev", VX)
    ip(a.ns, "addr", "add", "169.254.7.7/16", "dev", VX)  # link-local: not ours to remove
    drv.queue_resync()
    stats = drv.apply()
    # MTU, up, one address removed, and the ARP entry again: taking a link down flushes even the
    # permanent neighbours (FDB entries survive).
    assert not stats.recreated and stats.writes == 4 and stats.errors == []
    assert f"{b.tunnel_ip} lladdr {b.mac} PERMANENT" in ip(a.ns, "neigh", "show", "dev", VX)
    text = ip(a.ns, "addr", "show", "dev", VX)
    assert "mtu 1450" in text and ",UP" in text and "10.8.8.8" not in text and "169.254.7.7/16" in text
    assert f"{a.tunnel_ip}/32" in text
    assert a.nl.link(VX).index == link.index  # type: ignore[union-attr]

    # A new MAC for this node cannot be changed in place by Calico's rules: re-created, entries restored.
    changed.clear()
    drv.set_device(a.params(mac="66:00:00:00:01:0a"))
    stats = drv.apply()
    assert stats.recreated and stats.errors == [] and changed == [VX, VX]  # deleted, then created
    assert "66:00:00:00:01:0a" in ip(a.ns, "link", "show", VX)
    assert f"{b.tunnel_ip} lladdr {b.mac} PERMANENT" in ip(a.ns, "neigh", "show", "dev", VX)
    assert f"{b.mac} dst {b.node_ip}" in fdb_show(a.ns)

    # A local/parent change (the node IP moved) re-creates it too.
    ip(a.ns, "addr", "add", "10.10.0.11/24", "dev", "eth0")
    drv.set_device(a.params(mac="66:00:00:00:01:0a", local_ip=A("10.10.0.11")))
    assert drv.apply().recreated
    assert "local 10.10.0.11 dev eth0" in ip(a.ns, "-d", "link", "show", VX)


def test_device_deleted_behind_our_back_is_restored(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    drv = program(a, b)
    ip(a.ns, "link", "del", VX)
    # Without a resync the driver trusts its cache; a VTEP change then hits the missing device,
    # reports it, and the next apply repairs everything.
    c = Vtep(tunnel_ip=A("10.244.3.0"), mac="66:00:00:00:00:0c", node_ip=A("10.10.0.3"))
    drv.set_vteps({"b": b.vtep(), "c": c})
    stats = drv.apply()
    assert stats.errors and any("No such device" in e for e in stats.errors)
    assert drv.status() != ""
    stats = drv.apply()
    assert stats.errors == [] and stats.recreated
    assert drv.status() == ""
    assert f"{c.tunnel_ip} lladdr {c.mac} PERMANENT" in ip(a.ns, "neigh", "show", "dev", VX)
    assert f"{b.mac} dst {b.node_ip}" in fdb_show(a.ns) and f"{c.mac} dst {c.node_ip}" in fdb_show(a.ns)


def test_missing_parent_is_reported_and_retried(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    drv = VxlanDevice(a.nl)
    drv.set_device(a.params(parent_iface="ens9"))
    drv.set_vteps({"b": b.vtep()})
    stats = drv.apply()
    assert stats.writes == 0
    assert "parent interface ens9 of vxlan.calico does not exist" in drv.status()
    assert a.nl.link(VX) is None
    ip(a.ns, "link", "set", "eth0", "name", "ens9")
    stats = drv.apply()
    assert stats.errors == [] and drv.status() == ""
    assert "dev ens9" in ip(a.ns, "-d", "link", "show", VX)
    assert f"{b.mac} dst {b.node_ip}" in fdb_show(a.ns)


class FailingArp(Netlink):
    """The real client, except that the ARP entry for one IP fails: the kernel accepts every ARP
    entry we could ask for, so a per-entry failure has to be injected."""

    fail_ip: IPAddress | None = None

    def add_neigh(self, index: int, ip: IPAddress, mac: str, *, permanent: bool = True) -> None:
        if ip == self.fail_ip:
            raise NetlinkError(errno.EINVAL, f"add neighbour {ip} lladdr {mac} dev #{index}", "injected")
        super().add_neigh(index, ip, mac, permanent=permanent)


def test_one_failing_entry_does_not_block_the_others(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    with FailingArp(f"/run/netns/{a.ns}") as nl:
        c = Vtep(tunnel_ip=A("10.244.3.0"), mac="66:00:00:00:00:0c", node_ip=A("10.10.0.3"))
        nl.fail_ip = c.tunnel_ip
        drv = VxlanDevice(nl)
        drv.set_device(a.params())
        drv.set_vteps({"b": b.vtep(), "c": c})
        stats = drv.apply()
        assert len(stats.errors) == 1 and "10.244.3.0" in stats.errors[0]
        assert "cannot add ARP entry 10.244.3.0" in drv.status()
        neigh = ip(a.ns, "neigh", "show", "dev", VX)
        assert f"{b.tunnel_ip} lladdr {b.mac}" in neigh and "10.244.3.0" not in neigh
        assert f"{c.mac} dst {c.node_ip}" in fdb_show(a.ns)  # the same VTEP's FDB entry went in
        nl.fail_ip = None
        stats = drv.apply()  # retried without a resync
        assert stats.errors == [] and stats.writes == 1 and drv.status() == ""
        assert f"{c.tunnel_ip} lladdr {c.mac} PERMANENT" in ip(a.ns, "neigh", "show", "dev", VX)


# -- removals --------------------------------------------------------------------------------------
def test_stale_entries_removed_only_after_allow_removals(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    c = Vtep(tunnel_ip=A("10.244.3.0"), mac="66:00:00:00:00:0c", node_ip=A("10.10.0.3"))
    drv = VxlanDevice(a.nl)
    drv.set_device(a.params())
    drv.set_vteps({"b": b.vtep(), "c": c})
    drv.apply()
    # Someone else's leftovers on our device (say from before a restart).
    ip(a.ns, "neigh", "add", "10.244.7.0", "lladdr", "66:00:00:00:00:77", "dev", VX, "nud", "permanent")
    subprocess.run(["bridge", "-n", a.ns, "fdb", "add", "66:00:00:00:00:77", "dev", VX, "dst", "10.10.0.7",
                    "self", "permanent"], check=True)
    drv.queue_resync()
    drv.set_vteps({"b": b.vtep()})  # node c went away
    assert drv.apply().writes == 0  # datastore not in sync yet: nothing deleted
    assert "10.244.3.0" in ip(a.ns, "neigh", "show", "dev", VX) and "66:00:00:00:00:77" in fdb_show(a.ns)

    # A VTEP that moved to another node IP is an update, not a removal: done at once.
    drv.set_vteps({"b": Vtep(tunnel_ip=b.tunnel_ip, mac=b.mac, node_ip=A("10.10.0.22"))})
    assert drv.apply().writes == 1
    assert f"{b.mac} dst 10.10.0.22 self permanent" in fdb_show(a.ns)
    assert f"{b.mac} dst 10.10.0.2 " not in fdb_show(a.ns)

    drv.set_vteps({"b": b.vtep()})
    drv.allow_removals()
    stats = drv.apply()
    assert stats.errors == [] and stats.writes == 5  # b's FDB back; 2 stale ARP + 2 stale FDB entries gone
    neigh = ip(a.ns, "neigh", "show", "dev", VX)
    assert "10.244.3.0" not in neigh and "10.244.7.0" not in neigh and f"{b.tunnel_ip} lladdr {b.mac}" in neigh
    fdb = fdb_show(a.ns)
    assert c.mac not in fdb and "66:00:00:00:00:77" not in fdb and f"{b.mac} dst {b.node_ip}" in fdb
    assert drv.apply().writes == 0
    # Entries on other links are not ours.
    assert "10.10.0.1" in ip(a.ns, "addr", "show", "dev", "eth0")


def test_disable_deletes_the_device_once_removals_are_allowed(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    changed: list[str] = []
    drv = program(a, b, on_link_change=changed.append)
    changed.clear()
    drv.set_device(None)
    assert drv.apply().writes == 0 and a.nl.link(VX) is not None
    assert drv.status() == ""
    drv.allow_removals()
    stats = drv.apply()
    assert stats.writes == 1 and stats.recreated and a.nl.link(VX) is None
    assert changed == [VX] and drv.ifindex() is None and drv.status() == ""
    assert drv.apply().writes == 0
    # After a restart with VXLAN off, a leftover device goes as well.
    ip(a.ns, "link", "add", VX, "type", "vxlan", "id", "4096", "dstport", "4789")
    fresh = VxlanDevice(a.nl, removals_allowed=True)
    fresh.set_device(None)
    assert fresh.apply().writes == 1 and a.nl.link(VX) is None


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_refused_and_conflicts_reported(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    with pytest.raises(ValueError, match="VNI"):
        a.params(vni=0)
    with pytest.raises(ValueError, match="port"):
        a.params(port=70000)
    with pytest.raises(ValueError, match="MTU"):
        a.params(mtu=10)
    with pytest.raises(ValueError, match="invalid MAC"):
        a.params(mac="66:00")
    with pytest.raises(ValueError, match="unicast"):
        a.params(mac="01:00:5e:00:00:01")
    with pytest.raises(ValueError, match="IPv4"):
        a.params(tunnel_addr="10.244.1.0")
    with pytest.raises(ValueError, match="invalid MAC"):
        Vtep(tunnel_ip=A("10.244.3.0"), mac="zz:00:00:00:00:0c", node_ip=A("10.10.0.3"))
    assert a.params(mac="66:00:00:00:00:AB").mac == "66:00:00:00:00:ab"
    drv = VxlanDevice(a.nl)
    with pytest.raises(ValueError):
        drv.set_vteps({"b": "not a vtep"})  # type: ignore[dict-item]
    drv.set_device(a.params())
    # Two nodes claiming the same tunnel IP: the lowest name wins, the conflict is reported.
    dup = Vtep(tunnel_ip=b.tunnel_ip, mac="66:00:00:00:00:0d", node_ip=A("10.10.0.4"))
    drv.set_vteps({"b": b.vtep(), "d": dup})
    assert drv.apply().errors == []
    assert "nodes b and d both claim tunnel IP 10.244.2.0" in drv.status()
    assert f"{b.tunnel_ip} lladdr {b.mac}" in ip(a.ns, "neigh", "show", "dev", VX)
    assert "66:00:00:00:00:0d" not in fdb_show(a.ns)
