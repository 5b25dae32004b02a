"""Interop: a BIRD 2 peer configured the way Calico's confd configures BIRD on a calico-node exchanges routes
with felixpy nodes in both directions.

Topology: a 3-node BGP cluster (full mesh, etcd) from :class:`tests.e2e.multinode.Cluster`, plus one more
namespace ``<prefix>-bird`` plugged into the cluster's switch bridge like a node. BIRD there runs the config
of :func:`bgp.bird_conf.render_calico_node`: a static blackhole for its own block (an address of which sits
on its ``lo``), ``calico_aggr`` export, kernel programming into the main table, one session per felixpy node.
The felixpy nodes peer with it through a global BGPPeer (the mesh stays on).

The BIRD node's netns is recorded in the cluster's ledger and BIRD is spawned through it, so the cluster's
teardown removes both even if this test dies half way; the ``finally`` also stops BIRD by PID first.
"""

from __future__ import annotations

import functools
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from bgp.bird_conf import render_calico_node
from bgp.model import LocalBgpConfig, PeerSpec
from bgp.routes import PoolInfo
from felixpy import labnet
from felixpy.datastore.api import KIND_BGP_PEER
from tests.e2e.multinode import Cluster

pytestmark = [
    pytest.mark.root,
    pytest.mark.realparts,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("bird") is None or shutil.which("birdc") is None,
                       reason="bird/birdc (BIRD 2) are not installed"),
]

ASN = 64512
CONVERGE = 60.0  # BGP connect retry and ExaBGP reconfiguration are the slow parts
BIRD_HOST = 200  # host part of the BIRD node's address in the nodes' first subnet (nodes are .11.., rr .250)


class BirdNode:
    """One extra namespace on the cluster's bridge running BIRD; everything it makes is in the cluster's
    ledger (netns before creation, the BIRD process by PID + start time)."""

    def __init__(self, c: Cluster, block: ipaddress.IPv4Network) -> None:
        self.c = c
        self.block = block
        self.netns = f"{c.prefix}-bird"  # under the cluster's prefix: its teardown finds it by name too
        self.port = "bird"  # switch-side veth, next to the nodes' n1.. ports
        net = c.plan.subnets[0]
        self.address = ipaddress.IPv4Interface(f"{net[BIRD_HOST]}/{net.prefixlen}")
        self.dir = c.workdir / "bird"
        self.cfg = self.dir / "bird.cfg"
        self.ctl = str(self.dir / "bird.ctl")
        self.log = self.dir / "bird.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ip(self) -> str:
        return str(self.address.ip)

    def plug(self) -> None:
        """A veth from the switch netns into a new netns, enslaved to br1, as the lab attaches its nodes."""
        sw = self.c.plan.switch
        assert all(n.address != self.address for n in self.c.plan.all_nodes())
        self.c.lab.ledger.add_netns(self.netns)
        labnet.run("ip", "netns", "add", self.netns)
        labnet.run("ip", "-n", self.netns, "link", "set", "lo", "up")
        labnet.run("ip", "-n", sw, "link", "add", self.port, "type", "veth", "peer", "name", "eth0",
                   "netns", self.netns)
        labnet.run("ip", "-n", sw, "link", "set", self.port, "master", "br1", "up")
        labnet.run("ip", "-n", self.netns, "addr", "add", str(self.address), "dev", "eth0")
        labnet.run("ip", "-n", self.netns, "link", "set", "eth0", "up")
        # The block's first address is this "node's" workload: the pods ping it.
        labnet.run("ip", "-n", self.netns, "addr", "add", f"{self.block[1]}/32", "dev", "lo")

    def config(self) -> str:
        """What confd would render for a calico-node peering with each felixpy node as an explicit peer."""
        me = self.address.ip
        peers = tuple(PeerSpec(name=f"Global_{n.ip.replace('.', '_')}", address=n.address.ip, asn=ASN,
                               local_asn=ASN, kind="global") for n in self.c.plan.nodes)
        cfg = LocalBgpConfig(node="bird-interop", router_id=me, local_ip=me, asn=ASN, peers=peers)
        pool = PoolInfo(ipaddress.IPv4Network(self.c.lab.spec.pool))
        return render_calico_node(cfg, local_blocks=[self.block], pools=[pool], kernel_table=254)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg.write_text(self.config())
        # "ip netns exec" execs bird, so the recorded PID is BIRD's own.
        self.proc = labnet.spawn(self.c.lab.ledger, "bird:interop",
                                 ["bird", "-f", "-c", str(self.cfg), "-s", self.ctl], netns=self.netns, log=self.log)

    def stop(self) -> None:
        if self.proc is not None:
            labnet.stop_proc(self.proc.pid, timeout=5.0)
            self.c.lab.ledger.drop_proc("bird:interop")
            self.proc.wait(5)
            self.proc = None

    def unplug(self) -> None:
        self.stop()
        # Deleting the netns takes its eth0 and so the veth's switch end with it.
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        self.c.lab.ledger.drop_netns(self.netns)

    def birdc(self, *args: str) -> str:
        return labnet.run("birdc", "-s", self.ctl, *args, check=False, timeout=10)

    def sessions(self) -> dict[str, str]:
        """``{protocol name: the rest of its 'show protocols' line}`` for the BGP protocols."""
        out = {}
        for ln in self.birdc("show", "protocols").splitlines():
            words = ln.split()
            if len(words) >= 2 and words[1] == "BGP":
                out[words[0]] = ln
        return out

    def routes_to(self, cidr: str) -> str:
        return labnet.run("ip", "-n", self.netns, "-4", "route", "show", "exact", cidr, check=False).strip()

    def diagnostics(self) -> str:
        routes = labnet.run("ip", "-n", self.netns, "-4", "route", "show", check=False)
        return (f"==== BIRD node {self.netns} ({self.address})\nroutes:\n{routes}\nprotocols:\n"
                f"{self.birdc('show', 'protocols')}\nlog:\n{labnet.log_tail(self.log, 3000)}")


