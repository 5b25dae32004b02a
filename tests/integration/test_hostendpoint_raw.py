"""Do-not-track (raw, before conntrack) and pre-DNAT (mangle PREROUTING) host endpoint policy with real
packets, on nftables and on iptables (legacy and nft).

The whole policy pipeline runs (GlobalNetworkPolicy resources -> parse -> PolicyCalculator ->
PolicyManager -> kernel). Topology as in test_hostendpoint: a "node" namespace with ``eth0`` 10.66.0.1/24,
a "client" namespace behind it, a pod 10.65.0.2 behind ``calia``. The node listens on 22 (failsafe),
8080 and 9090; a test DNAT rule (its own nft table) sends node port 7777 to 8080, so a pre-DNAT policy
can be seen matching the port before DNAT. Conntrack entries are read with ``conntrack -L`` in the node
namespace. Each test removes its namespaces and every chain, hook, set and table it made."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.test_hostendpoint import BACKENDS, NODE_IP, POD_IP, PROFILE, Lab, gnp, hep, host_lab, sh

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
              pytest.mark.skipif(shutil.which("conntrack") is None, reason="needs the conntrack tool")]

RUN = f"fxraw{os.getpid() % 100000}{secrets.token_hex(2)}"
ALLOW_PROFILE = {"kind": "Profile", "metadata": {"name": "projectcalico-default-allow"},
                 "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}
# Untracked: 8080 denied, 9090 allowed untracked (and its replies, as Calico requires for untracked flows).
UNTRACKED = gnp("untracked", selector="role == 'node'", order=10, doNotTrack=True, applyOnForward=True,
                types=["Ingress", "Egress"],
                ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}},
                         {"action": "Allow", "protocol": "TCP", "destination": {"ports": [9090]}}],
                egress=[{"action": "Allow", "protocol": "TCP", "source": {"ports": [9090]}}])
# Untracked deny-all TCP: only the failsafe port (raw failsafe chains) gets through.
UNTRACKED_DENY_TCP = gnp("untracked-deny", selector="role == 'node'", order=20, doNotTrack=True,
                         applyOnForward=True, types=["Ingress"], ingress=[{"action": "Deny", "protocol": "TCP"}])
# Pre-DNAT: 8080 denied before DNAT, 9090 allowed (accepted even where normal policy would drop it).
PRE_DNAT = gnp("prednat", selector="role == 'node'", order=10, preDNAT=True, applyOnForward=True,
               types=["Ingress"],
               ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}},
                        {"action": "Allow", "protocol": "TCP", "destination": {"ports": [9090]}}])
PRE_DNAT_DENY_TCP = gnp("prednat-deny", selector="role == 'node'", order=20, preDNAT=True, applyOnForward=True,
                        types=["Ingress"], ingress=[{"action": "Deny", "protocol": "TCP"}])


def _dnat_7777(node: str) -> None:
    # The DNAT under test (not ours to manage: a separate nft table, gone with the namespace).
    subprocess.run(["ip", "netns", "exec", node, "nft", "-f", "-"], check=True, text=True, input=(
        "table ip fxdnat {\n chain pre {\n type nat hook prerouting priority dstnat; policy accept;\n"
        f"  tcp dport 7777 dnat to {NODE_IP}:8080\n }}\n}}\n"))


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, make_ns: Callable[[], str]) -> Iterator[Lab]:
    with host_lab(str(request.param), make_ns, node_setup=_dnat_7777, profiles=(PROFILE, ALLOW_PROFILE)) as lab:
        yield lab


def _hep_allow_all() -> dict[str, Any]:
    res = hep()
    res["spec"]["profiles"] = ["projectcalico-default-allow"]
    return res


def _tracked(lab: Lab, port: int) -> bool:
    """Does the node's conntrack table hold a TCP flow to ``port`` on the node?"""
    out = sh("ip", "netns", "exec", lab.ns["node"], "conntrack", "-L", "-p", "tcp", "--dport", str(port),
             "-d", NODE_IP)
    return f"dport={port}" in out


