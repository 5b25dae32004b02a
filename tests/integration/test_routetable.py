"""The route-table driver against the real kernel, in a throwaway "host" netns per test.

iproute2 writes the foreign/stale/drifted state and reads back the result; netlink events prove that
a restarted driver adopts correct routes without re-creating them.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from felixpy import names
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.shims.netlink import (
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV6_ROUTE,
    Monitor,
    Netlink,
    Route,
    RouteEvent,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxrt{os.getpid() % 100000}{secrets.token_hex(2)}"
N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
_count = 0


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def routes(ns: str, *args: str) -> set[str]:
    return {line.strip() for line in ip(ns, "route", "show", *args).splitlines()}


def add_veth(ns: str, name: str) -> None:
    ip(ns, "link", "add", name, "type", "veth", "peer", "name", name + "p")
    ip(ns, "link", "set", name, "up")
    ip(ns, "link", "set", name + "p", "up")


@pytest.fixture
def ns() -> Iterator[str]:
    global _count
    _count += 1
    name = f"{RUN}-{_count}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        for link in ("calia", "calib", "ext0"):
            add_veth(name, link)
        ip(name, "addr", "add", "192.168.77.1/24", "dev", "ext0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def nl(ns: str) -> Iterator[Netlink]:
    with Netlink(f"/run/netns/{ns}") as sock:
        yield sock


def blackhole(cidr: str, proto: int = names.RTPROT_FELIX) -> Route:
    return Route(N(cidr), protocol=proto, type="blackhole")


WANT = {"10.65.0.2 dev calia proto 80 scope link", "10.65.0.3 dev calia proto 80 scope link",
        "10.65.0.9 dev calib proto 80 scope link", "blackhole 10.65.0.0/26 proto 80"}
KERNEL = "192.168.77.0/24 dev ext0 proto kernel scope link src 192.168.77.1"


def program(rt: RouteTable) -> None:
    rt.set_iface_routes("calia", [N("10.65.0.2/32"), N("10.65.0.3/32")])
    rt.set_iface_routes("calib", [Route(N("10.65.0.9/32"), protocol=80, scope=253)])
    rt.set_routes("blocks", [blackhole("10.65.0.0/26")])


def test_apply_programs_exactly_the_desired_routes(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    program(rt)
    stats = rt.apply()
    assert (stats.adds, stats.dels, stats.errors, stats.pending, stats.resynced) == (4, 0, 0, 0, True)
    assert routes(ns) == WANT | {KERNEL}
    assert rt.num_owned_routes() == 4
    assert rt.iface_problem("calia") == "" and rt.iface_problem("calib") == ""
    # Nothing to do afterwards, whether we trust the cache or re-read the kernel.
    stats = rt.apply()
    assert (stats.adds, stats.dels, stats.resynced) == (0, 0, False)
    rt.queue_resync()
    stats = rt.apply()
    assert (stats.adds, stats.dels, stats.resynced) == (0, 0, True)
    # Removing desired routes removes them from the kernel.
    rt.set_iface_routes("calia", [N("10.65.0.3/32")])
    rt.set_routes("blocks", [])
    stats = rt.apply()
    assert (stats.adds, stats.dels) == (0, 2)
    assert routes(ns) == {"10.65.0.3 dev calia proto 80 scope link", "10.65.0.9 dev calib proto 80 scope link",
                          KERNEL}
    assert rt.num_owned_routes() == 2


def test_drift_is_repaired_on_resync(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    program(rt)
    rt.apply()
    ip(ns, "route", "del", "10.65.0.2/32")
    ip(ns, "route", "replace", "10.65.0.3/32", "dev", "calib", "proto", "80", "scope", "link")
    ip(ns, "route", "del", "blackhole", "10.65.0.0/26")
    # The cache is trusted until told otherwise (the agent's kernel monitor or refresh timer does).
    assert rt.apply().adds == 0
    rt.queue_resync()
    stats = rt.apply()
    assert (stats.adds, stats.dels, stats.errors) == (3, 0, 0)
    assert routes(ns) == WANT | {KERNEL}


def test_foreign_routes_are_untouched_and_stale_owned_ones_removed(ns: str, nl: Netlink) -> None:
    foreign = {"10.99.0.0/24 dev ext0 proto static scope link", "10.98.0.0/24 via 192.168.77.2 dev ext0",
               "blackhole 10.97.0.0/26 proto bird", "10.96.0.0/24 via 192.168.77.2 dev ext0 proto 81"}
    ip(ns, "route", "add", "10.99.0.0/24", "dev", "ext0", "proto", "static")
    ip(ns, "route", "add", "10.98.0.0/24", "via", "192.168.77.2")
    ip(ns, "route", "add", "blackhole", "10.97.0.0/26", "proto", "bird")
    ip(ns, "route", "add", "10.96.0.0/24", "via", "192.168.77.2", "proto", "81")
    ip(ns, "route", "add", "10.100.0.0/24", "via", "192.168.77.2", "table", "100", "proto", "80")
    # Stale state we own: by interface name (any protocol) and by protocol 80.
    ip(ns, "route", "add", "10.65.0.50", "dev", "calib", "scope", "link")
    ip(ns, "route", "add", "10.65.0.51", "dev", "calib", "proto", "static", "scope", "link")
    ip(ns, "route", "add", "blackhole", "10.66.0.0/26", "proto", "80")
    stale = {"10.65.0.50 dev calib scope link", "10.65.0.51 dev calib proto static scope link",
             "blackhole 10.66.0.0/26 proto 80"}
    assert routes(ns) == foreign | stale | {KERNEL}

    # Before the datastore is in sync, nothing is removed.
    rt = RouteTable(nl)
    program(rt)
    stats = rt.apply()
    assert (stats.adds, stats.dels) == (4, 0)
    assert routes(ns) == foreign | stale | WANT | {KERNEL}
    assert rt.num_owned_routes() == 7

    rt.allow_removals()
    stats = rt.apply()
    assert (stats.adds, stats.dels, stats.errors) == (0, 3, 0)
    assert routes(ns) == foreign | WANT | {KERNEL}
    assert "10.100.0.0/24 via 192.168.77.2 dev ext0 proto 80" in routes(ns, "table", "100")  # other table
    assert rt.num_owned_routes() == 4


def test_restart_adopts_correct_routes_without_churn(ns: str, nl: Netlink) -> None:
    first = RouteTable(nl, removals_allowed=True)
    program(first)
    first.apply()
    # A CNI-created route with the kernel's default protocol differs only in protocol: it is replaced.
    ip(ns, "route", "add", "10.65.0.4", "dev", "calib", "scope", "link")
    with Netlink(f"/run/netns/{ns}") as nl2, Monitor([RTNLGRP_IPV4_ROUTE], netns=f"/run/netns/{ns}") as mon:
        second = RouteTable(nl2, removals_allowed=True)
        program(second)
        second.set_iface_routes("calib", [Route(N("10.65.0.9/32"), protocol=80, scope=253), N("10.65.0.4/32")])
        stats = second.apply()
        events = [e for e in mon.read_events() if isinstance(e, RouteEvent)]
    assert (stats.adds, stats.dels, stats.errors, stats.resynced) == (1, 0, 0, True)
    # The only kernel route event is the one replacement: the existing routes were not re-created.
    assert [(e.deleted, str(e.route.dst), e.route.protocol) for e in events] == [(False, "10.65.0.4/32", 80)]
    assert routes(ns) == WANT | {KERNEL, "10.65.0.4 dev calib proto 80 scope link"}


def test_routes_wait_for_their_interface(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    rt.set_iface_routes("calic", [N("10.65.1.5/32")])
    rt.set_iface_routes("calia", [N("10.65.0.2/32")])
    stats = rt.apply()
    assert (stats.adds, stats.pending, stats.errors) == (1, 1, 0)
    assert rt.pending_ifaces == {"calic"}
    assert "calic does not exist" in rt.iface_problem("calic")
    assert rt.iface_problem("calia") == ""
    add_veth(ns, "calic")
    stats = rt.apply()  # no resync needed: pending interfaces are looked up on every apply
    assert (stats.adds, stats.pending, stats.resynced) == (1, 0, False)
    assert "10.65.1.5 dev calic proto 80 scope link" in routes(ns)
    assert rt.iface_problem("calic") == ""


def test_recreated_interface_gets_its_routes_back(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    rt.set_iface_routes("calia", [N("10.65.0.2/32")])
    rt.apply()
    # The pod is re-created: same veth name, new link (and the kernel dropped the old routes).
    ip(ns, "link", "del", "calia")
    add_veth(ns, "calia")
    assert "10.65.0.2 dev calia proto 80 scope link" not in routes(ns)
    rt.set_iface_routes("calia", [N("10.65.0.2/32")])  # the endpoint manager re-asserts it
    stats = rt.apply()
    assert (stats.adds, stats.errors, stats.resynced) == (1, 0, False)
    assert "10.65.0.2 dev calia proto 80 scope link" in routes(ns)


def test_one_bad_route_does_not_block_the_others(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    unreachable_gw = Route(N("10.70.0.0/24"), protocol=80, gateway=A("10.200.0.1"))
    rt.set_routes("gw", [unreachable_gw])
    program(rt)
    stats = rt.apply()
    assert (stats.adds, stats.errors) == (4, 1)
    assert "add route 10.70.0.0/24 via 10.200.0.1 proto 80" in stats.error_texts[0]
    assert "Network is unreachable" in stats.error_texts[0]
    assert routes(ns) == WANT | {KERNEL}
    # Failed routes are retried on the next apply; once the gateway is reachable they land.
    ip(ns, "route", "add", "10.200.0.0/24", "dev", "ext0")
    stats = rt.apply()
    assert (stats.adds, stats.errors) == (1, 0)
    assert "10.70.0.0/24 via 10.200.0.1 dev ext0 proto 80" in routes(ns)


def test_bad_input_is_refused_and_changes_nothing(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    program(rt)
    with pytest.raises(ValueError, match="IPv6"):
        rt.set_iface_routes("calia", [N("10.65.0.2/32"), ipaddress.IPv6Network("fd00::1/128")])
    with pytest.raises(ValueError, match="would not be recognised as ours"):
        rt.set_routes("blocks", [blackhole("10.65.0.0/26", proto=3)])
    with pytest.raises(ValueError, match="would not be recognised as ours"):
        rt.set_iface_routes("eth0", [Route(N("10.65.0.2/32"), protocol=3, scope=253)])
    with pytest.raises(ValueError, match="unknown type"):
        rt.set_routes("blocks", [Route(N("10.65.0.0/26"), protocol=80, type="bogus")])
    with pytest.raises(ValueError, match="invalid interface name"):
        rt.set_iface_routes("x" * 16, [N("10.65.0.2/32")])
    rt.apply()
    assert routes(ns) == WANT | {KERNEL}


def test_two_owners_of_one_key(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    rt.set_routes("z-blocks", [blackhole("10.65.0.2/32")])
    rt.set_iface_routes("calia", [N("10.65.0.2/32")])
    rt.apply()
    assert routes(ns) == {"10.65.0.2 dev calia proto 80 scope link", KERNEL}  # the interface route wins
    rt.set_iface_routes("calia", [])
    rt.apply()
    assert routes(ns) == {"blackhole 10.65.0.2 proto 80", KERNEL}  # the other claim takes over
    rt.set_routes("z-blocks", [])
    rt.apply()
    assert routes(ns) == {KERNEL}


@pytest.mark.skipif(not os.path.isdir("/proc/sys/net/ipv6"), reason="kernel without IPv6")
def test_ipv6_table_keeps_kernel_link_local_routes(ns: str, nl: Netlink) -> None:
    ip(ns, "-6", "route", "add", "fd00:99::/64", "dev", "ext0", "proto", "static")
    rt = RouteTable(nl, family=socket.AF_INET6, removals_allowed=True)
    rt.set_iface_routes("calia", [ipaddress.IPv6Network("fd00::2/128")])
    with Monitor([RTNLGRP_IPV6_ROUTE], netns=f"/run/netns/{ns}") as mon:
        stats = rt.apply()
        deleted = [e for e in mon.read_events() if isinstance(e, RouteEvent) and e.deleted]
    assert (stats.adds, stats.dels, stats.errors) == (1, 0, 0)
    assert deleted == []
    v6 = {line.strip() for line in ip(ns, "-6", "route", "show").splitlines()}
    assert "fd00::2 dev calia proto 80 metric 1024 pref medium" in v6
    # IPv6 routes get metric 1024 from the kernel; the driver expects that, so nothing churns.
    with Monitor([RTNLGRP_IPV6_ROUTE], netns=f"/run/netns/{ns}") as mon:
        rt.queue_resync()
        stats = rt.apply()
        assert [e for e in mon.read_events() if isinstance(e, RouteEvent)] == []
    assert (stats.adds, stats.dels) == (0, 0)
    assert any(line.startswith("fe80::/64 dev calia") for line in v6)
    assert any(line.startswith("fd00:99::/64 dev ext0") for line in v6)


def test_iface_changed_reprograms_without_a_resync(ns: str, nl: Netlink) -> None:
    rt = RouteTable(nl, removals_allowed=True)
    rt.set_iface_routes("calia", [N("10.65.0.2/32")])
    rt.apply()
    ip(ns, "link", "del", "calia")
    add_veth(ns, "calia")
    rt.iface_changed("calia")  # what the agent's link monitor reports
    stats = rt.apply()
    assert (stats.adds, stats.resynced) == (1, False)
    assert "10.65.0.2 dev calia proto 80 scope link" in routes(ns)
    # Deleted by hand: the routes become pending until the link is back.
    ip(ns, "link", "del", "calia")
    rt.iface_changed("calia")
    stats = rt.apply()
    assert stats.pending == 1 and "does not exist" in rt.iface_problem("calia")
