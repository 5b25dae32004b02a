"""Route programming: 10,000 workload /32 routes through the RouteTable driver vs ``ip -batch``.

Each run makes two fresh network namespaces, each with a veth ``calibench0`` (up); one gets the routes
from a fresh :class:`RouteTable` (construction + ``set_iface_routes`` + its first ``apply()``, which
also dumps the kernel as after an agent restart), the other from ``ip -n <ns> -batch <file>`` with the
same routes (``<ip>/32 dev calibench0 proto 80 scope link``). Both are checked to hold all routes, and
the namespaces are removed. Reported: medians over the runs; the last line is one JSON object.

Run as root from the repo: ``python -m bench.route_programming [--routes N] [--runs K]``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from felixpy import names
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.shims.netlink import Netlink

IFACE = "calibench0"


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _make_ns(name: str) -> None:
    _sh("ip", "netns", "add", name)
    _sh("ip", "-n", name, "link", "add", IFACE, "type", "veth", "peer", "name", "benchpeer0")
    _sh("ip", "-n", name, "link", "set", IFACE, "up")
    _sh("ip", "-n", name, "link", "set", "benchpeer0", "up")


def _count(ns: str) -> int:
    with Netlink(f"/run/netns/{ns}") as nl:
        return sum(1 for r in nl.routes() if r.protocol == names.RTPROT_FELIX)


def _ours(ns: str, nets: list[ipaddress.IPv4Network]) -> float:
    with Netlink(f"/run/netns/{ns}") as nl:
        t0 = time.perf_counter()
        rt = RouteTable(nl, removals_allowed=True)
        rt.set_iface_routes(IFACE, nets)
        stats = rt.apply()
        elapsed = time.perf_counter() - t0
    if stats.errors or stats.adds != len(nets):
        raise SystemExit(f"driver apply failed: {stats}")
    return elapsed


def _ip_batch(ns: str, batch_file: str) -> float:
    t0 = time.perf_counter()
    _sh("ip", "-n", ns, "-batch", batch_file)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    n = args.routes
    nets = [ipaddress.IPv4Network((0x0A000000 + 0x10000 + i, 32)) for i in range(n)]
    tag = f"fxbench{os.getpid()}"
    ours: list[float] = []
    ref: list[float] = []
    with tempfile.NamedTemporaryFile("w", prefix="fxbench-", suffix=".batch") as f:
        for net in nets:
            f.write(f"route add {net} dev {IFACE} proto {names.RTPROT_FELIX} scope link\n")
        f.flush()
        for run in range(args.runs):
            ns_a, ns_b = f"{tag}a{run}", f"{tag}b{run}"
            made: list[str] = []
            try:
                for ns in (ns_a, ns_b):
                    _make_ns(ns)
                    made.append(ns)
                # Alternate who goes first so neither side always gets the warmer caches.
                order = [("ours", ns_a), ("ref", ns_b)]
                if run % 2:
                    order.reverse()
                for which, ns in order:
                    if which == "ours":
                        ours.append(_ours(ns, nets))
                    else:
                        ref.append(_ip_batch(ns, f.name))
                for ns in (ns_a, ns_b):
                    got = _count(ns)
                    if got != n:
                        raise SystemExit(f"netns {ns} holds {got} routes, expected {n}")
                print(f"run {run}: ours {ours[-1] * 1000:.1f} ms, ip -batch {ref[-1] * 1000:.1f} ms",
                      file=sys.stderr)
            finally:
                for ns in made:
                    subprocess.run(["ip", "netns", "del", ns], check=False)
    ours_ms = statistics.median(ours) * 1000
    ref_ms = statistics.median(ref) * 1000
    print(f"{n} routes, median of {args.runs}: RouteTable {ours_ms:.1f} ms, ip -batch {ref_ms:.1f} ms")
    print(json.dumps({"name": "route_programming", "value": round(ours_ms, 2), "unit": "ms",
                      "reference": round(ref_ms, 2), "ratio": round(ours_ms / ref_ms, 3), "goal": 1.5}))


if __name__ == "__main__":
    main()
