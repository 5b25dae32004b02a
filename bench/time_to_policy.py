"""Time to policy: a new pod's CNI ADD until its endpoint chains, with every policy jump, are in the kernel.

Setup: a real etcd; through felixpy's datastore API, the namespace profile ``kns.fxbench`` (as
kube-controllers would write it, with ``pcns.projectcalico.org/name`` to apply) and 200 Calico
NetworkPolicies in namespace ``fxbench``, each with 3 ingress and 2 egress rules (rule selectors become IP
sets, one of them holding every pod). Then the agent (``tests.e2e.harness.Agent``) with
``FELIXPY_POLICY=enabled``, and 110 pods added one by one through the real CNI executable, each in a
fresh netns made outside the timed region.

Labels: in etcd mode a WorkloadEndpoint's labels come from the CNI request, which only yields
``projectcalico.org/namespace`` and ``projectcalico.org/orchestrator`` (plus the profile's
``pcns.*``), so every pod carries the same labels. Half of the policies select on those (four selector
forms, one inherited from the profile) and match every pod; the other half select on labels no pod has.
Each pod therefore gets 100 ingress + 100 egress policy jumps and the profile's, and the first pod
activates the 100 matching policies (200 chains).

Per pod: t0 just before the ADD exec; when ADD returns, ``nft -j list chain`` of ``filter-cali-tw-<iface>``
and ``filter-cali-fw-<iface>`` must hold every expected jump (ADD waits for the dataplane apply, so it
should); if not, they are polled and the time they are complete counts instead.

Reference, same run and machine: the same 110 ADDs with policy disabled (plain ADD latency), after one
untimed warm-up ADD that claims the IPAM block; those pods are DELeted before the policy agent starts (the
policy run's pods are not: their netns, the agent and etcd are simply removed). Progress goes to stderr.
Goal: p99 <= 100 ms; value = our p99, ratio = p99 / 100.

Everything runs in a private network namespace (re-exec through ``ip netns exec``) so the agent's
``cali*`` links and its nft table ``ip calico`` never meet another agent on this host; the namespace is
deleted at the end. Run as root from the repo: ``python -m bench.time_to_policy [--pods 110]``; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from felixpy.dataplane.policy_render import endpoint_chain_name, policy_chain_name, profile_chain_name
from felixpy.datastore.api import KIND_NETWORK_POLICY, KIND_PROFILE, Backend, Key, new_resource
from felixpy.model.policy import EGRESS, INGRESS, KIND_NP, PolicyKey
from tests.e2e.harness import Agent, DatastoreEnv, calico_conf, install_plugin
from tests.realparts.etcd import EtcdServer

POD_NS = "fxbench"
PROFILE = f"kns.{POD_NS}"
POOL = "10.250.0.0/16"
NODE = "bench-node"
ISOLATED_ENV = "FXBENCH_NODE_NETNS"
GOAL_MS = 100.0

# Selectors every pod matches (labels the CNI request gives, one inherited from the profile) and ones no
# pod matches; policy i uses MATCH[i // 2 % 4] when i is even, NO_MATCH[...] when odd.
MATCH = ("projectcalico.org/orchestrator == 'k8s'", "has(projectcalico.org/namespace)",
         f"pcns.projectcalico.org/name == '{POD_NS}'", "all()")
NO_MATCH = ("app == 'web-{i}'", "role in {{'db-{i}', 'cache'}}", "has(tier-{i})", "app == 'api' && env != 'prod'")


# -- running in a private node namespace --------------------------------------------------------------
def run_isolated(module: str) -> int | None:
    """Re-run ``python -m module`` inside a fresh netns (lo + one veth with an address, like a node's
    uplink); returns its exit code, or None when already inside one."""
    if os.environ.get(ISOLATED_ENV):
        return None
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, nftables)")
    ns = f"fxbench-node-{os.getpid()}"

    def ip(*a: str) -> None:
        subprocess.run(["ip", *a], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
        ip("-n", ns, "addr", "add", "172.31.250.1/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "eth0peer", "up")
        env = {**os.environ, ISOLATED_ENV: ns}
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", module, *sys.argv[1:]],
                              env=env).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- helpers shared with bench.churn ------------------------------------------------------------------
def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def cni(plugin: Path, command: str, conf: dict[str, Any], cid: str, netns: str, pod: str,
        ns: str = POD_NS) -> dict[str, Any]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": str(plugin.parent),
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}"}
    p = subprocess.run([str(plugin)], input=json.dumps(conf).encode(), env=env, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"CNI {command} {pod} failed: {p.stdout!r} {p.stderr!r}")
    return json.loads(p.stdout) if p.stdout.strip() else {}


def host_iface(result: dict[str, Any]) -> str:
    return str(next(i["name"] for i in result["interfaces"] if not i.get("sandbox")))


def _jumps(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("jump", "goto") and isinstance(v, dict) and "target" in v:
                yield str(v["target"])
            else:
                yield from _jumps(v)
    elif isinstance(node, list):
        for v in node:
            yield from _jumps(v)


def chain_jumps(chain: str) -> set[str] | None:
    """Jump targets of ``ip calico <chain>`` in the kernel; None if the chain is not there."""
    p = subprocess.run(["nft", "-j", "list", "chain", "ip", "calico", chain], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    return set(_jumps(json.loads(p.stdout)))


def metric(agent: Agent, name: str) -> float:
    status, body = agent.http("/metrics")
    if status != 200:
        return float("nan")
    for ln in body.splitlines():
        if ln.startswith(name + " "):
            return float(ln.split()[1])
    return float("nan")


def apply_stats(agent: Agent) -> tuple[float, float]:
    return (metric(agent, "felix_int_dataplane_apply_time_seconds_count"),
            metric(agent, "felix_int_dataplane_apply_time_seconds_sum"))


def profile_resource(ns: str) -> dict[str, Any]:
    return new_resource(Key(KIND_PROFILE, f"kns.{ns}"), {
        "labelsToApply": {"pcns.projectcalico.org/name": ns},
        "ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]})


async def write_all(endpoint: str, resources: list[dict[str, Any]]) -> None:
    from felixpy.datastore.etcd import EtcdBackend

    b: Backend = await EtcdBackend.connect([endpoint])
    try:
        for r in resources:
            md = r["metadata"]
            await b.create(Key(r["kind"], md["name"], md.get("namespace", "")), r)
    finally:
        await b.close()


# -- this benchmark -----------------------------------------------------------------------------------
def policy_resources(n: int) -> tuple[list[dict[str, Any]], list[PolicyKey]]:
    """n NetworkPolicies in POD_NS; returns them and the keys of those every pod matches."""
    out: list[dict[str, Any]] = []
    matching: list[PolicyKey] = []
    for i in range(n):
        name = f"pol-{i:03d}"
        if i % 2 == 0:
            sel = MATCH[i // 2 % 4]
            matching.append(PolicyKey(KIND_NP, POD_NS, name))
        else:
            sel = NO_MATCH[i // 2 % 4].format(i=i)
        spec = {
            "order": 100 + i, "selector": sel, "types": ["Ingress", "Egress"],
            "ingress": [
                {"action": "Allow", "protocol": "TCP", "source": {"selector": "has(projectcalico.org/orchestrator)"},
                 "destination": {"ports": [8000 + i]}},
                {"action": "Allow", "protocol": "UDP", "source": {"nets": [f"10.{i % 250}.0.0/16"]},
                 "destination": {"ports": [53]}},
                {"action": "Deny", "source": {"selector": f"role == 'r{i % 10}'"}},
            ],
            "egress": [
                {"action": "Allow", "protocol": "TCP", "destination": {"nets": ["192.168.0.0/16"], "ports": [443]}},
                {"action": "Deny", "protocol": "TCP", "destination": {"ports": [25]}},
            ],
        }
        out.append(new_resource(Key(KIND_NETWORK_POLICY, name, POD_NS), spec))
    return out, matching


def expected_jumps(matching: list[PolicyKey]) -> dict[str, set[str]]:
    return {d: {policy_chain_name(k, d) for k in matching} | {profile_chain_name(PROFILE, d)}
            for d in (INGRESS, EGRESS)}


def endpoint_complete(iface: str, want: dict[str, set[str]]) -> bool:
    for d in (INGRESS, EGRESS):
        got = chain_jumps(endpoint_chain_name(iface, d))
        if got is None or not want[d] <= got:
            return False
    return True


def run_pods(agent: Agent, plugin: Path, pods: int, tag: str, want: dict[str, set[str]] | None,
             warmup: int = 0, delete: bool = True) -> tuple[list[float], list[float], int]:
    """ADD ``pods`` pods one by one (after ``warmup`` untimed ones); returns (ADD ms, ready ms, late count).
    ``delete``: DEL them through CNI afterwards (else only their netns go, and with them the veths)."""
    conf = calico_conf(agent)
    total = warmup + pods
    nss = [f"fxb-{tag}-{uuid.uuid4().hex[:6]}" for _ in range(total)]
    cids = [uuid.uuid4().hex for _ in range(total)]
    added: list[int] = []
    add_ms: list[float] = []
    ready_ms: list[float] = []
    late = 0
    try:
        for n in nss:
            subprocess.run(["ip", "netns", "add", n], check=True)
        for i, n in enumerate(nss):
            pod = f"{tag}-{i}"
            t0 = time.perf_counter()
            res = cni(plugin, "ADD", conf, cids[i], f"/run/netns/{n}", pod)
            t_add = time.perf_counter()
            added.append(i)
            if i < warmup:
                continue
            add_ms.append((t_add - t0) * 1000)
            if want is not None:
                iface = host_iface(res)
                if not endpoint_complete(iface, want):
                    late += 1
                    deadline = t_add + 10
                    while not endpoint_complete(iface, want):
                        if time.perf_counter() > deadline:
                            raise RuntimeError(f"{pod} ({iface}): endpoint chains incomplete after 10 s\n"
                                               f"{agent.log_tail()}")
                        time.sleep(0.002)
                    t_add = time.perf_counter()
            ready_ms.append((t_add - t0) * 1000)
            if len(ready_ms) % 10 == 0:
                print(f"{tag}: {len(ready_ms)} pods, last 10 ready in "
                      f"{' '.join(f'{x:.0f}' for x in ready_ms[-10:])} ms", file=sys.stderr, flush=True)
        if delete:
            for i in added:
                cni(plugin, "DEL", conf, cids[i], f"/run/netns/{nss[i]}", f"{tag}-{i}")
    finally:
        for n in nss:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
    return add_ms, ready_ms, late


def main() -> int:
    rc = run_isolated("bench.time_to_policy")
    if rc is not None:
        return rc
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--policies", type=int, default=200)
    args = ap.parse_args()
    policies, matching = policy_resources(args.policies)
    want = expected_jumps(matching)
    with tempfile.TemporaryDirectory(prefix="fxbench-") as tmp, EtcdServer() as etcd:
        work = Path(tmp)
        plugin = install_plugin(work / "bin")
        asyncio.run(write_all(etcd.endpoint, [profile_resource(POD_NS), *policies]))
        ds = DatastoreEnv("etcdv3", etcd.endpoint)

        ref_agent = Agent(ds, work / "ref", NODE, POOL, extra_env={"FELIXPY_POLICY": "disabled"})
        (work / "ref").mkdir()
        ref_agent.start()
        try:
            r0 = apply_stats(ref_agent)
            ref_add, _, _ = run_pods(ref_agent, plugin, args.pods, "ref", None, warmup=1)
            r1 = apply_stats(ref_agent)
        finally:
            ref_agent.stop()

        agent = Agent(ds, work / "pol", NODE, POOL, extra_env={"FELIXPY_POLICY": "enabled"})
        (work / "pol").mkdir()
        agent.start()
        try:
            a0 = apply_stats(agent)
            add_ms, ready_ms, late = run_pods(agent, plugin, args.pods, "pol", want, delete=False)
            a1 = apply_stats(agent)
        finally:
            agent.stop()
    applies = a1[0] - a0[0]
    mean_apply_ms = (a1[1] - a0[1]) / applies * 1000 if applies else float("nan")
    p50, p99 = statistics.median(ready_ms), pct(ready_ms, 99)
    res = {
        "name": "time_to_policy", "value": round(p99, 2), "unit": "ms",
        "reference": round(pct(ref_add, 99), 2), "ratio": round(p99 / GOAL_MS, 3), "goal": 1.0,
        "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "max_ms": round(max(ready_ms), 2),
        "first_pod_ms": round(ready_ms[0], 2),
        "add_p50_ms": round(statistics.median(add_ms), 2), "add_p99_ms": round(pct(add_ms, 99), 2),
        "ref_p50_ms": round(statistics.median(ref_add), 2), "ref_p99_ms": round(pct(ref_add, 99), 2),
        "late_pods": late, "pods": len(ready_ms), "policies": args.policies,
        "jumps_per_chain": len(matching) + 1,
        "applies": int(applies), "apply_mean_ms": round(mean_apply_ms, 2),
        "ref_apply_mean_ms": round((r1[1] - r0[1]) / (r1[0] - r0[0]) * 1000, 2) if r1[0] > r0[0] else None,
        "datastore": "etcdv3",
    }
    print(f"policy on : ready p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms (first pod {res['first_pod_ms']} ms, "
          f"{late} pods late) | mean dataplane apply {res['apply_mean_ms']} ms over {res['applies']}")
    print(f"policy off: ADD p50 {res['ref_p50_ms']} ms p99 {res['ref_p99_ms']} ms")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