def _flush_conntrack(lab: Lab) -> None:
    subprocess.run(["ip", "netns", "exec", lab.ns["node"], "conntrack", "-F"], check=False, capture_output=True)


def test_untracked_policy(lab: Lab) -> None:
    for port in (22, 8080, 9090):
        lab.serve("node", port)
    lab.serve("pod", 8080)
    lab.set_hep(_hep_allow_all())
    assert lab.tcp("client", NODE_IP, 8080) and lab.tcp("client", NODE_IP, 9090)
    _flush_conntrack(lab)

    lab.set_policy(UNTRACKED)
    assert not lab.tcp("client", NODE_IP, 8080)  # denied in raw
    assert lab.tcp("client", NODE_IP, 9090)  # allowed untracked, both ways
    assert not _tracked(lab, 9090)  # ... and never entered conntrack
    assert lab.tcp("client", NODE_IP, 22)
    assert _tracked(lab, 22)  # failsafe traffic is tracked (and proves conntrack -L sees flows here)
    # The pod's traffic never meets untracked policy (it enters on calia).
    assert lab.tcp("pod", NODE_IP, 8080)
    assert lab.tcp("client", POD_IP, 8080) is False  # forwarded from eth0: the untracked Deny applies
    if lab.backend == "nft":
        drops = lab.mgr.drop_counters()
        assert drops[("default", "gnp/untracked", "ingress")][0] > 0

    # Untracked deny of all TCP: the failsafe port still passes (raw failsafe chains, replies included).
    lab.set_policy(UNTRACKED, present=False)
    lab.set_policy(UNTRACKED_DENY_TCP)
    assert not lab.tcp("client", NODE_IP, 9090)
    assert lab.tcp("client", NODE_IP, 22)
    lab.set_policy(UNTRACKED_DENY_TCP, present=False)
    assert lab.tcp("client", NODE_IP, 8080) and lab.tcp("client", NODE_IP, 9090)
    assert lab.mgr.errors == {}


def test_pre_dnat_policy(lab: Lab) -> None:
    for port in (22, 8080, 9090):
        lab.serve("node", port)
    # A host endpoint with neither policy nor profile: normal policy drops all but failsafe.
    lab.set_hep(hep())
    assert not lab.tcp("client", NODE_IP, 9090)

    lab.set_policy(PRE_DNAT)
    assert lab.tcp("client", NODE_IP, 9090)  # pre-DNAT Allow: accepted, the filter table does not re-decide
    assert not lab.tcp("client", NODE_IP, 8080)
    assert lab.tcp("client", NODE_IP, 22)  # failsafe before pre-DNAT policy

    # With normal policy allowing everything: the pre-DNAT Deny matches the port before DNAT, so 8080 is
    # closed while 7777 (DNAT to 8080) is open.
    lab.set_hep(_hep_allow_all())
    assert not lab.tcp("client", NODE_IP, 8080)
    assert lab.tcp("client", NODE_IP, 7777)
    if lab.backend == "nft":
        assert lab.mgr.drop_counters()[("default", "gnp/prednat", "ingress")][0] > 0
    # Workload traffic never meets pre-DNAT policy.
    lab.serve("pod", 8080)
    assert lab.tcp("pod", NODE_IP, 8080)

    # Pre-DNAT deny of all TCP: only failsafe passes.
    lab.set_policy(PRE_DNAT, present=False)
    lab.set_policy(PRE_DNAT_DENY_TCP)
    assert not lab.tcp("client", NODE_IP, 9090) and not lab.tcp("client", NODE_IP, 7777)
    assert lab.tcp("client", NODE_IP, 22)
    lab.set_policy(PRE_DNAT_DENY_TCP, present=False)
    assert lab.tcp("client", NODE_IP, 8080) and lab.tcp("client", NODE_IP, 9090)
    lab.set_hep(None)
    assert lab.mgr.host_endpoint_ifaces == frozenset() and lab.tcp("client", NODE_IP, 8080)
