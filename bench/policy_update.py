"""Policy update latency: one change on top of the 1,000-endpoint state, calculator to kernel, vs ``nft -f``.

The namespace first gets the full state of :mod:`bench.policy_sync` (10,000 endpoints, 1,000 local, one
3-rule policy each, 100 IP sets of 100) through the agent path, untimed. Then 200 changes, one at a time,
each to a different pod, rotating three kinds:

- ``port``: pod k's policy changes its first rule's port (8080 -> 8081): one policy chain is rewritten;
- ``move``: pod k's endpoint gets ``app=pod-<m>``, which moves it from its own policy to pod m's: its
  ingress endpoint chain is rewritten and its old policy (now selecting nothing) is deleted;
- ``group``: pod k's endpoint changes ``grp``: its address moves from one IP set to another.

Each change is timed from the calculator input (``set_policy`` / ``set_endpoint``) through ``flush()``,
``PolicyManager.on_update`` + ``complete_deferred_work()`` to ``NftTable.apply()`` returning, and is
checked to have sent exactly one transaction. **Reference**: after each ``port`` change, the batch our driver
just sent (``flush chain`` + the chain's 3 ``add rule`` lines: the single-chain replacement) is loaded again
with ``nft -f`` in the same namespace (idempotent; process spawn included). Reported: p50 / p99 overall and
per kind; the last line is one JSON object with ratio = p50 / 5 ms (the goal).

Run as root from the repo: ``python -m bench.policy_update [--changes N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.policy_sync import (
    PROFILE,
    Endpoint,
    agent_sync,
    build_workload,
    make_labels,
    make_policy,
    nft_file,
    ns_path,
    sh,
)
from felixpy.calc.policy import PolicyCalculator
from felixpy.dataplane.shims.nft import Nft

GOAL_MS = 5.0
KINDS = ("port", "move", "group")


class RecordingNft(Nft):
    """An :class:`Nft` that keeps the text of every batch it runs (to replay one as the reference)."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.batches: list[str] = []

    def run(self, commands: str, *, dry_run: bool = False) -> None:
        if not dry_run:
            self.batches.append(commands)
        super().run(commands, dry_run=dry_run)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def set_ep(calc: PolicyCalculator, ep: Endpoint, labels: dict[str, str]) -> None:
    calc.set_endpoint(ep.ep_id, local=ep.local, iface=ep.iface, labels=labels, profiles=(PROFILE,), addrs=(ep.addr,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--local", type=int, default=1_000)
    ap.add_argument("--total", type=int, default=10_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    if args.changes > args.local:
        raise SystemExit("--changes must not exceed --local (each change touches its own pod)")
    wl = build_workload(args.local, args.total)
    ns = f"fxpupd{os.getpid()}"
    made = False
    ours: dict[str, list[float]] = {k: [] for k in KINDS}
    parts: dict[str, list[float]] = {"calc": [], "mgr": [], "apply": []}
    refs: list[float] = []
    try:
        sh("ip", "netns", "add", ns)
        made = True
        nft = RecordingNft(ns_path(ns))
        sync = agent_sync(ns, wl, nft)
        calc, mgr, table = sync.calc, sync.mgr, sync.table
        print(f"initial sync: {sync.total_s * 1000:.0f} ms; {args.changes} changes follow", file=sys.stderr)
        # Visit pods spread over the table; 7 is coprime with 1,000 so no pod is touched twice.
        step = 7 if args.local % 7 else 11
        hub = args.local - 1  # the "move" target, never changed itself
        with tempfile.NamedTemporaryFile("w", prefix="fxbench-", suffix=".nft", delete=False) as f:
            ref_path = f.name
        try:
            for j in range(args.changes):
                k = (j * step) % args.local
                if k == hub:
                    k = (k + 1) % args.local
                kind = KINDS[j % len(KINDS)]
                ep = wl.endpoints[k]
                before = len(nft.batches)
                t0 = time.perf_counter()
                if kind == "port":
                    pol = make_policy(k, port=8081)
                    calc.set_policy(pol.key, pol)
                elif kind == "move":
                    set_ep(calc, ep, make_labels(k, app=f"pod-{hub}"))
                else:
                    set_ep(calc, ep, make_labels(k, grp=k + 1))
                msgs = calc.flush()
                t1 = time.perf_counter()
                for m in msgs:
                    mgr.on_update(m)
                mgr.complete_deferred_work()
                t2 = time.perf_counter()
                stats = table.apply()
                t3 = time.perf_counter()
                if stats.failed or mgr.errors or stats.transactions != 1 or len(nft.batches) != before + 1:
                    raise SystemExit(f"change {j} ({kind}) not applied as one transaction: "
                                     f"{stats.failed or mgr.errors or stats}")
                ours[kind].append(t3 - t0)
                parts["calc"].append(t1 - t0)
                parts["mgr"].append(t2 - t1)
                parts["apply"].append(t3 - t2)
                if kind == "port":
                    batch = nft.batches[-1]
                    lines = batch.strip().splitlines()
                    if not (lines[0].startswith("flush chain ") and len(lines) == 4):
                        raise SystemExit(f"unexpected batch for a port change:\n{batch}")
                    with open(ref_path, "w") as f:
                        f.write(batch)
                    refs.append(nft_file(ns, ref_path))
                if j < len(KINDS):
                    print(f"{kind} change: {(t3 - t0) * 1000:.2f} ms, batch of {stats.commands} commands:\n  "
                          + "\n  ".join(nft.batches[-1].strip().splitlines()), file=sys.stderr)
        finally:
            os.unlink(ref_path)
        # The kernel must hold what the agent wants: the last port change's chain with port 8081.
        last = sh("ip", "netns", "exec", ns, "nft", "list", "chain", "ip", "calico",
                  f"filter-cali-pi-np/bench/pod-{(0 * step) % args.local}")
        if "dport 8081" not in last:
            raise SystemExit(f"port change not in the kernel:\n{last}")
    finally:
        if made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    every = [v for vs in ours.values() for v in vs]
    p50, p99 = pct(every, 50) * 1000, pct(every, 99) * 1000
    ref50, ref99 = pct(refs, 50) * 1000, pct(refs, 99) * 1000
    for kind in KINDS:
        vs = ours[kind]
        print(f"  {kind:5s} n={len(vs):3d}: p50 {pct(vs, 50) * 1000:.2f} ms, p99 {pct(vs, 99) * 1000:.2f} ms",
              file=sys.stderr)
    print("  median parts: " + ", ".join(f"{k} {statistics.median(v) * 1000:.2f} ms" for k, v in parts.items()),
          file=sys.stderr)
    print(f"{len(every)} changes on {args.local} local endpoints: p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
          f"nft -f of the single-chain replacement p50 {ref50:.2f} ms, p99 {ref99:.2f} ms (n={len(refs)})")
    # As bench.bgp_convergence: "goal" is the p50 bound in ms, ratio = p50 / goal (met when <= 1).
    print(json.dumps({"name": "policy_update", "value": round(p50, 3), "unit": "ms", "reference": round(ref50, 3),
                      "ratio": round(p50 / GOAL_MS, 3), "goal": GOAL_MS, "p99_ms": round(p99, 3),
                      "ref_p99_ms": round(ref99, 3), "changes": len(every)}))


if __name__ == "__main__":
    main()
