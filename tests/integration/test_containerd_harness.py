"""Proves the containerd/CRI harness (tests/realparts) with Debian's reference CNI plugins.

Path under test: CriClient -> containerd 1.6 CRI -> go-cni/libcni -> loopback, then the conflist
ptp(+host-local) -> portmap -> felixpy-spy. The spy is a tiny chained plugin that records what
containerd passes (CNI_ARGS, runtimeConfig, prevResult, CNI_NETNS) and fails ADD on request, so
the tests can check that the harness fills requests the way kubelet does and surfaces CNI errors.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cri_api", reason="container-runtime-interface-api not installed (pip install -e .[test])")

from tests.realparts.containerd import (
    Containerd,
    containerd_available,
    make_cni_bin_dir,
    mounts_under,
    nat_snapshot,
    remove_idle_portmap_chains,
)
from tests.realparts.cri import CriClient, CriError
from tests.realparts.oci_image import BUSYBOX_IMAGE

_UNAVAILABLE = containerd_available()
pytestmark = [
    pytest.mark.root,
    pytest.mark.realparts,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"containerd harness unavailable: {_UNAVAILABLE}"),
]

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
FAIL_PREFIX = "fail-"

# Chained plugin: log the call, pass prevResult through on ADD, refuse pods named fail-*.
SPY_PLUGIN = """#!/usr/bin/python3 -I
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ.get("CNI_COMMAND", "")
args = dict(kv.split("=", 1) for kv in os.environ.get("CNI_ARGS", "").split(";") if "=" in kv)
record = {
    "command": cmd, "args": args, "netns": os.environ.get("CNI_NETNS", ""),
    "containerid": os.environ.get("CNI_CONTAINERID", ""), "ifname": os.environ.get("CNI_IFNAME", ""),
    "runtimeConfig": conf.get("runtimeConfig"), "prevResult": conf.get("prevResult"),
}
with open(conf["logFile"], "a") as f:
    f.write(json.dumps(record) + "\\n")
if cmd == "VERSION":
    print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}))
elif cmd == "ADD":
    name = args.get("K8S_POD_NAME", "")
    if name.startswith(conf["failPrefix"]):
        print(json.dumps({"cniVersion": conf["cniVersion"], "code": 999, "msg": "spy refuses pod " + name}))
        sys.exit(1)
    print(json.dumps(conf["prevResult"]))
