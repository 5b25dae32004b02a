"""Shared pieces of the BGP benchmarks (``bench.bgp_prefixes``, ``bench.bgp_convergence``).

- :class:`NetLab`: node network namespaces on one bridge (``<prefix>sw``), each with ``eth0`` at
  ``<subnet>.<idx>/24``; records every namespace and process it makes and removes them all in ``close()``
  (processes by PID, namespaces by name), also after a half-finished setup.
- :class:`BirdCtl`: a minimal client of BIRD's control socket, so enabling a protocol costs one write
  (forking ``birdc`` would add a few ms to every measurement).
- :class:`PrefixCounter`: the number of prefixes in a namespace's main FIB from ``/proc/<pid>/net/fib_triestat``
  (about 50 us whatever the table size; a netlink dump of 10k routes parsed in Python takes about 30 ms, and
  ``ip monitor`` drops events at BIRD's speed).
- :class:`OurNode`: the agent's BGP install path in this process: ExaBGP started by ``bgp.sidecar`` (config
  from ``bgp.exabgp_conf`` via :class:`~felixpy.bgpctl.BgpControl`) -> ``bgp.relay`` -> ``bgp.speaker`` ->
  :class:`~felixpy.bgpctl.BgpControl` (import rules, snapshot) -> :class:`~felixpy.dataplane.loop.Dataplane`
  with a :class:`~felixpy.dataplane.bgp_route_mgr.BgpRouteManager` and a
  :class:`~felixpy.dataplane.drivers.routetable.RouteTable` on a :class:`~felixpy.dataplane.shims.netlink.Netlink`
  opened in the node's namespace. No datastore: the pool and the BGP config are given directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bgp.model import LocalBgpConfig, PeerSpec
from bgp.sidecar import exabgp_pid
from felixpy import names
from felixpy.bgpctl import BgpControl
from felixpy.calc.messages import BgpConfigUpdate, InSync
from felixpy.dataplane.bgp_route_mgr import BgpRouteManager
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.loop import Dataplane
from felixpy.dataplane.shims.netlink import RTNLGRP_IPV4_ROUTE, Monitor, Netlink, Overflow, RouteEvent
from felixpy.ipam.pools import IPPool

ASN = 64512
BIRD = shutil.which("bird") or "/usr/sbin/bird"
EXABGP = Path(sys.executable).parent / "exabgp"


def sh(*args: str, check: bool = True) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def requirements() -> str:
    """Why the BGP benches cannot run here, or ''."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    if not os.access(BIRD, os.X_OK):
        return "bird2 is not installed"
    if not EXABGP.exists():
        return f"exabgp is not installed next to {sys.executable}"
    return ""


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:  # a zombie still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stop a process that is not our child (found in one of our namespaces)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class NetLab:
    """Namespaces on a bridge plus the processes started in them; ``close()`` removes everything."""

    def __init__(self, tag: str, subnet: str = "192.168.123") -> None:
        self.prefix = f"fx{tag}{os.getpid() % 100000}"
        self.subnet = subnet
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                             else None))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self.sw = self._netns("sw")
            sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _netns(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def ip(self, idx: int) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(f"{self.subnet}.{idx}")

    def add_node(self, idx: int) -> str:
        """A namespace with eth0 = <subnet>.idx/24 on the bridge."""
        ns = self._netns(f"n{idx}")
        port = f"{self.prefix[-6:]}p{idx}"[-15:]
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.sw)
        sh("ip", "-n", self.sw, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.ip(idx)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns

    def spawn(self, ns: str, argv: Sequence[str], log_name: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Run argv in ns (``ip netns exec`` execs it, so the PID is the program's), output to a log file."""
        with open(self.workdir / log_name, "ab") as log:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def log_tail(self, log_name: str, lines: int = 30) -> str:
        try:
            text = (self.workdir / log_name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- {log_name} ---\n" + "\n".join(text)

    def stop_processes(self) -> None:
        # In reverse start order, so sidecars (SIGTERM makes them stop their ExaBGP) go before the BIRDs.
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # Whatever still runs inside our namespaces (an ExaBGP whose sidecar died, a relay) is ours too.
        for ns in self.namespaces:
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                _stop_pid(int(pid), timeout=3.0)

    def close(self) -> None:
        self.stop_processes()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ BIRD


class BirdCtl:
    """BIRD's control socket: one command at a time, reply lines until a final ``0xxx``/``8xxx``/``9xxx`` code."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        self._reply()  # greeting: 0001 BIRD x.y ready.

    def _reply(self) -> list[str]:
        out: list[str] = []
        while True:
            while b"\n" not in self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("BIRD closed the control socket")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            out.append(text)
            if len(text) >= 5 and text[:4].isdigit() and text[4] == " " and text[0] in "089":
                if text[0] in "89":
                    raise RuntimeError(f"BIRD: {text}")
                return out

    def send(self, cmd: str) -> None:
        """Write a command without waiting (the caller times what happens next)."""
        self.sock.sendall(cmd.encode() + b"\n")

    def reply(self) -> list[str]:
        return self._reply()

    def cmd(self, cmd: str) -> list[str]:
        self.send(cmd)
        return self._reply()

    def established(self, protocol: str) -> bool:
        return any("Established" in ln for ln in self.cmd(f"show protocols {protocol}"))

    def close(self) -> None:
        self.sock.close()


def start_bird(lab: NetLab, ns: str, name: str, conf: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start BIRD in ns with conf; returns (process, control socket path)."""
    path = lab.workdir / f"{name}.conf"
    path.write_text(conf)
    ctl = str(lab.workdir / f"{name}.ctl")
    check = subprocess.run([BIRD, "-p", "-c", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"BIRD rejects {path}: {check.stderr.strip()}")
    p = lab.spawn(ns, [BIRD, "-f", "-c", str(path), "-s", ctl, "-P", str(lab.workdir / f"{name}.pid")],
                  f"{name}.log")
    wait_for(lambda: os.path.exists(ctl), 10, f"{name} control socket", lambda: lab.log_tail(f"{name}.log"))
    return p, ctl


def wait_for(pred: Callable[[], bool], timeout: float, what: str, diag: Callable[[], str] = lambda: "") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n{diag()}")
        time.sleep(0.05)


async def async_wait_for(pred: Callable[[], bool], timeout: float, what: str,
                         diag: Callable[[], str] = lambda: "") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n{diag()}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------ kernel counts

_PREFIXES = re.compile(rb"Main:.*?Prefixes:\s*(\d+)", re.S)


class PrefixCounter:
    """Prefixes in the main FIB of the namespace of process ``pid`` (the file stays bound to that namespace)."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/net/fib_triestat", os.O_RDONLY)

    def count(self) -> int:
        data = os.pread(self.fd, 1 << 16, 0)
        m = _PREFIXES.search(data)
        if m is None:
            raise RuntimeError(f"unexpected fib_triestat: {data[:200]!r}")
        return int(m.group(1))

    def wait(self, target: int, timeout: float, interval: float = 0.01) -> float:
        """Poll until count() == target; returns time.perf_counter() of the first poll that saw it."""
        end = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            if self.count() == target:
                return now
            if now > end:
                raise TimeoutError(f"{self.count()} prefixes in the FIB after {timeout:g} s, waiting for {target}")
            time.sleep(interval)

    def close(self) -> None:
        os.close(self.fd)


def check_routes(ns: str, nets: Sequence[ipaddress.IPv4Network], gateway: ipaddress.IPv4Address) -> None:
    """Raise unless the namespace's main table holds exactly ``nets`` as proto-bird routes via ``gateway``."""
    with Netlink(f"/run/netns/{ns}") as nl:
        got = {r.dst: r.gateway for r in nl.routes() if r.protocol == names.RTPROT_BIRD}
    wrong = [(d, g) for d, g in got.items() if g != gateway]
    if set(got) != set(nets) or wrong:
        raise RuntimeError(f"{ns}: {len(got)} proto-bird routes, expected {len(nets)} via {gateway}; "
                           f"wrong gateway: {wrong[:3]}")


class ProcNetns:
    """A sleeping process in a namespace, so /proc/<pid>/net/* of that namespace can be read."""

    def __init__(self, lab: NetLab, ns: str) -> None:
        self.proc = lab.spawn(ns, ["sleep", "infinity"], f"holder-{ns}.log")
        wait_for(lambda: os.readlink(f"/proc/{self.proc.pid}/ns/net") == _netns_id(ns), 5, f"holder in {ns}")

    @property
    def pid(self) -> int:
        return self.proc.pid


def _netns_id(ns: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"


class RouteWatch:
    """Route events of one namespace, each stamped with time.perf_counter() when the event loop reads it.

    For single-route latencies: ``ip monitor``-style multicast, no polling interval to round up to.
    """

    def __init__(self, ns: str) -> None:
        self.mon = Monitor((RTNLGRP_IPV4_ROUTE,), netns=f"/run/netns/{ns}")
        # (time, deleted, dst, gateway, protocol)
        self.events: list[tuple[float, bool, ipaddress.IPv4Network, object, int]] = []
        self.overflows = 0
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.mon.fileno(), self._readable)

    def _readable(self) -> None:
        now = time.perf_counter()
        for ev in self.mon.read_events():
            if isinstance(ev, Overflow):
                self.overflows += 1
            elif isinstance(ev, RouteEvent):
                r = ev.route
                if isinstance(r.dst, ipaddress.IPv4Network):
                    self.events.append((now, ev.deleted, r.dst, r.gateway, r.protocol))
        self._changed.set()

    def find(self, dst: ipaddress.IPv4Network, deleted: bool, since: float, protocol: int = names.RTPROT_BIRD
             ) -> tuple[float, bool, ipaddress.IPv4Network, object, int] | None:
        for ev in self.events:
            if ev[0] >= since and ev[2] == dst and ev[1] == deleted and ev[4] == protocol:
                return ev
        return None

    async def wait(self, dst: ipaddress.IPv4Network, deleted: bool, since: float, timeout: float,
                   protocol: int = names.RTPROT_BIRD) -> tuple[float, bool, ipaddress.IPv4Network, object, int]:
        """The first event of ``protocol`` for ``dst`` (added, or deleted) read at or after ``since``."""
        end = time.perf_counter() + timeout
        while True:
            ev = self.find(dst, deleted, since, protocol)
            if ev is not None:
                return ev
            left = end - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no {'delete' if deleted else 'add'} event for {dst} within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.mon.fileno())
        self.mon.close()


# ------------------------------------------------------------------------------------------------ ours


class OurNode:
    """The agent's BGP receive/install path for one node namespace, run in this process's event loop."""

    def __init__(self, lab: NetLab, ns: str, idx: int, pools: Sequence[IPPool], peers: Sequence[PeerSpec]) -> None:
        self.lab = lab
        self.ns = ns
        self.idx = idx
        self.ip = lab.ip(idx)
        self.name = f"n{idx}"
        self.dir = lab.workdir / self.name
        self.pools = list(pools)
        self.peers = tuple(peers)
        self.nl = Netlink(f"/run/netns/{ns}")
        self.route_table = RouteTable(self.nl, owned_protocols=(names.RTPROT_FELIX, names.RTPROT_BIRD))
        self.bgp_route_mgr = BgpRouteManager(self.nl, self.route_table)
        self.dataplane = Dataplane([self.bgp_route_mgr], [self.bgp_route_mgr, self.route_table])
        self.ctl = BgpControl(str(self.dir), submit=self.dataplane.submit, pools=lambda: self.pools,
                              ipip_available=lambda: False)
        self.sidecar: subprocess.Popen[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def config(self) -> LocalBgpConfig:
        return LocalBgpConfig(node=self.name, router_id=self.ip, local_ip=self.ip, asn=ASN, peers=self.peers)

    async def start(self) -> None:
        """Start the pipeline tasks, write the ExaBGP config (through BgpControl) and start the sidecar."""
        self._tasks.append(asyncio.create_task(self.dataplane.run(), name=f"{self.name}-dataplane"))
        self._tasks.append(asyncio.create_task(self.ctl.run(), name=f"{self.name}-bgp"))
        # As the agent does once the datastore is in sync: from now on stale routes may be removed.
        self.dataplane.submit([InSync()])
        self.ctl.on_message(BgpConfigUpdate(self.config()))
        await async_wait_for(lambda: os.path.exists(os.path.join(self.ctl.bgp_dir, "agent.sock")), 10,
                             "speaker socket")
        self.sidecar = self.lab.spawn(self.ns, [sys.executable, "-m", "bgp.sidecar", "--dir", str(self.dir)],
                                      f"{self.name}-sidecar.log")

    def established(self) -> bool:
        st = self.ctl.speaker.peer_status()
        return bool(st) and all(p.state == "established" for p in st) and self.ctl.speaker.synced

    def exabgp_pid(self) -> int | None:
        return exabgp_pid(str(self.dir))

    def relay_pids(self) -> list[int]:
        out = []
        for pid in sh("ip", "netns", "pids", self.ns, check=False).split():
            with contextlib.suppress(OSError):
                if b"bgp.relay" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
        return out

    def diag(self) -> str:
        return (f"{self.name}: connected={self.ctl.speaker.connected} synced={self.ctl.speaker.synced} "
                f"peers={self.ctl.speaker.peer_status()}\n" + self.lab.log_tail(f"{self.name}-sidecar.log"))

    async def stop(self) -> None:
        # Losing ExaBGP on purpose: its warnings (routes kept stale, status file gone) are noise here.
        for name in ("bgp", "felixpy"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        await asyncio.sleep(0.05)  # let the callbacks the cancellations scheduled run before the files go
        self.dataplane.close()
        self.nl.close()


class CpuMeter:
    """CPU seconds used by a set of processes (and this one) between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._start["bench process"] = time.process_time()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        out = {k: cpu_seconds(p) - self._start[k] for k, p in self.pids.items()}
        out["bench process"] = time.process_time() - self._start["bench process"]
        out["wall"] = time.perf_counter() - self._t0
        return out


def thread_wait(counter: PrefixCounter, target: int, timeout: float, interval: float = 0.01
                ) -> asyncio.Future[float]:
    """counter.wait() in its own thread (the event loop keeps running the pipeline meanwhile)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[float] = loop.create_future()

    def settle(result: float | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            assert result is not None
            fut.set_result(result)

    def run() -> None:
        try:
            t = counter.wait(target, timeout, interval)
        except BaseException as e:  # handed to the awaiting side
            loop.call_soon_threadsafe(settle, None, e)
            return
        loop.call_soon_threadsafe(settle, t, None)

    threading.Thread(target=run, daemon=True, name="fib-poller").start()
    return fut
