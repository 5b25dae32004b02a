"""Endpoint churn: 100 WorkloadEndpoint label changes per second, each datastore write until the kernel has it.

Setup (real etcd, the agent from ``tests.e2e.harness`` with ``FELIXPY_POLICY=enabled``): the profile
``kns.fxchurn`` and 50 NetworkPolicies ``pol-NN`` in namespace ``fxchurn``, policy N selecting
``grp == 'gNN'`` with 2 ingress rules (one allows from the next group: an IP set whose members move with
the churn) and 2 egress rules; then 100 pods added through the real CNI executable and given
``grp = g(i % 50)`` by writing their WorkloadEndpoints, and the bench waits until every endpoint chain
jumps to its group's policy.

Churn: for ``--seconds`` (20), open loop at ``--rate`` (100/s): update i rewrites endpoint ``i % 100``'s
WorkloadEndpoint with a new ``grp`` label (always a different group) through felixpy's etcd backend, one
unconditional write. t0 is just before the write. ``nft monitor rules`` (line-buffered, read by a thread
that stamps each line) reports the kernel side: the update is done when ``filter-cali-tw-<iface>`` gets
a rule jumping to the new group's ``filter-cali-pi-`` chain (the agent flushes and refills a changed
chain, in the same transaction as the ``fw`` chain). A later update of the same endpoint that lands first
completes the earlier ones too. Also reported: the agent's own ``felix_int_dataplane_apply_time_seconds``
(count and sum from /metrics, over the churn window).

Goal: the full rate sustained with p99 <= 200 ms; value = p99 ms, ratio = p99 / 200, reference = the
achieved write rate (updates/s). Runs in a private network namespace like bench.time_to_policy.
Run as root from the repo: ``python -m bench.churn [--rate 100] [--seconds 20]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.time_to_policy import (
    apply_stats,
    chain_jumps,
    cni,
    host_iface,
    pct,
    profile_resource,
    run_isolated,
    write_all,
)
from felixpy.dataplane.policy_render import endpoint_chain_name, policy_chain_name
from felixpy.datastore.api import KIND_NETWORK_POLICY, KIND_WEP, Backend, Key, KVPair, ListOptions, new_resource
from felixpy.model.policy import INGRESS, KIND_NP, PolicyKey
from tests.e2e.harness import Agent, DatastoreEnv, calico_conf, install_plugin
from tests.realparts.etcd import EtcdServer

NS = "fxchurn"
POOL = "10.251.0.0/16"
NODE = "churn-node"
GOAL_MS = 200.0


def pol_name(g: int) -> str:
    return f"pol-{g:02d}"


def target(g: int) -> str:
    return policy_chain_name(PolicyKey(KIND_NP, NS, pol_name(g)), INGRESS)


def policy_resources(groups: int) -> list[dict[str, Any]]:
    out = []
    for g in range(groups):
        spec = {
            "order": 100 + g, "selector": f"grp == 'g{g:02d}'", "types": ["Ingress", "Egress"],
            "ingress": [
                {"action": "Allow", "protocol": "TCP", "source": {"selector": f"grp == 'g{(g + 1) % groups:02d}'"},
                 "destination": {"ports": [8000 + g]}},
                {"action": "Allow", "protocol": "UDP", "source": {"nets": ["10.0.0.0/8"]},
                 "destination": {"ports": [53]}},
            ],
            "egress": [
                {"action": "Allow", "protocol": "TCP", "destination": {"nets": ["192.168.0.0/16"], "ports": [443]}},
                {"action": "Deny", "protocol": "TCP", "destination": {"ports": [25]}},
            ],
        }
        out.append(new_resource(Key(KIND_NETWORK_POLICY, pol_name(g), NS), spec))
    return out


@dataclass
class Pending:
    idx: int
    target: str
    t0: float


@dataclass
class Tracker:
    """Updates in flight by interface, completed by the monitor thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[str, list[Pending]] = field(default_factory=dict)
    done: dict[int, float] = field(default_factory=dict)  # update index -> ms
    lines: int = 0

    def expect(self, iface: str, p: Pending) -> None:
        with self.lock:
            self.pending.setdefault(iface, []).append(p)

    def on_line(self, line: str, now: float) -> None:
        # "add rule ip calico filter-cali-tw-<iface> ... jump <chain>"
        self.lines += 1
        if not line.startswith("add rule ip calico filter-cali-tw-"):
            return
        parts = line.split()
        if "jump" not in parts[:-1]:
            return
        iface = parts[4][len("filter-cali-tw-"):]
        jumped = parts[parts.index("jump") + 1].strip('"')
        with self.lock:
            lst = self.pending.get(iface)
            if not lst:
                return
            hit = next((k for k in range(len(lst) - 1, -1, -1) if lst[k].target == jumped), None)
            if hit is None:
                return
            for p in lst[:hit + 1]:
                self.done[p.idx] = (now - p.t0) * 1000
            del lst[:hit + 1]

    def outstanding(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.pending.values())


