"""Real TCP, UDP and ICMP between lab pods, driven from the test process itself.

Sockets are created inside a pod's network namespace (``setns`` on the calling thread, ``socket()``,
``setns`` back: a socket stays in the netns it was made in), so no helper process runs in the pods and
nothing needs to be found and killed afterwards: closing the sockets is the whole cleanup.

- :class:`EchoServers`: TCP and UDP echo servers on some ports in every given pod, served by one thread.
- :func:`probe_all`: many probes at once (one selector loop, non-blocking sockets), each with the same
  deadline, so a round costs about one timeout however many probes it holds. An outcome is ``"ok"`` (the
  echo/reply came back), ``"timeout"`` (no answer at all: what a policy drop looks like) or what else
  happened (``"refused"``: the port answered with a reset/port-unreachable, ``"EHOSTUNREACH"``...).
- :func:`probe_matrix`: every ordered pair of pods times every probe.

Every client socket gets a fresh source port (and every ICMP probe a fresh echo id) from a counter, so a
probe never reuses the 5-tuple of an earlier one whose conntrack entry could still be alive: otherwise a
new probe could ride an old connection that was allowed before a policy arrived.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from felixpy.dataplane.shims.netns import in_netns
from felixpy.labnet import PodInfo

SPORT_FIRST = 20000  # client source ports cycle through [SPORT_FIRST, SPORT_FIRST + SPORT_SPAN)
SPORT_SPAN = 40000
_sports = itertools.count(secrets.randbelow(SPORT_SPAN))
_icmp_ids = itertools.count(secrets.randbelow(65535))

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


@dataclass(frozen=True, order=True)
class Probe:
    """One kind of packet exchange: ``tcp``/``udp`` to a port, or ``icmp`` echo (port 0)."""

    proto: str
    port: int = 0

    def __post_init__(self) -> None:
        if self.proto not in ("tcp", "udp", "icmp"):
            raise ValueError(f"probe protocol must be tcp, udp or icmp, not {self.proto!r}")
        if (self.proto == "icmp") != (self.port == 0) or not 0 <= self.port <= 65535:
            raise ValueError(f"bad probe {self.proto}/{self.port}")

    def __str__(self) -> str:
        return self.proto if self.proto == "icmp" else f"{self.proto}/{self.port}"


ICMP = Probe("icmp")


def tcp(port: int) -> Probe:
    return Probe("tcp", port)


def udp(port: int) -> Probe:
    return Probe("udp", port)


def netns_path(pod: PodInfo) -> str:
    return f"/run/netns/{pod.netns}"


def _next_sport() -> int:
    return SPORT_FIRST + next(_sports) % SPORT_SPAN


def _next_icmp_id() -> int:
    return 1 + next(_icmp_ids) % 65535


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _echo_request(ident: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, 1)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(head + payload), ident, 1) + payload


def _errname(e: OSError) -> str:
    if e.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
        return "refused"
    return errno.errorcode.get(e.errno or 0, str(e))


# -- servers --------------------------------------------------------------------------------------------


class EchoServers:
    """TCP and UDP echo servers on ``ports`` (both protocols, 0.0.0.0) in each pod's netns.

    One daemon thread serves them all; TCP echoes whatever arrives until the client closes. Use as a
    context manager or call :meth:`stop` (idempotent); :meth:`add` serves more pods later."""

    def __init__(self, pods: Iterable[PodInfo], ports: Sequence[int]) -> None:
        self.ports = tuple(ports)
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._owned: list[socket.socket] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="echo-servers", daemon=True)
        try:
            self.add(pods)
        except BaseException:
            self._close_all()
            raise
        self._thread.start()

    def add(self, pods: Iterable[PodInfo]) -> None:
        for pod in pods:
            made: list[socket.socket] = []
            try:
                with in_netns(netns_path(pod)):
                    for port in self.ports:
                        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                            s = socket.socket(socket.AF_INET, kind)
                            made.append(s)
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                            s.bind(("0.0.0.0", port))
                            if kind == socket.SOCK_STREAM:
                                s.listen(128)
                            s.setblocking(False)
            except BaseException:
                for s in made:
                    s.close()
                raise
            with self._lock:
                for s in made:
                    self._owned.append(s)
                    role = "listen" if s.type == socket.SOCK_STREAM else "udp"
                    self._sel.register(s, selectors.EVENT_READ, (role, s))
            os.write(self._wake_w, b"x")

    def _serve(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(1.0):
                role, s = key.data
                try:
                    if role == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif role == "listen":
                        conn, _ = s.accept()
                        conn.setblocking(False)
                        with self._lock:
                            self._owned.append(conn)
                            self._sel.register(conn, selectors.EVENT_READ, ("conn", conn))
                    elif role == "conn":
                        data = s.recv(65536)
                        if data:
                            s.send(data)  # tiny tokens: one send never blocks
                        else:
                            self._drop(s)
                    else:
                        data, peer = s.recvfrom(65536)
                        s.sendto(data, peer)
                except BlockingIOError:
                    pass
                except OSError:
                    if role == "conn":
                        self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            with contextlib.suppress(ValueError):
                self._owned.remove(s)
        s.close()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(5)
        self._close_all()

    def _close_all(self) -> None:
        self._stopping = True
        with self._lock:
            for s in self._owned:
                s.close()
            self._owned.clear()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> EchoServers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- clients --------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    index: int
    probe: Probe
    dst: str
    sock: socket.socket
    token: bytes
    ident: int = 0
    connected: bool = False
    got: bytes = field(default=b"")


def _bound(kind: int, proto: int = 0) -> socket.socket:
    """A non-blocking client socket in the calling thread's netns, on a fresh source port (TCP/UDP)."""
    s = socket.socket(socket.AF_INET, kind, proto)
    try:
        if kind != socket.SOCK_RAW:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for attempt in range(20):
                try:
                    s.bind(("0.0.0.0", _next_sport()))
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE or attempt == 19:
                        raise
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _start(index: int, probe: Probe, dst: str) -> tuple[_Pending | None, str]:
    """Create the socket and send the first packet; (pending, "") or (None, outcome) if it ended at once."""
    token = secrets.token_hex(8).encode()
    if probe.proto == "icmp":
        s = _bound(socket.SOCK_RAW, socket.IPPROTO_ICMP)
        p = _Pending(index, probe, dst, s, token, ident=_next_icmp_id())
        try:
            s.sendto(_echo_request(p.ident, token), (dst, 0))
        except OSError as e:
            s.close()
            return None, _errname(e)
        return p, ""
    s = _bound(socket.SOCK_STREAM if probe.proto == "tcp" else socket.SOCK_DGRAM)
    p = _Pending(index, probe, dst, s, token)
    try:
        if probe.proto == "tcp":
            rc = s.connect_ex((dst, probe.port))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, os.strerror(rc))
        else:
            s.connect((dst, probe.port))
            s.send(token)
    except OSError as e:
        s.close()
        return None, _errname(e)
    return p, ""


