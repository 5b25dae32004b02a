"""BGP bulk receive: 10,000 /26 from a BIRD route reflector into a node's kernel, the agent's path vs BIRD's.

Lab (network namespaces on one bridge): a BIRD 2 route reflector (``.254``) with two disabled static
protocols holding the same N /26 blackholes, ``bulk_ours`` (exported only to our node) and ``bulk_bird``
(exported only to the BIRD node); "our node" (``.1``) runs the agent's install path in this process
(ExaBGP started by ``bgp.sidecar`` -> ``bgp.relay`` -> ``bgp.speaker`` -> ``felixpy.bgpctl.BgpControl`` ->
``Dataplane`` with ``BgpRouteManager`` + ``RouteTable``, see ``bench._bgplab.OurNode``); the reference node
(``.2``) runs BIRD configured as Calico's confd configures a node (``bgp.bird_conf.render_calico_node``: a
kernel protocol exporting into the main table).

Each repetition, for each node in turn (alternating who goes first): ``enable bulk_<x>`` on the reflector's
control socket at t0, then the node's main FIB is polled (``/proc/<pid>/net/fib_triestat``, every 2 ms)
until it holds all N prefixes; then ``disable bulk_<x>`` and poll until they are all gone. Measuring the two
nodes one after the other keeps them from competing for the 2 cores. Reported: medians over the
repetitions; the last line is one JSON object (value = our announce median, ratio = ours / BIRD, goal 3).

    python -m bench.bgp_prefixes [--prefixes 10000] [--reps 5] [--profile]

``--profile`` adds one unmeasured announce + withdraw of our node under cProfile (event loop thread and the
dataplane worker thread) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import ipaddress
import json
import logging
import pstats
import statistics
import sys
import time
from collections.abc import Sequence

from bench._bgplab import (
    ASN,
    BirdCtl,
    CpuMeter,
    NetLab,
    OurNode,
    PrefixCounter,
    ProcNetns,
    async_wait_for,
    check_routes,
    requirements,
    start_bird,
    thread_wait,
)
from bgp.bird_conf import render_calico_node
from bgp.model import LocalBgpConfig, PeerSpec
from felixpy.ipam.pools import IPPool

POOL = ipaddress.IPv4Network("10.64.0.0/12")
RR, OURS, REF = 254, 1, 2
POLL = 0.002  # fib_triestat costs ~50 us; a measurement overshoots by at most this
TIMEOUT = 60.0


def prefixes(n: int) -> list[ipaddress.IPv4Network]:
    base = int(POOL.network_address)
    if n * 64 > POOL.num_addresses:
        raise SystemExit(f"at most {POOL.num_addresses // 64} /26 fit in {POOL}")
    return [ipaddress.IPv4Network((base + 64 * i, 26)) for i in range(n)]


def rr_conf(lab: NetLab, nets: Sequence[ipaddress.IPv4Network]) -> str:
    me = lab.ip(RR)
    routes = "\n".join(f"  route {n} blackhole;" for n in nets)
    out = [
        "log stderr all;",
        f"router id {me};",
        "protocol device { scan time 2; }",
        'protocol direct { ipv4; interface "eth0"; }',
    ]
    for name in ("bulk_ours", "bulk_bird"):
        out += [f"protocol static {name} {{", "  disabled;", "  ipv4;", routes, "}"]
    out += [
        "template bgp rrclient {",
        f"  local {me} as {ASN};",
        f"  rr client; rr cluster id {me};",
        "  hold time 30; passive on; graceful restart on;",
        "}",
    ]
    for peer, idx in (("ours", OURS), ("birdnode", REF)):
        out += [
            f"protocol bgp {peer} from rrclient {{",
            f"  neighbor {lab.ip(idx)} as {ASN};",
            f'  ipv4 {{ import none; export where proto = "bulk_{peer[:4]}"; }};',
            "}",
        ]
    return "\n".join(out) + "\n"


def rr_peer(lab: NetLab) -> PeerSpec:
    addr = lab.ip(RR)
    return PeerSpec(name=f"Global_{str(addr).replace('.', '_')}", address=addr, asn=ASN, local_asn=ASN, hold_time=30,
                    kind="global")


def ref_conf(lab: NetLab, pool: IPPool) -> str:
    cfg = LocalBgpConfig(node="birdnode", router_id=lab.ip(REF), local_ip=lab.ip(REF), asn=ASN,
                         peers=(rr_peer(lab),))
    return render_calico_node(cfg, pools=[pool])


async def timed(rr: BirdCtl, cmd: str, counter: PrefixCounter, target: int) -> float:
    """Seconds from sending ``cmd`` to the reflector until the node's FIB holds ``target`` prefixes."""
    done = thread_wait(counter, target, TIMEOUT, POLL)
    t0 = time.perf_counter()
    rr.send(cmd)
    rr.reply()
    return await done - t0


