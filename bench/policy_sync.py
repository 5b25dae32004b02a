"""Policy full sync: 1,000 local endpoints x 3 policy rules + 100 IP sets of 100 members, agent path vs ``nft -f``.

Workload (built as parsed model objects before the clock starts):

- 10,000 endpoints in namespace ``bench``: 1,000 local (``cali<11 hex>`` interfaces, which need not exist
  for nft) and 9,000 remote; each has ``app=pod-<i>`` and ``grp=g<i % 100>``, so each group holds 100.
- one namespaced NetworkPolicy per local endpoint (selector ``app == "pod-<i>"``), ingress only, 3 rules:
  allow TCP 8080 from ``grp == "g<i % 100>"`` (one of 100 IP sets of 100 addresses), allow TCP
  9090-9099 from 192.168.0.0/16, deny;
- every endpoint names the profile ``kns.bench`` (allow in, allow out).

Each run makes a fresh network namespace. **Ours** is the agent's path: a fresh ``PolicyCalculator``
(every endpoint, policy and profile set, then ``flush()``), a fresh ``PolicyManager`` over
``NftTable(Nft(netns))`` (``on_update`` for every message, ``complete_deferred_work()``) and its first
``apply()``; the clock runs from the first calculator input to ``apply()`` returning, and the apply is
also timed alone. The table is then dumped (``nft list table ip calico``), deleted, and the **reference**
is ``nft -f <dump>`` of that same ruleset in the same namespace (process spawn included, as for any shell
out). The reloaded table is checked against the dump. Reported: medians; the last line is one JSON object.

Run as root from the repo: ``python -m bench.policy_sync [--runs K] [--local N] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import ipaddress
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from felixpy.calc.policy import PolicyCalculator
from felixpy.dataplane.drivers.nftables import NftApplyStats, NftTable
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.shims.netns import in_netns
from felixpy.dataplane.shims.nft import Nft
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    DEFAULT_TIER,
    INGRESS,
    KIND_NP,
    LABEL_NAMESPACE,
    EntityMatch,
    Policy,
    PolicyKey,
    PortRange,
    Profile,
    Rule,
)

NAMESPACE = "bench"
PROFILE = f"kns.{NAMESPACE}"
GROUPS = 100
TABLE = "ip calico"


@dataclass(frozen=True)
class Endpoint:
    ep_id: str
    local: bool
    iface: str
    labels: dict[str, str]
    addr: ipaddress.IPv4Network


@dataclass
class Workload:
    endpoints: list[Endpoint]
    policies: list[Policy]
    profile: Profile


def iface_name(i: int) -> str:
    return f"cali{i:011x}"


def pod_selector(app: str) -> str:
    return f'{LABEL_NAMESPACE} == "{NAMESPACE}" && app == "{app}"'


def make_policy(i: int, port: int = 8080) -> Policy:
    """Pod i's policy: 3 ingress rules, the first one using the IP set of group i % 100."""
    rules = (
        Rule(ACTION_ALLOW, protocol="TCP",
             source=EntityMatch(selector=f'{LABEL_NAMESPACE} == "{NAMESPACE}" && grp == "g{i % GROUPS:02d}"'),
             destination=EntityMatch(ports=(PortRange(port, port),))),
        Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(nets=(ipaddress.IPv4Network("192.168.0.0/16"),)),
             destination=EntityMatch(ports=(PortRange(9090, 9099),))),
        Rule(ACTION_DENY),
    )
    return Policy(key=PolicyKey(KIND_NP, NAMESPACE, f"pod-{i}"), tier=DEFAULT_TIER, order=100.0,
                  selector=pod_selector(f"pod-{i}"), types=(INGRESS,), ingress=rules)


def make_labels(i: int, app: str | None = None, grp: int | None = None) -> dict[str, str]:
    return {LABEL_NAMESPACE: NAMESPACE, "app": app or f"pod-{i}", "grp": f"g{(i if grp is None else grp) % GROUPS:02d}"}


def build_workload(local: int, total: int) -> Workload:
    eps = [Endpoint(ep_id=f"{NAMESPACE}/pod-{i}", local=i < local, iface=iface_name(i), labels=make_labels(i),
                    addr=ipaddress.IPv4Network((0x0A400000 + i, 32)))
           for i in range(total)]
    pols = [make_policy(i) for i in range(local)]
    allow = (Rule(ACTION_ALLOW),)
    return Workload(eps, pols, Profile(PROFILE, ingress=allow, egress=allow))


def feed(calc: PolicyCalculator, wl: Workload) -> None:
    calc.set_profile(wl.profile.name, wl.profile)
    for p in wl.policies:
        calc.set_policy(p.key, p)
    for ep in wl.endpoints:
        calc.set_endpoint(ep.ep_id, local=ep.local, iface=ep.iface, labels=ep.labels, profiles=(PROFILE,),
                          addrs=(ep.addr,))


def ns_path(ns: str) -> str:
    return f"/run/netns/{ns}"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def nft_file(ns: str, path: str) -> float:
    """Time ``nft -f path`` forked inside the namespace (no ``ip netns exec`` in the measurement)."""
    with in_netns(ns_path(ns)):
        t0 = time.perf_counter()
        p = subprocess.run(["nft", "-f", path], capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"nft -f {path} failed: {p.stderr.strip()[:500]}")
    return elapsed


@dataclass
class SyncResult:
    total_s: float
    calc_s: float
    mgr_s: float
    apply_s: float
    stats: NftApplyStats
    calc: PolicyCalculator
    mgr: PolicyManager
    table: NftTable


