"""CNI ADD/DEL latency: felixpy (agent + etcd-backed Calico IPAM) vs Debian's ptp + host-local.

Both plugins do the same job (veth into the pod netns, /32 address, host route) and are executed the
way a container runtime executes them: one process per call, CNI_* environment, config on stdin. Each
pod gets a fresh netns (created outside the timed region). ADDs are timed first, then DELs, for each
plugin in turn; the runs alternate so machine noise hits both sides.

    python -m bench.cni_latency [--pods 200]

Last line: one JSON object with name, value (our ADD p50 ms), unit, reference (ptp ADD p50 ms), ratio,
goal, and the DEL and p99 figures. Also reported, to tell the agent's share from the executables' own:
the agent-side mean per ADD/DEL (its felixpy_cni_request_seconds histogram) and each executable's bare
start-up cost (p50 of a VERSION call, which both answer without doing any work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.e2e.harness import Agent, DatastoreEnv, calico_conf, install_plugin, ip_forward
from tests.realparts.etcd import EtcdServer

REF_PLUGIN_DIR = Path("/usr/lib/cni")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def exec_plugin(binary: Path, command: str, conf: dict[str, Any], cid: str, netns: str, pod: str) -> float:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": f"{binary.parent}:{REF_PLUGIN_DIR}",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod}"}
    data = json.dumps(conf).encode()
    t0 = time.perf_counter()
    p = subprocess.run([str(binary)], input=data, env=env, capture_output=True)
    dt = (time.perf_counter() - t0) * 1000
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} {command} failed: {p.stdout!r} {p.stderr!r}")
    return dt


def startup_p50(binary: Path, n: int = 40) -> float:
    """p50 ms of a VERSION call: process start-up and exit, no work (both plugins answer it locally)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION"}
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([str(binary)], input=b'{"cniVersion":"1.0.0"}', env=env, capture_output=True, check=True)
        xs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(xs)


def agent_means(agent: Agent) -> dict[str, float]:
    """Mean agent-side ms per command from the agent's own histogram (sum / count)."""
    _, text = agent.http("/metrics")
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"felixpy_cni_request_seconds{suffix}{{command=\""
            if line.startswith(prefix):
                cmd = line[len(prefix):].split('"', 1)[0]
                into[cmd] = float(line.rsplit(" ", 1)[1])
    return {c: sums[c] / counts[c] * 1000 for c in sums if counts.get(c)}


def run_round(binary: Path, conf: dict[str, Any], pods: int) -> tuple[list[float], list[float]]:
    names = [f"fxbench-{uuid.uuid4().hex[:8]}" for _ in range(pods)]
    cids = [uuid.uuid4().hex for _ in range(pods)]
    for n in names:
        subprocess.run(["ip", "netns", "add", n], check=True)
    adds: list[float] = []
    dels: list[float] = []
    try:
        for i, n in enumerate(names):
            adds.append(exec_plugin(binary, "ADD", conf, cids[i], f"/run/netns/{n}", f"pod-{i}"))
        for i, n in enumerate(names):
            dels.append(exec_plugin(binary, "DEL", conf, cids[i], f"/run/netns/{n}", f"pod-{i}"))
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
    return adds, dels


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    saved_forward = ip_forward()
    ours_add: list[float] = []
    ours_del: list[float] = []
    ref_add: list[float] = []
    ref_del: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fxbench-") as tmp, EtcdServer() as etcd:
        work = Path(tmp)
        pool = "10.250.0.0/16"
        agent = Agent(DatastoreEnv("etcdv3", etcd.endpoint), work, "bench-node", pool)
        agent.start()
        try:
            plugin = install_plugin(work / "bin")
            ours_conf = calico_conf(agent)
            ref_conf = {"cniVersion": "1.0.0", "name": "bench-ref", "type": "ptp", "ipMasq": False,
                        "ipam": {"type": "host-local", "dataDir": str(work / "host-local"),
                                 "ranges": [[{"subnet": "10.249.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
            # Warm-up (first block claim, page cache) is not measured.
            run_round(plugin, ours_conf, 5)
            run_round(REF_PLUGIN_DIR / "ptp", ref_conf, 5)
            for _ in range(args.rounds):
                a, d = run_round(plugin, ours_conf, args.pods // args.rounds)
                ours_add += a
                ours_del += d
                a, d = run_round(REF_PLUGIN_DIR / "ptp", ref_conf, args.pods // args.rounds)
                ref_add += a
                ref_del += d
            agent_ms = agent_means(agent)  # includes the warm-up (first block claim): a little pessimistic
            start_ours, start_ref = startup_p50(plugin), startup_p50(REF_PLUGIN_DIR / "ptp")
        finally:
            agent.stop()
            subprocess.run(["ip", "route", "flush", "root", pool, "proto", "80"], capture_output=True)
            Path("/proc/sys/net/ipv4/ip_forward").write_text(saved_forward)
    res = {
        "name": "cni_latency",
        "value": round(statistics.median(ours_add), 2), "unit": "ms",
        "reference": round(statistics.median(ref_add), 2),
        "ratio": round(statistics.median(ours_add) / statistics.median(ref_add), 3),
        "goal": 1.0,
        "p50_ms": round(statistics.median(ours_add), 2), "ref_p50_ms": round(statistics.median(ref_add), 2),
        "p99_ms": round(pct(ours_add, 99), 2), "ref_p99_ms": round(pct(ref_add, 99), 2),
        "del_p50_ms": round(statistics.median(ours_del), 2),
        "ref_del_p50_ms": round(statistics.median(ref_del), 2),
        "del_p99_ms": round(pct(ours_del, 99), 2), "ref_del_p99_ms": round(pct(ref_del, 99), 2),
        "del_ratio": round(statistics.median(ours_del) / statistics.median(ref_del), 3),
        "agent_add_mean_ms": round(agent_ms.get("ADD", 0.0), 2),
        "agent_del_mean_ms": round(agent_ms.get("DEL", 0.0), 2),
        "startup_p50_ms": round(start_ours, 2), "ref_startup_p50_ms": round(start_ref, 2),
        "pods": len(ours_add), "datastore": "etcdv3",
    }
    print(f"felixpy  ADD p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms | DEL p50 {res['del_p50_ms']} ms "
          f"p99 {res['del_p99_ms']} ms")
    print(f"ptp+h-l  ADD p50 {res['ref_p50_ms']} ms p99 {res['ref_p99_ms']} ms | DEL p50 "
          f"{res['ref_del_p50_ms']} ms p99 {res['ref_del_p99_ms']} ms")
    print(f"agent side: ADD mean {res['agent_add_mean_ms']} ms, DEL mean {res['agent_del_mean_ms']} ms | "
          f"bare start-up p50: ours {res['startup_p50_ms']} ms, ptp {res['ref_startup_p50_ms']} ms")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