def monitor(tr: Tracker, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        tr.on_line(line, time.perf_counter())


async def churn(endpoint: str, weps: list[KVPair], ifaces: list[str], groups: int, rate: float,
                seconds: float, tr: Tracker, initial: list[int]) -> tuple[float, int, list[float]]:
    """Open-loop writer; returns (achieved rate, writes, write call ms)."""
    from felixpy.datastore.etcd import EtcdBackend

    b: Backend = await EtcdBackend.connect([endpoint])
    cur = list(initial)
    write_ms: list[float] = []
    errors = 0

    async def one(i: int, kv: KVPair) -> None:
        nonlocal errors
        t = time.perf_counter()
        try:
            await b.update(kv)
        except Exception as e:  # counted and reported; the churn goes on
            errors += 1
            print(f"write {i} failed: {e}", file=sys.stderr)
        write_ms.append((time.perf_counter() - t) * 1000)

    n = int(rate * seconds)
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    try:
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            e = i % len(weps)
            g = (cur[e] + 1 + (i // len(weps)) % (groups - 1)) % groups  # never the current group
            cur[e] = g
            kv = weps[e]
            md = kv.value["metadata"]
            value = {**kv.value, "metadata": {**md, "labels": {**(md.get("labels") or {}), "grp": f"g{g:02d}"}}}
            t0 = time.perf_counter()
            tr.expect(ifaces[e], Pending(i, target(g), t0))
            tasks.append(asyncio.create_task(one(i, KVPair(kv.key, value))))
        last = time.perf_counter()
        await asyncio.gather(*tasks)
    finally:
        await b.close()
    achieved = (n - 1) / (last - start) if n > 1 else 0.0
    return achieved, n - errors, write_ms


async def set_initial(endpoint: str, groups: int) -> tuple[list[KVPair], list[str], list[int]]:
    """Give every endpoint grp = g(i % groups); returns the endpoints (as written), ifaces and groups."""
    from felixpy.datastore.etcd import EtcdBackend

    b: Backend = await EtcdBackend.connect([endpoint])
    try:
        items = sorted((await b.list(KIND_WEP, ListOptions(namespace=NS))).items,
                       key=lambda kv: int(kv.value["spec"]["pod"].rsplit("-", 1)[1]))
        out: list[KVPair] = []
        for i, kv in enumerate(items):
            md = kv.value["metadata"]
            labels = {**(md.get("labels") or {}), "grp": f"g{i % groups:02d}"}
            kv.value = {**kv.value, "metadata": {**md, "labels": labels}}
            out.append(await b.update(kv))
        return out, [str(kv.value["spec"]["interfaceName"]) for kv in out], [i % groups for i in range(len(out))]
    finally:
        await b.close()


def main() -> int:
    rc = run_isolated("bench.churn")
    if rc is not None:
        return rc
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    tr = Tracker()
    mon: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="fxbench-") as tmp, EtcdServer() as etcd:
        work = Path(tmp)
        plugin = install_plugin(work / "bin")
        asyncio.run(write_all(etcd.endpoint, [profile_resource(NS), *policy_resources(args.groups)]))
        agent = Agent(DatastoreEnv("etcdv3", etcd.endpoint), work, NODE, POOL,
                      extra_env={"FELIXPY_POLICY": "enabled"})
        agent.start()
        conf = calico_conf(agent)
        nss = [f"fxc-{uuid.uuid4().hex[:8]}" for _ in range(args.endpoints)]
        cids = [uuid.uuid4().hex for _ in range(args.endpoints)]
        added: list[int] = []
        try:
            for n in nss:
                subprocess.run(["ip", "netns", "add", n], check=True)
            for i, n in enumerate(nss):
                host_iface(cni(plugin, "ADD", conf, cids[i], f"/run/netns/{n}", f"churn-{i}", ns=NS))
                added.append(i)
            weps, ifaces, initial = asyncio.run(set_initial(etcd.endpoint, args.groups))
            deadline = time.monotonic() + 30
            for iface, g in zip(ifaces, initial, strict=True):
                while target(g) not in (chain_jumps(endpoint_chain_name(iface, INGRESS)) or set()):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{iface}: initial policy not programmed\n{agent.log_tail()}")
                    time.sleep(0.05)
            mon = subprocess.Popen(["stdbuf", "-oL", "nft", "monitor", "rules"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=monitor, args=(tr, mon), daemon=True).start()
            time.sleep(0.5)  # let the monitor subscribe
            a0 = apply_stats(agent)
            achieved, writes, write_ms = asyncio.run(churn(etcd.endpoint, weps, ifaces, args.groups, args.rate,
                                                           args.seconds, tr, initial))
            drain = time.monotonic() + 5
            while tr.outstanding() and time.monotonic() < drain:
                time.sleep(0.05)
            a1 = apply_stats(agent)
            if agent.proc is None or agent.proc.poll() is not None:
                raise RuntimeError(f"agent died during the churn\n{agent.log_tail()}")
        finally:
            if mon is not None:
                mon.terminate()
                mon.wait(5)
            # No DELs: the agent, etcd and the node netns all go; deleting a pod netns removes its veth.
            agent.stop()
            for n in nss:
                subprocess.run(["ip", "netns", "del", n], capture_output=True)
    lat = list(tr.done.values())
    missed = int(args.rate * args.seconds) - len(lat)
    if not lat:
        raise SystemExit("no update reached the kernel")
    applies = a1[0] - a0[0]
    p99 = pct(lat, 99)
    res = {
        "name": "churn", "value": round(p99, 2), "unit": "ms", "reference": round(achieved, 1),
        "ratio": round(p99 / GOAL_MS, 3), "goal": 1.0,
        "p50_ms": round(statistics.median(lat), 2), "p90_ms": round(pct(lat, 90), 2), "p99_ms": round(p99, 2),
        "max_ms": round(max(lat), 2), "target_rate": args.rate, "achieved_rate": round(achieved, 1),
        "updates": writes, "seen_in_kernel": len(lat), "missed": missed,
        "write_p50_ms": round(statistics.median(write_ms), 2), "write_p99_ms": round(pct(write_ms, 99), 2),
        "applies": int(applies), "applies_per_s": round(applies / args.seconds, 1),
        "apply_mean_ms": round((a1[1] - a0[1]) / applies * 1000, 2) if applies else None,
        "endpoints": args.endpoints, "policies": args.groups, "monitor_lines": tr.lines,
    }
    print(f"churn {res['achieved_rate']}/s for {args.seconds:g} s: write->kernel p50 {res['p50_ms']} ms "
          f"p99 {res['p99_ms']} ms max {res['max_ms']} ms, {missed} missed | agent {res['applies']} applies, "
          f"mean {res['apply_mean_ms']} ms")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
