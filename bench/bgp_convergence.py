"""BGP convergence: a new block on node A -> its route in node B's kernel, end to end, vs BIRD -> BIRD.

Ours (default ``--mode agents``): a two-node cluster from ``tests.e2e.multinode.Cluster`` (real agents with
their ExaBGP sidecars in node namespaces, full mesh, etcd). Each try claims a new block for node A with
:class:`felixpy.ipam.IPAMClient` against the cluster's etcd (t0 = just before the claim) and waits for the
block's ``proto bird`` route to appear in B's kernel (a netlink route-event subscription in B's namespace,
stamped when read). Path: etcd watch -> A's calculation graph -> BgpControl -> speaker -> A's ExaBGP ->
B's ExaBGP -> relay -> speaker -> BgpControl -> dataplane -> kernel. Then the address and the block are
released and the withdrawal is timed the same way (reported, not the headline). If the cluster cannot be
started, or with ``--mode inproc``, both nodes' BGP pipelines run in this process instead (``bench._bgplab``:
ExaBGP + relay + speaker + BgpControl + Dataplane per node, no datastore) and t0 is
``BgpControl.on_message(BgpAnnounceUpdate(...))`` on A; the output says which mode ran.

Floor, measured in the same run: two BIRD 2 nodes configured as Calico's confd does
(``bgp.bird_conf.render_calico_node``, kernel protocol into the main table) peering directly; t0 = ``enable``
of a one-route static protocol on A's control socket, until the route is in B's kernel; then ``disable``.

    python -m bench.bgp_convergence [--blocks 60] [--bird-tries 30] [--mode agents|inproc]

Last line: one JSON object; value = our p50 (ms), reference = BIRD p50 (ms), ratio = value / goal, goal = 20
(an absolute goal: p50 <= 20 ms end to end).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench._bgplab import (
    ASN,
    BirdCtl,
    NetLab,
    OurNode,
    RouteWatch,
    async_wait_for,
    pct,
    requirements,
    start_bird,
)
from bgp.bird_conf import render_calico_node
from bgp.model import LocalBgpConfig, PeerSpec
from felixpy import names
from felixpy.calc.messages import BgpAnnounceUpdate
from felixpy.ipam.pools import IPPool

GOAL_MS = 20.0
TIMEOUT = 10.0
POOL = ipaddress.IPv4Network("10.66.0.0/16")
PROBE = ipaddress.IPv4Network("10.66.255.0/26")


@dataclass
class Series:
    adds: list[float] = field(default_factory=list)  # ms
    dels: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def summary(self, what: str) -> str:
        out = f"{what}: add p50 {statistics.median(self.adds):.1f} ms p99 {pct(self.adds, 99):.1f} ms"
        if self.dels:
            out += f" | withdraw p50 {statistics.median(self.dels):.1f} ms p99 {pct(self.dels, 99):.1f} ms"
        for k, v in self.extra.items():
            out += f" | {k} p50 {statistics.median(v):.1f} ms"
        return out + f" (n={len(self.adds)})"


def mesh_peer(me: ipaddress.IPv4Address, peer: ipaddress.IPv4Address) -> PeerSpec:
    # Calico's full-mesh naming and its rule for which side waits (string comparison of the addresses).
    return PeerSpec(name=f"Mesh_{str(peer).replace('.', '_')}", address=peer, asn=ASN, local_asn=ASN,
                    passive=str(peer) > str(me), kind="mesh")


# ------------------------------------------------------------------------------------------------ floor


async def bird_floor(tries: int) -> Series:
    pool = IPPool(name="bench", cidr=POOL, block_size=26)
    lab = NetLab("bc")
    ctls: list[BirdCtl] = []
    watch: RouteWatch | None = None
    try:
        ns = {i: lab.add_node(i) for i in (1, 2)}
        socks = {}
        for i, other in ((1, 2), (2, 1)):
            cfg = LocalBgpConfig(node=f"bird{i}", router_id=lab.ip(i), local_ip=lab.ip(i), asn=ASN,
                                 peers=(mesh_peer(lab.ip(i), lab.ip(other)),))
            conf = render_calico_node(cfg, pools=[pool])
            if i == 1:
                conf += f"\nprotocol static probe {{\n  disabled;\n  ipv4;\n  route {PROBE} blackhole;\n}}\n"
            _p, socks[i] = start_bird(lab, ns[i], f"bird{i}", conf)
        a, b = BirdCtl(socks[1]), BirdCtl(socks[2])
        ctls += [a, b]
        t = time.perf_counter()
        await async_wait_for(lambda: a.established(mesh_peer(lab.ip(1), lab.ip(2)).name)
                             and b.established(mesh_peer(lab.ip(2), lab.ip(1)).name), 60, "BIRD session")
        print(f"BIRD session up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        watch = RouteWatch(ns[2])
        watch.start()
        out = Series()
        for i in range(tries + 1):
            t0 = time.perf_counter()
            a.cmd("enable probe")
            ev = await watch.wait(PROBE, False, t0, TIMEOUT)
            if ev[3] != lab.ip(1):
                raise RuntimeError(f"BIRD node B installed {PROBE} via {ev[3]}, expected {lab.ip(1)}")
            t1 = time.perf_counter()
            a.cmd("disable probe")
            ev2 = await watch.wait(PROBE, True, t1, TIMEOUT)
            if i:  # the first try warms caches up (and BIRD's first export of the protocol)
                out.adds.append((ev[0] - t0) * 1000)
                out.dels.append((ev2[0] - t1) * 1000)
            await asyncio.sleep(0.01)
        return out
    finally:
        if watch is not None:
            watch.close()
        for c in ctls:
            c.close()
        lab.close()


# ------------------------------------------------------------------------------------------------ agents


class ClusterUnavailable(RuntimeError):
    pass


def start_cluster() -> Any:
    """A started two-node BGP cluster (tests.e2e.multinode.Cluster), or ClusterUnavailable saying why."""
    try:
        from tests.e2e.multinode import Cluster
    except ImportError as e:
        raise ClusterUnavailable(f"tests.e2e.multinode is not importable: {e}") from e
    c = Cluster(mode="bgp", nodes=2, datastore="etcdv3")
    try:
        c.start()  # removes what it made if it fails
    except Exception as e:
        raise ClusterUnavailable(f"the cluster did not start: {type(e).__name__}: {str(e)[:500]}") from e
    return c


async def agents(c: Any, blocks: int) -> Series:
    from felixpy import config
    from felixpy.datastore.factory import make_backend
    from felixpy.ipam import IPAMClient

    a, b = c.node(1), c.node(2)
    if not c.wait_for(lambda: all(p.state == "established" for n in (1, 2) for p in c.peers(n))
                      and all(c.peers(n) for n in (1, 2)), 30):
        raise ClusterUnavailable(f"BGP sessions not established: {c.peers(1)} {c.peers(2)}")
    backend = await make_backend(config.load({**c.datastore.env(), "NODENAME": "bench"}))
    watch = RouteWatch(b.netns)
    watch.start()
    # A's own blackhole route for the block (proto 80) shows when A's agent had processed the claim.
    watch_a = RouteWatch(a.netns)
    watch_a.start()
    try:
        ipam = IPAMClient(backend, node=a.name)
        a_ip = ipaddress.IPv4Address(a.ip)
        out = Series(extra={"claim call": [], "A's blackhole": []})
        tag = uuid.uuid4().hex[:8]
        for i in range(blocks + 1):
            handle = f"bench-{tag}-{i}"
            t0 = time.perf_counter()
            got = await ipam.auto_assign(handle_id=handle, attrs={}, num_v4=1)
            t_claim = time.perf_counter()
            block = got[0].network
            ev = await watch.wait(block, False, t0, TIMEOUT)
            if ev[3] != a_ip:
                raise RuntimeError(f"node B installed {block} via {ev[3]}, expected {a_ip}")
            t1 = time.perf_counter()
            await ipam.release_by_handle(handle)
            await ipam.release_block_affinity(block)
            ev2 = await watch.wait(block, True, t1, TIMEOUT)
            own = watch_a.find(block, False, t0, names.RTPROT_FELIX)
            if i:  # the first claim also loads IPAM config and pools
                out.adds.append((ev[0] - t0) * 1000)
                out.dels.append((ev2[0] - t1) * 1000)
                out.extra["claim call"].append((t_claim - t0) * 1000)
                if own is not None:
                    out.extra["A's blackhole"].append((own[0] - t0) * 1000)
        return out
    finally:
        watch_a.close()
        watch.close()
        await backend.close()


# ------------------------------------------------------------------------------------------------ inproc


async def inproc(blocks: int) -> Series:
    pool = IPPool(name="bench", cidr=POOL, block_size=26)
    lab = NetLab("bi")
    nodes: list[OurNode] = []
    watch: RouteWatch | None = None
    try:
        ns = {i: lab.add_node(i) for i in (1, 2)}
        for i, other in ((1, 2), (2, 1)):
            nodes.append(OurNode(lab, ns[i], i, [pool], [mesh_peer(lab.ip(i), lab.ip(other))]))
        for n in nodes:
            await n.start()
        a, b = nodes
        await async_wait_for(lambda: a.established() and b.established(), 30, "BGP sessions",
                             lambda: a.diag() + "\n" + b.diag())
        watch = RouteWatch(ns[2])
        watch.start()
        out = Series()
        for i in range(blocks + 1):
            block = ipaddress.IPv4Network((int(POOL.network_address) + 64 * i, 26))
            t0 = time.perf_counter()
            a.ctl.on_message(BgpAnnounceUpdate(frozenset({block})))
            ev = await watch.wait(block, False, t0, TIMEOUT)
            if ev[3] != a.ip:
                raise RuntimeError(f"node B installed {block} via {ev[3]}, expected {a.ip}")
            t1 = time.perf_counter()
            a.ctl.on_message(BgpAnnounceUpdate(frozenset()))
            ev2 = await watch.wait(block, True, t1, TIMEOUT)
            if i:
                out.adds.append((ev[0] - t0) * 1000)
                out.dels.append((ev2[0] - t1) * 1000)
        return out
    finally:
        if watch is not None:
            watch.close()
        lab.stop_processes()
        for n in nodes:
            await n.stop()
        lab.close()


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--blocks", type=int, default=60)
    ap.add_argument("--bird-tries", type=int, default=30)
    ap.add_argument("--mode", choices=("agents", "inproc"), default="agents")
    args = ap.parse_args()
    why = requirements()
    if why:
        raise SystemExit(why)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    t = time.perf_counter()
    floor = asyncio.run(bird_floor(args.bird_tries))
    print(floor.summary("BIRD -> BIRD") + f" [{time.perf_counter() - t:.1f} s]", file=sys.stderr)

    mode = args.mode
    t = time.perf_counter()
    ours: Series | None = None
    if mode == "agents":
        try:
            c = start_cluster()
            try:
                ours = asyncio.run(agents(c, args.blocks))
            finally:
                c.stop()
        except ClusterUnavailable as e:
            print(f"real agents unavailable ({e}); falling back to the in-process pipelines", file=sys.stderr)
            mode = "inproc"
    if ours is None:
        ours = asyncio.run(inproc(args.blocks))
    what = ("felixpy agents (IPAM claim in etcd -> B's kernel)" if mode == "agents"
            else "felixpy in-process BgpControl pipelines (announce on A -> B's kernel)")
    print(ours.summary(what) + f" [{time.perf_counter() - t:.1f} s]", file=sys.stderr)

    p50, ref = statistics.median(ours.adds), statistics.median(floor.adds)
    print(f"mode {mode}: ours p50 {p50:.1f} ms p99 {pct(ours.adds, 99):.1f} ms; BIRD p50 {ref:.1f} ms "
          f"p99 {pct(floor.adds, 99):.1f} ms; goal p50 <= {GOAL_MS:g} ms")
    res: dict[str, Any] = {
        "name": "bgp_convergence", "value": round(p50, 2), "unit": "ms", "reference": round(ref, 2),
        "ratio": round(p50 / GOAL_MS, 3), "goal": GOAL_MS, "mode": mode,
        "p99_ms": round(pct(ours.adds, 99), 2), "ref_p99_ms": round(pct(floor.adds, 99), 2),
        "withdraw_p50_ms": round(statistics.median(ours.dels), 2),
        "ref_withdraw_p50_ms": round(statistics.median(floor.dels), 2),
        "blocks": len(ours.adds), "bird_tries": len(floor.adds),
    }
    if "claim call" in ours.extra:
        res["claim_call_p50_ms"] = round(statistics.median(ours.extra["claim call"]), 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
