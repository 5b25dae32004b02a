"""The ExaBGP sidecar for real: network namespaces on a bridge, one ``bgp.sidecar`` (hence one ExaBGP 5 and
its ``bgp.relay``) per node namespace, and one :class:`bgp.speaker.Speaker` per node in this test process
(unix sockets work across network namespaces). A BIRD 2 peer configured like Calico's BIRD checks the wire
compatibility both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bgp.exabgp_conf import render_config, render_env
from bgp.model import LocalBgpConfig, PeerSpec
from bgp.sidecar import exabgp_pid, write_config
from bgp.speaker import PeerStatus, Speaker

A = IPv4Address
N = IPv4Network
RUN = f"fxbgp{os.getpid() % 100000}{secrets.token_hex(2)}"
SUBNET = "172.31.250"
HOLD = 3  # seconds; the minimum BGP allows, so a vanished peer is noticed quickly
GR_MAX = 30.0  # long enough to ride out an ExaBGP restart
GR_SHORT = 2.0  # for the test where a peer vanishes for good
EXABGP = Path(sys.executable).parent / "exabgp"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
needs_exabgp = pytest.mark.skipif(not EXABGP.exists(), reason=f"exabgp not installed next to {sys.executable}")
pytestmark = [pytest.mark.realparts, needs_exabgp]


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


async def until(pred: Callable[[], bool], timeout: float, what: str, diag: Callable[[], str] = lambda: "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        await asyncio.sleep(0.02)


def relay_argv(sock: str) -> list[str]:
    return [sys.executable, "-m", "bgp.relay", "--socket", sock]


# ---------------------------------------------------------------------------------------------- no root


def test_exabgp_validates_rendered_config(tmp_path: Path) -> None:
    peers = (
        PeerSpec(name="Mesh_10_0_0_2", address=A("10.0.0.2"), asn=64512, local_asn=64512, passive=True, hold_time=3),
        PeerSpec(name="Global_10_0_9_9_port_1790", address=A("10.0.9.9"), asn=65001, local_asn=64512, port=1790,
                 password="pa ss", graceful_restart_time=0),
    )  # fmt: skip
    cfg = LocalBgpConfig(node="n1", router_id=A("10.0.0.1"), local_ip=A("10.0.0.1"), asn=64512, peers=peers)
    write_config(str(tmp_path), render_config(cfg, relay_argv=relay_argv(str(tmp_path / "a.sock"))),
                 render_env(bind_ip="10.0.0.1"))  # fmt: skip
    env = dict(os.environ, EXABGP_ENVFILE=str(tmp_path / "exabgp.env"))
    ok = subprocess.run([str(EXABGP), "validate", "-n", str(tmp_path / "exabgp.conf")], env=env, capture_output=True,
                        text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # and the validator really looks: a broken file fails
    (tmp_path / "bad.conf").write_text((tmp_path / "exabgp.conf").read_text().replace("hold-time 3;", "hold-time 2;"))
    bad = subprocess.run([str(EXABGP), "validate", str(tmp_path / "bad.conf")], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours would still answer kill(0); ExaBGP is the sidecar's child, so check its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sidecar_lifecycle(tmp_path: Path) -> None:
    """Waits for the files, restarts ExaBGP when the env changes, stops it on SIGTERM."""
    d = tmp_path / "bgp"
    log = open(tmp_path / "sidecar.log", "wb")  # noqa: SIM115 - handed to the child
    sidecar = subprocess.Popen([sys.executable, "-m", "bgp.sidecar", "--dir", str(d)], stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    log.close()
    try:
        time.sleep(0.5)
        assert sidecar.poll() is None and exabgp_pid(str(d)) is None  # nothing to run yet
        cfg = LocalBgpConfig(node="n1", router_id=A("10.0.0.1"), local_ip=A("10.0.0.1"), asn=64512)
        conf = render_config(cfg, relay_argv=relay_argv(str(tmp_path / "a.sock")))
        write_config(str(d), conf, render_env(bind_ip=None, pipename=f"{RUN}lc"))
        _wait(lambda: exabgp_pid(str(d)) is not None, 10, "ExaBGP started")
        first = exabgp_pid(str(d))
        assert first is not None and _alive(first)
        assert write_config(str(d), conf, render_env(bind_ip=None, pipename=f"{RUN}lc", log_level="WARNING"))
        _wait(lambda: exabgp_pid(str(d)) not in (None, first), 15, "ExaBGP restarted for the new env")
        second = exabgp_pid(str(d))
        assert second is not None and not _alive(first)
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(15) == 0
        assert not _alive(second), "ExaBGP must stop with the sidecar"
        assert exabgp_pid(str(d)) is None
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
        pid = exabgp_pid(str(d))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- the lab


class Node:
    def __init__(self, lab: Lab, idx: int, ns: str) -> None:
        self.lab = lab
        self.idx = idx
        self.ns = ns
        self.ip = A(f"{SUBNET}.{idx}")
        self.dir = lab.tmp / f"n{idx}"
        self.sock = str(self.dir / "agent.sock")
        self.peers: list[Node] = []
        self.speaker: Speaker | None = None
        self.task: asyncio.Task[None] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.changes = 0

    @property
    def sp(self) -> Speaker:
        assert self.speaker is not None
        return self.speaker

    def peer_specs(self) -> list[PeerSpec]:
        return [
            PeerSpec(
                name=f"Mesh_{str(p.ip).replace('.', '_')}", address=p.ip, asn=64512, local_asn=64512,
                passive=str(p.ip) > str(self.ip),  # Calico's rule: the higher address (as a string) waits
                hold_time=HOLD, graceful_restart_time=120,
            )
            for p in self.peers
        ]  # fmt: skip

    def write_config(self) -> bool:
        cfg = LocalBgpConfig(node=f"n{self.idx}", router_id=self.ip, local_ip=self.ip, asn=64512,
                             peers=tuple(self.peer_specs()))  # fmt: skip
        return write_config(str(self.dir), render_config(cfg, relay_argv=relay_argv(self.sock)),
                            render_env(bind_ip=self.ip, pipename=f"{RUN}n{self.idx}"))  # fmt: skip

    def _changed(self) -> None:
        self.changes += 1

    async def start_speaker(self) -> None:
        self.speaker = Speaker(self.sock, on_change=self._changed, gr_max=self.lab.gr_max)
        self.speaker.set_peers(self.peer_specs())
        self.task = asyncio.create_task(self.speaker.run())
        await until(lambda: os.path.exists(self.sock), 5, "speaker socket")

    async def stop_speaker(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def start_sidecar(self) -> None:
        log = open(self.dir / "sidecar.log", "ab")  # noqa: SIM115 - handed to the child
        self.sidecar = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "bgp.sidecar", "--dir", str(self.dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def log_tail(self) -> str:
        try:
            return f"--- n{self.idx} sidecar/ExaBGP log ---\n" + "\n".join(
                (self.dir / "sidecar.log").read_text(errors="replace").splitlines()[-25:]
            )
        except OSError:
            return ""

    def status(self, peer: Node) -> PeerStatus:
        return next(s for s in self.sp.peer_status() if s.address == peer.ip)

    def established(self) -> bool:
        return bool(self.peers) and all(s.state == "established" for s in self.sp.peer_status())


class Lab:
    def __init__(self, make_ns: Callable[[], str], tmp: Path) -> None:
        self.make_ns = make_ns
        self.tmp = tmp
        self.gr_max = GR_MAX
        self.sw = make_ns()
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        self.nodes: list[Node] = []
        self.birds: list[subprocess.Popen[bytes]] = []

    def add_ns(self, idx: int) -> str:
        ns = self.make_ns()
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{idx}", "netns", self.sw)
        sh("ip", "-n", self.sw, "link", "set", f"p{idx}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{idx}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def add_node(self, idx: int) -> Node:
        node = Node(self, idx, self.add_ns(idx))
        node.dir.mkdir()
        self.nodes.append(node)
        return node

    async def start(self, *nodes: Node) -> None:
        for n in nodes:
            n.write_config()
            await n.start_speaker()
            n.start_sidecar()
        await until(lambda: all(n.established() for n in nodes), 30, "all sessions established", self.diag)

    def diag(self) -> str:
        parts = []
        for n in self.nodes:
            if n.speaker is not None:
                parts.append(f"n{n.idx}: connected={n.sp.connected} {n.sp.peer_status()} learned={n.sp.learned()}")
            parts.append(n.log_tail())
        return "\n".join(parts)

    async def close(self) -> None:
        for n in self.nodes:
            if n.sidecar is not None and n.sidecar.poll() is None:
                n.sidecar.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.sidecar is not None:
                try:
                    await asyncio.to_thread(n.sidecar.wait, 15)
                except subprocess.TimeoutExpired:
                    n.sidecar.kill()
                    n.sidecar.wait()
            pid = exabgp_pid(str(n.dir))  # only left if the sidecar could not stop it
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await n.stop_speaker()
        for b in self.birds:
            if b.poll() is None:
                b.terminate()
                try:
                    b.wait(5)
                except subprocess.TimeoutExpired:
                    b.kill()
                    b.wait()


@pytest.fixture
async def lab(make_ns: Callable[[], str], tmp_path: Path) -> AsyncIterator[Lab]:
    the_lab = Lab(make_ns, tmp_path)
    try:
        yield the_lab
    finally:
        await the_lab.close()


async def two_nodes(lab: Lab) -> tuple[Node, Node]:
    a, b = lab.add_node(1), lab.add_node(2)
    a.peers, b.peers = [b], [a]
    await lab.start(a, b)
    return a, b


P_A = N("10.244.1.0/26")
P_B = N("10.244.2.0/26")


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.root
@needs_root
async def test_announce_learn_withdraw(lab: Lab) -> None:
    a, b = await two_nodes(lab)
    a.sp.set_announced([P_A, N("10.244.1.64/26")])
    b.sp.set_announced([P_B])
    await until(lambda: len(b.sp.learned()) == 2 and P_B in a.sp.learned(), 10, "routes learned", lab.diag)
    assert b.sp.learned() == {P_A: a.ip, N("10.244.1.64/26"): a.ip}
    assert a.sp.learned() == {P_B: b.ip}
    assert b.status(a).received == 2
    a.sp.set_announced([P_A])
    await until(lambda: b.sp.learned() == {P_A: a.ip}, 10, "withdraw seen by the peer", lab.diag)
    await a.sp.withdraw_all()
    await until(lambda: not b.sp.learned(), 10, "drain seen by the peer", lab.diag)
    assert a.sp.learned() == {P_B: b.ip}  # withdrawing ours leaves theirs alone


@pytest.mark.root
@needs_root
async def test_exabgp_killed_graceful_restart_without_gap(lab: Lab) -> None:
    a, b = await two_nodes(lab)
    a.sp.set_announced([P_A])
    b.sp.set_announced([P_B])
    await until(lambda: P_A in b.sp.learned() and P_B in a.sp.learned(), 10, "routes learned", lab.diag)
    await until(lambda: exabgp_pid(str(a.dir)) is not None, 5, "pid file")
    old_pid = exabgp_pid(str(a.dir))
    assert old_pid is not None

    gaps: list[str] = []
    saw_stale = False

    async def watch() -> None:
        nonlocal saw_stale
        while True:
            if b.sp.learned().get(P_A) != a.ip:
                gaps.append(f"b lost {P_A} at {time.monotonic():.3f}")
            if a.sp.learned().get(P_B) != b.ip:
                gaps.append(f"a lost {P_B} at {time.monotonic():.3f}")
            saw_stale = saw_stale or b.status(a).stale
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        os.kill(old_pid, signal.SIGKILL)
        await until(lambda: b.status(a).state != "established", 10, "b notices a's ExaBGP is gone", lab.diag)
        # the sidecar starts a new ExaBGP, whose relay reconnects to a's speaker, which resyncs and re-announces
        await until(lambda: exabgp_pid(str(a.dir)) not in (None, old_pid), 15, "ExaBGP restarted", lab.diag)
        await until(lambda: a.established() and b.established() and a.sp.synced and b.sp.synced, 20,
                    "sessions back and synced", lab.diag)  # fmt: skip
        await until(lambda: not b.status(a).stale and not a.status(b).stale, 10, "End-of-RIB both ways", lab.diag)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert saw_stale, "b never marked a's routes stale"
    assert not gaps, gaps[:5]
    assert b.sp.learned() == {P_A: a.ip} and a.sp.learned() == {P_B: b.ip}


@pytest.mark.root
@needs_root
async def test_agent_restart_resyncs_without_peers_noticing(lab: Lab) -> None:
    a, b = await two_nodes(lab)
    b.sp.set_announced([P_B])
    a.sp.set_announced([P_A])
    await until(lambda: P_B in a.sp.learned() and P_A in b.sp.learned(), 10, "routes learned", lab.diag)
    b_view = b.status(a)
    exabgp_before = exabgp_pid(str(a.dir))

    await a.stop_speaker()  # the agent dies; ExaBGP and its relay live on
    await asyncio.sleep(0.3)
    await a.start_speaker()  # a brand-new speaker with an empty RIB
    a.sp.set_announced([P_A])
    await until(lambda: a.sp.connected and a.sp.synced, 10, "relay reconnected and resynced", lab.diag)
    assert a.sp.learned() == {P_B: b.ip}
    assert a.status(b).state == "established"
    await asyncio.sleep(0.5)
    # nothing happened on the wire: same session on b, same ExaBGP on a, a's prefix never withdrawn
    assert b.status(a).since == b_view.since and b.status(a).state == "established"
    assert exabgp_pid(str(a.dir)) == exabgp_before
    assert b.sp.learned() == {P_A: a.ip}


@pytest.mark.root
@needs_root
async def test_vanished_peer_routes_expire_after_hold_and_gr(lab: Lab) -> None:
    lab.gr_max = GR_SHORT
    a, b = await two_nodes(lab)
    a.sp.set_announced([P_A])
    await until(lambda: P_A in b.sp.learned(), 10, "route learned", lab.diag)
    sh("ip", "-n", lab.sw, "link", "set", "p1", "down")  # a vanishes silently: no FIN, no NOTIFICATION
    await until(lambda: b.status(a).state == "down", HOLD + 10, "hold timer expiry", lab.diag)
    st = b.status(a)
    assert st.stale and P_A in b.sp.learned(), "routes must survive the peer's restart window"
    assert st.last_reason
    await until(lambda: P_A not in b.sp.learned(), GR_SHORT + 5, "stale routes dropped", lab.diag)
    assert not b.status(a).stale and b.status(a).received == 0


BIRD_CONF = """\
router id {me};
protocol device {{ scan time 2; }}
protocol direct {{ ipv4; interface "eth0"; }}
protocol static {{ ipv4; route 10.244.3.0/26 blackhole; }}
template bgp bgp_template {{
  local as 64512;
  graceful restart;
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 5;
  hold time {hold};
  ipv4 {{ gateway recursive; add paths on; import all;
         export filter {{ if net ~ 10.244.0.0/16 && source = RTS_STATIC then accept; reject; }}; }};
}}
protocol bgp Mesh_{peer_} from bgp_template {{
  neighbor {peer} as 64512;
  source address {me};
  multihop;
  graceful restart time 120;
}}
"""


@pytest.mark.root
@needs_root
async def test_bird_peer_added_by_reload_exchanges_routes(lab: Lab) -> None:
    bird = shutil.which("bird")
    birdc = shutil.which("birdc")
    if bird is None or birdc is None:
        pytest.skip("bird2 not installed")
    a, b = await two_nodes(lab)
    a.sp.set_announced([P_A])
    await until(lambda: P_A in b.sp.learned(), 10, "route learned", lab.diag)
    ab_since = b.status(a).since

    ns = lab.add_ns(3)
    me = f"{SUBNET}.3"
    conf = lab.tmp / "bird.conf"
    conf.write_text(BIRD_CONF.format(me=me, peer=a.ip, peer_=str(a.ip).replace(".", "_"), hold=HOLD))
    ctl = str(lab.tmp / "bird.ctl")
    lab.birds.append(
        subprocess.Popen(["ip", "netns", "exec", ns, bird, "-f", "-c", str(conf), "-s", ctl, "-P",
                          str(lab.tmp / "bird.pid")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )  # fmt: skip

    # a learns about the new peer: new config -> the sidecar sends SIGUSR1 -> ExaBGP adds the neighbor
    bird_peer = PeerSpec(name="Mesh_172_31_250_3", address=A(me), asn=64512, local_asn=64512, passive=True,
                         hold_time=HOLD)  # fmt: skip
    a_peers = [*a.peer_specs(), bird_peer]
    cfg = LocalBgpConfig(node="n1", router_id=a.ip, local_ip=a.ip, asn=64512, peers=tuple(a_peers))
    assert write_config(str(a.dir), render_config(cfg, relay_argv=relay_argv(a.sock)),
                        render_env(bind_ip=a.ip, pipename=f"{RUN}n1"))  # fmt: skip
    a.sp.set_peers(a_peers)

    def bird_route() -> str:
        r = subprocess.run([birdc, "-s", ctl, "show", "route", "for", str(P_A), "all"], capture_output=True, text=True)
        return r.stdout

    def diag() -> str:
        return lab.diag() + "\n--- bird ---\n" + bird_route()

    await until(lambda: a.status(b).state == "established" and next(
        s for s in a.sp.peer_status() if s.address == A(me)).state == "established", 30, "BIRD session", diag)
    # BIRD -> ExaBGP: BIRD's static route, next hop BIRD
    await until(lambda: a.sp.learned().get(N("10.244.3.0/26")) == A(me), 15, "route from BIRD", diag)
    # ExaBGP -> BIRD: a's prefix with a's next hop (re-announced to the neighbor added by the reload)
    await until(lambda: f"via {a.ip}" in bird_route(), 15, "BIRD learns a's prefix", diag)
    assert "BGP.next_hop: " + str(a.ip) in bird_route()
    # the reload did not touch the existing a<->b session
    assert b.status(a).since == ab_since and b.status(a).state == "established"
