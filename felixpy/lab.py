"""``felixpy lab``: a multi-node cluster on this machine, in network namespaces.

``up`` builds N node namespaces on a bridge (plus a router; two subnets for vxlan-crosssubnet), starts the
embedded default datastore (a local etcd; kube-apiserver on top with ``--datastore kubernetes``), an agent
per node (and its ExaBGP sidecar in BGP modes), optionally a BIRD route reflector, creates pods on every
node through the installed CNI executable as kubelet's runtime would, and prints the pod IPs per node,
each node's BGP peers and a pod-to-pod ping matrix. ``status`` prints the same tables again. ``down``
removes everything ``up`` made, also after a crashed ``up`` (the state file is written before each step,
and namespaces are also found by name).

The building blocks live in :mod:`felixpy.labnet` (the e2e tests use the same ones).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from felixpy.labnet import MODES, Lab, LabError, LabSpec, Ledger, existing_netns, teardown

DEFAULT_STATE_DIR = "/run/felixpy-lab"


def state_dir() -> Path:
    return Path(os.environ.get("FELIXPY_LAB_DIR", DEFAULT_STATE_DIR))


def state_file() -> Path:
    return state_dir() / "state.json"


def _save(state: dict[str, Any]) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    tmp = state_file().with_suffix(f".{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, state_file())


def _load() -> dict[str, Any]:
    try:
        return dict(json.loads(state_file().read_text()))
    except (OSError, ValueError):
        return {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="felixpy lab", description="A multi-node felixpy lab in network namespaces "
                                "on this machine (run as root). State: $FELIXPY_LAB_DIR (default "
                                f"{DEFAULT_STATE_DIR}).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab and print pod IPs, BGP peers and a ping matrix")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--mode", choices=list(MODES), default="bgp",
                    help="bgp: no encapsulation; vxlan: VXLAN Always; vxlan-crosssubnet: nodes on two subnets "
                         "joined by a router, VXLAN across it only; ipip: IPIP Always (needs the ipip module)")
    up.add_argument("--rr", action="store_true", help="add a BIRD route reflector; node-to-node mesh off")
    up.add_argument("--datastore", choices=["etcd", "etcdv3", "kubernetes"], default="etcd",
                    help="etcd (default, embedded) or kubernetes (kube-apiserver backed by that etcd)")
    up.add_argument("--pods-per-node", type=int, default=2)
    up.add_argument("--prefix", default="fxlab", help="names of the lab's namespaces and links")
    up.add_argument("--base", default="172.31", help="first two octets of the node networks (<base>.<k>.0/24)")
    up.add_argument("--pool", default="10.244.0.0/16", help="the default IPv4 pool the agents create")
    up.add_argument("--nat-outgoing", action="store_true")
    up.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for the agents, then for full pod-to-pod connectivity")
    down = sub.add_parser("down", help="remove everything `up` made")
    down.add_argument("--prefix", default="", help="also sweep namespaces with this prefix (default: the lab's)")
    sub.add_parser("status", help="print the lab's tables again")
    return p


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    if os.geteuid() != 0:
        print("felixpy lab: must run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    try:
        if args.cmd == "up":
            return up(args)
        if args.cmd == "down":
            return down(args.prefix)
        return status()
    except BrokenPipeError:  # `felixpy lab status | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def up(args: argparse.Namespace) -> int:
    if _load():
        print(f"a lab is already up (state in {state_file()}); run `felixpy lab down` first", file=sys.stderr)
        return 1
    spec = LabSpec(prefix=args.prefix, nodes=args.nodes, mode=args.mode,
                   datastore="etcdv3" if args.datastore == "etcd" else args.datastore, rr=args.rr, base=args.base,
                   pool=args.pool, nat_outgoing=args.nat_outgoing)
    try:
        spec.validate()
    except LabError as e:
        print(f"felixpy lab: {e}", file=sys.stderr)
        return 2
    leftovers = sorted(n for n in existing_netns() if n.startswith(spec.prefix + "-"))
    if leftovers:
        print(f"namespaces of an earlier lab are still there ({', '.join(leftovers[:4])}...); "
              f"run `felixpy lab down --prefix {spec.prefix}` first", file=sys.stderr)
        return 1
    # The work dir is a subdirectory: `down` removes it whole, never a directory the user pointed us at.
    lab = Lab(spec, state_dir() / spec.prefix, Ledger({}, _save))
    lab.ledger.commit()
    t0 = time.monotonic()

    def step(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {msg}", flush=True)

    try:
        lab.build_network()
        plan = lab.plan
        step(f"network: {len(plan.nodes)} node namespaces on {', '.join(map(str, plan.subnets))} "
             f"(switch {plan.switch}, router {plan.router})" + (f", route reflector {plan.rr.name}" if plan.rr else ""))
        ds = lab.start_datastore()
        step(f"datastore: etcd {ds.etcd_endpoint}" + (f", kube-apiserver {ds.server} (kubeconfig {ds.kubeconfig})"
                                                       if ds.server else ""))
        lab.start_nodes()
        if spec.info.bgp and not any(k.startswith("bgp:") for k in lab.ledger.data["procs"]):
            step("note: this build has no ExaBGP sidecar (bgp.sidecar); no routes will be exchanged")
        if spec.info.ipip != "Never" and not Path("/sys/module/ipip").exists():
            step("note: the ipip module is not loaded on this kernel; IPIP routes cannot work here")
        lab.wait_ready(timeout=args.timeout)
        step(f"agents ready ({spec.mode} mode, {spec.datastore}); health at http://<node ip>:9099/readiness")
        lab.install_cni()
        lab.add_pods(args.pods_per_node)
        step(f"pods: {args.pods_per_node} per node created through the CNI executable")
        result = lab.converge(args.timeout) if args.pods_per_node else {}
        step("converged" if all(result.values()) else "not all pods reach each other (see the matrix)")
    except LabError as e:
        print(f"lab up failed: {e}", file=sys.stderr)
        print(f"the partial lab is recorded in {state_file()}; `felixpy lab down` removes it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; `felixpy lab down` removes what was made (state in {state_file()})", file=sys.stderr)
        return 130
    print()
    report(lab, result)
    pods = lab.pods()
    if len(pods) > 1:
        print(f"\ntry: ip netns exec {pods[0].netns} ping {pods[-1].ip}    (node shell: ip netns exec "
              f"{lab.plan.nodes[0].netns} bash)")
    print(f"logs: {lab.workdir}/<node>/agent.log; `felixpy lab status` prints these tables again; "
          "`felixpy lab down` removes everything.")
    return 0 if all(result.values()) else 3


def report(lab: Lab, matrix: dict[tuple[str, str], bool] | None = None) -> None:
    """The operator's view: nodes and pods, BGP peers, the ping matrix."""
    plan, pods = lab.plan, lab.pods()
    ds = lab.ds
    if ds is not None:
        print(f"datastore   {ds.type}: " + (ds.server if ds.server else ds.etcd_endpoint))
    print(f"mode        {lab.spec.mode} (pool {lab.spec.pool})\n")
    rows = [("NODE", "ADDRESS", "AGENT", "POD", "POD IP")]
    for n in plan.nodes:
        agent = "ready" if lab.node_ready(n.name) else ("running" if lab.proc_alive(f"agent:{n.name}") else "DOWN")
        mine = [p for p in pods if p.node == n.name] or None
        for i, p in enumerate(mine or [None]):
            first = i == 0
            rows.append((n.name if first else "", str(n.address) if first else "", agent if first else "",
                         p.name if p else "-", p.ip if p else ""))
    if plan.rr:
        alive = "running" if lab.proc_alive(f"rr:{plan.rr.name}") else "DOWN"
        rows.append((plan.rr.name, str(plan.rr.address), f"reflector {alive}", "", ""))
    _table(rows)
    print()
    if lab.spec.info.bgp:
        print("BGP peers")
        for n in plan.all_nodes():
            peers = lab.peers(n.name)
            text = ", ".join(f"{p.address}" + (f" ({lab.peer_name(p.address)})" if lab.peer_name(p.address) else "")
                             + f" {p.state}" for p in peers) or "none"
            src = f"  [{peers[0].source}]" if peers else ""
            print(f"  {n.name:<14} {text}{src}")
        print()
    else:
        print(f"BGP peers: none ({lab.spec.mode} mode does not run BGP)\n")
    if matrix is None:
        matrix = lab.matrix()
    names = [p.name for p in pods if p.ip]
    if not names:
        print("no pods")
        return
    print("pod-to-pod ping (row pings column)")
    width = max(6, *(len(n) for n in names)) + 1
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for a in names:
        cells = ["-" if a == b else ("ok" if matrix.get((a, b)) else "FAIL") for b in names]
        print(f"{a:<{width}}" + "".join(f"{c:>{width}}" for c in cells))
    ok = sum(1 for v in matrix.values() if v)
    print(f"{ok}/{len(matrix)} pairs reachable")


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def status() -> int:
    state = _load()
    if not state or "spec" not in state:
        print("no lab is up")
        return 1
    report(Lab.from_state(state))
    return 0


def down(prefix: str = "") -> int:
    state = _load()
    prefix = prefix or str((state.get("spec") or {}).get("prefix") or "fxlab")
    if not state and (state_dir() / prefix).is_dir():
        state = {"workdir": str(state_dir() / prefix)}
    removed = teardown(state, prefix=prefix)
    if state_file().exists():
        state_file().unlink()
        removed.append(f"state file {state_file()}")
    with contextlib.suppress(OSError):
        state_dir().rmdir()  # only if empty
    if not removed:
        print("no lab is up")
        return 0
    for item in removed:
        print(f"removed {item}")
    return 0
