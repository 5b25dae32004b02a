"""The CNI executable against the running agent and a real datastore, called the way a runtime calls it.

Covers: ADD/CHECK/DEL wiring and results, bad input (nothing left behind), 50 parallel ADDs then DELs
(unique addresses, zero leaks), agent restart without touching routes, drift repair.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from felixpy import names
from tests.e2e.conftest import NODE, ipam_usage
from tests.e2e.harness import Agent, DatastoreEnv, cali_links, calico_conf, routes_in, run_cni, sh, wait_for

pytestmark = [pytest.mark.root, pytest.mark.realparts]


class Netns:
    """Pod network namespaces made by this test (a runtime would make them), always removed."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def new(self) -> str:
        name = f"fxe2e-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.made.append(name)
        return name

    def cleanup(self) -> None:
        for n in self.made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    n = Netns()
    yield n
    n.cleanup()


def ping(src_netns: str, dst: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", src_netns, "ping", "-c", "1", "-W", "2", dst],
                          capture_output=True).returncode == 0


def mine(values: list[str], prefix: str) -> list[str]:
    return [v for v in values if prefix in v]


def test_add_check_del(agent: Agent, plugin: Path, netns: Netns, datastore: DatastoreEnv, pool: str) -> None:
    ns = "e2e-" + uuid.uuid4().hex[:6]
    datastore.ensure_namespace(ns)
    pods = []
    for i in range(2):
        pod, cid = f"web-{i}", uuid.uuid4().hex
        datastore.create_pod(ns, pod, NODE)
        n = netns.new()
        rc, res = run_cni(plugin, "ADD", calico_conf(agent), cid=cid, netns=f"/run/netns/{n}", ns=ns, pod=pod)
        assert rc == 0, (res, agent.log_tail())
        pods.append((pod, cid, n, res))
    for pod, _cid, n, res in pods:
        veth = names.veth_name_for_workload(ns, pod)
        assert res["cniVersion"] == "1.0.0"
        assert res["interfaces"][0] == {"name": veth, "mac": names.HOST_VETH_MAC}
        assert res["interfaces"][1]["sandbox"] == f"/run/netns/{n}" and res["interfaces"][1]["mac"]
        ip = ipaddress.ip_interface(res["ips"][0]["address"])
        assert ip.network.prefixlen == 32 and ip.ip in ipaddress.ip_network(pool)
        # Host side: the /32 route via the veth (ours, proto 80), proxy ARP on, no address.
        assert f"{ip.ip} dev {veth} proto 80 scope link" in sh("ip", "route", "show", f"{ip.ip}/32")
        assert Path(f"/proc/sys/net/ipv4/conf/{veth}/proxy_arp").read_text().strip() == "1"
        assert "inet " not in sh("ip", "addr", "show", "dev", veth)
        # Pod side: /32 on eth0, default via 169.254.1.1.
        assert "default via 169.254.1.1 dev eth0" in sh("ip", "-n", n, "route")
        # The WorkloadEndpoint is in the datastore.
        if datastore.type == "kubernetes":
            ann = datastore.pod(ns, pod)["metadata"]["annotations"]
            assert ann["cni.projectcalico.org/podIP"] == str(ip)
    # Blackhole for the node's affine block, and pods reach each other.
    assert any(r.startswith("blackhole") and "proto 80" in r for r in routes_in(pool)), routes_in(pool)
    ip0 = pods[0][3]["ips"][0]["address"].split("/")[0]
    ip1 = pods[1][3]["ips"][0]["address"].split("/")[0]
    assert ping(pods[0][2], ip1) and ping(pods[1][2], ip0)
    # CHECK with the ADD result as prevResult passes; after breaking the pod side it fails.
    _, cid0, n0, res0 = pods[0]
    conf = {**calico_conf(agent), "prevResult": res0}
    assert run_cni(plugin, "CHECK", conf, cid=cid0, netns=f"/run/netns/{n0}", ns=ns, pod="web-0")[0] == 0
    subprocess.run(["ip", "-n", n0, "addr", "flush", "dev", "eth0"], check=True)
    rc, err = run_cni(plugin, "CHECK", conf, cid=cid0, netns=f"/run/netns/{n0}", ns=ns, pod="web-0")
    assert rc != 0 and "CHECK failed" in err["msg"]
    # DEL twice (containerd style: second time without netns) cleans everything.
    for pod, cid, n, _ in pods:
        assert run_cni(plugin, "DEL", calico_conf(agent), cid=cid, netns=f"/run/netns/{n}", ns=ns, pod=pod)[0] == 0
        assert run_cni(plugin, "DEL", calico_conf(agent), cid=cid, netns="", ns=ns, pod=pod)[0] == 0
    assert not {names.veth_name_for_workload(ns, p[0]) for p in pods} & cali_links()
    assert not [r for r in routes_in(pool) if not r.startswith("blackhole")]
    handles, used = ipam_usage(datastore)
    assert not [h for h in handles if any(p[1] in h for p in pods)]
    assert not [ip for ip in used if ipaddress.ip_address(ip) in ipaddress.ip_network(pool)]


