"""Multi-node end-to-end harness: a :class:`Cluster` of node namespaces with real agents, ExaBGP sidecars,
an optional BIRD route reflector and one real datastore (etcd, or kube-apiserver on it), built from the
same :mod:`felixpy.labnet` blocks as ``felixpy lab``.

Usage::

    with Cluster(mode="bgp", nodes=3, datastore="etcdv3") as c:
        c.require_bgp_config()            # skips (with the reason) when the agent writes no BGP config yet
        pods = [c.add_pod(n) for n in c.node_names]
        assert c.wait_for(lambda: all(c.matrix(pods).values()), 30), c.diagnostics()

Everything a cluster makes (namespaces, the root link, processes, its work dir) is removed by ``stop()``,
also when ``start()`` failed half way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from felixpy import labnet
from felixpy.labnet import Lab, LabSpec, Ledger, NodePlan, PeerRow, PodInfo

T = TypeVar("T")
Pod = PodInfo  # .name, .node, .netns (alias .ns), .ip, .cid


def temp_root() -> str | None:
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


@dataclass(frozen=True)
class PingStats:
    sent: int
    received: int

    @property
    def lost(self) -> int:
        return self.sent - self.received


class Pinger:
    """A continuous ping from a pod (``count`` probes every ``interval`` s); ``stop()`` returns the counts.

    With ``count`` set, ``stop()`` waits for ping to finish on its own, so the last probe is not counted as
    lost just because it was still in flight."""

    def __init__(self, src: Pod, dst_ip: str, *, interval: float = 0.05, count: int = 0, wait: float = 1.0) -> None:
        args = ["ip", "netns", "exec", src.netns, "ping", "-n", "-q", "-i", f"{interval:g}", "-W", f"{wait:g}"]
        if count:
            args += ["-c", str(count)]
        self.count = count
        self.proc = subprocess.Popen([*args, dst_ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 60.0) -> PingStats:
        if not self.count:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        m = re.search(rb"(\d+) packets transmitted, (\d+) received", out)
        if not m:
            raise RuntimeError(f"unexpected ping output: {out.decode(errors='replace')}")
        return PingStats(int(m.group(1)), int(m.group(2)))


class Cluster:
    """N node namespaces on a bridge (two subnets and a router with ``subnets=2``), one datastore, an agent
    per node, the ExaBGP sidecar in BGP modes, a BIRD route reflector with ``rr=True``.

    ``mode``: bgp | vxlan | vxlan-crosssubnet | ipip (see :data:`felixpy.labnet.MODES`).
    ``datastore``: etcdv3 | kubernetes. ``agent_env``: extra environment for every agent (applied last).
    """

    def __init__(self, mode: str = "bgp", nodes: int = 3, datastore: str = "etcdv3", rr: bool = False,
                 subnets: int = 0, *, pool: str = "10.244.0.0/16", start_agents: bool = True,
                 ready_timeout: float = 90.0, agent_env: dict[str, str] | None = None) -> None:
        self.prefix = f"mn{secrets.token_hex(3)}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"felixpy-{self.prefix}-", dir=temp_root()))
        spec = LabSpec(prefix=self.prefix, nodes=nodes, mode=mode, datastore=datastore, rr=rr, subnets=subnets,
                       base="", pool=pool)
        self._spec_args = spec
        self.start_agents = start_agents
        self.agent_env = dict(agent_env or {})
        self.ready_timeout = ready_timeout
        self._lab: Lab | None = None
        self._missing: dict[str, str] = {}  # capability -> why the agent lacks it ("" = present)

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> Cluster:
        """Network, datastore, then all agents/sidecars/reflector at once; returns when every agent is
        ready. On failure everything made so far is removed before the error propagates."""
        spec = LabSpec(**{**self._spec_args.to_json(), "base": labnet.pick_base()})
        lab = self._lab = Lab(spec, self.workdir, Ledger({}))
        lab.extra_env = self.agent_env
        try:
            lab.build_network()
            lab.start_datastore()
            if self.start_agents:
                lab.start_nodes()
                lab.wait_ready(timeout=self.ready_timeout)
                lab.install_cni()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[str]:
        removed: list[str] = []
        if self._lab is not None:
            removed = self._lab.teardown()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return removed

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- topology ---------------------------------------------------------------------------------------
    @property
    def lab(self) -> Lab:
        """The running lab (every :class:`felixpy.labnet.Lab` method is available through it)."""
        if self._lab is None:
            raise RuntimeError("cluster not started")
        return self._lab

    @property
    def plan(self) -> labnet.Plan:
        return self.lab.plan

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.plan.nodes]

    def node(self, node: str | int) -> NodePlan:
        """By name (``mnxxxx-n2``), index (2) or short name (``n2``)."""
        return self.plan.node(node)

    @property
    def datastore(self) -> labnet.DatastoreInfo:
        return self.lab.datastore()

    # -- pods -------------------------------------------------------------------------------------------
    def add_pod(self, node: str | int, name: str = "", *, namespace: str = labnet.K8S_NAMESPACE,
                labels: dict[str, str] | None = None, ports: list[dict[str, Any]] | None = None) -> Pod:
        """A pod on ``node``; ``namespace``, ``labels`` and container ``ports`` as in
        :meth:`felixpy.labnet.Lab.add_pod` (they reach the agent with the Kubernetes datastore)."""
        return self.lab.add_pod(self.node(node).name, name, namespace=namespace, labels=labels, ports=ports or ())

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A Kubernetes namespace with ``labels`` (merged into an existing one's); Kubernetes datastore only."""
        self.datastore.kube().ensure_namespace(name, labels)

    def del_pod(self, pod: Pod) -> None:
        self.lab.del_pod(pod)

    def pods(self) -> list[Pod]:
        return self.lab.pods()

    def ping(self, src: Pod, dst: Pod | str, *, count: int = 1, wait: float = 1.0) -> bool:
        return self.lab.ping(src, dst if isinstance(dst, str) else dst.ip, count=count, wait=wait)

    def matrix(self, pods: list[Pod] | None = None) -> dict[tuple[str, str], bool]:
        """``{(src pod, dst pod): reachable}`` over every ordered pair, pinged in parallel."""
        return self.lab.matrix(pods)

    def failing(self, pods: list[Pod] | None = None) -> list[tuple[str, str]]:
        return sorted(k for k, ok in self.matrix(pods).items() if not ok)

    def pinger(self, src: Pod, dst: Pod, *, interval: float = 0.05, count: int = 0) -> Pinger:
        return Pinger(src, dst.ip, interval=interval, count=count)

    # -- inspection -------------------------------------------------------------------------------------
    @staticmethod
    def wait_for(pred: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> bool:
        return labnet.wait_for(pred, timeout, interval)

    def node_routes(self, node: str | int) -> list[str]:
        """``ip -4 route`` in the node's netns, one line per route."""
        return self.lab.routes(self.node(node).name)

    def routes_to(self, node: str | int, cidr: str) -> list[str]:
        """The node's routes whose destination is exactly ``cidr`` (e.g. another node's block)."""
        want = ipaddress.ip_network(cidr)
        out = []
        for ln in self.node_routes(node):
            words = ln.split()
            dst = words[1] if words[0] in ("blackhole", "unreachable", "prohibit") else words[0]
            with contextlib.suppress(ValueError):
                if dst != "default" and ipaddress.ip_network(dst, strict=False) == want:
                    out.append(ln)
        return out

    def peers(self, node: str | int) -> list[PeerRow]:
        return self.lab.peers(self.node(node).name)

    def bgp_config_written(self, node: str | int) -> bool:
        return self.lab.bgp_config_written(self.node(node).name)

    def has_link(self, node: str | int, link: str) -> bool:
        return subprocess.run(["ip", "-n", self.node(node).netns, "link", "show", link],
                              capture_output=True).returncode == 0

    def agent_log(self, node: str | int, limit: int = 3000) -> str:
        return labnet.log_tail(self.lab.agent_log(self.node(node).name), limit)

    def ruleset(self, node: str | int) -> str:
        """The node's policy/NAT rules as the kernel has them: ``nft list table ip calico``, the ``cali``
        lines of ``iptables-save`` and ``ipset list`` (whichever backend the agent uses, the other is empty)."""
        netns = self.node(node).netns
        nft = labnet.ns_run(netns, "nft", "list", "table", "ip", "calico", check=False)
        ipt = "\n".join(ln for ln in labnet.ns_run(netns, "iptables-save", check=False).splitlines()
                        if "cali" in ln or ln.startswith("*"))
        sets = labnet.ns_run(netns, "ipset", "list", check=False) if shutil.which("ipset") else ""
        return (f"# nft list table ip calico\n{nft or '(no table)'}\n# iptables-save (cali)\n{ipt or '(none)'}"
                f"\n# ipset list\n{sets.strip() or '(none)'}")

    def diagnostics(self, limit: int = 1500) -> str:
        """Routes, peers and log tails of every node: the message for a failed assertion."""
        parts = []
        for n in self.plan.all_nodes():
            d = self.lab.node_dir(n.name)
            parts.append(f"==== {n.name} ({n.address})\nroutes:\n  " + "\n  ".join(self.lab.routes(n.name))
                         + f"\npeers: {self.lab.peers(n.name)}")
            for log in sorted(d.glob("*.log")):
                parts.append(f"---- {log.name}\n{labnet.log_tail(log, limit)}")
        return "\n".join(parts)

    # -- capability checks (skip, with the reason, what the agent cannot do yet) ---------------------------
    def require_bgp_config(self, timeout: float = 15.0) -> None:
        """Skip the calling test unless every agent has written its ExaBGP config (checked once per cluster)."""
        import importlib.util

        def missing() -> str:
            if importlib.util.find_spec("bgp.sidecar") is None:
                return "this build has no ExaBGP sidecar (bgp.sidecar)"
            if not self.wait_for(lambda: all(self.bgp_config_written(n) for n in self.node_names), timeout):
                n = next(n for n in self.node_names if not self.bgp_config_written(n))
                return (f"the agent does not write its BGP config yet: no {self.lab.bgp_dir(n)}/exabgp.conf "
                        f"after {timeout:g}s")
            return ""

        self._require("bgp-config", missing)

    def require_vxlan_device(self, timeout: float = 15.0) -> None:
        """Skip the calling test unless every agent has created ``vxlan.calico`` (checked once per cluster)."""
        def missing() -> str:
            if not self.wait_for(lambda: all(self.has_link(n, "vxlan.calico") for n in self.node_names), timeout):
                return f"the agent does not create vxlan.calico yet (none after {timeout:g}s)"
            return ""

        self._require("vxlan-device", missing)

    def _require(self, what: str, check: Callable[[], str]) -> None:
        import pytest

        if what not in self._missing:
            self._missing[what] = check()
        if self._missing[what]:
            pytest.skip(self._missing[what])

    # -- faults ------------------------------------------------------------------------------------------
    def exabgp_pids(self, node: str | int) -> list[int]:
        """ExaBGP processes in the node's netns (not the sidecar supervisor, not the relay)."""
        out = []
        for pid in labnet.netns_pids(self.node(node).netns):
            argv = labnet.proc_cmdline(pid)
            if any(Path(a).name == "exabgp" for a in argv) or argv[1:3] == ["-m", "exabgp"]:
                out.append(pid)
        return out

    def kill_exabgp(self, node: str | int) -> list[int]:
        """SIGKILL the node's ExaBGP (its sidecar should restart it); returns the killed PIDs."""
        pids = self.exabgp_pids(node)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def kill_agent(self, node: str | int, sig: int = signal.SIGKILL) -> None:
        """Stop the node's agent (SIGKILL by default: a crash, no cleanup). Its kernel state stays."""
        self.lab.stop(f"agent:{self.node(node).name}", sig=sig)

    def start_agent(self, node: str | int, *, wait: bool = True) -> None:
        name = self.node(node).name
        self.lab.start_agent(name)
        if wait:
            self.lab.wait_ready([name], timeout=self.ready_timeout)

    def link_down(self, node: str | int) -> None:
        """Cut the node off the switch (its own eth0 stays up): its peers see it vanish after the hold time."""
        labnet.set_port(self.plan, self.node(node).name, False)

    def link_up(self, node: str | int) -> None:
        labnet.set_port(self.plan, self.node(node).name, True)

    # -- datastore ---------------------------------------------------------------------------------------
    def with_backend(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``await fn(backend)`` with a fresh felixpy backend for this cluster's datastore."""
        return self.lab.with_backend(fn)

    def upsert(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        """Create or replace a cluster-scoped Calico v3 resource (BGPPeer, BGPConfiguration, IPPool, ...)."""
        async def go(b: Any) -> None:
            await labnet.upsert(b, kind, name, spec)

        self.with_backend(go)

    def delete(self, kind: str, name: str) -> None:
        from felixpy.datastore.api import Key

        async def go(b: Any) -> None:
            await b.delete(Key(kind, name))

        self.with_backend(go)

    def blocks(self) -> list[dict[str, Any]]:
        """Every IPAMBlock's spec (cidr, affinity ``host:<node>``, allocations...)."""
        from felixpy.datastore.api import KIND_IPAM_BLOCK

        async def go(b: Any) -> list[dict[str, Any]]:
            return [dict(kv.value["spec"]) for kv in (await b.list(KIND_IPAM_BLOCK)).items]

        return self.with_backend(go)

    def block_of(self, pod: Pod) -> str:
        """The CIDR of the IPAM block holding the pod's address."""
        ip = ipaddress.ip_address(pod.ip)
        for spec in self.blocks():
            if ip in ipaddress.ip_network(spec["cidr"]):
                return str(spec["cidr"])
        raise LookupError(f"no block holds {pod.ip}")

    def delete_block(self, cidr: str) -> None:
        """Delete an IPAM block (and its affinity), as an operator or IPAM GC would."""
        from felixpy.datastore.api import KIND_BLOCK_AFFINITY, KIND_IPAM_BLOCK

        async def go(b: Any) -> None:
            for kv in (await b.list(KIND_IPAM_BLOCK)).items:
                if kv.value["spec"]["cidr"] == cidr:
                    await b.delete(kv.key)
            for kv in (await b.list(KIND_BLOCK_AFFINITY)).items:
                if kv.value["spec"].get("cidr") == cidr:
                    await b.delete(kv.key)

        self.with_backend(go)


@contextlib.contextmanager
def cluster(**kwargs: Any) -> Iterator[Cluster]:
    c = Cluster(**kwargs)
    with c:
        yield c
