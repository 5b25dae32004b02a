"""Building blocks of a multi-node lab on one machine, shared by ``felixpy lab`` and the e2e harness.

Topology (every object is named from one prefix, so a lab is found and removed by name too)::

    root netns: <prefix>-ds 172.31.1.254/24 (etcd / kube-apiserver listen here)
                  |
    <prefix>-sw (switch netns): br1 = 172.31.1.0/24                   br2 = 172.31.2.0/24 (two-subnet plans)
                  |        |        |         |                          |           |
            <prefix>-n1  -n2 .12  -rr .250   <prefix>-rt: eth1 .1 ........ eth2 .1   <prefix>-n3 .13
              eth0 .11                       (router, ip_forward)

Decisions:

- Every node's default route points at the router netns, also with one subnet: proxy ARP on the pods'
  ``cali*`` veths answers for the pods' gateway 169.254.1.1 only when the node has a route for it through
  another device, as every real node does. The router knows only the lab's subnets, so nothing leaks out.
- The datastore runs in the root netns, bound to the address of a veth the lab creates into the switch
  (not in its own netns): the test process and the lab reach it directly, the node namespaces reach it over
  the bridge (through the router for the second subnet), and no extra hop or netns is needed.
- Every daemon runs under ``ip netns exec`` (its own mount namespace with the netns's ``/sys``), in its own
  session, and is tracked by PID plus its kernel start time, so a stale PID is never signalled. Teardown also
  kills whatever still runs inside the lab's namespaces (``ip netns pids``), which catches grandchildren
  such as ExaBGP or BIRD.
- Every created object is recorded in a :class:`Ledger` *before* it is created (processes right after), and
  the ledger is saved through a callback, so ``teardown`` works from a state file after a crash.
- Pods are network namespaces wired by the installed CNI executable, called exactly as a runtime calls it
  (``CNI_*`` environment, the conflist entry on stdin) with the node's conflist; with the Kubernetes
  datastore the Pod objects (and Nodes) are created first, as kubelet and the scheduler would.

This module uses the ``ip`` command (iproute2), not rtnetlink: it is a tool around the agent, not a part of
its dataplane.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "deploy" / "crds"
ETCD_BINARY = os.environ.get("FELIXPY_ETCD", shutil.which("etcd") or "/usr/bin/etcd")
KUBE_APISERVER_BINARY = os.environ.get("FELIXPY_KUBE_APISERVER", "/var/cache/felixpy/kube-apiserver-1.20.2-fx2")
HEALTH_PORT = 9099
K8S_NAMESPACE = "lab"  # the Kubernetes namespace of the lab's pods
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(RuntimeError):
    """A lab step failed; the message says what and where to look."""


# --------------------------------------------------------------------------------------------------------
# The plan: names and addresses, computed from a spec (pure, deterministic: ``down`` recomputes it).
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeInfo:
    backend: str  # CALICO_NETWORKING_BACKEND
    vxlan: str  # CALICO_IPV4POOL_VXLAN
    ipip: str  # CALICO_IPV4POOL_IPIP
    subnets: int  # node subnets by default
    bgp: bool  # runs the ExaBGP sidecar


MODES: dict[str, ModeInfo] = {
    "bgp": ModeInfo("bird", "Never", "Never", 1, True),
    "ipip": ModeInfo("bird", "Never", "Always", 1, True),
    "vxlan": ModeInfo("vxlan", "Always", "Never", 1, False),
    "vxlan-crosssubnet": ModeInfo("vxlan", "CrossSubnet", "Never", 2, False),
}
DATASTORES = ("etcdv3", "kubernetes")


@dataclass(frozen=True)
class LabSpec:
    prefix: str = "fxlab"  # names every netns/link; short (the root link is ``<prefix>-ds``, <= 15 chars)
    nodes: int = 3
    mode: str = "bgp"
    datastore: str = "etcdv3"  # etcdv3 | kubernetes
    rr: bool = False  # a BIRD route reflector netns (and mesh off, everyone peering with it)
    subnets: int = 0  # node subnets; 0 = the mode's default (2 for vxlan-crosssubnet)
    base: str = "172.31"  # first two octets of the lab's node networks (<base>.<k>.0/24)
    pool: str = "10.244.0.0/16"
    nat_outgoing: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LabError(f"unknown mode {self.mode!r} (one of {', '.join(MODES)})")
        if self.datastore not in DATASTORES:
            raise LabError(f"unknown datastore {self.datastore!r} (etcdv3 or kubernetes)")
        if not 1 <= self.nodes <= 50:
            raise LabError("nodes: 1..50")
        if self.subnet_count not in (1, 2):
            raise LabError("subnets: 1 or 2")
        if self.subnet_count > self.nodes:
            raise LabError("two subnets need at least two nodes")
        if not self.prefix or len(self.prefix) > 12 or not self.prefix.replace("-", "").isalnum() \
                or self.prefix != self.prefix.lower():
            raise LabError(f"prefix {self.prefix!r}: 1..12 lowercase letters, digits or '-'")
        try:
            nodes, pool = ipaddress.IPv4Network(f"{self.base}.0.0/16"), ipaddress.IPv4Network(self.pool)
        except ValueError as e:
            raise LabError(f"bad address setting: {e}") from None
        if nodes.overlaps(pool):
            raise LabError(f"the node networks {nodes} overlap the pod pool {pool}")
        if self.rr and not MODES[self.mode].bgp:
            raise LabError("--rr needs a BGP mode (bgp or ipip)")

    @property
    def info(self) -> ModeInfo:
        return MODES[self.mode]

    @property
    def subnet_count(self) -> int:
        if self.subnets:
            return self.subnets
        return MODES[self.mode].subnets if self.mode in MODES else 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class NodePlan:
    name: str  # the node name (NODENAME), also its netns name
    index: int  # 1-based; 0 for the route reflector
    subnet: int  # 1-based subnet number
    address: ipaddress.IPv4Interface  # eth0 address with prefix
    gateway: str  # default route via the router
    port: str  # the switch-side veth name (inside the switch netns)

    @property
    def netns(self) -> str:
        return self.name

    @property
    def ip(self) -> str:
        return str(self.address.ip)


@dataclass(frozen=True)
class Plan:
    spec: LabSpec
    switch: str  # switch netns
    router: str  # router netns (every node's default gateway)
    subnets: tuple[ipaddress.IPv4Network, ...]
    nodes: tuple[NodePlan, ...]
    rr: NodePlan | None
    ds_link: str  # root-netns end of the datastore veth
    ds_address: ipaddress.IPv4Interface

    @property
    def ds_ip(self) -> str:
        return str(self.ds_address.ip)

    def all_nodes(self) -> list[NodePlan]:
        """The nodes, then the route reflector if any."""
        return [*self.nodes, *([self.rr] if self.rr else [])]

    def node(self, name_or_index: str | int) -> NodePlan:
        for n in self.all_nodes():
            if name_or_index in (n.name, n.index) or name_or_index == f"n{n.index}":
                return n
        raise KeyError(f"no node {name_or_index!r} in this lab")

    def namespaces(self) -> list[str]:
        """Infrastructure namespaces in creation order (pods are separate)."""
        out = [self.switch, self.router]
        return out + [n.netns for n in self.nodes] + ([self.rr.netns] if self.rr else [])

    def supernet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.spec.base}.0.0/16")


def make_plan(spec: LabSpec) -> Plan:
    spec.validate()
    s = spec.subnet_count
    subnets = tuple(ipaddress.IPv4Network(f"{spec.base}.{k}.0/24") for k in range(1, s + 1))
    per = -(-spec.nodes // s)  # nodes fill subnet 1 first: with 3 nodes on 2 subnets, n1 n2 | n3
    nodes = []
    for i in range(1, spec.nodes + 1):
        k = (i - 1) // per + 1
        nodes.append(NodePlan(f"{spec.prefix}-n{i}", i, k, ipaddress.IPv4Interface(f"{spec.base}.{k}.{10 + i}/24"),
                              f"{spec.base}.{k}.1", f"n{i}"))
    rr = None
    if spec.rr:
        rr = NodePlan(f"{spec.prefix}-rr", 0, 1, ipaddress.IPv4Interface(f"{spec.base}.1.250/24"),
                      f"{spec.base}.1.1", "rr")
    return Plan(spec, f"{spec.prefix}-sw", f"{spec.prefix}-rt", subnets, tuple(nodes), rr,
                f"{spec.prefix}-ds", ipaddress.IPv4Interface(f"{spec.base}.1.254/24"))


# --------------------------------------------------------------------------------------------------------
# The ledger: what was created, saved before (or right after) each creation.
# --------------------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """JSON-able record of a lab. ``save`` (e.g. writing the lab's state file) runs after every change."""

    data: dict[str, Any] = field(default_factory=dict)
    save: Callable[[dict[str, Any]], None] | None = None
    # Pods are added from several threads; every change and its save happen under this lock.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        for k, empty in (("netns", []), ("links", []), ("procs", {}), ("pods", {}), ("datastore", {})):
            self.data.setdefault(k, empty)

    def commit(self) -> None:
        with self.lock:
            if self.save is not None:
                self.save(self.data)

    def add_netns(self, name: str) -> None:
        with self.lock:
            if name not in self.data["netns"]:
                self.data["netns"].append(name)
                self.commit()

    def drop_netns(self, name: str) -> None:
        with self.lock:
            if name in self.data["netns"]:
                self.data["netns"].remove(name)
                self.commit()

    def add_link(self, name: str) -> None:
        with self.lock:
            if name not in self.data["links"]:
                self.data["links"].append(name)
                self.commit()

    def add_proc(self, key: str, pid: int, netns: str) -> None:
        with self.lock:
            self.data["procs"][key] = {"pid": pid, "start": proc_start_time(pid), "netns": netns}
            self.commit()

    def drop_proc(self, key: str) -> None:
        with self.lock:
            if self.data["procs"].pop(key, None) is not None:
                self.commit()

    def put_pod(self, name: str, pod: dict[str, Any]) -> None:
        with self.lock:
            self.data["pods"][name] = pod
            self.commit()

    def drop_pod(self, name: str) -> None:
        with self.lock:
            if self.data["pods"].pop(name, None) is not None:
                self.commit()

    def set(self, key: str, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.commit()


# --------------------------------------------------------------------------------------------------------
# Small process and command helpers.
# --------------------------------------------------------------------------------------------------------


def run(*args: str, check: bool = True, timeout: float = 30.0, input: bytes | None = None) -> str:
    p = subprocess.run(list(args), capture_output=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}")
    return p.stdout.decode(errors="replace")


def ns_run(netns: str, *args: str, check: bool = True, timeout: float = 30.0) -> str:
    return run("ip", "netns", "exec", netns, *args, check=check, timeout=timeout)


def proc_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if gone): a PID plus this names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    # Field 22; the command name (field 2) may contain spaces and parentheses, so split after its ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def proc_alive(pid: int, start: int = 0) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap our own exited children so they do not linger as zombies
    st = proc_start_time(pid)
    if not st or (start and st != start):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_proc(pid: int, start: int = 0, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal one process we started (and the process group it leads), escalating to SIGKILL."""
    if not proc_alive(pid, start):
        return
    for s in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, s)  # also when it no longer leads its group
        deadline = time.monotonic() + (timeout if s != signal.SIGKILL else 5.0)
        while time.monotonic() < deadline:
            if not proc_alive(pid, start):
                return
            time.sleep(0.05)


def netns_pids(netns: str) -> list[int]:
    out = run("ip", "netns", "pids", netns, check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: str | Path, limit: int = 2500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def felixpy_argv(*args: str) -> list[str]:
    """The venv's ``felixpy`` console script when present, else ``python -m felixpy``."""
    exe = Path(sys.executable).with_name("felixpy")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "felixpy", *args]


# Variables of the caller's environment that would leak into the lab's daemons and change their behaviour.
_SCRUB_PREFIXES = ("FELIX_", "FELIXPY_", "CALICO_", "ETCD_", "KUBERNETES_")
_SCRUB = {"DATASTORE_TYPE", "KUBECONFIG", "NODENAME", "HOSTNAME", "IP", "IP6", "AS", "IP_AUTODETECTION_METHOD",
          "NO_DEFAULT_POOLS"}


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith(_SCRUB_PREFIXES)}
    env["PATH"] = f"{Path(sys.executable).parent}:{SYS_PATH}"
    env.update(extra)
    return env


