"""bgp.speaker.Speaker through the real bgp.relay subprocess, with the test playing ExaBGP: it writes events
(in the exact format ExaBGP 5.0.15 prints, see test_exabgp_api.py) to the relay's stdin and answers the commands
the relay passes on. This pins the speaker's protocol and RIB rules deterministically; the real ExaBGP runs in
tests/integration/test_exabgp_speaker.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from bgp.model import PeerSpec
from bgp.speaker import Speaker

A = IPv4Address
N = IPv4Network
LOCAL = "10.0.0.1"
P1, P2, P3 = "10.0.0.2", "10.0.0.3", "10.0.0.4"


# ---------------------------------------------------------------------------------------------- ExaBGP lines


def _ev(kind: str, peer: str, body: str) -> str:
    return (
        f'{{ "exabgp": "5.0.0", "time": 1.0, "host" : "t", "pid" : 1, "ppid" : 1, "counter": 1, "type": "{kind}", '
        f'"neighbor": {{ "address": {{ "local": "{LOCAL}", "peer": "{peer}" }}, "asn": {{ "local": 64512, '
        f'"peer": 64512 }}, "router-id": "{LOCAL}" , {body} }} }}'
    )


def state(peer: str, st: str, reason: str = "") -> str:
    extra = f', "reason": "{reason}"' if st == "down" else ""
    return _ev("state", peer, f'"state": "{st}"{extra}')


def open_(peer: str, gr: int | None = 120) -> str:
    caps = '"1": { "name": "multiprotocol", "families": [ "ipv4/unicast" ] }'
    if gr is not None:
        caps += f', "64": {{ "name": "graceful restart", "time": {gr}, "address-family-flags": {{ }} }}'
    return _ev(
        "open",
        peer,
        f'"direction": "receive", "open": {{ "version": 4, "asn": 64512, "hold_time": 9, "router_id": "{peer}", '
        f'"capabilities": {{ {caps} }} }}',
    )


def update(peer: str, nets: Iterable[str], nh: str | None = None, local_pref: int = 100) -> str:
    nlri = ", ".join(f'{{ "nlri": "{n}" }}' for n in nets)
    return _ev(
        "update",
        peer,
        f'"direction": "receive", "message": {{ "update": {{ "attribute": {{ "origin": "igp", '
        f'"local-preference": {local_pref} }}, "announce": {{ "ipv4 unicast": {{ "{nh or peer}": [ {nlri} ] }} }} '
        "} }",
    )


def withdraw(peer: str, nets: Iterable[str]) -> str:
    nlri = ", ".join(f'{{ "nlri": "{n}" }}' for n in nets)
    return _ev(
        "update",
        peer,
        f'"direction": "receive", "message": {{ "update": {{ "withdraw": {{ "ipv4 unicast": [ {nlri} ] }} }} }}',
    )


def eor(peer: str) -> str:
    return _ev("update", peer, '"direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } }')


def neighbor_json(peer: str, up: bool, gr: bool = True) -> dict[str, Any]:
    return {
        "state": "up" if up else "down",
        "duration": 5,
        "fsm": "ESTABLISHED" if up else "IDLE",
        "local": {"address": LOCAL, "capabilities": {"graceful-restart": True}},
        "peer": {"address": peer, "capabilities": {"graceful-restart": gr}},
    }


def rib_json(peer: str, net: str, nh: str | None = None) -> str:
    return json.dumps(
        {
            "peer": {"address": peer},
            "route": {
                "nlri": {"prefix": net, "nexthop": nh or peer, "family": {"afi": "ipv4", "safi": "unicast"}},
                "attributes": {"origin": "igp", "local-preference": 100},
            },
        }
    )


# ---------------------------------------------------------------------------------------------- scripted ExaBGP


class ScriptedExabgp:
    """ExaBGP's side of a real ``bgp.relay`` process."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.neighbors: list[dict[str, Any]] = []
        self.rib_in: list[str] = []
        self.rib_out: list[str] = []
        self.commands: list[str] = []
        self.gate: dict[str, asyncio.Event] = {}  # command prefix -> answer only once set
        self.silent: set[str] = set()  # command prefixes never answered
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bgp.relay", "--socket", self.sock, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.task = asyncio.create_task(self._serve())

    def write(self, *lines: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("".join(line + "\n" for line in lines).encode())

    def _answer(self, cmd: str) -> list[str]:
        if cmd == "show neighbor json":
            return [json.dumps(self.neighbors)]
        if cmd == "show adj-rib in json":
            return list(self.rib_in)
        if cmd == "show adj-rib out json":
            return list(self.rib_out)
        return []

    async def _serve(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            cmd = line.decode().rstrip("\n")
            self.commands.append(cmd)
            if any(cmd.startswith(p) for p in self.silent):
                continue
            for prefix, gate in self.gate.items():
                if cmd.startswith(prefix):
                    await gate.wait()
            self.write(*self._answer(cmd), "done")

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def wait_command(self, pred: Callable[[str], bool], timeout: float = 5.0) -> str:
        async def find() -> str:
            while True:
                for c in self.commands:
                    if pred(c):
                        return c
                await asyncio.sleep(0.01)

        return await asyncio.wait_for(find(), timeout)


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.01)


def spec(addr: str) -> PeerSpec:
    return PeerSpec(name="Mesh_" + addr.replace(".", "_"), address=A(addr), asn=64512, local_asn=64512)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / "agent.sock")
        self.changes = 0
        self.speaker: Speaker | None = None
        self.task: asyncio.Task[None] | None = None
        self.exa: list[ScriptedExabgp] = []

    def _changed(self) -> None:
        self.changes += 1

    async def start_speaker(self, **kw: Any) -> Speaker:
        kw.setdefault("gr_max", 60.0)
        self.speaker = Speaker(self.sock, on_change=self._changed, **kw)
        self.speaker.set_peers([spec(P1), spec(P2)])
        self.task = asyncio.create_task(self.speaker.run())
        await until(lambda: Path(self.sock).exists(), what="socket")
        return self.speaker

    async def stop_speaker(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def start_exabgp(self, setup: Callable[[ScriptedExabgp], None] | None = None) -> ScriptedExabgp:
        exa = ScriptedExabgp(self.sock)
        if setup is not None:
            setup(exa)
        await exa.start()
        self.exa.append(exa)
        sp = self.speaker
        assert sp is not None
        await until(lambda: sp.connected and sp.synced, what="connect + resync")
        return exa


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    await harness.stop_speaker()
    for exa in harness.exa:
        await exa.stop()


def learned(h: Harness) -> dict[IPv4Network, IPv4Address]:
    assert h.speaker is not None
    return h.speaker.learned()


def status(h: Harness, addr: str) -> Any:
    assert h.speaker is not None
    return next(p for p in h.speaker.peer_status() if p.address == A(addr))


# ---------------------------------------------------------------------------------------------- tests


async def test_resync_commands_then_announce_and_eor_on_up(h: Harness) -> None:
    sp = await h.start_speaker(chunk=2)
    sp.set_announced([N("10.244.1.0/26"), N("10.244.1.64/26"), N("10.244.1.128/26")])
    exa = await h.start_exabgp()
    assert exa.commands[:3] == ["show neighbor json", "show adj-rib in json", "show adj-rib out json"]
    await exa.wait_command(lambda c: c.startswith("announce attributes next-hop self nlri 10.244.1.128/26"))
    assert "announce attributes next-hop self nlri 10.244.1.0/26 10.244.1.64/26" in exa.commands
    assert status(h, P1).state == "idle"

    exa.write(state(P1, "connected"), open_(P1), state(P1, "up"))
    await exa.wait_command(lambda c: c == f"neighbor {P1} announce eor ipv4 unicast")
    per_peer = [c for c in exa.commands if c.startswith(f"neighbor {P1} announce attributes")]
    assert per_peer == [
        f"neighbor {P1} announce attributes next-hop self nlri 10.244.1.0/26 10.244.1.64/26",
        f"neighbor {P1} announce attributes next-hop self nlri 10.244.1.128/26",
    ]
    # EOR only after the re-announcement (manual-eor)
    assert exa.commands.index(f"neighbor {P1} announce eor ipv4 unicast") > exa.commands.index(per_peer[-1])
    await until(lambda: status(h, P1).state == "established")

    sp.set_announced([N("10.244.1.0/26")])
    await exa.wait_command(lambda c: c.startswith("withdraw attributes nlri"))
    wd = [c for c in exa.commands if c.startswith("withdraw")]
    assert wd == ["withdraw attributes nlri 10.244.1.64/26 10.244.1.128/26"]

    await sp.withdraw_all()
    assert exa.commands[-1] == "withdraw attributes nlri 10.244.1.0/26"


async def test_learn_withdraw_and_import_filter(h: Harness) -> None:
    await h.start_speaker(accept=lambda n: n.subnet_of(N("10.244.0.0/16")))
    exa = await h.start_exabgp()
    exa.write(open_(P1), state(P1, "up"))
    exa.write(update(P1, ["10.244.2.0/26", "10.244.2.64/26", "192.168.0.0/24"]))
    exa.write(update(P1, ["10.244.9.0/26"], nh=LOCAL))  # our own route reflected back: never a next hop
    exa.write(update(P3, ["10.244.3.0/26"]))  # not a configured peer: ignored
    await until(lambda: len(learned(h)) == 2, what="two learned routes")
    assert learned(h) == {N("10.244.2.0/26"): A(P1), N("10.244.2.64/26"): A(P1)}
    assert status(h, P1).received == 4 and [p.address for p in h.speaker.peer_status()] == [A(P1), A(P2)]  # type: ignore[union-attr]

    exa.write(withdraw(P1, ["10.244.2.64/26"]))
    await until(lambda: N("10.244.2.64/26") not in learned(h))
    assert learned(h) == {N("10.244.2.0/26"): A(P1)}

    # a new import filter re-evaluates held routes
    h.speaker.set_accept(lambda n: True)  # type: ignore[union-attr]
    assert learned(h)[N("192.168.0.0/24")] == A(P1)


async def test_graceful_restart_keeps_stale_until_eor(h: Harness) -> None:
    await h.start_speaker()
    exa = await h.start_exabgp()
    exa.write(open_(P1, gr=120), state(P1, "up"), update(P1, ["10.244.2.0/26", "10.244.2.64/26"]), eor(P1))
    await until(lambda: len(learned(h)) == 2)

    exa.write(state(P1, "down", "closing connection"))
    await until(lambda: status(h, P1).state == "down")
    st = status(h, P1)
    assert st.stale and st.last_reason == "closing connection"
    assert len(learned(h)) == 2  # kept while the peer restarts

    exa.write(open_(P1, gr=120), state(P1, "up"), update(P1, ["10.244.2.0/26"]))
    await until(lambda: status(h, P1).state == "established")
    assert len(learned(h)) == 2  # not re-advertised yet, but no End-of-RIB either
    exa.write(eor(P1))
    await until(lambda: not status(h, P1).stale)
    assert learned(h) == {N("10.244.2.0/26"): A(P1)}


async def test_stale_routes_expire_after_min_of_gr_time_and_gr_max(h: Harness) -> None:
    await h.start_speaker(gr_max=0.3)
    exa = await h.start_exabgp()
    exa.write(open_(P1, gr=120), state(P1, "up"), update(P1, ["10.244.2.0/26"]))
    exa.write(open_(P2, gr=None), state(P2, "up"), update(P2, ["10.244.3.0/26"]))
    await until(lambda: len(learned(h)) == 2)
    before = h.changes
    exa.write(state(P1, "down", "hold timer expired"), state(P2, "down", "closing connection"))
    # P2 advertised no graceful restart: gone at once; P1's route survives until gr_max
    await until(lambda: N("10.244.3.0/26") not in learned(h))
    assert N("10.244.2.0/26") in learned(h)
    await until(lambda: not learned(h), timeout=3, what="stale expiry")
    assert h.changes > before
    assert status(h, P1).received == 0 and not status(h, P1).stale


async def test_best_path_and_deterministic_tie_break(h: Harness) -> None:
    await h.start_speaker()
    exa = await h.start_exabgp()
    exa.write(open_(P1), state(P1, "up"), open_(P2), state(P2, "up"))
    exa.write(update(P2, ["10.244.5.0/26"], nh="10.0.0.99"), update(P1, ["10.244.5.0/26"], nh="10.0.0.98"))
    await until(lambda: status(h, P2).received == 1 and status(h, P1).received == 1)
    assert learned(h) == {N("10.244.5.0/26"): A("10.0.0.98")}  # equal paths: lowest peer address
    exa.write(update(P2, ["10.244.5.0/26"], nh="10.0.0.99", local_pref=200))
    await until(lambda: learned(h) == {N("10.244.5.0/26"): A("10.0.0.99")}, what="local-pref wins")
    exa.write(state(P2, "down", "x"))  # P2 now stale: the fresh path from P1 wins
    await until(lambda: learned(h) == {N("10.244.5.0/26"): A("10.0.0.98")}, what="fresh beats stale")


async def test_resync_from_snapshot_and_events_during_resync(h: Harness) -> None:
    sp = await h.start_speaker()
    sp.set_announced([N("10.244.1.0/26")])
    gate = asyncio.Event()

    def setup(exa: ScriptedExabgp) -> None:
        exa.neighbors = [neighbor_json(P1, up=True), neighbor_json(P2, up=False)]
        exa.rib_in = [rib_json(P1, "10.244.2.0/26"), rib_json(P1, "10.244.2.64/26"), rib_json(P2, "10.244.3.0/26")]
        exa.rib_out = [rib_json(P1, "10.244.1.0/26", nh=LOCAL)]
        exa.gate["show adj-rib in json"] = gate

    exa = ScriptedExabgp(h.sock)
    setup(exa)
    await exa.start()
    h.exa.append(exa)
    await exa.wait_command(lambda c: c == "show adj-rib in json")
    # an update arriving while the snapshot is being taken is newer than it: it must win
    exa.write(withdraw(P1, ["10.244.2.64/26"]), update(P1, ["10.244.2.128/26"]))
    await asyncio.sleep(0.1)
    assert not sp.synced
    gate.set()
    await until(lambda: sp.synced)
    # P2 is down in ExaBGP: its Adj-RIB-In leftovers are not trusted
    assert learned(h) == {N("10.244.2.0/26"): A(P1), N("10.244.2.128/26"): A(P1)}
    assert status(h, P1).state == "established" and status(h, P2).state == "idle"
    # P1's Adj-RIB-Out already holds our prefix: only End-of-RIB is owed, no global re-announce
    await exa.wait_command(lambda c: c == f"neighbor {P1} announce eor ipv4 unicast")
    assert not [c for c in exa.commands if "announce attributes" in c]


async def test_exabgp_restart_keeps_routes_stale_then_resyncs(h: Harness) -> None:
    sp = await h.start_speaker()
    exa = await h.start_exabgp()
    exa.write(open_(P1), state(P1, "up"), update(P1, ["10.244.2.0/26", "10.244.2.64/26"]), eor(P1))
    await until(lambda: len(learned(h)) == 2)
    await exa.stop()  # ExaBGP gone: relay sees EOF and exits
    await until(lambda: not sp.connected)
    assert len(learned(h)) == 2 and status(h, P1).stale

    def setup(e: ScriptedExabgp) -> None:  # restarted ExaBGP, session already back with one route
        e.neighbors = [neighbor_json(P1, up=True)]
        e.rib_in = [rib_json(P1, "10.244.2.0/26")]

    await h.start_exabgp(setup)
    assert learned(h) == {N("10.244.2.0/26"): A(P1)}
    assert not status(h, P1).stale and status(h, P1).state == "established"


async def test_agent_restart_resyncs_without_peer_events(h: Harness) -> None:
    await h.start_speaker()

    def setup(e: ScriptedExabgp) -> None:
        e.neighbors = [neighbor_json(P1, up=True)]
        e.rib_in = [rib_json(P1, "10.244.2.0/26")]

    exa = await h.start_exabgp(setup)
    assert learned(h) == {N("10.244.2.0/26"): A(P1)}
    await h.stop_speaker()  # the agent dies; ExaBGP and its relay stay
    n_cmds = len(exa.commands)
    sp2 = await h.start_speaker()
    await until(lambda: sp2.connected and sp2.synced, what="relay reconnects to the new agent")
    assert sp2.learned() == {N("10.244.2.0/26"): A(P1)}
    assert exa.commands[n_cmds : n_cmds + 3] == ["show neighbor json", "show adj-rib in json", "show adj-rib out json"]


async def test_unanswered_command_reconnects_and_stale_ack_is_swallowed(h: Harness) -> None:
    sp = await h.start_speaker(command_timeout=0.5)
    exa = await h.start_exabgp()
    exa.silent.add("announce attributes")
    gate = asyncio.Event()
    exa.gate["show neighbor json"] = gate  # hold the next session's first command until the late ACK is out
    exa.neighbors = [neighbor_json(P1, up=True)]
    sp.set_announced([N("10.244.1.0/26")])
    await exa.wait_command(lambda c: c.startswith("announce attributes"))
    n = len(exa.commands)
    await until(lambda: not sp.connected, what="speaker drops the out-of-step connection")
    await until(lambda: "show neighbor json" in exa.commands[n:], what="relay reconnects, resync starts")
    exa.silent.clear()
    exa.write("done")  # the late ACK of the timed-out command: the relay must not hand it to the new session
    gate.set()
    await until(lambda: sp.synced, what="resync")
    # had the late ACK been taken for "show neighbor json", the neighbor list would have been lost
    assert status(h, P1).state == "established"
    await until(lambda: any(c.startswith("announce attributes") for c in exa.commands[n:]), what="re-announce")
    await until(lambda: sp._idle.is_set())  # nothing left in flight


async def test_peer_removal_and_bad_input(h: Harness) -> None:
    sp = await h.start_speaker()
    exa = await h.start_exabgp()
    exa.write("{ this is not json", '{ "exabgp": "5.0.0", "type": "state", "neighbor": {} }', "random text")
    exa.write(open_(P1), state(P1, "up"), update(P1, ["10.244.2.0/26"]), open_(P2), state(P2, "up"))
    exa.write(update(P2, ["10.244.3.0/26"]))
    await until(lambda: len(learned(h)) == 2)
    sp.set_peers([spec(P2)])
    assert learned(h) == {N("10.244.3.0/26"): A(P2)}
    assert [p.address for p in sp.peer_status()] == [A(P2)]
    exa.write(update(P1, ["10.244.4.0/26"]))  # events of the removed peer are ignored
    exa.write(update(P2, ["10.244.5.0/26"]))
    await until(lambda: N("10.244.5.0/26") in learned(h))
    assert N("10.244.4.0/26") not in learned(h)


async def test_on_change_is_coalesced(h: Harness) -> None:
    await h.start_speaker()
    exa = await h.start_exabgp()
    exa.write(open_(P1), state(P1, "up"))
    await until(lambda: status(h, P1).state == "established")
    before = h.changes
    exa.write(*(update(P1, [f"10.{i // 256}.{i % 256}.0/24"]) for i in range(2000)))
    await until(lambda: len(learned(h)) == 2000)
    assert 1 <= h.changes - before < 200
