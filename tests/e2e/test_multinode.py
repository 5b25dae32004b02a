"""Three-node clusters end to end: agents (+ ExaBGP sidecars, + a BIRD route reflector) in node namespaces,
pods made through the CNI executable, real packets between them, in both datastores.

Topologies: BGP without encapsulation as a full mesh, through a route reflector and with explicit BGPPeers;
VXLAN Always; VXLAN CrossSubnet (nodes on two subnets joined by a router). Faults (BGP mesh): ExaBGP killed,
agent restarted under a continuous ping, a peer that goes away and comes back.

A test skips, saying why, when the agent in this tree cannot do its part yet (no BGP config written, no
VXLAN device): detected at run time, so the tests start running as soon as the agent can.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from felixpy import labnet
from felixpy.datastore.api import KIND_BGP_CONFIG, KIND_BGP_PEER
from tests.e2e.multinode import Cluster, Pod

pytestmark = [pytest.mark.root, pytest.mark.realparts, pytest.mark.timeout(600)]

CONVERGE = 60.0  # seconds for routes to settle after a change (BGP connect retry is the slow part)

TOPOLOGIES: dict[str, dict[str, Any]] = {
    "bgp-mesh": {"mode": "bgp"},
    "bgp-rr": {"mode": "bgp", "rr": True},
    "bgp-peers": {"mode": "bgp"},  # mesh off, one global BGPPeer per node address
    "vxlan": {"mode": "vxlan"},
    "vxlan-crosssubnet": {"mode": "vxlan-crosssubnet"},
    "ipip": {"mode": "ipip"},  # runs only where the kernel has IPIP
}


def need_ipip(topo: str) -> None:
    if topo != "ipip":
        return
    from felixpy.dataplane.shims.netlink import Netlink, ipip_supported

    with Netlink() as nl:
        ok, reason = ipip_supported(nl)
    if not ok:
        pytest.skip(f"IPIP topology: {reason}")


def need_kube(datastore: str) -> None:
    if datastore == "kubernetes" and not os.access(labnet.KUBE_APISERVER_BINARY, os.X_OK):
        pytest.skip(f"kube-apiserver not built ({labnet.KUBE_APISERVER_BINARY}); see docs/control-plane.md")


def require_capability(c: Cluster) -> None:
    if c.lab.spec.info.bgp:
        c.require_bgp_config()
    else:
        c.require_vxlan_device()


def explicit_peers(c: Cluster) -> None:
    """Mesh off; every node peers with every node address listed as a global BGPPeer (its own is skipped)."""
    c.upsert(KIND_BGP_CONFIG, "default", {"nodeToNodeMeshEnabled": False, "asNumber": 64512})
    for n in c.plan.nodes:
        c.upsert(KIND_BGP_PEER, f"peer-{n.index}", {"peerIP": n.ip, "asNumber": 64512})


@pytest.fixture(scope="module", params=[(t, d) for d in labnet.DATASTORES for t in TOPOLOGIES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[str, Cluster]]:
    topo, datastore = request.param
    need_kube(datastore)
    need_ipip(topo)
    with Cluster(nodes=3, datastore=datastore, **TOPOLOGIES[topo]) as c:
        if topo == "bgp-peers":
            explicit_peers(c)
        yield topo, c


def all_reach(c: Cluster, pods: list[Pod]) -> bool:
    return not c.failing(pods)


def test_every_pod_pings_every_other_pod(cluster: tuple[str, Cluster]) -> None:
    topo, c = cluster
    require_capability(c)
    pods = [c.add_pod(1), c.add_pod(1), c.add_pod(2), c.add_pod(3)]
    assert c.wait_for(lambda: all_reach(c, pods), CONVERGE, 0.5), f"{c.failing(pods)}\n{c.diagnostics()}"

    block3 = c.block_of(pods[3])
    on_n1 = " ".join(c.routes_to(1, block3))
    if topo.startswith("bgp"):
        assert "vxlan" not in on_n1 and c.node(3).ip in on_n1, on_n1  # no encapsulation: via the node itself
    elif topo == "ipip":
        assert "tunl0" in on_n1 and c.node(3).ip in on_n1, on_n1
    elif topo == "vxlan":
        assert "vxlan.calico" in on_n1, on_n1
    else:  # CrossSubnet: n3 sits behind the router, n2 shares n1's subnet
        assert "vxlan.calico" in on_n1, on_n1
        same = " ".join(c.routes_to(1, c.block_of(pods[2])))
        assert "vxlan" not in same and c.node(2).ip in same, same
    if topo == "bgp-rr":
        rr = c.plan.rr
        assert rr is not None
        assert c.wait_for(lambda: all({p.address for p in c.peers(n) if p.state.lower() == "established"}
                                      == {rr.ip} for n in c.node_names), CONVERGE), c.diagnostics()


def test_deleting_a_block_removes_its_route_elsewhere(cluster: tuple[str, Cluster]) -> None:
    _topo, c = cluster
    require_capability(c)
    pod = c.add_pod(3)
    cidr = c.block_of(pod)
    assert c.wait_for(lambda: all(c.routes_to(n, cidr) for n in (1, 2)), CONVERGE), c.diagnostics()
    c.delete_block(cidr)
    assert c.wait_for(lambda: not any(c.routes_to(n, cidr) for n in (1, 2)), CONVERGE), c.diagnostics()


# --- faults (BGP full mesh, etcd) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Cluster, list[Pod]]]:
    # Short timers so "a peer goes away" resolves in seconds: hold 6 s, and peers keep a vanished node's
    # routes for its 10 s graceful-restart time (still far longer than an ExaBGP restart takes).
    with Cluster(mode="bgp", nodes=3, agent_env={"FELIXPY_BGP_HOLD_TIME": "6"}) as c:
        c.upsert(KIND_BGP_CONFIG, "default", {"nodeMeshMaxRestartTime": "10s"})
        c.require_bgp_config()
        pods = [c.add_pod(n) for n in (1, 2, 3)]
        assert c.wait_for(lambda: all_reach(c, pods), CONVERGE, 0.5), f"{c.failing(pods)}\n{c.diagnostics()}"
        yield c, pods


def test_exabgp_killed_is_restarted_and_peers_lose_no_route(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, pods = mesh
    cidr = c.block_of(pods[0])
    assert c.wait_for(lambda: bool(c.exabgp_pids(1)), 20), c.diagnostics()
    killed = c.kill_exabgp(1)
    assert killed
    lost: list[str] = []

    def restarted_and_routes_kept() -> bool:
        # Sampled continuously: graceful restart keeps the route on the peers while n1's ExaBGP is away.
        lost.extend(f"n{n}" for n in (2, 3) if not c.routes_to(n, cidr))
        new = [p for p in c.exabgp_pids(1) if p not in killed]
        return bool(new) and all(p.state.lower() == "established" for p in c.peers(1)) and len(c.peers(1)) == 2

    assert c.wait_for(restarted_and_routes_kept, CONVERGE, 0.1), c.diagnostics()
    assert lost == [], f"route to {cidr} missing on {sorted(set(lost))} during the restart"
    assert all_reach(c, pods), c.failing(pods)


def test_agent_restart_under_ping_loses_no_packet(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, pods = mesh
    ping = c.pinger(pods[1], pods[0], interval=0.05, count=300)  # n2's pod -> n1's pod for 15 s
    c.kill_agent(1)
    c.start_agent(1)
    stats = ping.stop()
    assert stats.sent == 300 and stats.lost == 0, (stats, c.diagnostics())


def test_peer_gone_routes_removed_after_hold_time_then_restored(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, pods = mesh
    conf = (c.lab.bgp_dir(c.node(1).name) / "exabgp.conf").read_text()
    holds = [int(h) for h in re.findall(r"hold-time (\d+);", conf)]
    if not holds:
        pytest.skip("no hold-time in the agent's exabgp.conf")
    hold = max(holds)
    if hold > 30:
        pytest.skip(f"BGP hold time is {hold}s; the test needs a shorter one (no knob set here yet)")
    cidr = c.block_of(pods[2])
    c.link_down(3)
    try:
        # Removed once the hold timer fires (plus any graceful-restart stale time the peers grant).
        assert c.wait_for(lambda: not any(c.routes_to(n, cidr) for n in (1, 2)), hold + 150, 0.5), c.diagnostics()
    finally:
        c.link_up(3)
    assert c.wait_for(lambda: all(c.routes_to(n, cidr) for n in (1, 2)), CONVERGE + hold, 0.5), c.diagnostics()
    assert c.wait_for(lambda: all_reach(c, pods), CONVERGE, 0.5), c.failing(pods)
