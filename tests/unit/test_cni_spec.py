"""CNI request parsing and result formatting (pure)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from cni_plugin import spec
from cni_plugin.spec import CniError

CONF = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico", "nodename": "n1", "mtu": 1450,
        "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
        "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}, "datastore_type": "kubernetes"}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0"}


def conf(**over: object) -> bytes:
    return json.dumps({**CONF, **over}).encode()


def test_parses_calicos_own_conflist_entry() -> None:
    req = spec.parse_request(ENV, conf())
    assert req.command == "ADD" and req.pod_namespace == "ns1" and req.pod_name == "web-0"
    assert req.conf.ipam.type == "calico-ipam" and req.conf.mtu == 1450 and req.conf.nodename == "n1"
    assert req.conf.kubeconfig == "/etc/cni/net.d/calico-kubeconfig" and req.conf.policy_type == "k8s"


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_accepts_supported_versions(version: str) -> None:
    assert spec.parse_request(ENV, conf(cniVersion=version)).conf.cni_version == version


@pytest.mark.parametrize(("env_over", "stdin", "code", "fragment"), [
    ({}, b"not json", spec.ERR_DECODE, "not valid JSON"),
    ({}, b"", spec.ERR_DECODE, "no network configuration"),
    ({}, b"[1,2]", spec.ERR_DECODE, "JSON object"),
    ({}, json.dumps({**CONF, "cniVersion": "9.9.9"}).encode(), spec.ERR_INCOMPATIBLE_VERSION, "incompatible"),
    ({}, json.dumps({k: v for k, v in CONF.items() if k != "name"}).encode(), spec.ERR_INVALID_CONFIG, "'name'"),
    ({}, json.dumps({**CONF, "mtu": -5}).encode(), spec.ERR_INVALID_CONFIG, "mtu"),
    ({"CNI_COMMAND": "FROB"}, None, spec.ERR_INVALID_ENV, "unknown CNI_COMMAND"),
    ({"CNI_COMMAND": ""}, None, spec.ERR_INVALID_ENV, "CNI_COMMAND"),
    ({"CNI_IFNAME": ""}, None, spec.ERR_INVALID_ENV, "CNI_IFNAME"),
    ({"CNI_NETNS": ""}, None, spec.ERR_INVALID_ENV, "CNI_NETNS"),
    ({"CNI_ARGS": "K8S_POD_NAME"}, None, spec.ERR_INVALID_ENV, "CNI_ARGS"),
])
def test_bad_requests_get_the_spec_error_code(env_over: dict[str, str], stdin: bytes | None, code: int,
                                              fragment: str) -> None:
    with pytest.raises(CniError) as ei:
        spec.parse_request({**ENV, **env_over}, conf() if stdin is None else stdin)
    assert ei.value.code == code
    assert fragment in ei.value.msg + ei.value.details


def test_del_does_not_need_a_netns() -> None:
    req = spec.parse_request({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, conf())
    assert req.command == "DEL" and req.netns == ""


def test_check_needs_040_or_later() -> None:
    with pytest.raises(CniError):
        spec.parse_request({**ENV, "CNI_COMMAND": "CHECK"}, conf(cniVersion="0.3.1"))


def test_version_needs_no_config() -> None:
    req = spec.parse_request({"CNI_COMMAND": "VERSION"}, b"")
    assert req.command == "VERSION"
    assert "1.0.0" in spec.version_response()["supportedVersions"]


def _result() -> spec.Result:
    return spec.Result(
        interfaces=(spec.Interface("cali123", "ee:ee:ee:ee:ee:ee"),
                    spec.Interface("eth0", "02:00:00:00:00:01", sandbox="/run/netns/x", mtu=1450)),
        ips=(spec.IPConfig(ipaddress.IPv4Interface("10.0.0.5/32"), interface=1),),
        routes=({"dst": "0.0.0.0/0"},))


def test_result_formats_per_version() -> None:
    r1 = spec.format_result(_result(), "1.0.0")
    assert r1["ips"] == [{"address": "10.0.0.5/32", "interface": 1}]
    assert r1["interfaces"][1] == {"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1450,
                                   "sandbox": "/run/netns/x"}
    r031 = spec.format_result(_result(), "0.3.1")
    assert r031["ips"][0]["version"] == "4" and "mtu" not in r031["interfaces"][1]
    r020 = spec.format_result(_result(), "0.2.0")
    assert r020["ip4"]["ip"] == "10.0.0.5/32" and "ips" not in r020
    assert [str(i) for i in spec.parse_result_ips(r1)] == ["10.0.0.5/32"]
    assert [str(i) for i in spec.parse_result_ips(r020)] == ["10.0.0.5/32"]


def test_error_format_keeps_requested_version() -> None:
    err = spec.format_error(CniError(7, "bad"), spec.requested_version(conf(cniVersion="0.4.0")))
    assert err == {"cniVersion": "0.4.0", "code": 7, "msg": "bad"}
    assert spec.requested_version(b"garbage") == "1.0.0"
