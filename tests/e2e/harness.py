"""End-to-end helpers: the agent as a real process, the CNI executable called as a runtime calls it,
and read-only inspection of the kernel and the datastore."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin.install import install_binaries
from tests.realparts.etcd import free_port
from tests.realparts.kube_apiserver import KubeApiServer

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DatastoreEnv:
    type: str  # etcdv3 | kubernetes
    etcd_endpoint: str
    kas: KubeApiServer | None = None

    @property
    def kubeconfig(self) -> str:
        return self.kas.kubeconfig if self.kas else ""

    def agent_env(self) -> dict[str, str]:
        if self.type == "etcdv3":
            return {"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": self.etcd_endpoint}
        return {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": self.kubeconfig}

    # -- the Kubernetes objects kubelet/controllers would create (none of them run here) ---------------
    def ensure_namespace(self, ns: str) -> None:
        if self.kas:
            self.kas.ensure_namespace(ns)

    def ensure_node(self, node: str) -> None:
        if self.kas:
            self.kas.apply({"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}})

    def create_pod(self, ns: str, name: str, node: str, labels: dict[str, str] | None = None) -> None:
        if self.kas:
            self.kas.apply({"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
                            "spec": {"nodeName": node, "automountServiceAccountToken": False,
                                     "containers": [{"name": "main", "image": "localhost/felixpy-busybox:latest"}]}})

    def pod(self, ns: str, name: str) -> dict[str, Any]:
        assert self.kas is not None
        return dict(self.kas.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}"))


def _nft_table_exists(family: str = "ip", name: str = "calico") -> bool:
    return subprocess.run(["nft", "list", "table", family, name], capture_output=True).returncode == 0


@dataclass
class Agent:
    ds: DatastoreEnv
    workdir: Path
    node: str
    pool: str
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    health_port: int = 0

    @property
    def socket(self) -> str:
        return str(self.workdir / "cni.sock")

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start(self, timeout: float = 60.0) -> None:
        self.health_port = free_port()
        # This agent runs in the host's own network namespace: no BGP sidecar here (single node), its
        # files in the test's dir, and the NAT table it creates is removed again by stop().
        self._nat_table_existed = _nft_table_exists()
        env = {**os.environ, **self.ds.agent_env(), "NODENAME": self.node, "CALICO_IPV4POOL_CIDR": self.pool,
               "FELIXPY_CNI_SOCKET": self.socket, "FELIX_HEALTHPORT": str(self.health_port),
               "FELIX_HEALTHHOST": "127.0.0.1", "FELIXPY_STATE_DIR": str(self.workdir / "state"),
               "FELIX_ROUTEREFRESHINTERVAL": "30", "CALICO_NETWORKING_BACKEND": "none",
               "FELIXPY_BGP_DIR": str(self.workdir / "bgp"), "CALICO_IPV4POOL_NAT_OUTGOING": "false",
               **self.extra_env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "felixpy", "agent"], env=env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"agent not ready after {timeout}s:\n{self.log_tail()}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def ready(self) -> bool:
        return self.http("/readiness")[0] == 200

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        if not getattr(self, "_nat_table_existed", True) and _nft_table_exists():
            subprocess.run(["nft", "delete", "table", "ip", "calico"], check=False, capture_output=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""


def install_plugin(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    install_binaries(bin_dir, "/usr/bin/python3")
    return bin_dir / "calico"


def calico_conf(agent: Agent, *, version: str = "1.0.0", name: str = "k8s-pod-network") -> dict[str, Any]:
    """Calico's own conflist entry, unchanged, plus our socket key (Calico ignores unknown keys)."""
    conf: dict[str, Any] = {"type": "calico", "log_level": "info", "datastore_type": agent.ds.type,
                            "nodename": agent.node, "mtu": 0, "ipam": {"type": "calico-ipam"},
                            "policy": {"type": "k8s"}, "felixpy_socket": agent.socket}
    if agent.ds.kubeconfig:
        conf["kubernetes"] = {"kubeconfig": agent.ds.kubeconfig}
    return {"cniVersion": version, "name": name, **conf}


def run_cni(plugin: Path, command: str, conf: dict[str, Any] | bytes, *, cid: str, netns: str = "",
            ns: str = "default", pod: str = "", ifname: str = "eth0",
            socket: str = "") -> tuple[int, dict[str, Any]]:
    env = {**({"FELIXPY_CNI_SOCKET": socket} if socket else {}),
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": str(plugin.parent),
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod or cid}"}
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    p = subprocess.run([str(plugin)], input=data, env=env, capture_output=True, timeout=120)
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return p.returncode, out


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(list(args), check=check, capture_output=True, text=True).stdout


def cali_links() -> set[str]:
    out = sh("ip", "-o", "link", "show")
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ": cali" in ln}


def routes_in(pool: str) -> list[str]:
    return [ln for ln in sh("ip", "route", "show", "root", pool).splitlines() if ln.strip()]


def ip_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


def wait_for(pred: Any, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
