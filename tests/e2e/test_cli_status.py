"""``felixpy node status``, ``felixpy status``, /metrics and /readiness on a running 3-node BGP mesh (etcd).

The CLI runs inside each node's network namespace with the agent's environment, as it would in the
calico-node container. Faults: a node's ExaBGP sidecar stopped (its sessions go down: reasons shown, status
FAILs, readiness 503 after the short grace), an agent killed (node status: not running), and last, the
datastore killed before an agent gets SIGTERM (it must still exit promptly and leave its routes alone).
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from felixpy import labnet
from felixpy.datastore.api import KIND_BGP_CONFIG, KIND_GLOBAL_NETWORK_POLICY
from tests.e2e.multinode import Cluster, Pod

pytestmark = [pytest.mark.root, pytest.mark.realparts, pytest.mark.timeout(900)]

CONVERGE = 60.0
GRACE = 5  # FELIXPY_BGP_READY_GRACE for these agents
EXIT_BOUND = 10.0  # SIGTERM -> exit, with the datastore dead (it used to hang forever)


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Cluster, list[Pod]]]:
    env = {"FELIXPY_BGP_HOLD_TIME": "6", "FELIXPY_BGP_READY_GRACE": str(GRACE)}
    with Cluster(mode="bgp", nodes=3, agent_env=env) as c:
        c.upsert(KIND_BGP_CONFIG, "default", {"nodeMeshMaxRestartTime": "10s"})
        c.require_bgp_config()
        pods = [c.add_pod(n) for n in (1, 2, 3)]
        assert c.wait_for(lambda: not c.failing(pods), CONVERGE, 0.5), f"{c.failing(pods)}\n{c.diagnostics()}"
        yield c, pods


def cli(c: Cluster, node: int, *args: str) -> tuple[int, str]:
    name = c.node(node).name
    p = subprocess.run(["ip", "netns", "exec", c.node(node).netns, *labnet.felixpy_argv(*args)],
                       env=c.lab.agent_env(name), capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def peer_rows(out: str) -> dict[str, list[str]]:
    """``| addr | type | state | since | info |`` rows of the IPv4 table, by address."""
    rows = {}
    for ln in out.splitlines():
        cells = [x.strip() for x in ln.split("|")[1:-1]]
        if len(cells) == 5 and re.fullmatch(r"\d+\.\d+\.\d+\.\d+", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def http(c: Cluster, node: int, path: str) -> tuple[int, str]:
    url = f"http://{c.node(node).ip}:{labnet.HEALTH_PORT}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for ln in text.splitlines():
        if ln.startswith("#") or not ln.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", ln)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def mesh_up(c: Cluster, node: int) -> bool:
    rc, out = cli(c, node, "node", "status")
    rows = peer_rows(out)
    others = {c.node(n).ip for n in (1, 2, 3) if n != node}
    return rc == 0 and set(rows) == others and all(r[:2] == ["node-to-node mesh", "up"] and r[3] == "Established"
                                                   for r in rows.values())


def test_node_status_shows_mesh_peers_established(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, _pods = mesh
    for n in (1, 2, 3):
        assert c.wait_for(functools.partial(mesh_up, c, n), CONVERGE, 1.0), cli(c, n, "node", "status")[1]
    rc, out = cli(c, 1, "node", "status")
    assert rc == 0 and out.startswith("Calico process is running.\n\nIPv4 BGP status\n+"), out
    assert "No IPv6 peers found." in out
    since = peer_rows(out)[c.node(2).ip][2]
    assert re.fullmatch(r"\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d", since), out


def test_status_ok_and_metrics_on_a_healthy_node(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, _pods = mesh
    # A policy that selects every endpoint and allows everything: it becomes active on every node with a pod,
    # which is what felixpy_time_to_policy_seconds measures.
    c.upsert(KIND_GLOBAL_NETWORK_POLICY, "cli-status-allow-all",
             {"selector": "all()", "types": ["Ingress", "Egress"], "ingress": [{"action": "Allow"}],
              "egress": [{"action": "Allow"}]})
    try:
        def ttp_observed() -> bool:
            return (metric(http(c, 1, "/metrics")[1], "felixpy_time_to_policy_seconds_count") or 0) > 0

        assert c.wait_for(ttp_observed, CONVERGE, 0.5), http(c, 1, "/metrics")[1]
        seen: dict[str, str] = {}

        def settled() -> bool:
            """Status (JSON and text) all OK and the policy gauge published, in one observation: the fixture's
            BGPConfiguration change (restart time, negotiated in OPEN) resets every session a few seconds after
            start, and gauges update every 1 s."""
            rc, out = cli(c, 1, "status", "-o", "json")
            rc2, text = cli(c, 1, "status")
            code, m = http(c, 1, "/metrics")
            seen.update(json=out, text=text, metrics=m)
            return (rc == rc2 == 0 and code == 200 and all(ch["status"] == "OK" for ch in json.loads(out)["checks"])
                    and text.startswith(f"felixpy status of {c.node(1).name}: OK")
                    and (metric(m, "felix_active_local_policies") or 0) >= 1)

        assert c.wait_for(settled, CONVERGE, 1.0), seen
        out, text_out, m = seen["json"], seen["text"], seen["metrics"]
        st = json.loads(out)
        verdicts = {ch["name"]: ch["status"] for ch in st["checks"]}
        assert verdicts == {k: "OK" for k in ("agent", "datastore", "dataplane", "bgp", "ipam", "policy")}, out
        assert st["agent"]["policy"]["policies"] >= 1 and st["agent"]["ipam"]["local_blocks"], out
        assert text_out.startswith(f"felixpy status of {c.node(1).name}: OK"), text_out

        assert (metric(m, "felix_int_dataplane_apply_time_seconds_count") or 0) > 0
        assert (metric(m, "felix_int_dataplane_apply_time_seconds_sum") or 0) > 0
        assert (metric(m, "felix_active_local_endpoints") or 0) >= 1
        assert (metric(m, "felix_active_local_policies") or 0) >= 1
        assert metric(m, "felix_cluster_num_hosts") == 3
        assert (metric(m, "felix_cluster_num_workload_endpoints") or 0) >= 3
        assert metric(m, "felix_resync_state") == 3
        assert (metric(m, "felix_route_table_num_routes") or 0) > 0
        for n in (2, 3):
            assert metric(m, "felixpy_bgp_peer_established", peer=c.node(n).ip) == 1, m
            assert metric(m, "felixpy_bgp_peer_state", peer=c.node(n).ip, state="established") == 1
        assert (metric(m, "felixpy_ipam_pool_addresses", pool=c.lab.spec.pool, state="allocated") or 0) >= 3, m
        assert (metric(m, "felixpy_ipam_local_addresses", state="allocated") or 0) >= 1
    finally:
        c.delete(KIND_GLOBAL_NETWORK_POLICY, "cli-status-allow-all")


def test_bgp_down_shows_reasons_fails_status_and_readiness(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, _pods = mesh
    n2 = c.node(2)
    assert c.wait_for(lambda: mesh_up(c, 2), CONVERGE, 1.0), cli(c, 2, "node", "status")[1]
    c.lab.stop(f"bgp:{n2.name}")  # the sidecar stops its ExaBGP: every session of n2 goes down
    c.kill_exabgp(2)  # in case it outlived its supervisor
    try:
        def n2_down() -> bool:
            rows = peer_rows(cli(c, 2, "node", "status")[1])
            return len(rows) == 2 and all(r[1] != "up" for r in rows.values())

        assert c.wait_for(n2_down, CONVERGE, 1.0), cli(c, 2, "node", "status")[1]
        rc, out = cli(c, 2, "node", "status")
        assert rc == 0 and "Calico process is running." in out
        for row in peer_rows(out).values():
            assert row[1] == "start" and row[3] != "Established" and len(row[3].split()) > 1, out  # state + reason

        # n1 sees n2 go: its row is no longer up and says why (notification / connection closed).
        def n1_sees_n2_down() -> bool:
            row = peer_rows(cli(c, 1, "node", "status")[1]).get(n2.ip)
            return row is not None and row[1] != "up" and len(row[3].split()) > 1

        assert c.wait_for(n1_sees_n2_down, CONVERGE, 1.0), cli(c, 1, "node", "status")[1]

        rc, out = cli(c, 2, "status", "-o", "json")
        st = json.loads(out)
        bgp = next(ch for ch in st["checks"] if ch["name"] == "bgp")
        assert rc == 1 and st["status"] == "FAIL" and bgp["status"] == "FAIL", out
        assert "0/2 peers established" in bgp["reason"] or "ExaBGP" in bgp["reason"], out
        # The grace (5 s) is long over: readiness fails with calico-node's message.
        assert c.wait_for(lambda: http(c, 2, "/readiness")[0] == 503, CONVERGE, 0.5), http(c, 2, "/readiness")
        assert "BGP not established with" in http(c, 2, "/readiness")[1]
        assert http(c, 1, "/readiness")[0] == 200  # n1 still has n3
    finally:
        c.lab.start_sidecar(n2.name)
    assert c.wait_for(lambda: mesh_up(c, 2) and mesh_up(c, 1), CONVERGE + 30, 1.0), c.diagnostics()
    assert c.wait_for(lambda: http(c, 2, "/readiness")[0] == 200, CONVERGE, 0.5), http(c, 2, "/readiness")


def test_node_status_when_the_agent_is_down(mesh: tuple[Cluster, list[Pod]]) -> None:
    c, _pods = mesh
    c.kill_agent(3)
    try:
        rc, out = cli(c, 3, "node", "status")
        assert rc == 1 and out.strip() == "Calico process is not running.", out
        rc, out = cli(c, 3, "status")
        assert rc == 1 and re.search(r"agent\s+FAIL\s+not running", out), out
    finally:
        c.start_agent(3)
    assert c.wait_for(lambda: mesh_up(c, 3), CONVERGE, 1.0), cli(c, 3, "node", "status")[1]


def test_sigterm_exits_promptly_with_the_datastore_gone(mesh: tuple[Cluster, list[Pod]]) -> None:
    """Last in the module: it kills the datastore."""
    c, pods = mesh
    n1 = c.node(1)
    routes_before = [r for r in c.node_routes(1) if r.startswith(pods[0].ip)]
    assert routes_before, c.node_routes(1)
    c.lab.stop("etcd", sig=signal.SIGKILL)
    rc, out = cli(c, 2, "status", "--timeout", "3")
    assert rc == 1 and re.search(r"datastore\s+FAIL\s+unreachable", out), out
    time.sleep(2)  # let the agents notice (watch errors, reconnect attempts)
    rec = c.lab.ledger.data["procs"][f"agent:{n1.name}"]
    pid, start = int(rec["pid"]), int(rec.get("start") or 0)
    os.kill(pid, signal.SIGTERM)
    exited = c.wait_for(lambda: not labnet.proc_alive(pid, start), EXIT_BOUND, 0.1)
    if not exited:
        os.kill(pid, signal.SIGKILL)
    assert exited, f"agent still running {EXIT_BOUND:g}s after SIGTERM\n{c.agent_log(1)}"
    c.lab.ledger.drop_proc(f"agent:{n1.name}")
    # Nothing flushed: the pod's route is still there.
    assert [r for r in c.node_routes(1) if r.startswith(pods[0].ip)] == routes_before
