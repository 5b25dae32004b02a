"""The stdlib rtnetlink shim and the netns helpers against the real kernel, in throwaway namespaces.

iproute2 is the independent witness: what we write must show up in ``ip`` output and vice versa.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from felixpy.dataplane.shims import netns
from felixpy.dataplane.shims.netlink import (
    IPIP_MISSING,
    RT_SCOPE_LINK,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_LINK,
    LinkEvent,
    Monitor,
    Netlink,
    NetlinkError,
    Overflow,
    Route,
    RouteEvent,
    VxlanInfo,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxnl{os.getpid() % 100000}{secrets.token_hex(2)}"
N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def ns(make_ns: Callable[[], str]) -> str:
    return make_ns()


@pytest.fixture
def nl(ns: str) -> Iterator[Netlink]:
    with Netlink(f"/run/netns/{ns}") as sock:
        yield sock


def veth(ns: str, name: str, peer: str) -> int:
    ip(ns, "link", "add", name, "type", "veth", "peer", "name", peer)
    ip(ns, "link", "set", name, "up")
    ip(ns, "link", "set", peer, "up")
    return _index(ns, name)


def _index(ns: str, name: str) -> int:
    return int(ip(ns, "-o", "link", "show", name).split(":", 1)[0])


# -- netns helpers --------------------------------------------------------------------------------
def test_netns_exists_and_errors(ns: str) -> None:
    assert netns.netns_exists(f"/run/netns/{ns}")
    assert not netns.netns_exists(f"/run/netns/{ns}-nope")
    assert not netns.netns_exists("")
    with pytest.raises(netns.NetnsError, match="does not exist"):
        netns.open_netns(f"/run/netns/{ns}-nope")
    with pytest.raises(netns.NetnsError, match="is not a network namespace"):
        netns.open_netns("/proc/self/ns/uts")
    with pytest.raises(netns.NetnsError, match="does not exist"):
        Netlink(f"/run/netns/{ns}-nope")


def test_in_netns_switches_only_this_thread_and_returns(ns: str) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    target = os.stat(f"/run/netns/{ns}").st_ino
    seen: dict[str, int] = {}

    def worker() -> None:
        with netns.in_netns(f"/run/netns/{ns}"):
            seen["inside"] = os.stat("/proc/thread-self/ns/net").st_ino
            seen["main_thread"] = os.stat(f"/proc/{os.getpid()}/task/{os.getpid()}/ns/net").st_ino
        seen["after"] = os.stat("/proc/thread-self/ns/net").st_ino

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"inside": target, "main_thread": own, "after": own}
    assert netns.same_netns("/proc/self/ns/net")
    assert not netns.same_netns(f"/run/netns/{ns}")


def test_sysctl_follows_the_thread_netns(ns: str) -> None:
    ip(ns, "link", "add", "sysa", "type", "veth", "peer", "name", "sysb")
    with netns.in_netns(f"/run/netns/{ns}"):
        netns.write_sysctl("net/ipv4/conf/sysa/proxy_arp", 1)
        netns.write_sysctl("net/ipv4/conf/lo/accept_local", 1)
        assert netns.read_sysctl("net/ipv4/conf/sysa/proxy_arp") == "1"
    # The other netns (ours) is untouched, the target has the values.
    assert not os.path.exists("/proc/sys/net/ipv4/conf/sysa")
    out = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.conf.sysa.proxy_arp",
                          "net.ipv4.conf.lo.accept_local"], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["1", "1"]
    with pytest.raises(ValueError):
        netns.write_sysctl("/proc/sys/net/ipv4/ip_forward", 1)
    with pytest.raises(ValueError):
        netns.write_sysctl("net/../../etc/passwd", 1)


# -- links ----------------------------------------------------------------------------------------
def test_links_of_a_fresh_netns(nl: Netlink) -> None:
    links = nl.links()
    assert [ln.name for ln in links] == ["lo"]
    lo = nl.link("lo")
    assert lo is not None and lo.index == 1 and lo.kind is None and lo.mtu == 65536
    assert nl.link(1) == lo
    assert nl.link("nosuchlink") is None
    assert nl.link(4242) is None
    with pytest.raises(ValueError):
        nl.link("x" * 16)


def test_veth_with_peer_in_another_netns(make_ns: Callable[[], str]) -> None:
    a, b = make_ns(), make_ns()
    fd = netns.open_netns(f"/run/netns/{b}")
    try:
        with Netlink(f"/run/netns/{a}") as nla, Netlink(fd) as nlb:
            nla.add_veth("calitest1", "eth0", peer_netns_fd=fd, mtu=1400, mac="ee:ee:ee:ee:ee:ee",
                         peer_mac="02:11:22:33:44:55", up=True)
            host = nla.link("calitest1")
            pod = nlb.link("eth0")
            assert host is not None and pod is not None
            assert (host.kind, host.mac, host.mtu, host.up) == ("veth", "ee:ee:ee:ee:ee:ee", 1400, True)
            assert (pod.kind, pod.mac, pod.mtu, pod.up) == ("veth", "02:11:22:33:44:55", 1400, False)
            assert host.link == pod.index and host.link_netnsid is not None
            assert not host.oper_up  # the peer is still down
            nlb.set_link(pod.index, up=True)
            host = nla.link("calitest1")
            assert host is not None and host.oper_up
            assert "ee:ee:ee:ee:ee:ee" in ip(a, "link", "show", "calitest1")
            assert "02:11:22:33:44:55" in ip(b, "link", "show", "eth0")

            with pytest.raises(NetlinkError) as ei:
                nla.add_veth("calitest1", "eth9")
            assert ei.value.errno == errno.EEXIST
            assert "add veth calitest1 peer eth9" in str(ei.value)

            nlb.set_link(pod.index, mtu=1300, mac="02:00:00:00:00:09", name="eth1")
            renamed = nlb.link("eth1")
            assert renamed is not None and (renamed.mtu, renamed.mac) == (1300, "02:00:00:00:00:09")

            assert nla.del_link("calitest1") is True
            assert nla.del_link("calitest1") is False
            assert nla.del_link(9999) is False
            assert nlb.link("eth1") is None  # the peer went with it
    finally:
        os.close(fd)


def test_bad_input_is_refused_before_the_kernel(nl: Netlink) -> None:
    with pytest.raises(ValueError, match="invalid MAC"):
        nl.add_veth("calibad", "peerbad", mac="zz:zz")
    with pytest.raises(ValueError, match="invalid interface name"):
        nl.add_veth("a/b", "peer")
    assert nl.link("calibad") is None


# -- addresses ------------------------------------------------------------------------------------
def test_addresses(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "addra", "addrb")
    nl.add_addr(idx, ipaddress.IPv4Interface("10.65.0.2/32"))
    nl.add_addr(idx, ipaddress.IPv4Interface("10.65.0.2/32"))  # replace: idempotent
    got = {a.address for a in nl.addrs(idx)}
    assert ipaddress.IPv4Interface("10.65.0.2/32") in got
    assert "inet 10.65.0.2/32" in ip(ns, "addr", "show", "addra")
    assert all(a.index == idx for a in nl.addrs(idx))
    assert nl.del_addr(idx, ipaddress.IPv4Interface("10.65.0.2/32")) is True
    assert nl.del_addr(idx, ipaddress.IPv4Interface("10.65.0.2/32")) is False
    assert "10.65.0.2" not in ip(ns, "addr", "show", "addra")


# -- routes ---------------------------------------------------------------------------------------
def test_route_dump_of_an_empty_table(nl: Netlink) -> None:
    assert nl.routes() == []
    assert nl.routes(table=1234) == []


def test_single_routes_round_trip(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "calirt1", "peerrt1")
    # Onlink gateways are checked against the local table, which a netns gets once lo is up.
    ip(ns, "link", "set", "lo", "up")
    workload = Route(N("10.65.0.5/32"), protocol=80, scope=RT_SCOPE_LINK, oif=idx)
    blackhole = Route(N("10.65.0.0/26"), protocol=80, type="blackhole")
    via = Route(N("10.66.0.0/24"), protocol=80, oif=idx, gateway=A("10.65.0.5"), onlink=True, metric=100)
    other_table = Route(N("10.67.0.0/24"), table=1000, protocol=80, type="unreachable")
    for r in (workload, blackhole, via, other_table):
        nl.add_route(r)
    text = ip(ns, "route", "show")
    assert "10.65.0.5 dev calirt1 proto 80 scope link" in text
    assert "blackhole 10.65.0.0/26 proto 80" in text
    assert "10.66.0.0/24 via 10.65.0.5 dev calirt1 proto 80 metric 100 onlink" in text
    assert "unreachable 10.67.0.0/24 proto 80" in ip(ns, "route", "show", "table", "1000")
    dumped = nl.routes()
    for r in (workload, blackhole, via):
        assert r in dumped  # exact equality: a re-dump recognises what we wrote
    assert nl.routes(table=1000) == [other_table]

    with pytest.raises(NetlinkError) as ei:
        nl.add_route(workload, replace=False)
    assert ei.value.errno == errno.EEXIST
    assert str(ei.value) == f"add route 10.65.0.5/32 dev #{idx} proto 80 scope link: File exists"

    # Routes written by iproute2 parse back with the same fields.
    ip(ns, "route", "add", "10.68.0.7", "dev", "calirt1", "proto", "static", "scope", "link")
    assert Route(N("10.68.0.7/32"), protocol=4, scope=RT_SCOPE_LINK, oif=idx) in nl.routes()

    assert nl.del_route(workload) is True
    assert nl.del_route(workload) is False
    assert not any(line.startswith("10.65.0.5 ") for line in ip(ns, "route", "show").splitlines())


def test_bulk_apply_maps_errors_to_routes(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "calibulk", "peerbulk")
    good = [Route(N((0x0A400000 + i, 32)), protocol=80, scope=RT_SCOPE_LINK, oif=idx) for i in range(3000)]
    bad_dev = Route(N("10.70.0.1/32"), protocol=80, scope=RT_SCOPE_LINK, oif=99999)
    bad_gw = Route(N("10.71.0.0/24"), protocol=80, gateway=A("10.200.0.1"))  # no route to the gateway
    bad_type = Route(N("10.72.0.0/24"), type="nonsense")
    # Put the failures in different chunks of the batch (1024 requests each).
    adds = [*good[:10], bad_dev, *good[10:1500], bad_gw, bad_type, *good[1500:]]
    gone = Route(N("10.73.0.1/32"), protocol=80, scope=RT_SCOPE_LINK, oif=idx)
    errors = nl.apply_routes(adds, [gone], ifnames={idx: "calibulk"})
    by_route = {id(e.obj): e for e in errors}
    assert len(errors) == 3
    assert by_route[id(bad_dev)].errno == errno.ENODEV
    assert by_route[id(bad_gw)].errno == errno.ENETUNREACH
    assert by_route[id(bad_type)].errno == errno.EINVAL
    assert "add route 10.71.0.0/24 via 10.200.0.1 proto 80" in str(by_route[id(bad_gw)])
    lines = ip(ns, "route", "show", "proto", "80").splitlines()
    assert len(lines) == 3000
    assert set(nl.routes()) >= set(good)

    # Deleting in bulk, including routes that are already gone: no errors.
    assert nl.apply_routes([], [*good, gone]) == []
    assert ip(ns, "route", "show", "proto", "80") == ""


# -- neighbours -----------------------------------------------------------------------------------
def test_neighbours(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "calinb", "peernb")
    nl.add_neigh(idx, A("10.65.0.9"), "02:00:00:00:00:01")
    nl.add_neigh(idx, A("10.65.0.9"), "02:00:00:00:00:02")  # replace
    got = nl.neighs(idx)
    assert [(n.ip, n.mac, n.permanent) for n in got] == [(A("10.65.0.9"), "02:00:00:00:00:02", True)]
    assert "10.65.0.9 lladdr 02:00:00:00:00:02 PERMANENT" in ip(ns, "neigh", "show", "dev", "calinb")
    assert nl.del_neigh(idx, A("10.65.0.9")) is True
    assert nl.del_neigh(idx, A("10.65.0.9")) is False
    assert nl.neighs(idx) == []


# -- monitoring -----------------------------------------------------------------------------------
def test_monitor_reports_changes_behind_our_back(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "calimon", "peermon")
    ip(ns, "link", "add", "ext0", "type", "veth", "peer", "name", "ext1")
    ip(ns, "link", "set", "ext0", "up")
    ip(ns, "link", "set", "ext1", "up")
    with Monitor((RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE), netns=f"/run/netns/{ns}") as mon:
        assert mon.read_events() == []
        assert mon.ifname(idx) == "calimon"
        # Our own writes (proto 80) echo back but are not "changes behind our back".
        nl.add_route(Route(N("10.65.0.5/32"), protocol=80, scope=RT_SCOPE_LINK, oif=idx))
        assert mon.drain_owned_route_changes(("cali",)) is False
        # Foreign routes elsewhere do not matter either.
        ip(ns, "route", "add", "10.99.0.0/24", "dev", "ext0")
        assert mon.drain_owned_route_changes(("cali",)) is False
        # Someone deletes our route by hand.
        ip(ns, "route", "del", "10.65.0.5/32")
        assert mon.drain_owned_route_changes(("cali",)) is True
        # A foreign route lands on a workload interface.
        ip(ns, "route", "add", "10.65.0.6", "dev", "calimon", "proto", "static")
        events = mon.read_events()
        assert any(isinstance(e, RouteEvent) and not e.deleted and e.route.dst == N("10.65.0.6/32")
                   and e.route.oif == idx and e.route.protocol == 4 for e in events)
        ip(ns, "route", "add", "10.65.0.7", "dev", "calimon", "proto", "static")
        assert mon.drain_owned_route_changes(("cali",)) is True
        # A workload interface appears.
        ip(ns, "link", "add", "calinew", "type", "veth", "peer", "name", "peernew")
        events = mon.read_events()
        assert any(isinstance(e, LinkEvent) and e.link.name == "calinew" and not e.deleted for e in events)
        assert mon.ifname(_index(ns, "calinew")) == "calinew"
        ip(ns, "link", "del", "calinew")
        assert mon.drain_owned_route_changes(("cali",)) is True
        assert mon.read_events() == []


def test_subscribe_uses_the_same_netns(ns: str, nl: Netlink) -> None:
    with nl.subscribe([RTNLGRP_LINK]) as mon:
        ip(ns, "link", "add", "calisub", "type", "veth", "peer", "name", "peersub")
        names = {e.link.name for e in mon.read_events() if isinstance(e, LinkEvent)}
        assert "calisub" in names


def test_monitor_overflow_is_reported(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "caliovf", "peerovf")
    with Monitor([RTNLGRP_IPV4_ROUTE], netns=f"/run/netns/{ns}", rcvbuf=1024) as mon:
        many = [Route(N((0x0A500000 + i, 32)), protocol=80, scope=RT_SCOPE_LINK, oif=idx) for i in range(500)]
        assert nl.apply_routes(many, []) == []
        events = mon.read_events()
        assert any(isinstance(e, Overflow) for e in events)
        assert nl.apply_routes([], many) == []
        assert mon.drain_owned_route_changes(("cali",)) is True  # an overflow means "anything changed"
        assert mon.read_events() == []


def test_lost_replies_are_reported_not_swallowed(ns: str) -> None:
    # A receive buffer far too small for 2000 error replies: the kernel drops some and then every
    # reply until the queue is drained. Every failed route must still come back as an error
    # (ENOBUFS where the reply was lost), and the call must not hang waiting for a dropped ack.
    with Netlink(f"/run/netns/{ns}", rcvbuf=1024, timeout=20) as small:
        bad = [Route(N((0x0A600000 + i, 32)), protocol=80, scope=RT_SCOPE_LINK, oif=99999) for i in range(2000)]
        errors = small.apply_routes(bad, [])
        assert len(errors) == 2000
        assert {e.errno for e in errors} <= {errno.ENODEV, errno.ENOBUFS}
        assert any(e.errno == errno.ENOBUFS for e in errors)
        # The socket is still usable afterwards.
        assert [ln.name for ln in small.links()] == ["lo"]


# -- tunnels: vxlan links, FDB entries, IPIP ------------------------------------------------------
def test_vxlan_link_round_trip(ns: str, nl: Netlink) -> None:
    parent = veth(ns, "vxpar", "vxparb")
    nl.add_vxlan("vxlan.calico", vni=4096, port=4789, local=A("10.96.0.1"), parent_index=parent, mtu=1450,
                 mac="66:01:02:03:04:05", up=True)
    text = ip(ns, "-d", "link", "show", "vxlan.calico")
    assert "vxlan id 4096 local 10.96.0.1 dev vxpar" in text and "dstport 4789 nolearning" in text
    assert "mtu 1450" in text and "66:01:02:03:04:05" in text and ",UP" in text
    link = nl.link("vxlan.calico")
    assert link is not None and link.kind == "vxlan" and link.up
    assert link.vxlan == VxlanInfo(vni=4096, port=4789, local=A("10.96.0.1"), link=parent, learning=False)
    # Links made by iproute2 parse the same way; plain links have no vxlan info.
    ip(ns, "link", "add", "vx2", "type", "vxlan", "id", "7", "dstport", "8472", "learning")
    vx2 = nl.link("vx2")
    assert vx2 is not None and vx2.vxlan == VxlanInfo(vni=7, port=8472, local=None, link=None, learning=True)
    assert nl.link("vxpar") is not None and nl.link("vxpar").vxlan is None  # type: ignore[union-attr]
    with pytest.raises(NetlinkError) as ei:
        nl.add_vxlan("vx2", vni=8)
    assert ei.value.errno == errno.EEXIST and "add vxlan vx2 vni 8" in str(ei.value)
    with pytest.raises(ValueError, match="VNI"):
        nl.add_vxlan("vx3", vni=1 << 24)
    with pytest.raises(ValueError, match="port"):
        nl.add_vxlan("vx3", vni=1, port=0)
    assert nl.link("vx3") is None


def test_fdb_entries_and_arp_on_vxlan(ns: str, nl: Netlink) -> None:
    ip(ns, "link", "add", "vxfdb", "type", "vxlan", "id", "4096", "dstport", "4789", "nolearning")
    idx = _index(ns, "vxfdb")
    mac = "66:aa:bb:cc:dd:01"
    nl.add_fdb(idx, mac, A("10.96.0.2"))
    nl.add_fdb(idx, mac, A("10.96.0.2"))  # same again: no error, no duplicate
    assert f"{mac} dst 10.96.0.2 self permanent" in subprocess.run(
        ["bridge", "-n", ns, "fdb", "show", "dev", "vxfdb"], check=True, capture_output=True, text=True).stdout
    got = nl.fdbs(idx)
    assert [(f.mac, f.dst, f.permanent, f.index) for f in got] == [(mac, A("10.96.0.2"), True, idx)]
    # A unicast MAC has one destination: adding it again moves it (the VTEP's node IP changed).
    nl.add_fdb(idx, mac, A("10.96.0.3"))
    assert [(f.mac, f.dst) for f in nl.fdbs(idx)] == [(mac, A("10.96.0.3"))]
    # Entries written by iproute2 are listed too; the filter keeps other links' entries out.
    subprocess.run(["bridge", "-n", ns, "fdb", "add", "66:aa:bb:cc:dd:02", "dev", "vxfdb", "dst", "10.96.0.4",
                    "self", "permanent"], check=True)
    assert {(f.mac, f.dst) for f in nl.fdbs(idx)} == {(mac, A("10.96.0.3")), ("66:aa:bb:cc:dd:02", A("10.96.0.4"))}
    assert all(f.index == idx for f in nl.fdbs(idx))
    assert {f.mac for f in nl.fdbs() if f.index == idx} == {mac, "66:aa:bb:cc:dd:02"}
    # A wrong destination deletes nothing (the kernel still acks it, so the result says little).
    nl.del_fdb(idx, mac, A("10.96.0.2"))
    assert (mac, A("10.96.0.3")) in {(f.mac, f.dst) for f in nl.fdbs(idx)}
    assert nl.del_fdb(idx, mac, A("10.96.0.3")) is True
    assert nl.del_fdb(idx, mac, A("10.96.0.3")) is False
    assert nl.del_fdb(idx, "66:aa:bb:cc:dd:02") is True
    assert nl.fdbs(idx) == []
    with pytest.raises(ValueError, match="invalid MAC"):
        nl.add_fdb(idx, "66:aa", A("10.96.0.3"))
    # Permanent ARP entries work on a vxlan link like on any other.
    nl.add_neigh(idx, A("10.244.1.0"), mac)
    assert [(n.ip, n.mac, n.permanent) for n in nl.neighs(idx)] == [(A("10.244.1.0"), mac, True)]
    assert f"10.244.1.0 lladdr {mac} PERMANENT" in ip(ns, "neigh", "show", "dev", "vxfdb")


def test_route_get_resolves_next_hops(ns: str, nl: Netlink) -> None:
    idx = veth(ns, "rgeta", "rgetb")
    ip(ns, "link", "set", "lo", "up")
    ip(ns, "addr", "add", "10.97.0.1/24", "dev", "rgeta")
    assert nl.route_get(A("8.8.8.8")) is None  # no route at all
    connected = nl.route_get(A("10.97.0.7"))
    assert connected is not None and connected.oif == idx and connected.gateway is None
    assert connected.dst == N("10.97.0.7/32")
    # A next hop that is not directly connected resolves through its route (BIRD's "gateway recursive").
    ip(ns, "route", "add", "10.98.0.0/16", "via", "10.97.0.254")
    via = nl.route_get(A("10.98.3.4"))
    assert via is not None and via.gateway == A("10.97.0.254") and via.oif == idx and via.type == "unicast"
    local = nl.route_get(A("10.97.0.1"))
    assert local is not None and local.type == "local"
    ip(ns, "route", "add", "blackhole", "10.99.0.0/16")
    ip(ns, "route", "add", "unreachable", "10.100.0.0/16")
    assert nl.route_get(A("10.99.0.1")) is None
    assert nl.route_get(A("10.100.0.1")) is None


def test_ipip_probe_and_creation(ns: str, nl: Netlink) -> None:
    ok, reason = nl.ipip_supported()
    assert reason
    print(f"IPIP support on this kernel: {ok} ({reason})")
    if ok:
        nl.add_ipip("fxipt1", remote=A("192.0.2.9"), mtu=1480)
        link = nl.link("fxipt1")
        assert link is not None and link.kind == "ipip" and link.mtu == 1480
        assert nl.del_link("fxipt1") is True
    else:
        assert reason == IPIP_MISSING
        with pytest.raises(NetlinkError) as ei:
            nl.add_ipip()
        assert ei.value.errno == errno.EOPNOTSUPP
        assert "kernel has no IPIP support (ipip module missing)" in str(ei.value)
    assert not any(ln.name.startswith("fxipip") for ln in nl.links())  # the probe leaves nothing behind