def agent_sync(ns: str, wl: Workload, nft: Nft | None = None) -> SyncResult:
    """The agent's full sync into an empty namespace; see the module docstring for what is timed."""
    table = NftTable(nft if nft is not None else Nft(ns_path(ns)), removals_allowed=True)
    t0 = time.perf_counter()
    calc = PolicyCalculator()
    feed(calc, wl)
    msgs = calc.flush()
    t1 = time.perf_counter()
    mgr = PolicyManager(table)
    for m in msgs:
        mgr.on_update(m)
    mgr.complete_deferred_work()
    t2 = time.perf_counter()
    stats = table.apply()
    t3 = time.perf_counter()
    if stats.failed or mgr.errors or stats.transactions != 1:
        raise SystemExit(f"agent sync failed: {stats.failed or mgr.errors or stats}")
    return SyncResult(t3 - t0, t1 - t0, t2 - t1, t3 - t2, stats, calc, mgr, table)


def count_ruleset(dump: str) -> tuple[int, int, int]:
    """(chains, rules, set/map elements) in an ``nft list table`` text dump, for the report."""
    chains = rules = 0
    in_chain = False
    for line in dump.splitlines():
        s = line.strip()
        if s.startswith("chain "):
            chains += 1
            in_chain = True
        elif s.startswith(("set ", "map ")):
            in_chain = False
        elif in_chain and s and s != "}" and not s.startswith(("type ", "policy ")):
            rules += 1
    elems = dump.count("10.64.") + dump.count(": goto ")
    return chains, rules, elems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--local", type=int, default=1_000, help="local endpoints (one policy each)")
    ap.add_argument("--total", type=int, default=10_000, help="endpoints cluster-wide (IP-set members)")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra agent sync and print the top")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    wl = build_workload(args.local, args.total)
    tag = f"fxpsync{os.getpid()}"
    totals: list[float] = []
    calcs: list[float] = []
    mgrs: list[float] = []
    applies: list[float] = []
    refs: list[float] = []
    libs: list[float] = []
    shape = ""
    with tempfile.TemporaryDirectory(prefix="fxbench-") as tmp:
        dump_path = os.path.join(tmp, "calico.nft")
        for run in range(args.runs + (1 if args.profile else 0)):
            profiling = args.profile and run == args.runs
            ns = f"{tag}r{run}"
            made = False
            try:
                sh("ip", "netns", "add", ns)
                made = True
                if profiling:
                    prof = cProfile.Profile()
                    prof.enable()
                    res = agent_sync(ns, wl)
                    prof.disable()
                    out = io.StringIO()
                    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
                    print(out.getvalue(), file=sys.stderr)
                    out = io.StringIO()
                    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
                    print(out.getvalue(), file=sys.stderr)
                    continue
                res = agent_sync(ns, wl)
                dump = sh("ip", "netns", "exec", ns, "nft", "list", "table", TABLE)
                with open(dump_path, "w") as f:
                    f.write(dump)
                sh("ip", "netns", "exec", ns, "nft", "delete", "table", TABLE)
                ref = nft_file(ns, dump_path)
                again = sh("ip", "netns", "exec", ns, "nft", "list", "table", TABLE)
                if again != dump:
                    raise SystemExit("the table reloaded with nft -f differs from our dump")
                # For the report only: the same text through libnftables in-process (our backend's floor).
                sh("ip", "netns", "exec", ns, "nft", "delete", "table", TABLE)
                lib_nft = Nft(ns_path(ns), backend="lib")
                lib_nft.backend  # noqa: B018 - open the context before the clock starts
                t0 = time.perf_counter()
                lib_nft.run(dump)
                libs.append(time.perf_counter() - t0)
                if not shape:
                    c, r, e = count_ruleset(dump)
                    shape = (f"{c} chains, {r} rules, {e} set/map elements, {len(dump) // 1024} KiB of nft text, "
                             f"{res.stats.commands} commands in one transaction")
                    print(f"ruleset: {shape}", file=sys.stderr)
                totals.append(res.total_s)
                calcs.append(res.calc_s)
                mgrs.append(res.mgr_s)
                applies.append(res.apply_s)
                refs.append(ref)
                print(f"run {run}: ours {res.total_s * 1000:.1f} ms (calculator {res.calc_s * 1000:.1f}, manager "
                      f"{res.mgr_s * 1000:.1f}, apply {res.apply_s * 1000:.1f}), nft -f {ref * 1000:.1f} ms, "
                      f"libnftables {libs[-1] * 1000:.1f} ms",
                      file=sys.stderr)
            finally:
                if made:
                    subprocess.run(["ip", "netns", "del", ns], check=False)
    med = {k: statistics.median(v) * 1000 for k, v in
           (("total", totals), ("calc", calcs), ("mgr", mgrs), ("apply", applies), ("ref", refs), ("lib", libs))}
    print(f"{args.local} local endpoints / {args.total} endpoints, median of {args.runs}: agent path "
          f"{med['total']:.1f} ms (calculator {med['calc']:.1f}, manager {med['mgr']:.1f}, apply {med['apply']:.1f}); "
          f"nft -f {med['ref']:.1f} ms (libnftables in-process {med['lib']:.1f});"
          f" apply alone / nft -f = {med['apply'] / med['ref']:.2f}")
    print(json.dumps({"name": "policy_sync", "value": round(med["total"], 2), "unit": "ms",
                      "reference": round(med["ref"], 2), "ratio": round(med["total"] / med["ref"], 3),
                      "goal": 1.2}))


if __name__ == "__main__":
    main()
