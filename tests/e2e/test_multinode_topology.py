"""The multi-node lab's topology without agents: the plan, namespaces, bridge, router, addresses, the
datastore reachable from node namespaces, cutting a node off the switch, and cleanup (also from a state file
after a crash, through ``felixpy lab down``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from felixpy import lab as lab_cli
from felixpy import labnet
from felixpy.labnet import LabError, LabSpec, make_plan
from tests.e2e.multinode import Cluster


def netns_with(prefix: str) -> list[str]:
    return sorted(n for n in labnet.existing_netns() if n.startswith(prefix + "-"))


def assert_gone(prefix: str, workdir: Path, pids: list[int]) -> None:
    assert netns_with(prefix) == []
    assert subprocess.run(["ip", "link", "show", f"{prefix}-ds"], capture_output=True).returncode != 0
    assert [p for p in pids if labnet.proc_alive(p)] == []
    assert not workdir.exists()


def ping_ttl(netns: str, ip: str) -> int:
    out = labnet.ns_run(netns, "ping", "-n", "-c", "1", "-W", "2", ip)
    return int(out.split("ttl=")[1].split()[0])


def http_from(netns: str, url: str, *, token: str = "", ca: str = "") -> str:
    """GET ``url`` from inside ``netns`` with the system python (a process of that netns, like the agent)."""
    code = ("import sys, ssl, urllib.request as u\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[3]) if sys.argv[3] else None\n"
            "h = {'Authorization': 'Bearer ' + sys.argv[2]} if sys.argv[2] else {}\n"
            "print(u.urlopen(u.Request(sys.argv[1], headers=h), timeout=5, context=ctx).read().decode())\n")
    return labnet.ns_run(netns, "/usr/bin/python3", "-c", code, url, token, ca)


# --- the plan (pure) ------------------------------------------------------------------------------------


def test_plan_single_subnet() -> None:
    p = make_plan(LabSpec(prefix="t1", nodes=3, mode="bgp", rr=True, base="172.20"))
    assert [n.name for n in p.nodes] == ["t1-n1", "t1-n2", "t1-n3"]
    assert [str(n.address) for n in p.nodes] == ["172.20.1.11/24", "172.20.1.12/24", "172.20.1.13/24"]
    assert {n.gateway for n in p.nodes} == {"172.20.1.1"}
    assert p.rr is not None and p.rr.name == "t1-rr" and str(p.rr.address) == "172.20.1.250/24"
    assert p.namespaces() == ["t1-sw", "t1-rt", "t1-n1", "t1-n2", "t1-n3", "t1-rr"]
    assert (p.ds_link, p.ds_ip) == ("t1-ds", "172.20.1.254")
    assert p.node(2) is p.node("n2") is p.node("t1-n2")
    with pytest.raises(KeyError):
        p.node("n9")


def test_plan_crosssubnet_splits_nodes() -> None:
    p = make_plan(LabSpec(prefix="t2", nodes=3, mode="vxlan-crosssubnet", base="172.21"))
    assert [str(s) for s in p.subnets] == ["172.21.1.0/24", "172.21.2.0/24"]
    assert [(n.subnet, str(n.address), n.gateway) for n in p.nodes] == [
        (1, "172.21.1.11/24", "172.21.1.1"), (1, "172.21.1.12/24", "172.21.1.1"), (2, "172.21.2.13/24", "172.21.2.1")]
    assert make_plan(LabSpec(prefix="t2", nodes=4, subnets=2)).nodes[2].subnet == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "geneve"}, "unknown mode"),
    ({"datastore": "consul"}, "unknown datastore"),
    ({"prefix": "much-too-long-prefix"}, "prefix"),
    ({"prefix": "Upper"}, "prefix"),
    ({"mode": "vxlan", "rr": True}, "--rr needs a BGP mode"),
    ({"nodes": 1, "subnets": 2}, "two subnets"),
    ({"base": "300.1"}, "bad address"),
    ({"base": "10.244"}, "overlap the pod pool"),
])
def test_plan_rejects_bad_specs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LabError, match=message):
        make_plan(LabSpec(**kwargs))  # type: ignore[arg-type]


def test_lab_cli_usage_errors() -> None:
    assert lab_cli.main(["up", "--mode", "nope"]) == 2
    assert lab_cli.main(["--help"]) == 0


# --- the real topology ----------------------------------------------------------------------------------


@pytest.fixture
def topo() -> Iterator[Cluster]:
    c = Cluster(mode="bgp", nodes=3, start_agents=False)
    c.start()
    yield c
    c.stop()


@pytest.mark.root
@pytest.mark.realparts
def test_single_subnet_topology(topo: Cluster) -> None:
    plan = topo.plan
    prefix = plan.spec.prefix
    assert netns_with(prefix) == sorted(plan.namespaces())
    # The switch holds one bridge with every node's port, the router's and the datastore link's.
    br = labnet.run("ip", "-n", plan.switch, "-o", "link", "show", "master", "br1")
    assert {ln.split(":")[1].strip().split("@")[0] for ln in br.splitlines()} == {"n1", "n2", "n3", "rt1", "ds"}
    for n in plan.nodes:
        assert str(n.address) in labnet.run("ip", "-n", n.netns, "-o", "-4", "addr", "show", "dev", "eth0")
        assert f"default via {n.gateway} dev eth0" in topo.node_routes(n.name)
    # Node to node directly (TTL untouched), the datastore from every node.
    assert ping_ttl(plan.nodes[0].netns, plan.nodes[2].ip) == 64
    for n in plan.nodes:
        assert json.loads(http_from(n.netns, f"{topo.datastore.etcd_endpoint}/health"))["health"] == "true"

    # ... and from this process through felixpy's own backend.
    from felixpy.datastore.api import KIND_IPPOOL

    async def pools(b: object) -> int:
        return len((await b.list(KIND_IPPOOL)).items)  # type: ignore[attr-defined]

    assert topo.with_backend(pools) == 0


@pytest.mark.root
@pytest.mark.realparts
def test_link_down_cuts_only_the_switch_port(topo: Cluster) -> None:
    n1, n2 = topo.node(1), topo.node(2)
    topo.link_down(2)
    try:
        assert subprocess.run(["ip", "netns", "exec", n1.netns, "ping", "-c1", "-W1", n2.ip],
                              capture_output=True).returncode != 0
        # The node itself sees no change on its link (no carrier event for the agent to react to).
        assert "state UP" in labnet.run("ip", "-n", n2.netns, "link", "show", "eth0")
    finally:
        topo.link_up(2)
    assert ping_ttl(n1.netns, n2.ip) == 64


@pytest.mark.root
@pytest.mark.realparts
def test_two_subnets_joined_by_router() -> None:
    with Cluster(mode="vxlan-crosssubnet", nodes=3, start_agents=False) as c:
        n1, n2, n3 = c.plan.nodes
        assert (n1.subnet, n2.subnet, n3.subnet) == (1, 1, 2)
        assert ping_ttl(n1.netns, n2.ip) == 64  # same subnet: bridged
        assert ping_ttl(n1.netns, n3.ip) == 63  # other subnet: one router hop
        assert f"via {n1.gateway}" in labnet.run("ip", "-n", n1.netns, "route", "get", n3.ip)
        # This process (the lab, the tests) reaches both subnets: health probes go straight to node addresses.
        assert labnet.run("ping", "-n", "-c1", "-W2", n3.ip) and labnet.run("ping", "-n", "-c1", "-W2", n1.ip)
        # The datastore lives on subnet 1; node 3 reaches it through the router.
        assert '"health":"true"' in http_from(n3.netns, f"{c.datastore.etcd_endpoint}/health").replace(" ", "")
        prefix, workdir = c.plan.spec.prefix, c.workdir
    assert_gone(prefix, workdir, [])


@pytest.mark.root
@pytest.mark.realparts
def test_kube_apiserver_reachable_from_nodes() -> None:
    if not os.access(labnet.KUBE_APISERVER_BINARY, os.X_OK):
        pytest.skip(f"kube-apiserver not built ({labnet.KUBE_APISERVER_BINARY}); see docs/control-plane.md")
    with Cluster(mode="vxlan", nodes=2, datastore="kubernetes", start_agents=False) as c:
        ds = c.datastore
        # Verified TLS from a node netns: the serving certificate names the lab address it binds.
        nodes = json.loads(http_from(c.node(2).netns, f"{ds.server}/api/v1/nodes", token=ds.token, ca=ds.ca_file))
        assert sorted(i["metadata"]["name"] for i in nodes["items"]) == c.node_names
        crd = http_from(c.node(1).netns, f"{ds.server}/apis/crd.projectcalico.org/v1/ippools", token=ds.token,
                        ca=ds.ca_file)
        assert json.loads(crd)["kind"] == "IPPoolList"
        # The agents' kubeconfig is valid YAML/JSON and names that server.
        assert json.loads(Path(ds.kubeconfig).read_text())["clusters"][0]["cluster"]["server"] == ds.server


@pytest.mark.root
@pytest.mark.realparts
def test_cluster_stop_leaves_nothing() -> None:
    c = Cluster(mode="bgp", nodes=2, rr=True, start_agents=False).start()
    lab = c.lab
    # A daemon in a node netns with an untracked grandchild (like the sidecar's ExaBGP).
    p = labnet.spawn(lab.ledger, "sleeper", ["sh", "-c", "sleep 600 & sleep 600"], netns=c.node(1).netns,
                     log=c.workdir / "sleeper.log")
    assert labnet.wait_for(lambda: len(labnet.netns_pids(c.node(1).netns)) == 3, 5)
    pids = [*labnet.netns_pids(c.node(1).netns), lab.ledger.data["procs"]["etcd"]["pid"]]
    prefix, workdir = c.plan.spec.prefix, c.workdir
    c.stop()
    p.wait(5)
    assert_gone(prefix, workdir, pids)


@pytest.mark.root
@pytest.mark.realparts
def test_lab_down_after_a_crashed_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """`felixpy lab down` from nothing but the state file (the `up` process is gone, objects dangling)."""
    state_dir = Path(tempfile.mkdtemp(prefix="felixpy-labstate-", dir="/dev/shm"))
    monkeypatch.setenv("FELIXPY_LAB_DIR", str(state_dir))
    spec = LabSpec(prefix=f"lc{os.getpid() % 10000}", nodes=2, mode="vxlan-crosssubnet", base=labnet.pick_base())
    lab = labnet.Lab(spec, state_dir / spec.prefix, labnet.Ledger({}, lab_cli._save))
    try:
        lab.build_network()
        lab.start_datastore()
        labnet.spawn(lab.ledger, "agent:fake", ["sleep", "600"], netns=lab.plan.nodes[1].netns,
                     log=lab.workdir / "fake.log")
        pids = [int(r["pid"]) for r in lab.ledger.data["procs"].values()]
        # An object made after the last save is still found by its name.
        labnet.run("ip", "netns", "add", f"{spec.prefix}-n1-p9")
        del lab  # the crash: nothing in memory survives, only the state file
        assert lab_cli.main(["status"]) == 0
        assert lab_cli.main(["down"]) == 0
        assert_gone(spec.prefix, state_dir / spec.prefix, pids)
        assert not (state_dir / "state.json").exists()
        assert lab_cli.main(["status"]) == 1  # nothing left to report
    finally:
        labnet.teardown(json.loads((state_dir / "state.json").read_text()) if (state_dir / "state.json").exists()
                        else {}, prefix=spec.prefix)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.mark.root
@pytest.mark.realparts
def test_peers_fall_back_to_bgp_sockets(topo: Cluster) -> None:
    """Without the agent's status.json, a node's BGP peers are its established TCP sessions on port 179."""
    lab, n1, n2, n3 = topo.lab, topo.node(1), topo.node(2), topo.node(3)
    listen = "import socket,time;s=socket.create_server(('0.0.0.0',179));c=s.accept();time.sleep(60)"
    connect = f"import socket,time;c=socket.create_connection(('{n1.ip}',179));time.sleep(60)"
    server = labnet.spawn(lab.ledger, "listener", ["/usr/bin/python3", "-c", listen], netns=n1.netns,
                          log=topo.workdir / "l.log")
    assert labnet.wait_for(lambda: ":179" in labnet.ns_run(n1.netns, "ss", "-Htln"), 5)
    client = labnet.spawn(lab.ledger, "speaker", ["/usr/bin/python3", "-c", connect], netns=n2.netns,
                          log=topo.workdir / "c.log")
    try:
        assert labnet.wait_for(lambda: bool(topo.peers(1)), 5)
        assert topo.peers(1) == [labnet.PeerRow(n2.ip, "Established", "", "ss")]
        assert [p.address for p in topo.peers(2)] == [n1.ip]
        assert topo.peers(3) == []
        # The agent's own table wins when it exists.
        bgp = lab.bgp_dir(n1.name)
        bgp.mkdir(parents=True)
        (bgp / "status.json").write_text(json.dumps({"peers": [
            {"address": n2.ip, "name": "Mesh_x", "state": "Established"},
            {"address": n3.ip, "name": "Mesh_y", "state": "Connect"}]}))
        assert [(p.address, p.state, p.source) for p in topo.peers(1)] == [
            (n2.ip, "Established", "status.json"), (n3.ip, "Connect", "status.json")]
    finally:
        for key in ("speaker", "listener"):
            lab.stop(key)
        server.wait(5)
        client.wait(5)
