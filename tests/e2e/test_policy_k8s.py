"""Kubernetes NetworkPolicy enforced with real packets across nodes, and the policy faults an operator meets.

Three nodes on the Kubernetes datastore with policy on (``FELIXPY_POLICY=enabled``): namespaces become
``kns.*`` profiles (allow-all), so pods talk freely until a NetworkPolicy selects one; then only what the
policy allows gets in, and deleting the policy restores the rest. Checked with ICMP across nodes.

Faults: invalid Calico policies (bad selector, bad CIDR, unknown protocol) are reported and skipped while
the valid ones keep working; a rule or chain deleted by hand is restored and a stale chain left in our
table is removed, by the agent's periodic resync (shortened here with ``FELIX_ROUTEREFRESHINTERVAL``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from felixpy import labnet
from felixpy.datastore.api import KIND_NETWORK_POLICY, Key, new_resource
from tests.e2e.multinode import Cluster, Pod
from tests.e2e.test_cli_status import http

pytestmark = [pytest.mark.root, pytest.mark.realparts, pytest.mark.timeout(600)]

CONVERGE = 60.0  # generous: CI machines are shared and a policy must cross kube-apiserver, agent and nft
REFRESH = 5  # seconds between the agents' full dataplane resyncs (drift repair) in this module


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, list[Pod]]]:
    if not os.access(labnet.KUBE_APISERVER_BINARY, os.X_OK):
        pytest.skip(f"kube-apiserver not built ({labnet.KUBE_APISERVER_BINARY})")
    env = {"FELIXPY_POLICY": "enabled", "FELIX_ROUTEREFRESHINTERVAL": str(REFRESH)}
    with Cluster(mode="vxlan", nodes=3, datastore="kubernetes", agent_env=env) as c:
        c.require_vxlan_device()
        pods = [c.add_pod(1), c.add_pod(2), c.add_pod(3)]
        assert c.wait_for(lambda: not c.failing(pods), CONVERGE, 0.5), f"{c.failing(pods)}\n{c.diagnostics()}"
        yield c, pods


def node_index(c: Cluster, name: str) -> int:
    return next(i for i in range(1, len(c.node_names) + 1) if c.node(i).name == name)


def ingress_drops(c: Cluster, node: str) -> float:
    """Sum of felixpy_policy_dropped_packets{direction="ingress"} scraped from the node's agent."""
    text = http(c, node_index(c, node), "/metrics")[1]
    total = 0.0
    for ln in text.splitlines():
        if ln.startswith("felixpy_policy_dropped_packets{") and 'direction="ingress"' in ln:
            total += float(ln.rsplit(" ", 1)[1])
    return total