def top(prof: cProfile.Profile, title: str, n: int = 15) -> str:
    """The project's functions by cumulative time, then everything by own time."""
    parts = [f"--- {title} ---"]
    for order, restrict in (("cumulative", r"/(bgp|felixpy)/"), ("tottime", "")):
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats(order).print_stats(*([restrict, n] if restrict else [n]))
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        keep = [ln for ln in lines if "function calls" in ln or "ncalls" in ln or "/" in ln or "{" in ln]
        parts.append(f"by {order}:")
        parts += keep[: n + 2]
    return "\n".join(parts)


async def run(args: argparse.Namespace) -> dict[str, object]:
    nets = prefixes(args.prefixes)
    n = len(nets)
    pool = IPPool(name="bench", cidr=POOL, block_size=26)
    lab = NetLab("bp")
    ours: OurNode | None = None
    ctls: list[BirdCtl] = []
    counters: list[PrefixCounter] = []
    try:
        ns_rr, ns_ours, ns_ref = lab.add_node(RR), lab.add_node(OURS), lab.add_node(REF)
        rr_proc, rr_sock = start_bird(lab, ns_rr, "rr", rr_conf(lab, nets))
        _ref_proc, ref_sock = start_bird(lab, ns_ref, "birdnode", ref_conf(lab, pool))
        rr = BirdCtl(rr_sock)
        ref = BirdCtl(ref_sock)
        ctls += [rr, ref]
        ours = OurNode(lab, ns_ours, OURS, [pool], [rr_peer(lab)])
        await ours.start()
        node = ours
        t_setup = time.perf_counter()
        ref_peer = rr_peer(lab).name
        await async_wait_for(lambda: node.established() and rr.established("ours") and ref.established(ref_peer)
                             and rr.established("birdnode"), 60, "BGP sessions", node.diag)
        print(f"sessions up in {time.perf_counter() - t_setup:.1f} s; workdir {lab.workdir}", file=sys.stderr)
        c_ours = PrefixCounter(ProcNetns(lab, ns_ours).pid)
        c_ref = PrefixCounter(ProcNetns(lab, ns_ref).pid)
        counters += [c_ours, c_ref]
        base_ours, base_ref = c_ours.count(), c_ref.count()
        exa = ours.exabgp_pid()
        relays = ours.relay_pids()
        pids = {"ExaBGP": exa or 0, "bgp.relay": relays[0] if relays else 0, "BIRD reflector": rr_proc.pid}
        res: dict[str, list[float]] = {k: [] for k in ("ours_add", "ours_del", "ref_add", "ref_del")}
        cpu: list[dict[str, float]] = []

        async def measure_ours(verify: bool) -> None:
            meter = CpuMeter(pids)
            meter.start()
            res["ours_add"].append(await timed(rr, "enable bulk_ours", c_ours, base_ours + n))
            cpu.append(meter.stop())
            if verify:  # outside the timed part: a full dump of what the kernel holds
                check_routes(ns_ours, nets, lab.ip(RR))
            res["ours_del"].append(await timed(rr, "disable bulk_ours", c_ours, base_ours))

        async def measure_ref(verify: bool) -> None:
            res["ref_add"].append(await timed(rr, "enable bulk_bird", c_ref, base_ref + n))
            if verify:
                check_routes(ns_ref, nets, lab.ip(RR))
            res["ref_del"].append(await timed(rr, "disable bulk_bird", c_ref, base_ref))

        for rep in range(args.reps):
            if rep % 2:
                await measure_ref(rep == 1)
                await measure_ours(rep == 1)
            else:
                await measure_ours(rep == 0)
                await measure_ref(rep == 0)
            c = cpu[-1]
            print(f"rep {rep}: ours add {res['ours_add'][-1] * 1000:.0f} ms, del {res['ours_del'][-1] * 1000:.0f} ms"
                  f" | BIRD add {res['ref_add'][-1] * 1000:.0f} ms, del {res['ref_del'][-1] * 1000:.0f} ms | CPU s "
                  f"during our add: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()), file=sys.stderr)

        if args.profile:
            main_prof = cProfile.Profile()
            dp_prof = cProfile.Profile()
            # cProfile follows one thread: enable a second profiler inside the dataplane worker thread.
            await asyncio.get_running_loop().run_in_executor(node.dataplane.executor, dp_prof.enable)
            main_prof.enable()
            try:
                add = await timed(rr, "enable bulk_ours", c_ours, base_ours + n)
                delete = await timed(rr, "disable bulk_ours", c_ours, base_ours)
            finally:
                main_prof.disable()
                await asyncio.get_running_loop().run_in_executor(node.dataplane.executor, dp_prof.disable)
            print(f"profiled run (slower): add {add * 1000:.0f} ms, del {delete * 1000:.0f} ms", file=sys.stderr)
            print(top(main_prof, "event loop thread: relay socket, speaker, BgpControl"), file=sys.stderr)
            print(top(dp_prof, "dataplane worker thread: BgpRouteManager, RouteTable, netlink"), file=sys.stderr)

        med = {k: statistics.median(v) * 1000 for k, v in res.items()}
        cpu_med = {k: round(statistics.median(c[k] for c in cpu), 3) for k in cpu[0]}
        spread = {k: (min(v) * 1000, max(v) * 1000) for k, v in res.items()}
        return {"n": n, "med": med, "spread": spread, "cpu": cpu_med, "reps": args.reps}
    finally:
        for counter in counters:
            counter.close()
        for b in ctls:
            b.close()
        lab.stop_processes()
        if ours is not None:
            await ours.stop()
        lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    why = requirements()
    if why:
        raise SystemExit(why)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = asyncio.run(run(args))
    med, spread = r["med"], r["spread"]
    assert isinstance(med, dict) and isinstance(spread, dict)
    ratio = med["ours_add"] / med["ref_add"]

    def fmt(k: str) -> str:
        return f"{med[k]:.0f} ms ({spread[k][0]:.0f}-{spread[k][1]:.0f})"

    print(f"{r['n']} /26 from a BIRD reflector, median (min-max) of {r['reps']}: ours add {fmt('ours_add')}, withdraw "
          f"{fmt('ours_del')}; BIRD add {fmt('ref_add')}, withdraw {fmt('ref_del')}; add ratio {ratio:.2f} "
          f"(goal <= 3.0)")
    print(f"CPU seconds during our add (median): {r['cpu']}")
    print(json.dumps({
        "name": "bgp_prefixes", "value": round(med["ours_add"], 1), "unit": "ms",
        "reference": round(med["ref_add"], 1), "ratio": round(ratio, 3), "goal": 3.0,
        "withdraw_ms": round(med["ours_del"], 1), "ref_withdraw_ms": round(med["ref_del"], 1),
        "withdraw_ratio": round(med["ours_del"] / med["ref_del"], 3), "prefixes": r["n"], "reps": r["reps"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
