"""A BIRD route reflector rendered by felixpy, with Calico-style BIRD nodes, in network namespaces.

Topology (all namespaces made by the ``make_ns`` fixture): a switch namespace holding bridge ``br0`` and one
veth per node namespace (``eth0`` inside, 192.168.100.0/24). Every BIRD is killed by PID, and the
namespaces deleted, whatever happens.

1. Reflection: the reflector's config comes from ``render_route_reflector`` and two clients' from
   ``render_calico_node``, all three computed with Calico's rules from the same resources (mesh off,
   BGPPeer ``nodeSelector: all()`` / ``peerSelector: route-reflector == 'true'``). Client 1's block reaches
   client 2's kernel table (and back) with its original next hop, and nothing but BGP routes is reflected.
2. ``bgp.rr.RouteReflector`` driven from an in-memory datastore: it writes its own Node, configures BIRD,
   reloads it on change without dropping unchanged sessions, skips malformed resources, restarts a BIRD
   that dies, and stops it when cancelled.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bgp.bird_conf import render_calico_node, render_route_reflector
from bgp.model import LocalBgpConfig
from bgp.peers import compute_local_config, parse_bgp_configuration, parse_bgp_node, parse_bgp_peer
from bgp.routes import PoolInfo
from bgp.rr import RouteReflector
from felixpy.datastore.api import KIND_BGP_CONFIG, KIND_BGP_PEER, KIND_NODE, Key, NotFound, Resource, new_resource
from felixpy.datastore.memory import MemoryBackend

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("bird") is None or shutil.which("birdc") is None,
                       reason="bird/birdc (BIRD 2) are not installed"),
]

RUN = f"fxrr{os.getpid() % 100000}"
SUBNET = "192.168.100"
RR_IP = f"{SUBNET}.254"
CLUSTER_ID = "1.0.0.1"
POOL = ipaddress.IPv4Network("10.244.0.0/16")
TABLE = 100


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30).stdout


def node_res(name: str, ip: str, *, cluster: str = "", labels: dict[str, str] | None = None) -> Resource:
    bgp = {"ipv4Address": f"{ip}/24"}
    if cluster:
        bgp["routeReflectorClusterID"] = cluster
    return new_resource(Key(KIND_NODE, name), {"bgp": bgp}, labels=labels)


MESH_OFF = new_resource(Key(KIND_BGP_CONFIG, "default"), {"nodeToNodeMeshEnabled": False})
TO_RR = new_resource(Key(KIND_BGP_PEER, "to-rr"),
                     {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"})


def config_for(me: str, node_resources: list[Resource]) -> LocalBgpConfig:
    nodes = {n.name: n for n in map(parse_bgp_node, node_resources)}
    cfg = compute_local_config(me, nodes, parse_bgp_configuration(MESH_OFF), None, [parse_bgp_peer(TO_RR)])
    assert cfg is not None
    return cfg


class Lab:
    """Namespaces on one bridge, and the BIRDs started in them (stopped by PID in :meth:`close`)."""

    def __init__(self, make_ns: Callable[[], str], tmp: Path) -> None:
        self.make_ns = make_ns
        self.tmp = tmp
        self.sw = make_ns()
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ns: dict[str, str] = {}

    def add(self, name: str, ip: str) -> str:
        ns = self.make_ns()
        port = f"v{len(self.ns)}"
        sh("ip", "-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.sw, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self.ns[name] = ns
        return ns

    def ctl(self, name: str) -> str:
        return str(self.tmp / f"{name}.ctl")

    def start_bird(self, name: str, text: str, *, recovery: bool = False) -> subprocess.Popen[bytes]:
        cfg = self.tmp / f"{name}.cfg"
        cfg.write_text(text)
        argv = ["ip", "netns", "exec", self.ns[name], "bird", "-f", "-c", str(cfg), "-s", self.ctl(name)]
        if recovery:
            argv.insert(6, "-R")
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def birdc(self, name: str, *args: str) -> str:
        return sh("birdc", "-s", self.ctl(name), *args, check=False)

    def close(self) -> None:
        for p in self.procs:  # "ip netns exec" execs bird, so this PID is BIRD's
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


@pytest.fixture
def lab(make_ns: Callable[[], str], tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(make_ns, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def wait_for(pred: Callable[[], bool], what: str, lab: Lab | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            logs = ""
            if lab is not None:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in lab.tmp.glob("*.log"))
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


async def await_for(pred: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def kernel_route(lab: Lab, name: str, dst: str) -> str:
    # Not checked: "ip route show table N" fails until the table has its first route.
    return sh("ip", "-n", lab.ns[name], "route", "show", "table", str(TABLE), dst, check=False).strip()


# ------------------------------------------------------------------------------------------- 1. reflection


def test_reflector_carries_routes_between_calico_style_nodes(lab: Lab) -> None:
    resources = [node_res("c1", f"{SUBNET}.1"), node_res("c2", f"{SUBNET}.2"),
                 node_res("rr", RR_IP, cluster=CLUSTER_ID, labels={"route-reflector": "true"})]
    for name, ip in (("rr", RR_IP), ("c1", f"{SUBNET}.1"), ("c2", f"{SUBNET}.2")):
        lab.add(name, ip)
    rr_cfg = config_for("rr", resources)
    assert [(p.name, p.rr_client) for p in rr_cfg.peers] == [(f"Node_{SUBNET.replace('.', '_')}_1", True),
                                                             (f"Node_{SUBNET.replace('.', '_')}_2", True)]
    lab.start_bird("rr", render_route_reflector(rr_cfg), recovery=True)
    pools = [PoolInfo(POOL)]
    for i in (1, 2):
        cfg = config_for(f"c{i}", resources)
        assert [p.name for p in cfg.peers] == ["Node_192_168_100_254"]
        block = ipaddress.IPv4Network(f"10.244.{i}.0/26")
        lab.start_bird(f"c{i}", render_calico_node(cfg, local_blocks=[block], pools=pools, kernel_table=TABLE))

    # Client 1's block, in client 2's kernel table, with client 1 (not the reflector) as next hop; and back.
    wait_for(lambda: f"via {SUBNET}.1 " in kernel_route(lab, "c2", "10.244.1.0/26"), "c1's block on c2", lab)
    wait_for(lambda: f"via {SUBNET}.2 " in kernel_route(lab, "c1", "10.244.2.0/26"), "c2's block on c1", lab)
    assert "proto bird" in kernel_route(lab, "c2", "10.244.1.0/26")

    detail = lab.birdc("c2", "show", "route", "all", "10.244.1.0/26")
    assert f"BGP.next_hop: {SUBNET}.1" in detail
    assert f"BGP.originator_id: {SUBNET}.1" in detail and f"BGP.cluster_list: {CLUSTER_ID}" in detail

    # P9: the reflector exports only BGP routes; its connected subnet never reaches a client.
    from_rr = lab.birdc("c2", "show", "route", "protocol", "Node_192_168_100_254")
    assert "10.244.1.0/26" in from_rr
    assert f"{SUBNET}.0/24" not in from_rr
    assert "10.244.2.0/26" not in from_rr  # c2's own block is not reflected back to it
    # The reflector writes nothing to its kernel.
    assert sh("ip", "-n", lab.ns["rr"], "route", "show", "table", "all", "proto", "bird").strip() == ""


# ------------------------------------------------------------------------------------------- 2. the runner


async def test_route_reflector_runner_from_the_datastore(lab: Lab) -> None:
    rr_ns = lab.add("rr", RR_IP)
    lab.add("c1", f"{SUBNET}.1")
    be = MemoryBackend()
    for res in (node_res("c1", f"{SUBNET}.1"), node_res("c2", f"{SUBNET}.2"), MESH_OFF, TO_RR):
        await be.create(Key(res["kind"], res["metadata"]["name"]), res)
    run_dir = lab.tmp / "rr-run"
    rr = RouteReflector(be, "rr", str(run_dir), node_ip=ipaddress.IPv4Interface(f"{RR_IP}/24"),
                        cluster_id=CLUSTER_ID, labels={"route-reflector": "true"},
                        bird_argv_prefix=["ip", "netns", "exec", rr_ns])
    task = asyncio.create_task(rr.run())
    old_pid: int | None = None
    try:
        async def has_node() -> bool:
            try:
                kv = await be.get(Key(KIND_NODE, "rr"))
            except NotFound:
                return False
            return bool(kv.value["metadata"].get("labels", {}).get("route-reflector") == "true")

        await await_for(has_node, "the reflector's own Node")

        async def protocols() -> dict[str, Any]:
            if rr.bird.pid is None:
                return {}
            try:
                return {p.name: p for p in await rr.protocols() if p.proto == "BGP"}
            except RuntimeError:
                return {}  # BIRD is (re)starting and its socket is not there yet

        async def established(name: str) -> bool:
            p = (await protocols()).get(name)
            return p is not None and p.established

        # A Calico-style BIRD client on c1 computed from the datastore's resources, reflector included.
        nodes = [kv.value for kv in (await be.list(KIND_NODE)).items]
        lab.start_bird("c1", render_calico_node(config_for("c1", nodes), local_blocks=[], pools=[PoolInfo(POOL)]))
        await await_for(lambda: established("Node_192_168_100_1"), "the session with c1")
        assert "Node_192_168_100_2" in await protocols()  # c2 has no namespace: configured, not up
        assert (run_dir / "bird.cfg").read_text().count("rr client;") == 2
        pid = rr.bird.pid
        assert pid is not None

        # A new node: BIRD is reloaded in place and the unchanged session stays up.
        await be.create(Key(KIND_NODE, "c3"), node_res("c3", f"{SUBNET}.3"))

        async def has_c3() -> bool:
            return "Node_192_168_100_3" in await protocols()

        await await_for(has_c3, "the new node's session")
        assert rr.bird.pid == pid and rr.reloads >= 1
        assert (await protocols())["Node_192_168_100_1"].established

        # A malformed Node is skipped; the reflector keeps running with the rest.
        bad = node_res("bad", f"{SUBNET}.9")
        bad["spec"]["bgp"]["ipv4Address"] = "not-an-address"
        await be.create(Key(KIND_NODE, "bad"), bad)

        async def counted() -> bool:
            return rr.invalid_resources >= 1

        await await_for(counted, "the malformed node to be counted")
        assert not task.done() and "Node_192_168_100_9" not in await protocols()

        # BIRD dies: the supervisor starts a new one with the same config.
        old_pid = pid
        os.kill(pid, signal.SIGKILL)

        async def restarted() -> bool:
            return rr.bird.pid not in (None, old_pid) and await established("Node_192_168_100_1")

        await await_for(restarted, "BIRD to be restarted and the session back")
        assert rr.bird.starts == 2

        # No BGPPeer, no sessions (the mesh is off and reflectors never mesh anyway).
        await be.delete(Key(KIND_BGP_PEER, "to-rr"))

        async def no_sessions() -> bool:
            return not await protocols()

        await await_for(no_sessions, "the sessions to go away")
        last_pid = rr.bird.pid
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert last_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(last_pid, 0)  # stopped (and reaped) on cancel
    assert not (run_dir / "bird.ctl").exists()
