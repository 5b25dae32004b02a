"""Node address / MTU autodetection against a real netns with several interfaces (veth pairs: this
kernel has no ``dummy`` links). Each method must pick what calico-node would pick."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

from felixpy.autodetect import (
    DEFAULT_HOST_MTU,
    AutodetectError,
    detect_host_mtu,
    detect_ipv4,
    host_interfaces,
    parse_ip_setting,
)
from felixpy.dataplane.shims.netlink import Netlink

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxad{os.getpid() % 100000}{secrets.token_hex(2)}"
IF = ipaddress.IPv4Interface


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


# Created in this order, so ifindexes grow down the list; calico-node searches the highest first.
HOST = [
    ("eth0", 1400, ["169.254.5.5/16", "10.1.0.5/24"]),  # a link-local address first: skipped
    ("ens3", 1500, ["192.168.7.7/24"]),
    ("docker0", 1500, ["172.17.0.1/16"]),  # excluded by default
    ("veth9", 1500, ["172.18.0.1/16"]),  # excluded by default
    ("cali1234", 1500, ["10.244.0.1/32"]),  # excluded by default
    ("bond7", 9000, []),  # no address at all
]


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[str, Netlink]]:
    # One namespace for the whole module: every test only reads it.
    ns = f"{RUN}-host"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip(ns, "link", "set", "lo", "up")
        for i, (name, mtu, addrs) in enumerate(HOST):
            ip(ns, "link", "add", name, "mtu", str(mtu), "type", "veth", "peer", "name", f"zz{i}", "mtu", str(mtu))
            ip(ns, "link", "set", name, "up")
            ip(ns, "link", "set", f"zz{i}", "up")
            for a in addrs:
                ip(ns, "addr", "add", a, "dev", name)
        with Netlink(f"/run/netns/{ns}") as nl:
            yield ns, nl
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize(("method", "want"), [
    ("", "192.168.7.7/24"),  # first-found: ens3 has the higher ifindex of the two candidates
    ("first-found", "192.168.7.7/24"),
    ("interface=^eth.*", "10.1.0.5/24"),
    ("interface=eth.*", "172.18.0.1/16"),  # unanchored, as in Go: "veth9" matches too (and is searched first)
    ("interface=^eth0$,ens3", "192.168.7.7/24"),  # several regexes: still the highest ifindex first
    ("interface=^doc", "172.17.0.1/16"),  # an explicit include is not subject to the default skips
    ("skip-interface=ens.*", "10.1.0.5/24"),
    ("cidr=172.18.0.0/16", "172.18.0.1/16"),  # cidr= looks at every interface
    ("cidr=10.0.0.0/8", "10.244.0.1/32"),  # cali1234 has a higher ifindex than eth0
    ("cidr=10.1.0.0/16,fd00::/8", "10.1.0.5/24"),
    ("can-reach=10.1.0.99", "10.1.0.5/24"),  # the source address of the connected route
    ("can-reach=192.168.7.200", "192.168.7.7/24"),
    ("can-reach=localhost", "127.0.0.1/8"),  # a hostname, resolved like calico-node does
])
def test_methods(host: tuple[str, Netlink], method: str, want: str) -> None:
    _ns, nl = host
    assert detect_ipv4(method, nl) == IF(want)


def test_can_reach_needs_a_route(host: tuple[str, Netlink]) -> None:
    _ns, nl = host
    with pytest.raises(AutodetectError, match=r"cannot reach 8\.8\.8\.8: Network is unreachable"):
        detect_ipv4("can-reach=8.8.8.8", nl)


def test_kubernetes_internal_ip(host: tuple[str, Netlink]) -> None:
    _ns, nl = host
    # The first IPv4 InternalIP, with the prefix length of the host address.
    assert detect_ipv4("kubernetes-internal-ip", nl, k8s_internal_ips=["fd00::5", "10.1.0.5"]) == IF("10.1.0.5/24")
    assert detect_ipv4("kubernetes-internal-ip", nl, ["192.168.7.7"]) == IF("192.168.7.7/24")  # positional too
    assert detect_ipv4("kubernetes-internal-ip", nl, ["10.5.0.1/20"]) == IF("10.5.0.1/20")  # a CIDR as it is
    with pytest.raises(AutodetectError, match=r"InternalIP 10\.9\.9\.9 is not on any host interface"):
        detect_ipv4("kubernetes-internal-ip", nl, k8s_internal_ips=["10.9.9.9"])
    with pytest.raises(AutodetectError, match="the Node has no IPv4 InternalIP"):
        detect_ipv4("kubernetes-internal-ip", nl, k8s_internal_ips=["fd00::5"])
    with pytest.raises(AutodetectError, match="addresses: none"):
        detect_ipv4("kubernetes-internal-ip", nl)


def test_nothing_found_is_a_clear_error(host: tuple[str, Netlink]) -> None:
    _ns, nl = host
    with pytest.raises(AutodetectError, match="no valid host interfaces found"):
        detect_ipv4("interface=^wlan", nl)
    with pytest.raises(AutodetectError, match=r"no valid IPv4 addresses found.*bond7: no IPv4 address"):
        detect_ipv4("interface=bond", nl)
    with pytest.raises(AutodetectError, match="no valid IPv4 addresses found"):
        detect_ipv4("cidr=100.64.0.0/10", nl)
    with pytest.raises(AutodetectError, match="invalid IP autodetection method"):
        detect_ipv4("first-fount", nl)


def test_first_found_skips_link_local_and_empty(make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    ip(ns, "link", "add", "eth1", "type", "veth", "peer", "name", "peer1")
    ip(ns, "addr", "add", "169.254.9.9/16", "dev", "eth1")
    with Netlink(f"/run/netns/{ns}") as nl:
        with pytest.raises(AutodetectError, match=r"eth1: 169\.254\.9\.9/16"):
            detect_ipv4("first-found", nl)
        ip(ns, "addr", "add", "10.50.0.2/16", "dev", "eth1")
        assert detect_ipv4("first-found", nl) == IF("10.50.0.2/16")


def test_host_interfaces_order(host: tuple[str, Netlink]) -> None:
    _ns, nl = host
    names = [n for n, _ in host_interfaces(nl)]
    assert names[-1] == "lo"
    assert names.index("ens3") < names.index("eth0")  # highest ifindex first
    assert dict(host_interfaces(nl))["eth0"] == [IF("169.254.5.5/16"), IF("10.1.0.5/24")]


def test_parse_ip_setting(host: tuple[str, Netlink]) -> None:
    _ns, nl = host
    assert parse_ip_setting("10.1.0.5", nl) == IF("10.1.0.5/24")  # mask from the host interface
    assert parse_ip_setting("10.1.0.5/16", nl) == IF("10.1.0.5/16")  # a CIDR as it is
    assert parse_ip_setting("10.77.0.1", nl) == IF("10.77.0.1/32")  # not on the host: /32
    for bad in ("autodetect", "10.1.0.300", "", "fd00::1"):
        with pytest.raises(AutodetectError, match="invalid IP setting"):
            parse_ip_setting(bad, nl)


def test_host_mtu(host: tuple[str, Netlink], make_ns: Callable[[], str]) -> None:
    ns, nl = host
    assert detect_host_mtu(nl) == 1400  # eth0 and ens3 match the default pattern; the smallest wins
    assert detect_host_mtu(nl, pattern=r"^ens") == 1500
    assert detect_host_mtu(nl, pattern=r"^bond") == 9000
    assert detect_host_mtu(nl, pattern=r"^nomatch") == DEFAULT_HOST_MTU
    ip(ns, "link", "set", "zz0", "down")  # eth0 loses its carrier: not counted any more
    try:
        assert detect_host_mtu(nl) == 1500
    finally:
        ip(ns, "link", "set", "zz0", "up")
    empty = make_ns()
    with Netlink(f"/run/netns/{empty}") as nl2:
        assert detect_host_mtu(nl2) == DEFAULT_HOST_MTU
