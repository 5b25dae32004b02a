"""The pure parts of node autodetection: IP_AUTODETECTION_METHOD parsing, Go's "global unicast", MTUs."""

from __future__ import annotations

import ipaddress

import pytest

from felixpy.autodetect import (
    CAN_REACH,
    CIDR,
    DEFAULT_SKIP_INTERFACES,
    FIRST_FOUND,
    INTERFACE,
    K8S_INTERNAL_IP,
    SKIP_INTERFACE,
    AutodetectError,
    Method,
    is_global_unicast,
    parse_method,
    pod_mtu,
)

A = ipaddress.IPv4Address


@pytest.mark.parametrize(("text", "want"), [
    ("", Method(FIRST_FOUND)),
    ("first-found", Method(FIRST_FOUND)),
    ("  first-found ", Method(FIRST_FOUND)),
    ("kubernetes-internal-ip", Method(K8S_INTERNAL_IP)),
    ("interface=eth0", Method(INTERFACE, interfaces=("eth0",))),
    ("interface=eth.*, ens[0-9]+ ,^bond0$", Method(INTERFACE, interfaces=("eth.*", "ens[0-9]+", "^bond0$"))),
    ("skip-interface=docker.*,", Method(SKIP_INTERFACE, interfaces=("docker.*",))),
    ("can-reach=8.8.8.8", Method(CAN_REACH, destination="8.8.8.8")),
    ("can-reach=www.example.com", Method(CAN_REACH, destination="www.example.com")),
    ("can-reach=[10.0.0.1]", Method(CAN_REACH, destination="10.0.0.1")),
    ("cidr=10.0.0.0/8", Method(CIDR, cidrs=(ipaddress.ip_network("10.0.0.0/8"),))),
    ("cidr=192.168.1.7/24 , fd00::/64", Method(CIDR, cidrs=(ipaddress.ip_network("192.168.1.0/24"),
                                                            ipaddress.ip_network("fd00::/64")))),
])
def test_parse_valid_methods(text: str, want: Method) -> None:
    assert parse_method(text) == want


@pytest.mark.parametrize(("text", "match"), [
    ("first_found", "invalid IP autodetection method 'first_found'"),
    ("interface", "invalid IP autodetection method"),
    ("eth0", "invalid IP autodetection method"),
    ("kubernetes-internal-ip=x", "invalid IP autodetection method"),
    ("interface=", "needs at least one regex"),
    ("interface= , ", "needs at least one regex"),
    ("skip-interface=eth(", "bad regex 'eth\\('"),
    ("cidr=10.0.0.0/33", "'10.0.0.0/33' is not a CIDR"),
    ("cidr=10.0.0.0/8,bogus", "'bogus' is not a CIDR"),
    ("cidr=", "needs at least one CIDR"),
    ("can-reach=", "needs an IP or hostname"),
    ("can-reach=a b", "needs an IP or hostname"),
])
def test_parse_invalid_methods(text: str, match: str) -> None:
    with pytest.raises(AutodetectError, match=match):
        parse_method(text)


def test_invalid_type_is_a_clear_error() -> None:
    with pytest.raises(AutodetectError, match="expected a string"):
        parse_method(None)  # type: ignore[arg-type]


def test_method_round_trips_through_str() -> None:
    for text in ("first-found", "interface=eth.*,ens3", "skip-interface=br.*", "can-reach=10.0.0.1",
                 "cidr=10.0.0.0/8,192.168.0.0/16", "kubernetes-internal-ip"):
        assert str(parse_method(text)) == text
        assert parse_method(str(parse_method(text))) == parse_method(text)


def test_global_unicast_like_go() -> None:
    for good in ("10.0.0.1", "192.168.1.1", "172.16.0.1", "8.8.8.8", "100.64.0.1"):
        assert is_global_unicast(A(good)), good
    for bad in ("127.0.0.1", "169.254.1.1", "224.0.0.1", "0.0.0.0", "255.255.255.255"):
        assert not is_global_unicast(A(bad)), bad


def test_default_skip_list_matches_calico() -> None:
    import re
    skipped = ("docker0", "cbr0", "dummy0", "podman1", "virbr0", "lxcbr0", "veth1234", "lo", "br-abc", "cali1234",
               "tunl0", "flannel.1", "kube-ipvs0", "cni0", "vxlan.calico", "vxlan-v6.calico", "wireguard.cali",
               "wg-v6.cali", "nodelocaldns")
    kept = ("eth0", "ens3", "enp0s3", "bond0", "wlan0", "vxlan0", "br0")
    assert all(any(re.search(rx, n) for rx in DEFAULT_SKIP_INTERFACES) for n in skipped)
    assert not any(any(re.search(rx, n) for rx in DEFAULT_SKIP_INTERFACES) for n in kept)


def test_pod_mtu() -> None:
    assert pod_mtu(1500, vxlan=False, ipip=False) == 1500
    assert pod_mtu(1500, vxlan=True, ipip=False) == 1450
    assert pod_mtu(1500, vxlan=False, ipip=True) == 1480
    assert pod_mtu(1500, vxlan=True, ipip=True) == 1450  # the minimum over enabled encapsulations
    assert pod_mtu(9001, vxlan=False, ipip=True) == 8981