def spawn(ledger: Ledger, key: str, argv: Sequence[str], *, netns: str = "", env: dict[str, str] | None = None,
          log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a daemon in ``netns`` (root netns if empty), own session, output appended to ``log``."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                             cwd=cwd or REPO, start_new_session=True)
    ledger.add_proc(key, p.pid, netns)
    return p


# --------------------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------------------


def existing_netns() -> set[str]:
    return {ln.split()[0] for ln in run("ip", "netns", "list", check=False).splitlines() if ln.strip()}


def root_conflicts(plan: Plan) -> list[str]:
    """Root-netns addresses or routes overlapping the lab's node networks (they would misroute its traffic)."""
    sup = plan.supernet()
    bad = []
    for ln in run("ip", "-o", "-4", "addr", "show").splitlines():
        parts = ln.split()
        if "inet" in parts:
            net = ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network
            if net.overlaps(sup):
                bad.append(f"address {parts[parts.index('inet') + 1]} on {parts[1]}")
    for ln in run("ip", "-4", "route", "show", "table", "main").splitlines():
        words = ln.split()
        dst = words[1] if len(words) > 1 and words[0] in ("blackhole", "unreachable", "prohibit") else \
            (words[0] if words else "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                if ipaddress.IPv4Network(dst, strict=False).overlaps(sup):
                    bad.append(f"route {ln.strip()}")
    return bad


def pick_base(candidates: Iterable[str] | None = None) -> str:
    """A ``<a>.<b>`` base whose /16 nothing on this host uses (tests run labs next to other labs)."""
    used = []
    for ln in run("ip", "-o", "-4", "addr", "show").splitlines() + run("ip", "-4", "route").splitlines():
        for word in ln.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word.count(".") == 3:
                    used.append(ipaddress.IPv4Network(word, strict=False))
    for base in candidates or [f"172.{b}" for b in range(30, 15, -1)] + [f"10.{b}" for b in range(230, 244)]:
        sup = ipaddress.IPv4Network(f"{base}.0.0/16")
        if not any(u.overlaps(sup) for u in used):
            return base
    raise LabError("no free private /16 for the lab's node networks")


def _sysctl(netns: str, key: str, value: str) -> None:
    ns_run(netns, "sysctl", "-qw", f"{key}={value}")


def _new_netns(ledger: Ledger, name: str) -> None:
    ledger.add_netns(name)
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")


def build_network(plan: Plan, ledger: Ledger) -> None:
    """Create the switch, router, node and route-reflector namespaces and the datastore link."""
    clash = sorted(set(plan.namespaces()) & existing_netns())
    if clash:
        raise LabError(f"namespaces already exist: {', '.join(clash)} (a lab with prefix "
                       f"{plan.spec.prefix!r} is up; take it down first)")
    bad = root_conflicts(plan)
    if bad:
        raise LabError(f"{plan.supernet()} is in use on this host ({'; '.join(bad[:3])}); pick another base")
    sw = plan.switch
    _new_netns(ledger, sw)
    for k in range(1, len(plan.subnets) + 1):
        run("ip", "-n", sw, "link", "add", f"br{k}", "type", "bridge")
        run("ip", "-n", sw, "link", "set", f"br{k}", "up")
    _new_netns(ledger, plan.router)
    for k, net in enumerate(plan.subnets, 1):
        run("ip", "-n", sw, "link", "add", f"rt{k}", "type", "veth", "peer", "name", f"eth{k}", "netns", plan.router)
        run("ip", "-n", sw, "link", "set", f"rt{k}", "master", f"br{k}", "up")
        run("ip", "-n", plan.router, "addr", "add", f"{net[1]}/{net.prefixlen}", "dev", f"eth{k}")
        run("ip", "-n", plan.router, "link", "set", f"eth{k}", "up")
    _sysctl(plan.router, "net.ipv4.ip_forward", "1")
    for n in plan.all_nodes():
        _new_netns(ledger, n.netns)
        run("ip", "-n", sw, "link", "add", n.port, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
        run("ip", "-n", sw, "link", "set", n.port, "master", f"br{n.subnet}", "up")
        run("ip", "-n", n.netns, "addr", "add", str(n.address), "dev", "eth0")
        run("ip", "-n", n.netns, "link", "set", "eth0", "up")
        run("ip", "-n", n.netns, "route", "add", "default", "via", n.gateway)
    ledger.add_link(plan.ds_link)
    run("ip", "link", "add", plan.ds_link, "type", "veth", "peer", "name", "ds", "netns", sw)
    run("ip", "-n", sw, "link", "set", "ds", "master", "br1", "up")
    run("ip", "addr", "add", str(plan.ds_address), "dev", plan.ds_link)
    run("ip", "link", "set", plan.ds_link, "up")
    for net in plan.subnets[1:]:
        run("ip", "route", "add", str(net), "via", str(plan.subnets[0][1]), "dev", plan.ds_link)


def set_port(plan: Plan, node: str, attached: bool) -> None:
    """Attach/detach a node's switch port: the node's own link stays up (no carrier event), packets stop.
    This is "the peer went away" as its neighbours see it: only their BGP hold timers notice."""
    n = plan.node(node)
    if attached:
        run("ip", "-n", plan.switch, "link", "set", n.port, "master", f"br{n.subnet}")
    else:
        run("ip", "-n", plan.switch, "link", "set", n.port, "nomaster")


# --------------------------------------------------------------------------------------------------------
# The datastore: etcd, and optionally kube-apiserver backed by it, bound to the lab's root address.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatastoreInfo:
    type: str  # etcdv3 | kubernetes
    etcd_endpoint: str
    kubeconfig: str = ""  # kubernetes only
    server: str = ""  # kube-apiserver URL
    token: str = ""  # its admin token
    ca_file: str = ""

    def env(self) -> dict[str, str]:
        if self.type == "etcdv3":
            return {"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": self.etcd_endpoint}
        return {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": self.kubeconfig}

    def kube(self) -> KubeApi:
        if not self.server:
            raise LabError("no kube-apiserver in this lab (etcd datastore)")
        return KubeApi(self.server, self.token, self.ca_file)


def _http_ok(url: str, *, ctx: ssl.SSLContext | None = None, token: str = "") -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def _exited_or_ok(p: subprocess.Popen[bytes], url: str, ctx: ssl.SSLContext | None = None, token: str = "") -> bool:
    return p.poll() is not None or _http_ok(url, ctx=ctx, token=token)


def start_etcd(ledger: Ledger, workdir: Path, host: str, *, timeout: float = 30.0) -> str:
    """One etcd member listening for clients on ``host``; returns its endpoint once healthy."""
    if not os.access(ETCD_BINARY, os.X_OK):
        raise LabError(f"etcd not found at {ETCD_BINARY} (apt-get install etcd-server)")
    last = ""
    for _attempt in range(3):  # a free port can be taken before etcd binds it
        port, peer = free_port(host), free_port("127.0.0.1")
        client, peer_url = f"http://{host}:{port}", f"http://127.0.0.1:{peer}"
        data = workdir / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        p = spawn(ledger, "etcd", [ETCD_BINARY, "--name", "lab", "--data-dir", str(data),
                                   "--listen-client-urls", client, "--advertise-client-urls", client,
                                   "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                                   "--initial-cluster", f"lab={peer_url}", "--initial-cluster-state", "new",
                                   "--logger", "zap", "--log-level", "warn"],
                  log=workdir / "etcd.log")
        if wait_for(functools.partial(_exited_or_ok, p, f"{client}/health"), timeout, 0.05) and p.poll() is None:
            return client
        last = log_tail(workdir / "etcd.log")
        stop_proc(p.pid)
        ledger.drop_proc("etcd")
    raise LabError(f"etcd did not start: {last}")


class KubeApi:
    """A minimal synchronous REST client for what kubelet/controllers would create in the lab."""

    def __init__(self, server: str, token: str, ca_file: str) -> None:
        self.server = server
        self.token = token
        self._ctx = ssl.create_default_context(cafile=ca_file)

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.server + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ctx) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise KubeError(e.code, e.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def create(self, path: str, obj: dict[str, Any], *, exist_ok: bool = True) -> None:
        try:
            self.request("POST", path, obj)
        except KubeError as e:
            if not (exist_ok and e.status == 409):
                raise

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path)
        except KubeError as e:
            if e.status != 404:
                raise

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        """A JSON merge patch (RFC 7386): only the given fields change."""
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def ensure_namespace(self, ns: str, labels: dict[str, str] | None = None) -> None:
        """The namespace (and its default ServiceAccount); ``labels`` are merged into an existing one's."""
        md: dict[str, Any] = {"name": ns, **({"labels": labels} if labels else {})}
        self.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": md})
        if labels:
            self.patch(f"/api/v1/namespaces/{ns}", {"metadata": {"labels": labels}})
        # No controller-manager runs here, so the ServiceAccount admission needs this made by hand.
        self.create(f"/api/v1/namespaces/{ns}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}})

    def ensure_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}})

    def create_pod(self, ns: str, name: str, node: str, *, labels: dict[str, str] | None = None,
                   ports: Sequence[dict[str, Any]] = ()) -> None:
        """A Pod bound to ``node``, labelled ``app=<name>`` plus ``labels`` (which win); ``ports`` are its
        container's ``ports`` entries (``{"name": "web", "containerPort": 8080, "protocol": "TCP"}``)."""
        container: dict[str, Any] = {"name": "main", "image": "localhost/felixpy-busybox:latest"}
        if ports:
            container["ports"] = [dict(p) for p in ports]
        self.create(f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name, **(labels or {})}},
            "spec": {"nodeName": node, "automountServiceAccountToken": False, "containers": [container]}})

    def apply_crds(self, crd_dir: Path = CRD_DIR, timeout: float = 60.0) -> None:
        import yaml

        names = []
        for path in sorted(crd_dir.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    self.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
                    names.append(doc["metadata"]["name"])
        if not names:
            raise LabError(f"no CRDs in {crd_dir}")

        def established(name: str) -> bool:
            crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in (crd.get("status") or {}).get("conditions") or [])

        pending = set(names)

        def all_established() -> bool:
            pending.difference_update([n for n in list(pending) if established(n)])
            return not pending

        if not wait_for(all_established, timeout, 0.1):
            raise LabError(f"CRDs not Established after {timeout}s: {sorted(pending)}")