BAD_INPUTS = [
    ("not json", b"{{{", "ADD", True, 6),
    ("missing name", {"cniVersion": "1.0.0", "type": "calico", "ipam": {"type": "calico-ipam"}}, "ADD", True, 7),
    ("unsupported version", {"cniVersion": "2.0.0", "name": "x", "type": "calico"}, "ADD", True, 1),
    ("unknown command", None, "FROB", True, 4),
    ("missing netns", None, "ADD", False, 999),
    ("unsupported ipam", "hostlocal", "ADD", True, 7),
]


@pytest.mark.parametrize(("what", "conf", "command", "netns_ok", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_cni_error_and_leaves_nothing(agent: Agent, plugin: Path, netns: Netns,
                                                     datastore: DatastoreEnv, pool: str, what: str,
                                                     conf: object, command: str, netns_ok: bool,
                                                     code: int) -> None:
    cid = "bad" + uuid.uuid4().hex
    n = netns.new()
    path = f"/run/netns/{n}" if netns_ok else f"/run/netns/{n}-missing"
    body: dict[str, object] | bytes
    if conf is None:
        body = calico_conf(agent)
    elif conf == "hostlocal":
        body = {**calico_conf(agent), "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}
    elif isinstance(conf, dict):
        body = {**conf, "felixpy_socket": agent.socket}
    else:
        body = conf  # type: ignore[assignment]
    before = cali_links()
    # The socket also comes from the environment: a body that is not JSON cannot name it.
    rc, err = run_cni(plugin, command, body, cid=cid, netns=path, ns="bad", pod=cid[:20], socket=agent.socket)
    assert rc != 0
    assert err["code"] == code and err["msg"], err
    assert cali_links() == before
    handles, _ = ipam_usage(datastore)
    assert not [h for h in handles if cid in h]
    assert not [r for r in routes_in(pool) if not r.startswith("blackhole")]


def test_50_parallel_adds_then_dels(agent: Agent, plugin: Path, netns: Netns, datastore: DatastoreEnv,
                                    pool: str) -> None:
    ns = "par-" + uuid.uuid4().hex[:6]
    datastore.ensure_namespace(ns)
    work = []
    for i in range(50):
        pod = f"p{i}"
        datastore.create_pod(ns, pod, NODE)
        work.append((pod, uuid.uuid4().hex, netns.new()))

    def add(w: tuple[str, str, str]) -> tuple[int, dict[str, object]]:
        return run_cni(plugin, "ADD", calico_conf(agent), cid=w[1], netns=f"/run/netns/{w[2]}", ns=ns, pod=w[0])

    with ThreadPoolExecutor(50) as ex:
        results = list(ex.map(add, work))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0] != 0][:3]
    ips = [r["ips"][0]["address"] for _, r in results]  # type: ignore[index]
    assert len(set(ips)) == 50
    _, used = ipam_usage(datastore)
    in_pool = [ip for ip in used if ipaddress.ip_address(ip) in ipaddress.ip_network(pool)]
    assert sorted(in_pool) == sorted(i.split("/")[0] for i in ips), (used[:5], ips[:3])
    assert len([r for r in routes_in(pool) if " dev cali" in r]) == 50

    def delete(w: tuple[str, str, str]) -> int:
        return run_cni(plugin, "DEL", calico_conf(agent), cid=w[1], netns=f"/run/netns/{w[2]}", ns=ns, pod=w[0])[0]

    with ThreadPoolExecutor(50) as ex:
        assert all(rc == 0 for rc in ex.map(delete, work))
    handles, used = ipam_usage(datastore)
    assert not [h for h in handles if any(w[1] in h for w in work)]
    assert not [ip for ip in used if ipaddress.ip_address(ip) in ipaddress.ip_network(pool)]
    assert not [r for r in routes_in(pool) if " dev cali" in r]
    assert not {names.veth_name_for_workload(ns, w[0]) for w in work} & cali_links()


def test_restart_leaves_routes_untouched_and_drift_is_repaired(agent: Agent, plugin: Path, netns: Netns,
                                                               datastore: DatastoreEnv, pool: str) -> None:
    ns = "rs-" + uuid.uuid4().hex[:6]
    datastore.ensure_namespace(ns)
    datastore.create_pod(ns, "a", NODE)
    cid, n = uuid.uuid4().hex, netns.new()
    rc, res = run_cni(plugin, "ADD", calico_conf(agent), cid=cid, netns=f"/run/netns/{n}", ns=ns, pod="a")
    assert rc == 0, res
    ip = res["ips"][0]["address"].split("/")[0]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(pool)
    route = sh("ip", "route", "show", f"{ip}/32").strip()
    assert route
    # Watch route deletions while the agent is killed and started again.
    mon = subprocess.Popen(["ip", "-o", "monitor", "route"], stdout=subprocess.PIPE, text=True)
    events: list[str] = []
    reader = threading.Thread(target=lambda: events.extend(iter(mon.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        agent.stop(sig=9)
        assert sh("ip", "route", "show", f"{ip}/32").strip() == route  # routes outlive the agent
        agent.start()
        assert wait_for(agent.ready, 30)
    finally:
        mon.terminate()
        mon.wait(5)
        reader.join(5)
    touched = [e for e in events if ip in e or "blackhole" in e]
    assert not touched, f"restart touched existing routes: {touched}"
    assert sh("ip", "route", "show", f"{ip}/32").strip() == route
    # A route deleted by hand comes back (the agent watches the kernel).
    subprocess.run(["ip", "route", "del", f"{ip}/32"], check=True)
    assert wait_for(lambda: sh("ip", "route", "show", f"{ip}/32").strip() == route, 10), agent.log_tail()
    # So does a deleted blackhole.
    bh = next(r for r in routes_in(pool) if r.startswith("blackhole"))
    subprocess.run(["ip", "route", "del", *bh.split()], check=True)
    assert wait_for(lambda: bh in routes_in(pool), 10)
    assert run_cni(plugin, "DEL", calico_conf(agent), cid=cid, netns=f"/run/netns/{n}", ns=ns, pod="a")[0] == 0


def test_late_del_of_an_old_sandbox_leaves_the_new_one_alone(agent: Agent, plugin: Path, netns: Netns,
                                                              datastore: DatastoreEnv, pool: str) -> None:
    """Sandbox A of a pod is replaced by sandbox B (same pod, so the same host veth name); a DEL for A that
    arrives late (runtime GC, restart) must release A's address only, never B's veth, route or address."""
    ns = "e2e-" + uuid.uuid4().hex[:6]
    datastore.ensure_namespace(ns)
    pod = "web"
    datastore.create_pod(ns, pod, NODE)
    peer_pod, peer_cid, peer_n = "peer", uuid.uuid4().hex, netns.new()
    datastore.create_pod(ns, peer_pod, NODE)
    rc, peer = run_cni(plugin, "ADD", calico_conf(agent), cid=peer_cid, netns=f"/run/netns/{peer_n}", ns=ns,
                       pod=peer_pod)
    assert rc == 0, (peer, agent.log_tail())
    cid_a, n_a = uuid.uuid4().hex, netns.new()
    rc, res_a = run_cni(plugin, "ADD", calico_conf(agent), cid=cid_a, netns=f"/run/netns/{n_a}", ns=ns, pod=pod)
    assert rc == 0, (res_a, agent.log_tail())
    cid_b, n_b = uuid.uuid4().hex, netns.new()
    rc, res_b = run_cni(plugin, "ADD", calico_conf(agent), cid=cid_b, netns=f"/run/netns/{n_b}", ns=ns, pod=pod)
    assert rc == 0, (res_b, agent.log_tail())
    ip_a = res_a["ips"][0]["address"].split("/")[0]
    ip_b = res_b["ips"][0]["address"].split("/")[0]
    peer_ip = peer["ips"][0]["address"].split("/")[0]
    veth = names.veth_name_for_workload(ns, pod)
    assert ping(n_b, peer_ip), agent.log_tail()
    try:
        # The late DEL for A, with and without its netns.
        assert run_cni(plugin, "DEL", calico_conf(agent), cid=cid_a, netns=f"/run/netns/{n_a}", ns=ns, pod=pod)[0] == 0
        assert run_cni(plugin, "DEL", calico_conf(agent), cid=cid_a, netns="", ns=ns, pod=pod)[0] == 0
        assert veth in cali_links(), agent.log_tail()
        assert f"{ip_b} dev {veth}" in sh("ip", "route", "show", f"{ip_b}/32"), agent.log_tail()
        assert ping(n_b, peer_ip) and ping(peer_n, ip_b), agent.log_tail()
        _, used = ipam_usage(datastore)
        if ip_a != ip_b:
            assert ip_a not in used, used  # A's address went back to the pool
        assert ip_b in used
    finally:
        for cid, n, p in ((cid_b, n_b, pod), (peer_cid, peer_n, peer_pod)):
            run_cni(plugin, "DEL", calico_conf(agent), cid=cid, netns=f"/run/netns/{n}", ns=ns, pod=p)