def free_block(c: Cluster, pool: str) -> ipaddress.IPv4Network:
    """A /26 of the pool no IPAM block overlaps (10.244.250.0/26 in the default pool, unless taken)."""
    used = [ipaddress.IPv4Network(b["cidr"]) for b in c.blocks()]
    net = ipaddress.IPv4Network(pool)
    preferred = ipaddress.IPv4Network("10.244.250.0/26")
    candidates = [preferred] if preferred.subnet_of(net) else []
    candidates += list(net.subnets(new_prefix=26))[::-1]
    return next(b for b in candidates if not any(b.overlaps(u) for u in used))


def proto_line_ok(line: str, via: str) -> bool:
    return f"via {via} " in (line + " ") and "proto bird" in line


def test_calico_style_bird_peer_exchanges_routes_both_ways() -> None:
    with Cluster(mode="bgp", nodes=3) as c:
        c.require_bgp_config()
        pods = [c.add_pod(n) for n in (1, 2, 3)]
        blocks = {n.index: c.block_of(p) for n, p in zip(c.plan.nodes, pods, strict=True)}
        block = free_block(c, c.lab.spec.pool)
        cidr, target = str(block), str(block[1])
        bird = BirdNode(c, block)

        def diag() -> str:
            return f"{bird.diagnostics()}\n{c.diagnostics()}"

        try:
            bird.plug()
            bird.start()
            c.upsert(KIND_BGP_PEER, "bird-interop", {"peerIP": bird.ip, "asNumber": ASN})

            # BIRD sees all three felixpy nodes as Established.
            names = {f"Global_{n.ip.replace('.', '_')}" for n in c.plan.nodes}
            assert c.wait_for(lambda: set(bird.sessions()) == names
                              and all("Established" in ln for ln in bird.sessions().values()), CONVERGE), diag()

            # BIRD -> felixpy: its block in every node's kernel via the BIRD node, as a BGP route; pods reach it.
            assert c.wait_for(lambda: all(any(proto_line_ok(r, bird.ip) for r in c.routes_to(n, cidr))
                                          for n in (1, 2, 3)), CONVERGE), diag()
            for p in pods:
                assert c.wait_for(functools.partial(c.ping, p, target), 15, 0.5), f"{p.name} -> {target}\n{diag()}"

            # felixpy -> BIRD: every node's pod block in BIRD's kernel (main table) via that node.
            def bird_has_blocks() -> bool:
                return all(proto_line_ok(bird.routes_to(blocks[n.index]), n.ip) for n in c.plan.nodes)

            assert c.wait_for(bird_has_blocks, CONVERGE), diag()

            # Withdrawal: BIRD stops originating its block; every felixpy node drops the route.
            static = [ln.split()[0] for ln in bird.birdc("show", "protocols").splitlines()
                      if len(ln.split()) > 1 and ln.split()[1] == "Static"]
            assert len(static) == 1, bird.birdc("show", "protocols")
            assert "disabled" in bird.birdc("disable", static[0]), diag()
            assert c.wait_for(lambda: not any(c.routes_to(n, cidr) for n in (1, 2, 3)), CONVERGE), diag()
            # Only the route went: the sessions stay up and BIRD keeps the felixpy nodes' routes.
            sessions = bird.sessions()
            assert set(sessions) == names and all("Established" in ln for ln in sessions.values()), diag()
            assert bird_has_blocks(), diag()
        finally:
            bird.unplug()
        assert not Path(f"/run/netns/{bird.netns}").exists()