class KubeError(LabError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"kube-apiserver: HTTP {status}: {body[:500]}")
        self.status = status


def start_kube_apiserver(ledger: Ledger, workdir: Path, host: str, etcd: str, *,
                         timeout: float = 120.0) -> DatastoreInfo:
    """kube-apiserver on ``host`` (its self-signed certificate then names that address), RBAC on, a static
    admin token; writes a kubeconfig the node namespaces can use. Returns once /readyz answers."""
    if not os.access(KUBE_APISERVER_BINARY, os.X_OK):
        raise LabError(f"kube-apiserver not found at {KUBE_APISERVER_BINARY} (scripts/setup.sh builds it; "
                       "see docs/control-plane.md)")
    d = workdir / "kube-apiserver"
    d.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    sa_key = d / "sa.key"
    run("openssl", "genrsa", "-out", str(sa_key), "2048")
    tokens = d / "tokens.csv"
    tokens.write_text(f'{token},admin,admin,"system:masters"\n')
    tokens.chmod(0o600)
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    last = ""
    for _attempt in range(3):
        port = free_port(host)
        server = f"https://{host}:{port}"
        p = spawn(ledger, "kube-apiserver", [
            KUBE_APISERVER_BINARY, f"--etcd-servers={etcd}", f"--bind-address={host}",
            f"--advertise-address={host}", f"--secure-port={port}", f"--cert-dir={d / 'certs'}",
            f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc", f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC", "--service-cluster-ip-range=10.96.0.0/16",
            # Less background work on a small machine.
            "--enable-priority-and-fairness=false", "--profiling=false", "--endpoint-reconciler-type=none", "--v=1",
        ], log=workdir / "kube-apiserver.log")
        if wait_for(functools.partial(_exited_or_ok, p, f"{server}/readyz", insecure, token), timeout, 0.2) \
                and p.poll() is None:
            ca = str(d / "certs" / "apiserver.crt")
            kubeconfig = d / "kubeconfig"
            # JSON is YAML: every kubeconfig reader takes it.
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
                "users": [{"name": "admin", "user": {"token": token}}],
                "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "admin"}}],
                "current-context": "lab"}, indent=1))
            kubeconfig.chmod(0o600)
            return DatastoreInfo("kubernetes", etcd, str(kubeconfig), server, token, ca)
        last = log_tail(workdir / "kube-apiserver.log")
        stop_proc(p.pid)
        ledger.drop_proc("kube-apiserver")
    raise LabError(f"kube-apiserver did not start: {last}")