"""


@dataclass
class Node:
    containerd: Containerd
    cri: CriClient
    subnet: ipaddress.IPv4Network
    spy_log: Path

    def spy_records(self, sandbox_id: str) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.spy_log.read_text().splitlines() if line]
        return [r for r in records if r["containerid"] == sandbox_id]


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    work = Path(tempfile.mkdtemp(prefix=f"fpyh-{os.getpid()}-"))
    ip_forward_before = IP_FORWARD.read_text().strip()
    nat_before = nat_snapshot()
    # A random /24 so concurrent runs on this machine don't hand out the same pod IPs.
    subnet = ipaddress.IPv4Network(f"10.213.{random.randint(100, 254)}.0/24")
    spy = work / "felixpy-spy"
    spy.write_text(SPY_PLUGIN)
    spy.chmod(0o755)
    conf_dir = work / "net.d"
    conf_dir.mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "fpyh-ptp",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(work / "ipam"),
                    "ranges": [[{"subnet": str(subnet)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {
                "type": "felixpy-spy",
                "capabilities": {"portMappings": True},
                "logFile": str(work / "spy.log"),
                "failPrefix": FAIL_PREFIX,
            },
        ],
    }
    (conf_dir / "10-fpyh.conflist").write_text(json.dumps(conflist))
    bin_dir = make_cni_bin_dir(work / "bin", {"felixpy-spy": spy})
    ctrd = Containerd(cni_bin_dir=bin_dir, cni_conf_dir=conf_dir, prefix="fpyh-ctrd-")
    try:
        ctrd.start()
        yield Node(ctrd, ctrd.client(), subnet, work / "spy.log")
    finally:
        try:
            ctrd.stop()
        finally:
            remove_idle_portmap_chains(nat_before)
            if leftover := nat_snapshot() - nat_before:
                # Not a failure: another runtime on this host may be using portmap right now.
                warnings.warn(f"portmap nat state left behind (in use by someone else?): {leftover}", stacklevel=1)
            # ptp turns on forwarding host-wide; put back what the host had.
            if IP_FORWARD.read_text().strip() != ip_forward_before:
                IP_FORWARD.write_text(ip_forward_before)
            shutil.rmtree(work, ignore_errors=True)


@dataclass
class Pod:
    sandbox_id: str
    container_id: str
    ip: str
    uid: str


def _run_tools_pod(node: Node, name: str, **kwargs: Any) -> Pod:
    uid = f"{name}-uid-{random.getrandbits(32):08x}"
    sandbox_id = node.cri.run_pod(name, "fpyh-ns", uid=uid, **kwargs)
    container_id = node.cri.start_container(sandbox_id, "tools", BUSYBOX_IMAGE, ["sleep", "infinity"])
    return Pod(sandbox_id, container_id, node.cri.pod_ip(sandbox_id), uid)


def _remove_sandbox(node: Node, sandbox_id: str) -> None:
    node.cri.stop_pod(sandbox_id)
    node.cri.remove_pod(sandbox_id)


def _remove(node: Node, pod: Pod) -> None:
    _remove_sandbox(node, pod.sandbox_id)


@pytest.fixture(scope="module")
def pod_pair(node: Node) -> Iterator[tuple[Pod, Pod]]:
    a = _run_tools_pod(node, "pair-a")
    b = _run_tools_pod(node, "pair-b")
    yield a, b
    _remove(node, a)
    _remove(node, b)


def _host_veth(node: Node, sandbox_id: str) -> str:
    """ptp's host-side veth, from the CNI result containerd keeps (the interface with no sandbox)."""
    interfaces = node.cri.pod_info(sandbox_id)["cniResult"]["Interfaces"]
    names = [str(n) for n, i in interfaces.items() if not i.get("Sandbox")]
    assert len(names) == 1, interfaces
    return names[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http_get(url: str, deadline_s: float = 20) -> str:
    # Polls because busybox httpd starts asynchronously after StartContainer returns.
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                body: bytes = resp.read()
                return body.decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def test_runtime_and_network_ready(node: Node) -> None:
    assert node.cri.status() == {"RuntimeReady": True, "NetworkReady": True}, node.cri.status_reasons()
    assert "containerd" in node.cri.version()


def test_pods_get_addresses_from_the_conflist(node: Node, pod_pair: tuple[Pod, Pod]) -> None:
    a, b = pod_pair
    assert a.ip != b.ip
    for pod in pod_pair:
        assert ipaddress.ip_address(pod.ip) in node.subnet
        rc, out, err = node.cri.exec(pod.container_id, ["ip", "-4", "-o", "addr", "show", "eth0"])
        assert rc == 0, err
        assert f"inet {pod.ip}/24" in out
        netns = node.cri.pod_netns_path(pod.sandbox_id)
        assert netns is not None
        assert Path(netns).parent == node.containerd.netns_dir
        assert Path(netns).exists()


def test_cni_args_are_filled_like_kubelet(node: Node, pod_pair: tuple[Pod, Pod]) -> None:
    pod = pod_pair[0]
    adds = [r for r in node.spy_records(pod.sandbox_id) if r["command"] == "ADD"]
    assert len(adds) == 1
    args = adds[0]["args"]
    assert args["K8S_POD_NAMESPACE"] == "fpyh-ns"
    assert args["K8S_POD_NAME"] == "pair-a"
    assert args["K8S_POD_INFRA_CONTAINER_ID"] == pod.sandbox_id
    assert args["K8S_POD_UID"] == pod.uid
    assert adds[0]["ifname"] == "eth0"
    assert adds[0]["netns"] == node.cri.pod_netns_path(pod.sandbox_id)
    assert adds[0]["prevResult"]["ips"][0]["address"] == f"{pod.ip}/24"


def test_pods_ping_each_other(node: Node, pod_pair: tuple[Pod, Pod]) -> None:
    a, b = pod_pair
    for src, dst in ((a, b), (b, a)):
        rc, out, err = node.cri.exec(src.container_id, ["ping", "-c", "1", "-W", "3", dst.ip], timeout=10)
        assert rc == 0, f"ping {dst.ip} from {src.ip} failed: {out} {err}"


def test_host_port_reaches_pod(node: Node) -> None:
    port = _free_port()
    sandbox_id = node.cri.run_pod("web", "fpyh-ns", port_mappings=[(80, port, "tcp")])
    try:
        node.cri.start_container(sandbox_id, "httpd", BUSYBOX_IMAGE, ["httpd", "-f", "-p", "80", "-h", "/var/www"])
        assert _http_get(f"http://127.0.0.1:{port}/") == "felixpy\n"
        assert _http_get(f"http://{node.cri.pod_ip(sandbox_id)}/") == "felixpy\n"
        # containerd's go-cni sends capitalised keys; a Python plugin must read them case-insensitively.
        add = next(r for r in node.spy_records(sandbox_id) if r["command"] == "ADD")
        mappings = add["runtimeConfig"]["portMappings"]
        assert [{k.lower(): v for k, v in m.items()} for m in mappings] == [
            {"hostport": port, "containerport": 80, "protocol": "tcp", "hostip": ""}
        ]
    finally:
        node.cri.stop_pod(sandbox_id)
        node.cri.remove_pod(sandbox_id)


def test_removal_leaves_nothing_behind(node: Node) -> None:
    port = _free_port()
    dnat_chains_before = {c for c in nat_snapshot() if c.startswith("CNI-DN-")}
    pod = _run_tools_pod(node, "gone", port_mappings=[(8080, port, "tcp")])
    dnat_chains = {c for c in nat_snapshot() if c.startswith("CNI-DN-")} - dnat_chains_before
    assert len(dnat_chains) == 1  # portmap's per-pod chain
    netns = node.cri.pod_netns_path(pod.sandbox_id)
    veth = _host_veth(node, pod.sandbox_id)
    assert netns is not None and Path(netns).exists()
    assert Path(f"/sys/class/net/{veth}").exists()
    assert any(m == netns for m in mounts_under(node.containerd.state))
    nat_rules = os.popen("iptables-save -t nat").read()
    assert f"{pod.ip}:8080" in nat_rules

    _remove(node, pod)

    assert pod.sandbox_id not in {p.id for p in node.cri.list_pods()}
    assert not Path(netns).exists()
    assert not Path(f"/sys/class/net/{veth}").exists()
    leftover = [m for m in mounts_under(node.containerd.base or Path("/nonexistent")) if pod.sandbox_id in m]
    assert leftover == [] and netns not in mounts_under(node.containerd.state)
    assert pod.ip not in os.popen("ip -4 route show").read().split()
    nat_rules = os.popen("iptables-save -t nat").read()
    assert pod.ip not in nat_rules
    assert not dnat_chains & nat_snapshot()
    # containerd runs DEL twice: at stop (netns present) and at remove (no netns).
    dels = [r for r in node.spy_records(pod.sandbox_id) if r["command"] == "DEL"]
    assert [bool(r["netns"]) for r in dels] == [True, False]


def test_cni_add_error_is_surfaced(node: Node) -> None:
    name = f"{FAIL_PREFIX}pod"
    with pytest.raises(CriError) as info:
        node.cri.run_pod(name, "fpyh-ns")
    assert f"spy refuses pod {name}" in str(info.value)
    assert name not in {p.name for p in node.cri.list_pods()}


def test_parallel_pods(node: Node) -> None:
    names = [f"par-{i}" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
        ids = list(pool.map(lambda n: node.cri.run_pod(n, "fpyh-ns"), names))
        try:
            ips = [node.cri.pod_ip(i) for i in ids]
            assert len(set(ips)) == len(names)
            assert all(ipaddress.ip_address(ip) in node.subnet for ip in ips)
        finally:
            list(pool.map(lambda i: _remove_sandbox(node, i), ids))
    assert not set(ids) & {p.id for p in node.cri.list_pods()}


def test_containerd_in_node_netns() -> None:
    """Containerd started in a simulated node's netns: pod veths and routes land there, not on the host."""
    netns_name = f"fpyh-node-{os.getpid()}"
    netns = Path("/run/netns") / netns_name
    work = Path(tempfile.mkdtemp(prefix=f"fpyh-{os.getpid()}-node-"))
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    try:
        subprocess.run(["ip", "-n", netns_name, "link", "set", "lo", "up"], check=True)
        conf_dir = work / "net.d"
        conf_dir.mkdir()
        subnet = f"10.213.{random.randint(100, 254)}.0/24"
        ptp = {
            "type": "ptp",
            "ipam": {"type": "host-local", "dataDir": str(work / "ipam"), "ranges": [[{"subnet": subnet}]]},
        }
        (conf_dir / "10-node.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": "fpyh-node", "plugins": [ptp]})
        )
        with Containerd(
            cni_bin_dir=make_cni_bin_dir(work / "bin"),
            cni_conf_dir=conf_dir,
            netns=netns,
            prefix="fpyh-ctrd-",
        ) as ctrd:
            cri = ctrd.client()
            sandbox_id = cri.run_pod("in-node", "fpyh-ns")
            pod_ip = cri.pod_ip(sandbox_id)
            interfaces = cri.pod_info(sandbox_id)["cniResult"]["Interfaces"]
            (veth,) = [n for n, i in interfaces.items() if not i.get("Sandbox")]
            assert not Path(f"/sys/class/net/{veth}").exists()
            in_node = ["nsenter", f"--net={netns}", "--"]
            link = subprocess.run([*in_node, "ip", "link", "show", veth], capture_output=True, text=True)
            assert link.returncode == 0, link.stderr
            ping = subprocess.run(
                [*in_node, "busybox", "ping", "-c", "1", "-W", "3", pod_ip], capture_output=True, text=True
            )
            assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        subprocess.run(["ip", "netns", "del", netns_name], check=False)
        shutil.rmtree(work, ignore_errors=True)