def _policy(name: str, target: str, allowed_from: str) -> dict[str, object]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": labnet.K8S_NAMESPACE},
            "spec": {"podSelector": {"matchLabels": {"app": target}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": allowed_from}}}]}]}}


def test_ingress_policy_admits_only_the_selected_peer(cluster: tuple[Cluster, list[Pod]]) -> None:
    c, (a, b, other) = cluster
    kube = c.datastore.kube()
    path = f"/apis/networking.k8s.io/v1/namespaces/{labnet.K8S_NAMESPACE}/networkpolicies"
    kube.create(path, _policy("a-from-b", a.name, b.name))
    try:
        # b (node 2) still reaches a (node 1); other (node 3) no longer does; a's own egress is untouched.
        assert c.wait_for(lambda: not c.ping(other, a), CONVERGE, 0.5), c.diagnostics()
        assert c.ping(b, a), c.diagnostics()
        assert c.ping(a, other), c.diagnostics()
        assert c.ping(other, b), c.diagnostics()
        # The drops show up in a's agent's metrics, per policy (read from the kernel every few seconds).
        assert c.wait_for(lambda: ingress_drops(c, a.node) > 0, CONVERGE, 1.0), \
            http(c, node_index(c, a.node), "/metrics")[1]
    finally:
        kube.delete(f"{path}/a-from-b")
    assert c.wait_for(lambda: c.ping(other, a), CONVERGE, 0.5), c.diagnostics()


def test_default_deny_ingress_then_allow_again(cluster: tuple[Cluster, list[Pod]]) -> None:
    c, (a, b, other) = cluster
    kube = c.datastore.kube()
    path = f"/apis/networking.k8s.io/v1/namespaces/{labnet.K8S_NAMESPACE}/networkpolicies"
    kube.create(path, {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "deny-all", "namespace": labnet.K8S_NAMESPACE},
                       "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    try:
        pods = [a, b, other]
        assert c.wait_for(lambda: all(not ok for ok in c.matrix(pods).values()), CONVERGE, 0.5), c.matrix(pods)
    finally:
        kube.delete(f"{path}/deny-all")
    assert c.wait_for(lambda: not c.failing([a, b, other]), CONVERGE, 0.5), c.diagnostics()


def _put_calico_policy(c: Cluster, name: str, spec: dict[str, Any]) -> None:
    key = Key(KIND_NETWORK_POLICY, name, labnet.K8S_NAMESPACE)

    async def go(b: Any) -> None:
        await b.create(key, new_resource(key, spec))

    c.with_backend(go)


def _del_calico_policy(c: Cluster, name: str) -> None:
    async def go(b: Any) -> None:
        await b.delete(Key(KIND_NETWORK_POLICY, name, labnet.K8S_NAMESPACE))

    c.with_backend(go)


def test_invalid_policies_are_reported_and_skipped(cluster: tuple[Cluster, list[Pod]]) -> None:
    c, (a, b, other) = cluster
    valid = {"selector": f"app == '{a.name}'", "types": ["Ingress"],
             "ingress": [{"action": "Allow", "source": {"selector": f"app == '{b.name}'"}}]}
    # Each of these would isolate a pod if it were applied; skipped, it must change nothing.
    invalid: dict[str, dict[str, Any]] = {
        "bad-selector": {"selector": "app == ", "types": ["Ingress"]},
        "bad-cidr": {"selector": f"app == '{other.name}'", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "source": {"nets": ["10.1.2.300/24"]}}]},
        "bad-protocol": {"selector": f"app == '{b.name}'", "types": ["Ingress"],
                         "ingress": [{"action": "Allow", "protocol": "FOO"}]},
    }
    names = ["valid-a-from-b", *invalid]
    try:
        for name, spec in invalid.items():
            _put_calico_policy(c, name, spec)
        _put_calico_policy(c, "valid-a-from-b", valid)
        # The valid policy is enforced on a's node...
        assert c.wait_for(lambda: not c.ping(other, a), CONVERGE, 0.5), c.diagnostics()
        assert c.ping(b, a), c.diagnostics()
        # ...and the invalid ones isolate nobody.
        for src, dst in ((a, b), (a, other), (b, other), (other, b)):
            assert c.ping(src, dst), f"{src.name} -> {dst.name}\n{c.diagnostics()}"
        # Every agent reports each invalid policy by name, and keeps serving (it answered the pings above).
        for node in (1, 2, 3):
            logs = c.agent_log(node, 200_000)
            for name in invalid:
                assert name in logs and ("skipping" in logs or "invalid" in logs), \
                    f"node {node} did not report {name}:\n{logs[-3000:]}"
    finally:
        for name in names:
            _del_calico_policy(c, name)
    assert c.wait_for(lambda: c.ping(other, a), CONVERGE, 0.5), c.diagnostics()


def _nft(c: Cluster, node: int, *args: str) -> str:
    return labnet.ns_run(c.node(node).netns, "nft", *args)


def _chains(c: Cluster, node: int) -> dict[str, list[dict[str, Any]]]:
    """Chain name -> its rules, from ``nft -j list table ip calico`` in the node's netns."""
    out: dict[str, list[dict[str, Any]]] = {}
    for item in json.loads(_nft(c, node, "-j", "list", "table", "ip", "calico"))["nftables"]:
        if "chain" in item:
            out.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            out.setdefault(item["rule"]["chain"], []).append(item["rule"])
    return out


def test_hand_edited_rules_are_restored_and_stale_chains_removed(cluster: tuple[Cluster, list[Pod]]) -> None:
    c, (a, b, other) = cluster
    kube = c.datastore.kube()
    path = f"/apis/networking.k8s.io/v1/namespaces/{labnet.K8S_NAMESPACE}/networkpolicies"
    kube.create(path, _policy("a-from-b-drift", a.name, b.name))
    try:
        assert c.wait_for(lambda: not c.ping(other, a), CONVERGE, 0.5), c.diagnostics()
        before = _chains(c, 1)
        pol = [n for n, rules in before.items() if "cali-pi-" in n and rules]
        assert pol, f"no ingress policy chain with rules on node 1:\n{c.ruleset(1)}"
        ep = [n for n, rules in before.items() if "cali-tw-" in n and rules]
        assert ep, f"no to-workload endpoint chain on node 1:\n{c.ruleset(1)}"

        # An operator (or another tool) flushes the policy chain: a's only allow rule is gone, b is cut off...
        _nft(c, 1, "flush", "chain", "ip", "calico", pol[0])
        # ...deletes one rule of the endpoint chain, and leaves a chain of ours from an "earlier run".
        _nft(c, 1, "delete", "rule", "ip", "calico", ep[0], "handle", str(before[ep[0]][-1]["handle"]))
        _nft(c, 1, "add", "chain", "ip", "calico", "filter-cali-pi-stale0000")
        _nft(c, 1, "add", "rule", "ip", "calico", "filter-cali-pi-stale0000", "drop")

        def repaired() -> bool:
            now = _chains(c, 1)
            return ("filter-cali-pi-stale0000" not in now
                    and all(len(now.get(n, [])) == len(before[n]) for n in (pol[0], ep[0])))

        assert c.wait_for(repaired, CONVERGE, 0.5), f"not repaired:\n{c.ruleset(1)}"
        assert c.ping(b, a), c.diagnostics()  # the restored allow rule admits b again
        assert not c.ping(other, a), c.diagnostics()  # and the policy still isolates a from the rest
    finally:
        kube.delete(f"{path}/a-from-b-drift")
    assert c.wait_for(lambda: c.ping(other, a), CONVERGE, 0.5), c.diagnostics()