# --------------------------------------------------------------------------------------------------------
# Status sources.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerRow:
    address: str
    state: str
    name: str = ""  # the agent's session name (Mesh_..., Global_..., Node_...)
    source: str = ""  # where this row came from (status.json, ss, ...)


def peers_from_status_json(bgp_dir: Path, netns: str) -> list[PeerRow] | None:
    """The agent's ``<bgp dir>/status.json`` session table (written by its BGP control)."""
    try:
        st = json.loads((bgp_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    peers = st.get("peers") if isinstance(st, dict) else st
    if not isinstance(peers, list):
        return None
    return [PeerRow(str(p.get("address") or p.get("peer_ip") or p.get("ip") or "?"), str(p.get("state", "?")),
                    str(p.get("name", "")), "status.json") for p in peers if isinstance(p, dict)]


def peers_from_sockets(bgp_dir: Path, netns: str) -> list[PeerRow] | None:
    """Established TCP sessions on port 179 inside the node's netns: works for any speaker."""
    out = ns_run(netns, "ss", "-Htn", "state", "established", "( sport = :179 or dport = :179 )", check=False)
    rows = []
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) >= 4:
            # Whichever side listens, the remote end of the connection is the peer.
            rows.append(PeerRow(parts[-1].rsplit(":", 1)[0], "Established", "", "ss"))
    return rows


# Tried in order; the first one that answers (not None) wins. Append better sources here.
PEER_SOURCES: list[Callable[[Path, str], list[PeerRow] | None]] = [peers_from_status_json, peers_from_sockets]


# --------------------------------------------------------------------------------------------------------
# The lab itself.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodInfo:
    name: str
    node: str
    netns: str
    cid: str
    ip: str = ""
    k8s_namespace: str = K8S_NAMESPACE

    @property
    def ns(self) -> str:
        return self.netns

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Lab:
    """A lab's life: network, datastore, node daemons, pods, inspection and teardown.

    ``workdir`` holds per-node directories (``<workdir>/<node>/{agent.log,cni.sock,state,bgp}``), the
    datastore's data and logs and the CNI executables. All created state is in ``ledger``.
    """

    def __init__(self, spec: LabSpec, workdir: Path, ledger: Ledger | None = None) -> None:
        self.plan = make_plan(spec)
        self.spec = spec
        self.workdir = workdir
        self.ledger = ledger or Ledger()
        self.ledger.data.setdefault("spec", spec.to_json())
        self.ledger.data.setdefault("workdir", str(workdir))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Extra agent environment (tests: knobs such as timers); applied last, after the lab's own.
        self.extra_env: dict[str, str] = {}
        ds = self.ledger.data.get("datastore") or {}
        self.ds: DatastoreInfo | None = DatastoreInfo(**ds) if ds else None

    @classmethod
    def from_state(cls, state: dict[str, Any], save: Callable[[dict[str, Any]], None] | None = None) -> Lab:
        return cls(LabSpec.from_json(state["spec"]), Path(state["workdir"]), Ledger(state, save))

    # -- paths --------------------------------------------------------------------------------------------
    def node_dir(self, node: str) -> Path:
        return self.workdir / self.plan.node(node).name

    def cni_socket(self, node: str) -> str:
        return str(self.node_dir(node) / "cni.sock")

    def bgp_dir(self, node: str) -> Path:
        return self.node_dir(node) / "bgp"

    def agent_log(self, node: str) -> Path:
        return self.node_dir(node) / "agent.log"

    @property
    def bin_dir(self) -> Path:
        return self.workdir / "bin"

    # -- bring-up -----------------------------------------------------------------------------------------
    def build_network(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        build_network(self.plan, self.ledger)

    def start_datastore(self) -> DatastoreInfo:
        endpoint = start_etcd(self.ledger, self.workdir, self.plan.ds_ip)
        ds = DatastoreInfo("etcdv3", endpoint)
        if self.spec.datastore == "kubernetes":
            ds = start_kube_apiserver(self.ledger, self.workdir, self.plan.ds_ip, endpoint)
            kube = ds.kube()
            kube.apply_crds()
            # What kubelet registers and an admin creates: the Nodes, the pods' namespace.
            for n in self.plan.nodes:
                kube.ensure_node(n.name)
            if self.plan.rr:
                kube.ensure_node(self.plan.rr.name, {"route-reflector": "true"})
            kube.ensure_namespace(K8S_NAMESPACE)
        self.ds = ds
        self.ledger.set("datastore", asdict(ds))
        return ds

    def datastore(self) -> DatastoreInfo:
        if self.ds is None:
            raise LabError("the datastore is not started")
        return self.ds

    def with_backend(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``await fn(backend)`` with a fresh felixpy datastore backend (closed afterwards)."""
        from felixpy import config
        from felixpy.datastore.factory import make_backend

        cfg = config.load({**self.datastore().env(), "NODENAME": "lab"})

        async def go() -> T:
            backend = await make_backend(cfg)
            try:
                return await fn(backend)
            finally:
                await backend.close()

        return asyncio.run(go())

    def configure_route_reflection(self) -> None:
        """What an operator does for a reflector: mesh off, every node peers with ``route-reflector == 'true'``
        (the reflector labels its own Node; with Kubernetes the lab made that Node labelled already)."""
        from felixpy.datastore.api import KIND_BGP_CONFIG, KIND_BGP_PEER

        async def go(b: Any) -> None:
            await upsert(b, KIND_BGP_CONFIG, "default", {"nodeToNodeMeshEnabled": False})
            await upsert(b, KIND_BGP_PEER, "peer-with-route-reflectors",
                         {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"})

        self.with_backend(go)

    def agent_env(self, node: str) -> dict[str, str]:
        n = self.plan.node(node)
        d = self.node_dir(node)
        info = self.spec.info
        return clean_env({
            **self.datastore().env(), "NODENAME": n.name, "IP_AUTODETECTION_METHOD": "interface=eth0",
            "CALICO_NETWORKING_BACKEND": info.backend, "CALICO_IPV4POOL_CIDR": self.spec.pool,
            "CALICO_IPV4POOL_VXLAN": info.vxlan, "CALICO_IPV4POOL_IPIP": info.ipip,
            "CALICO_IPV4POOL_NAT_OUTGOING": "true" if self.spec.nat_outgoing else "false",
            "FELIXPY_CNI_SOCKET": str(d / "cni.sock"), "FELIXPY_STATE_DIR": str(d / "state"),
            "FELIXPY_BGP_DIR": str(d / "bgp"), "FELIX_HEALTHENABLED": "true",
            # Each node netns has its own ports; 0.0.0.0 lets the lab probe it over the bridge.
            "FELIX_HEALTHHOST": "0.0.0.0", "FELIX_HEALTHPORT": str(HEALTH_PORT),
            "FELIX_LOGSEVERITYSCREEN": "INFO", **self.extra_env,
        })

    def start_agent(self, node: str) -> subprocess.Popen[bytes]:
        n = self.plan.node(node)
        self.node_dir(node).mkdir(parents=True, exist_ok=True)
        p = spawn(self.ledger, f"agent:{n.name}", felixpy_argv("agent"), netns=n.netns, env=self.agent_env(node),
                  log=self.agent_log(node))
        self.procs[f"agent:{n.name}"] = p
        return p

    def start_sidecar(self, node: str) -> subprocess.Popen[bytes] | None:
        """The ExaBGP sidecar (BGP modes); None when this build has no sidecar yet."""
        import importlib.util

        if importlib.util.find_spec("bgp.sidecar") is None:
            return None
        n = self.plan.node(node)
        bgp = self.bgp_dir(node)
        bgp.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = clean_env({"NODENAME": n.name, "FELIXPY_BGP_DIR": str(bgp), "FELIX_LOGSEVERITYSCREEN": "INFO"})
        p = spawn(self.ledger, f"bgp:{n.name}", felixpy_argv("bgp-sidecar", "--dir", str(bgp)), netns=n.netns,
                  env=env, log=self.node_dir(node) / "bgp-sidecar.log")
        self.procs[f"bgp:{n.name}"] = p
        return p

    def start_route_reflector(self) -> subprocess.Popen[bytes] | None:
        rr = self.plan.rr
        if rr is None:
            return None
        d = self.workdir / rr.name
        (d / "bgp").mkdir(parents=True, exist_ok=True, mode=0o700)
        env = clean_env({**self.datastore().env(), "NODENAME": rr.name, "IP": str(rr.address),
                         "FELIXPY_RR_CLUSTER_ID": rr.ip, "FELIXPY_BGP_DIR": str(d / "bgp"),
                         "FELIX_LOGSEVERITYSCREEN": "INFO"})
        p = spawn(self.ledger, f"rr:{rr.name}", felixpy_argv("route-reflector"), netns=rr.netns, env=env,
                  log=d / "route-reflector.log")
        self.procs[f"rr:{rr.name}"] = p
        return p

    def start_nodes(self) -> None:
        """Agents, sidecars and the reflector all at once (each waits for what it needs)."""
        if self.spec.rr:
            self.configure_route_reflection()
        for n in self.plan.nodes:
            self.start_agent(n.name)
            if self.spec.info.bgp:
                self.start_sidecar(n.name)
        self.start_route_reflector()

    def node_ready(self, node: str) -> bool:
        return _http_ok(f"http://{self.plan.node(node).ip}:{HEALTH_PORT}/readiness")

    def wait_ready(self, nodes: Sequence[str] | None = None, timeout: float = 90.0) -> None:
        pending = list(nodes or [n.name for n in self.plan.nodes])

        def check() -> bool:
            for name in list(pending):
                if not self.proc_alive(f"agent:{name}"):
                    raise LabError(f"agent on {name} exited; see {self.agent_log(name)}:\n"
                                   f"{log_tail(self.agent_log(name))}")
                if self.node_ready(name):
                    pending.remove(name)
            return not pending

        if not wait_for(check, timeout, 0.2):
            name = pending[0]
            raise LabError(f"agent on {name} not ready after {timeout:g}s; see {self.agent_log(name)}:\n"
                           f"{log_tail(self.agent_log(name))}")

    def proc_alive(self, key: str) -> bool:
        rec = self.ledger.data["procs"].get(key)
        return bool(rec) and proc_alive(int(rec["pid"]), int(rec.get("start") or 0))

    def stop(self, key: str, *, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        rec = self.ledger.data["procs"].get(key)
        if rec:
            stop_proc(int(rec["pid"]), int(rec.get("start") or 0), sig=sig, timeout=timeout)
            self.ledger.drop_proc(key)
        p = self.procs.pop(key, None)
        if p is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)

    # -- pods -------------------------------------------------------------------------------------------
    def install_cni(self) -> Path:
        from cni_plugin.install import install_binaries

        self.bin_dir.mkdir(parents=True, exist_ok=True)
        install_binaries(self.bin_dir, "/usr/bin/python3")
        return self.bin_dir / "calico"

    def cni_conf(self, node: str) -> dict[str, Any]:
        """Calico's own conflist entry for this node, plus our socket key (Calico ignores unknown keys)."""
        ds = self.datastore()
        conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
                                "log_level": "info", "datastore_type": ds.type, "nodename": self.plan.node(node).name,
                                "mtu": 0, "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
                                "felixpy_socket": self.cni_socket(node)}
        if ds.kubeconfig:
            conf["kubernetes"] = {"kubeconfig": ds.kubeconfig}
        return conf

    def cni(self, command: str, pod: PodInfo) -> tuple[int, dict[str, Any]]:
        plugin = self.bin_dir / "calico"
        if not plugin.exists():
            self.install_cni()
        env = {"PATH": SYS_PATH, "CNI_COMMAND": command, "CNI_CONTAINERID": pod.cid,
               "CNI_NETNS": f"/run/netns/{pod.netns}", "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin_dir),
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.k8s_namespace};K8S_POD_NAME={pod.name};"
                           f"K8S_POD_INFRA_CONTAINER_ID={pod.cid}"}
        p = subprocess.run([str(plugin)], input=json.dumps(self.cni_conf(pod.node)).encode(), env=env,
                           capture_output=True, timeout=120)
        try:
            out = json.loads(p.stdout) if p.stdout.strip() else {}
        except ValueError:
            out = {"msg": p.stdout.decode(errors="replace")}
        if p.returncode != 0 and not out:
            out = {"msg": p.stderr.decode(errors="replace").strip()}
        return p.returncode, out

    def pods(self) -> list[PodInfo]:
        """The lab's pods, by node then name."""
        with self.ledger.lock:
            pods = [PodInfo(**p) for p in self.ledger.data["pods"].values()]
        return sorted(pods, key=lambda p: (self.plan.node(p.node).index, len(p.name), p.name))

    def add_pod(self, node: str, name: str = "", *, namespace: str = K8S_NAMESPACE,
                labels: dict[str, str] | None = None, ports: Sequence[dict[str, Any]] = ()) -> PodInfo:
        """A pod on ``node`` the way kubelet makes one: (Kubernetes: the Pod object,) a netns, CNI ADD.

        ``namespace`` is the pod's Kubernetes namespace (created if missing); pod names are unique across
        namespaces (they name the netns). ``labels`` (added to ``app=<name>``) and ``ports`` (container
        ports, e.g. named ones) go into the Pod object, so they matter with the Kubernetes datastore only."""
        n = self.plan.node(node)
        with self.ledger.lock:
            if not name:
                taken = set(self.ledger.data["pods"])
                name = next(f"n{n.index}-p{j}" for j in range(1, 10_000) if f"n{n.index}-p{j}" not in taken)
            elif name in self.ledger.data["pods"]:
                raise LabError(f"a pod named {name!r} exists already (names are unique across namespaces)")
            pod = PodInfo(name, n.name, f"{self.spec.prefix}-{name}", uuid.uuid4().hex, k8s_namespace=namespace)
            self.ledger.put_pod(name, pod.to_json())
            self.ledger.add_netns(pod.netns)
        run("ip", "netns", "add", pod.netns)
        ds = self.datastore()
        if ds.server:
            kube = ds.kube()
            if namespace != K8S_NAMESPACE:
                kube.ensure_namespace(namespace)
            kube.create_pod(pod.k8s_namespace, name, n.name, labels=labels, ports=ports)
        rc, out = self.cni("ADD", pod)
        if rc != 0 or not out.get("ips"):
            raise LabError(f"CNI ADD for pod {name} on {n.name} failed ({rc}): {out}; "
                           f"see {self.agent_log(n.name)}")
        pod = PodInfo(**{**pod.to_json(), "ip": str(out["ips"][0]["address"]).split("/")[0]})
        self.ledger.put_pod(name, pod.to_json())
        return pod

    def add_pods(self, per_node: int) -> list[PodInfo]:
        """``per_node`` pods on every node, nodes in parallel (one node's ADDs in order)."""
        def one_node(n: NodePlan) -> list[PodInfo]:
            return [self.add_pod(n.name) for _ in range(per_node)]

        with ThreadPoolExecutor(max_workers=max(1, len(self.plan.nodes))) as ex:
            return [p for ps in ex.map(one_node, self.plan.nodes) for p in ps]

    def del_pod(self, pod: PodInfo | str) -> None:
        p = pod if isinstance(pod, PodInfo) else PodInfo(**self.ledger.data["pods"][pod])
        rc, out = self.cni("DEL", p)
        if rc != 0:
            raise LabError(f"CNI DEL for pod {p.name} failed ({rc}): {out}")
        ds = self.datastore()
        if ds.server:
            ds.kube().delete(f"/api/v1/namespaces/{p.k8s_namespace}/pods/{p.name}")
        run("ip", "netns", "del", p.netns, check=False)
        self.ledger.drop_pod(p.name)
        self.ledger.drop_netns(p.netns)

    # -- inspection ---------------------------------------------------------------------------------------
    def ping(self, src: PodInfo, dst_ip: str, *, count: int = 1, wait: float = 1.0) -> bool:
        return subprocess.run(["ip", "netns", "exec", src.netns, "ping", "-n", "-q", "-c", str(count),
                               "-W", f"{wait:g}", "-i", "0.2", dst_ip], capture_output=True).returncode == 0

    def matrix(self, pods: Sequence[PodInfo] | None = None, *, wait: float = 1.0) -> dict[tuple[str, str], bool]:
        """Ping every pod from every other pod (in parallel); ``{(src, dst): ok}``."""
        ps = [p for p in (pods if pods is not None else self.pods()) if p.ip]
        pairs = [(a, b) for a in ps for b in ps if a.name != b.name]
        with ThreadPoolExecutor(max_workers=16) as ex:
            oks = list(ex.map(lambda ab: self.ping(ab[0], ab[1].ip, wait=wait), pairs))
        return {(a.name, b.name): ok for (a, b), ok in zip(pairs, oks, strict=True)}

    def converge(self, timeout: float = 30.0) -> dict[tuple[str, str], bool]:
        """Retry the failing pairs of the ping matrix until all pass or ``timeout``; the last matrix."""
        result = self.matrix()
        deadline = time.monotonic() + timeout
        while not all(result.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            failing = {p for pair, ok in result.items() if not ok for p in pair}
            retry = self.matrix([p for p in self.pods() if p.name in failing])
            result.update({k: v for k, v in retry.items() if k in result and not result[k]})
        return result

    def peers(self, node: str) -> list[PeerRow]:
        n = self.plan.node(node)
        for source in PEER_SOURCES:
            with contextlib.suppress(Exception):
                rows = source(self.bgp_dir(n.name), n.netns)
                if rows is not None:
                    return rows
        return []

    def peer_name(self, address: str) -> str:
        for n in self.plan.all_nodes():
            if n.ip == address:
                return n.name
        return ""

    def routes(self, node: str) -> list[str]:
        out = run("ip", "-n", self.plan.node(node).netns, "-4", "route", "show", check=False)
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def bgp_config_written(self, node: str) -> bool:
        return (self.bgp_dir(node) / "exabgp.conf").exists()

    # -- teardown -----------------------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Remove everything the ledger names, then anything left under the lab's prefix. Returns what was
        removed (for the operator)."""
        removed = teardown(self.ledger.data, prefix=self.spec.prefix)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(1)
        self.procs.clear()
        return removed


async def upsert(backend: Any, kind: str, name: str, spec: dict[str, Any]) -> None:
    """Create the v3 resource, or replace its spec if it exists."""
    from felixpy.datastore.api import AlreadyExists, Key, KVPair, new_resource

    key = Key(kind, name)
    try:
        await backend.create(key, new_resource(key, spec))
    except AlreadyExists:
        kv = await backend.get(key)
        await backend.update(KVPair(key, {**kv.value, "spec": spec}, kv.revision, kv.uid))


def teardown(state: dict[str, Any], *, prefix: str = "") -> list[str]:
    """Undo a lab from its state (works in another process, after a crash): processes by PID (checked
    against their start time), then whatever still runs in the lab's namespaces, then the namespaces and
    root links, then the work directory."""
    removed: list[str] = []
    procs: dict[str, Any] = state.get("procs") or {}
    # Node daemons first (they hold datastore connections), the datastore last.
    order = sorted(procs, key=lambda k: (k in ("kube-apiserver", "etcd"), k == "etcd", k))
    nets = list(state.get("netns") or [])
    if prefix:
        nets += sorted(n for n in existing_netns() if n.startswith(prefix + "-") and n not in nets)
    with ThreadPoolExecutor(max_workers=8) as ex:
        list(ex.map(lambda k: stop_proc(int(procs[k]["pid"]), int(procs[k].get("start") or 0)),
                    [k for k in order if k not in ("kube-apiserver", "etcd")]))
    for ns in nets:
        for pid in netns_pids(ns):
            stop_proc(pid, proc_start_time(pid), timeout=3.0)
    for k in ("kube-apiserver", "etcd"):
        if k in procs:
            stop_proc(int(procs[k]["pid"]), int(procs[k].get("start") or 0))
    removed += [f"process {k}" for k in order]
    links = list(state.get("links") or [])
    if prefix and f"{prefix}-ds" not in links:
        links.append(f"{prefix}-ds")
    for link in links:
        if subprocess.run(["ip", "link", "del", link], capture_output=True).returncode == 0:
            removed.append(f"link {link}")
    for ns in reversed(nets):
        if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
            removed.append(f"netns {ns}")
    state["procs"], state["netns"], state["links"], state["pods"] = {}, [], [], {}
    wd = state.get("workdir")
    if wd and Path(wd).is_dir():
        shutil.rmtree(wd, ignore_errors=True)
        removed.append(f"dir {wd}")
    return removed
