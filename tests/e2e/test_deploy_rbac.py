"""deploy/ against a real kube-apiserver (v1.20, RBAC on, audit log on): every manifest applies and is stored
as written; the real agent, run in a network namespace with the environment of the DaemonSet and a token of
the manifest's own ServiceAccount (TokenRequest), starts, becomes ready, writes what calico-node writes and
serves a CNI ADD/DEL, without one refused request (audit log and agent log); and requests outside each
role are refused."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni_plugin.install import install_binaries
from felixpy.dataplane.shims.netns import in_netns
from tests.e2e.harness import REPO, run_cni, wait_for
from tests.realparts.etcd import EtcdServer
from tests.realparts.kube_apiserver import ApiError, KubeApiServer, kube_apiserver_missing_reason
from tests.unit.test_config import _find, container_env

_MISSING = kube_apiserver_missing_reason()
pytestmark = [
    pytest.mark.root,
    pytest.mark.realparts,
    pytest.mark.skipif(_MISSING is not None, reason=f"kube-apiserver unavailable: {_MISSING}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

DEPLOY = REPO / "deploy"
AGENT_USER = "system:serviceaccount:kube-system:calico-node"
CNI_USER = "system:serviceaccount:kube-system:calico-cni-plugin"
RR_USER = "system:serviceaccount:kube-system:felixpy-route-reflector"
AGENT_IP = "10.251.7.2/24"  # only inside the agent's own netns


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object under deploy/ (kustomize files are build instructions, not objects)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and not str(d.get("apiVersion", "")).startswith("kustomize.config.k8s.io/"):
                docs.append(d)
    return docs


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def missing_fields(want: Any, have: Any, path: str = "") -> list[str]:
    """Paths of ``want`` that the stored object lacks or holds differently. v1.20 silently drops unknown
    fields of built-in kinds, so a misspelt field shows up here."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [] if _empty(want) and _empty(have) else [path or "/"]
        out: list[str] = []
        for k, v in want.items():
            if k not in have and not _empty(v):
                out.append(f"{path}/{k}")
            elif k in have:
                out += missing_fields(v, have[k], f"{path}/{k}")
        return out
    if isinstance(want, list):
        if _empty(want) and _empty(have):
            return []
        if not isinstance(have, list) or len(have) != len(want):
            return [path]
        return [m for i, (a, b) in enumerate(zip(want, have, strict=True))
                for m in missing_fields(a, b, f"{path}[{i}]")]
    return [] if str(want) == str(have) else [f"{path}: {want!r} != {have!r}"]


@dataclass
class Cluster:
    kas: KubeApiServer
    applied: list[dict[str, Any]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # --allow-privileged: as every cluster that runs a CNI DaemonSet (kubeadm sets it).
    with EtcdServer() as etcd, KubeApiServer(etcd, audit=True, extra_args=["--allow-privileged=true"]) as kas:
        docs = manifests()
        kas.apply_crd_objects(docs)  # CRDs first, and Established, before anything uses them
        stored = [kas.apply(d) for d in docs if d["kind"] != "CustomResourceDefinition"]
        yield Cluster(kas, stored)


def test_every_manifest_applies_and_is_stored_as_written(cluster: Cluster) -> None:
    kas = cluster.kas
    docs = manifests()
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Deployment",
            "CustomResourceDefinition"} <= kinds
    for d in docs:
        if d["kind"] == "CustomResourceDefinition":
            continue
        path = kas._collection_path(d) + "/" + d["metadata"]["name"]
        stored = kas.request("GET", path)
        assert not missing_fields(d, stored), (d["kind"], d["metadata"]["name"], missing_fields(d, stored))
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("DaemonSet", "calico-node"), ("ConfigMap", "calico-config"), ("ServiceAccount", "calico-node"),
            ("ServiceAccount", "calico-cni-plugin"), ("Deployment", "felixpy-route-reflector")} <= names