def _step(p: _Pending, sel: selectors.BaseSelector) -> str:
    """Handle one readiness event; the outcome once the probe is done, else ""."""
    s = p.sock
    if p.probe.proto == "icmp":
        while True:
            try:
                data, (src, _) = s.recvfrom(65536)
            except BlockingIOError:
                return ""
            ihl = (data[0] & 0x0F) * 4
            if src != p.dst or len(data) < ihl + 8:
                continue  # other probes' replies: every raw socket in the netns sees all ICMP
            typ, _code, _sum, ident = struct.unpack("!BBHH", data[ihl:ihl + 6])
            if typ == ICMP_ECHO_REPLY and ident == p.ident and data[ihl + 8:] == p.token:
                return "ok"
    if p.probe.proto == "tcp" and not p.connected:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return _errname(OSError(err, os.strerror(err)))
        p.connected = True
        s.send(p.token)
        sel.modify(s, selectors.EVENT_READ, p)
        return ""
    data = s.recv(65536)
    if not data:
        return "closed"
    p.got += data
    if p.got == p.token:
        return "ok"
    return "" if p.token.startswith(p.got) else "garbled"


def probe_all(tasks: Sequence[tuple[PodInfo, str, Probe]], timeout: float = 1.0) -> list[str]:
    """Run every ``(source pod, destination IP, probe)`` at once; the outcomes in the same order."""
    out = ["timeout"] * len(tasks)
    pending: dict[int, _Pending] = {}
    sel = selectors.DefaultSelector()
    by_src: dict[str, list[int]] = {}
    for i, (src, _, _) in enumerate(tasks):
        by_src.setdefault(src.netns, []).append(i)
    try:
        for idxs in by_src.values():
            with in_netns(netns_path(tasks[idxs[0]][0])):
                for i in idxs:
                    _, dst, probe = tasks[i]
                    p, outcome = _start(i, probe, dst)
                    if p is None:
                        out[i] = outcome
                        continue
                    pending[i] = p
                    events = selectors.EVENT_WRITE if probe.proto == "tcp" else selectors.EVENT_READ
                    sel.register(p.sock, events, p)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                p = key.data
                try:
                    outcome = _step(p, sel)
                except BlockingIOError:
                    outcome = ""
                except OSError as e:
                    outcome = _errname(e)
                if outcome:
                    out[p.index] = outcome
                    sel.unregister(p.sock)
                    p.sock.close()
                    del pending[p.index]
    finally:
        for p in pending.values():
            p.sock.close()
        sel.close()
    return out


Key = tuple[str, str, Probe]  # (source pod name, destination pod name, probe)


def probe_matrix(pods: Sequence[PodInfo], probes: Sequence[Probe], *, timeout: float = 1.0,
                 only: Iterable[Key] | None = None) -> dict[Key, str]:
    """Every ordered pair of distinct pods times every probe (or just the ``only`` keys)."""
    by_name = {p.name: p for p in pods}
    keys = list(only) if only is not None else \
        [(a.name, b.name, pr) for a in pods for b in pods if a.name != b.name for pr in probes]
    outcomes = probe_all([(by_name[a], by_name[b].ip, pr) for a, b, pr in keys], timeout)
    return dict(zip(keys, outcomes, strict=True))


@contextlib.contextmanager
def serving(pods: Iterable[PodInfo], ports: Sequence[int]) -> Iterator[EchoServers]:
    with EchoServers(pods, ports) as servers:
        yield servers
