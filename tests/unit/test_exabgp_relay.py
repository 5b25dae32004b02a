"""bgp.relay as a real subprocess: the test holds its stdin/stdout (ExaBGP's side) and the unix socket it
connects to (the agent's side)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class RelayProc:
    def __init__(self, sock_path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bgp.relay", "--socket", sock_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.stdout = self.proc.stdout
        os.set_blocking(self.stdout.fileno(), False)
        self._out = b""

    def write(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def read_line(self, timeout: float = 5.0) -> bytes:
        """One command line the relay passed to 'ExaBGP'."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no command from relay (have {self._out!r})")
            try:
                chunk = os.read(self.stdout.fileno(), 65536)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                raise EOFError
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "agent.sock")


@pytest.fixture
def relay(sock_path: str) -> Iterator[RelayProc]:
    r = RelayProc(sock_path)
    yield r
    r.close()


def listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(5)
    return srv


def recv_lines(conn: socket.socket, n: int, timeout: float = 5.0) -> list[bytes]:
    conn.settimeout(timeout)
    buf = b""
    while buf.count(b"\n") < n:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n")[:n]


def test_exits_on_stdin_eof_without_agent(relay: RelayProc) -> None:
    relay.write(b'{ "exabgp": "5.0.0", "type": "state" }\n')
    relay.stdin.close()
    assert relay.proc.wait(5) == 0


def test_discards_while_disconnected_then_forwards_whole_lines(relay: RelayProc, sock_path: str) -> None:
    relay.write(b"line-before-agent\nstarted-")  # nobody listening: the whole line is dropped
    time.sleep(0.2)
    srv = listen(sock_path)
    conn, _ = srv.accept()
    relay.write(b"before-connect\nafter-1\n")  # the relay kept reading, so this line is whole: forwarded
    relay.write(b"after-2\n")
    assert recv_lines(conn, 3) == [b"started-before-connect", b"after-1", b"after-2"]
    # agent -> ExaBGP: only whole lines, blank lines dropped
    conn.sendall(b"show neighbor json\n\nannounce attr")
    assert relay.read_line() == b"show neighbor json"
    conn.sendall(b"ibutes next-hop self nlri 10.0.0.0/26\n")
    assert relay.read_line() == b"announce attributes next-hop self nlri 10.0.0.0/26"
    conn.close()
    srv.close()


def test_half_command_of_a_dead_agent_is_dropped_and_stale_acks_swallowed(relay: RelayProc, sock_path: str) -> None:
    srv = listen(sock_path)
    c1, _ = srv.accept()
    c1.sendall(b"show adj-rib in json\n")
    assert relay.read_line() == b"show adj-rib in json"
    c1.sendall(b"withdraw attributes nlri 10.")  # dies mid-command
    c1.close()
    c2, _ = srv.accept()  # the relay reconnects
    # ExaBGP answers the first agent's command only now: its output and ACK must not reach the new agent
    relay.write(b'{"peer": {"address": "10.0.0.2"}, "route": {}}\n')  # JSON show output of the old command
    relay.write(b"10.0.0.2 ipv4 unicast 10.0.0.0/26 next-hop 10.0.0.2\ndone\n")
    c2.sendall(b"show neighbor json\n")
    assert relay.read_line() == b"show neighbor json"  # the half withdraw never reached ExaBGP
    relay.write(b'[{"state": "up"}]\ndone\n{ "exabgp": "5.0.0", "type": "state" }\n')
    assert recv_lines(c2, 3) == [b'[{"state": "up"}]', b"done", b'{ "exabgp": "5.0.0", "type": "state" }']
    c2.close()
    srv.close()


def test_events_pass_while_old_acks_are_owed(relay: RelayProc, sock_path: str) -> None:
    srv = listen(sock_path)
    c1, _ = srv.accept()
    c1.sendall(b"announce attributes next-hop self nlri 10.0.0.0/26\n")
    assert relay.read_line().startswith(b"announce")
    c1.close()
    c2, _ = srv.accept()
    relay.write(b'{ "exabgp": "5.0.0", "type": "update" }\ndone\n')  # event passes, old ACK swallowed
    c2.sendall(b"show neighbor json\n")
    assert relay.read_line() == b"show neighbor json"
    relay.write(b"[]\ndone\n")
    assert recv_lines(c2, 3) == [b'{ "exabgp": "5.0.0", "type": "update" }', b"[]", b"done"]
    c2.close()
    srv.close()


def test_exits_when_exabgp_goes_while_agent_connected(relay: RelayProc, sock_path: str) -> None:
    srv = listen(sock_path)
    conn, _ = srv.accept()
    relay.stdin.close()
    assert relay.proc.wait(5) == 0
    conn.settimeout(5)
    assert conn.recv(10) == b""  # the agent sees the close
    conn.close()
    srv.close()