# --- the agent in its own network namespace ----------------------------------------------------------------
class NetnsForwarder:
    """127.0.0.1:<port> inside a netns forwarded to 127.0.0.1:<port> here: the API server listens on the
    host's loopback only, and the agent's kubeconfig (and the server's certificate) name 127.0.0.1."""

    def __init__(self, netns_path: str, port: int) -> None:
        self.netns_path = netns_path
        self.port = port
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        def listen() -> socket.socket:
            with in_netns(self.netns_path):  # the socket belongs to the netns it was made in
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", self.port))
                s.listen(64)
                return s

        with ThreadPoolExecutor(1) as ex:
            self._listener = ex.submit(listen).result()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                inner, _ = self._listener.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                inner.close()
                continue
            with self._lock:
                self._socks += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _http_in_netns(netns: str, url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        with in_netns(netns):
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError as e:
                return 0, str(e)

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(get).result()


@dataclass
class RunningAgent:
    node: str
    netns: str
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return str(self.workdir / "cni.sock")

    def log(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")

    def readiness(self) -> tuple[int, str]:
        return _http_in_netns(f"/run/netns/{self.netns}", "http://127.0.0.1:9099/readiness")


@pytest.fixture
def node_agent(cluster: Cluster, tmp_path: Path) -> Iterator[RunningAgent]:
    kas = cluster.kas
    tag = uuid.uuid4().hex[:6]
    node = f"rbac-node-{tag}"
    netns = f"fxrbac-{tag}"
    kas.apply({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux"}}})
    _ip("netns", "add", netns)
    fwd: NetnsForwarder | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        # The node's uplink: a veth pair entirely inside the netns (eth0 carries the node address).
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        _ip("-n", netns, "addr", "add", AGENT_IP, "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "eth1", "up")
        fwd = NetnsForwarder(f"/run/netns/{netns}", kas.port)
        fwd.start()
        token = kas.mint_token("kube-system", "calico-node")
        kubeconfig = kas.write_kubeconfig_for_token(token, str(tmp_path / "kubeconfig"))
        env = container_env(_find("DaemonSet", "calico-node"), "calico-node", node=node)
        # In a pod the token comes from the projected SA volume; files of this test's own go to tmp_path.
        env.update(KUBECONFIG=kubeconfig, FELIXPY_STATE_DIR=str(tmp_path / "state"),
                   FELIXPY_CNI_SOCKET=str(tmp_path / "cni.sock"), FELIXPY_BGP_DIR=str(tmp_path / "bgp"),
                   PATH=os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
        (tmp_path / "bgp").mkdir()
        with open(tmp_path / "agent.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "felixpy", "agent"],
                                    env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        agent = RunningAgent(node, netns, tmp_path, proc)
        yield agent
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if fwd is not None:
            fwd.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _audit(kas: KubeApiServer, user: str) -> list[dict[str, Any]]:
    return [e for e in kas.audit_events(("ResponseStarted", "ResponseComplete"))
            if (e.get("user") or {}).get("username") == user]


def _resource(ev: dict[str, Any]) -> str:
    ref = ev.get("objectRef") or {}
    res = str(ref.get("resource", ""))
    if ref.get("subresource"):
        res += "/" + str(ref["subresource"])
    group = ref.get("apiGroup") or ""
    return f"{group}:{res}" if group else res


def _granted(role: dict[str, Any]) -> set[tuple[str, str]]:
    """(resource as _resource() names it, verb) for every rule of a ClusterRole."""
    out = set()
    for rule in role.get("rules") or []:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((f"{group}:{res}" if group else res, verb))
    return out


def test_agent_runs_with_exactly_its_role(cluster: Cluster, node_agent: RunningAgent, tmp_path: Path) -> None:
    kas = cluster.kas
    assert wait_for(lambda: node_agent.readiness()[0] == 200 or node_agent.proc.poll() is not None, 180, 0.5), \
        (node_agent.readiness(), node_agent.log()[-4000:])
    assert node_agent.proc.poll() is None, node_agent.log()[-4000:]

    # What calico-node's startup writes, written with the calico-node ServiceAccount's token.
    info = kas.request("GET", "/apis/crd.projectcalico.org/v1/clusterinformations/default")
    assert info["spec"]["datastoreReady"] is True
    pool = kas.request("GET", "/apis/crd.projectcalico.org/v1/ippools/default-ipv4-ippool")
    env = container_env(_find("DaemonSet", "calico-node"), "calico-node")
    assert pool["spec"]["cidr"] == env["CALICO_IPV4POOL_CIDR"]
    assert pool["spec"]["ipipMode"] == env["CALICO_IPV4POOL_IPIP"]

    def node_annotations() -> dict[str, str]:
        md = kas.request("GET", f"/api/v1/nodes/{node_agent.node}")["metadata"]
        return dict(md.get("annotations") or {})

    assert wait_for(lambda: node_annotations().get("projectcalico.org/IPv4Address") == AGENT_IP, 30), \
        node_annotations()

    # A CNI ADD and DEL as the runtime makes them, with the ConfigMap's conflist entry.
    ns = "rbac-" + uuid.uuid4().hex[:6]
    kas.ensure_namespace(ns)
    kas.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": ns},
               "spec": {"nodeName": node_agent.node, "automountServiceAccountToken": False,
                        "containers": [{"name": "main", "image": "busybox"}]}})
    template = _find("ConfigMap", "calico-config")["data"]["cni_network_config"]
    conflist = json.loads(template.replace("__KUBERNETES_NODE_NAME__", node_agent.node)
                          .replace("__CNI_MTU__", "0").replace("__KUBECONFIG_FILEPATH__", ""))
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    plugin_dir = tmp_path / "bin"
    plugin_dir.mkdir()
    install_binaries(plugin_dir, "/usr/bin/python3")
    pod_netns = f"{node_agent.netns}-pod"
    _ip("netns", "add", pod_netns)
    try:
        cid = uuid.uuid4().hex
        rc, out = run_cni(plugin_dir / "calico", "ADD", conf, cid=cid, netns=f"/run/netns/{pod_netns}", ns=ns,
                          pod="web", socket=node_agent.socket)
        assert rc == 0, (out, node_agent.log()[-4000:])
        ip = out["ips"][0]["address"].split("/")[0]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(env["CALICO_IPV4POOL_CIDR"])
        ann = kas.request("GET", f"/api/v1/namespaces/{ns}/pods/web")["metadata"]["annotations"]
        assert ann["cni.projectcalico.org/podIP"] == f"{ip}/32"
        assert ann["cni.projectcalico.org/containerID"] == cid
        rc, out = run_cni(plugin_dir / "calico", "DEL", conf, cid=cid, netns=f"/run/netns/{pod_netns}", ns=ns,
                          pod="web", socket=node_agent.socket)
        assert rc == 0, (out, node_agent.log()[-4000:])
        ann = kas.request("GET", f"/api/v1/namespaces/{ns}/pods/web")["metadata"].get("annotations") or {}
        assert not ann.get("cni.projectcalico.org/podIP")
    finally:
        subprocess.run(["ip", "netns", "del", pod_netns], capture_output=True)
    assert node_agent.proc.poll() is None, node_agent.log()[-4000:]

    # Least privilege shown: nothing the agent did was refused...
    events = _audit(kas, AGENT_USER)
    assert events, "no audit events for the agent's ServiceAccount"
    refused = sorted({(e["verb"], _resource(e)) for e in events if (e.get("responseStatus") or {}).get("code") == 403})
    assert not refused, refused
    log = node_agent.log()
    assert "403" not in log and "forbidden" not in log.lower(), log[-4000:]
    # ...and every resource the role grants was used (no grant for something the agent never touches).
    used = {(_resource(e), e["verb"]) for e in events}
    granted = _granted(_find("ClusterRole", "calico-node"))
    assert {r for r, _ in granted} <= {r for r, _ in used}, sorted({r for r, _ in granted} - {r for r, _ in used})
    assert used <= granted, sorted(used - granted)
    print("agent used:", sorted(used))
    print("granted but not used in this run:", sorted(granted - used))


@pytest.mark.parametrize(("sa", "method", "path", "body"), [
    # The agent: no secrets, no RBAC, no pod specs, no node objects beyond their status, no policy writes.
    ("calico-node", "DELETE", "/api/v1/namespaces/kube-system/secrets/anything", None),
    ("calico-node", "GET", "/api/v1/namespaces/kube-system/secrets", None),
    ("calico-node", "POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles",
     {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "escalate"},
      "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
    ("calico-node", "PATCH", "/api/v1/namespaces/default/pods/p", {"spec": {"nodeName": "x"}}),
    ("calico-node", "POST", "/api/v1/namespaces/default/pods",
     {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": []}}),
    ("calico-node", "PATCH", "/api/v1/nodes/n", {"metadata": {"labels": {"a": "b"}}}),
    ("calico-node", "DELETE", "/api/v1/nodes/n", None),
    ("calico-node", "DELETE", "/api/v1/namespaces/default", None),
    ("calico-node", "GET", "/api/v1/namespaces/kube-system/configmaps", None),
    ("calico-node", "DELETE", "/apis/crd.projectcalico.org/v1/ippools/default-ipv4-ippool", None),
    ("calico-node", "POST", "/apis/crd.projectcalico.org/v1/globalnetworkpolicies",
     {"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "x"},
      "spec": {}}),
    ("calico-node", "GET", "/apis/crd.projectcalico.org/v1/felixconfigurations", None),
    ("calico-node", "POST", "/api/v1/namespaces/kube-system/serviceaccounts/calico-node/token",
     {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}),
    # The CNI plugin's identity is granted nothing (the executable talks to the agent, not the API).
    ("calico-cni-plugin", "GET", "/apis/networking.k8s.io/v1/networkpolicies", None),
    ("calico-cni-plugin", "GET", "/api/v1/namespaces/default/pods", None),
    ("calico-cni-plugin", "GET", "/apis/crd.projectcalico.org/v1/ipamblocks", None),
    # The route reflector reads Nodes and BGP resources and patches its Node's status, nothing else.
    ("felixpy-route-reflector", "GET", "/api/v1/pods", None),
    ("felixpy-route-reflector", "GET", "/apis/crd.projectcalico.org/v1/ippools", None),
    ("felixpy-route-reflector", "PATCH", "/api/v1/nodes/n", {"metadata": {"labels": {"a": "b"}}}),
])
def test_actions_outside_the_roles_are_refused(cluster: Cluster, sa: str, method: str, path: str,
                                               body: Any) -> None:
    token = cluster.kas.mint_token("kube-system", sa)
    ctype = "application/strategic-merge-patch+json" if method == "PATCH" else "application/json"
    with pytest.raises(ApiError) as err:
        cluster.kas.request(method, path, body, token=token, content_type=ctype)
    assert err.value.status == 403, err.value.body


@pytest.mark.parametrize(("sa", "method", "path", "body"), [
    ("calico-node", "GET", "/api/v1/nodes", None),
    ("calico-node", "GET", "/apis/crd.projectcalico.org/v1/ipamblocks", None),
    ("calico-node", "GET", "/apis/networking.k8s.io/v1/networkpolicies", None),
    ("felixpy-route-reflector", "GET", "/api/v1/nodes", None),
    ("felixpy-route-reflector", "GET", "/apis/crd.projectcalico.org/v1/bgppeers", None),
    ("felixpy-route-reflector", "GET", "/apis/crd.projectcalico.org/v1/bgpconfigurations", None),
])
def test_the_roles_grant_what_they_say(cluster: Cluster, sa: str, method: str, path: str, body: Any) -> None:
    # The same token path as the refusals above, so a refusal there is RBAC, not a broken token.
    token = cluster.kas.mint_token("kube-system", sa)
    assert isinstance(cluster.kas.request(method, path, body, token=token), dict)


def test_route_reflector_can_write_its_node_status(cluster: Cluster) -> None:
    kas = cluster.kas
    node = "rr-" + uuid.uuid4().hex[:6]
    kas.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    token = kas.mint_token("kube-system", "felixpy-route-reflector")
    patch = {"metadata": {"annotations": {"projectcalico.org/RouteReflectorClusterID": "10.0.0.9"}}}
    kas.request("PATCH", f"/api/v1/nodes/{node}/status", patch, token=token,
                content_type="application/strategic-merge-patch+json")
    got = kas.request("GET", f"/api/v1/nodes/{node}")["metadata"]["annotations"]
    assert got["projectcalico.org/RouteReflectorClusterID"] == "10.0.0.9"
