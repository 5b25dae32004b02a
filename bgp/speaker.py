"""The agent's side of the ExaBGP process API (asyncio).

ExaBGP runs ``bgp.relay`` as its process; the relay connects to the unix socket this :class:`Speaker` listens
on. The speaker keeps an in-memory Adj-RIB-In per configured peer, chooses one next hop per accepted prefix
(:meth:`Speaker.learned`), and keeps ExaBGP's announcements equal to :meth:`Speaker.set_announced`. It never
touches the kernel: the agent programs routes from :meth:`Speaker.learned` when ``on_change`` fires.

What ExaBGP does not do and this class does (lab pitfalls P4-P8, P10, P11):

* one command in flight, its ``done``/``error`` read before the next (ACKs are untagged);
* on every (re)connection, a resync from ``show neighbor json`` and ``show adj-rib in|out json`` before the
  RIB is trusted; events that arrive meanwhile are replayed on top of the snapshot;
* graceful restart on the receiving side: a peer's routes stay (stale) for ``min(its restart time, gr_max)``
  after it goes down and are dropped at its End-of-RIB unless re-advertised; the same when the connection to
  ExaBGP is lost (ExaBGP restarting: its peers keep our routes, we keep theirs);
* ``manual-eor``: when a peer comes up it gets our prefixes and then our End-of-RIB, so graceful-restart
  helpers never flush our routes before we re-announce them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from . import api
from .model import PeerSpec

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
MAX_LINE = 256 << 20  # one UPDATE can become a long JSON line; anything beyond this is garbage
DEFAULT_COMMAND_TIMEOUT = 120.0

Route = tuple[IPv4Address, api.Rank]  # (next hop, rank)


def _accept_all(_net: IPv4Network) -> bool:
    return True


@dataclass(frozen=True)
class PeerStatus:
    address: IPv4Address
    name: str  # Calico-style protocol name from the PeerSpec ("" for a peer only ExaBGP knows)
    state: str  # idle (never seen) | connect (TCP/OPEN in progress) | established | down
    since: float  # time.time() of the last state change
    last_reason: str  # why the session last went down ("" if never)
    received: int  # prefixes currently held from this peer (incl. stale and filtered ones)
    stale: bool  # graceful restart in progress: some of its routes are kept stale


@dataclass
class _Peer:
    address: IPv4Address
    name: str = ""
    state: str = "idle"
    since: float = field(default_factory=time.time)
    reason: str = ""
    local: IPv4Address | None = None
    gr_time: int = 0  # restart time from the peer's OPEN (0: no graceful restart)
    routes: dict[IPv4Network, Route] = field(default_factory=dict)
    stale: set[IPv4Network] = field(default_factory=set)
    stale_deadline: float | None = None  # loop time
    stale_timer: asyncio.TimerHandle | None = None
    eor_pending: bool = False  # up, but its End-of-RIB not received yet
    # our side: prefixes to (re)announce to this neighbor, then our End-of-RIB; None = nothing owed
    owe: set[IPv4Network] | None = None


class _Pending:
    __slots__ = ("future", "output")

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future
        self.output: list[Any] = []


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = asyncio.Event()

    def close(self) -> None:
        self.closed.set()
        self.writer.close()


class SpeakerConnectionLost(ConnectionError):
    pass


class Speaker:
    """Serve the relay's unix socket and keep the RIB; see the module docstring."""

    def __init__(
        self,
        socket_path: str,
        *,
        on_change: Callable[[], None],
        accept: Callable[[IPv4Network], bool] = _accept_all,
        gr_max: float = 120.0,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        chunk: int = api.CHUNK,
    ) -> None:
        self.socket_path = socket_path
        self._on_change = on_change
        self._accept = accept
        self.gr_max = float(gr_max)
        self.command_timeout = command_timeout
        self.chunk = chunk

        self._peers: dict[IPv4Address, _Peer] = {}
        self._configured: dict[IPv4Address, PeerSpec] | None = None  # None until set_peers()
        # accepted routes, prefix -> peer -> route; the best of each is cached in _best
        self._index: dict[IPv4Network, dict[IPv4Address, Route]] = {}
        self._best: dict[IPv4Network, IPv4Address] = {}
        self._dirty: set[IPv4Network] = set()

        self._desired: set[IPv4Network] = set()
        self._sent: set[IPv4Network] = set()  # what ExaBGP's Adj-RIB-Outs hold (union), as far as we know

        self._conn: _Conn | None = None
        self._session: asyncio.Task[None] | None = None
        self._resyncing = False
        self._resynced = False
        self._buffered: list[api.Event] = []
        self._pending: _Pending | None = None
        self._cmd_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()

        self._fire_scheduled = False
        self._best_changed = False
        self._status_changed = False
        self._bad_lines = 0

    # ================================================================== public API

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def synced(self) -> bool:
        """Connected, resynced, and every session that came up since has sent its End-of-RIB."""
        return (
            self._conn is not None
            and self._resynced
            and not any(p.eor_pending for p in self._peers.values() if self._is_configured(p.address))
        )

    async def run(self) -> None:
        """Listen on the socket (mode 0600) and serve relay connections forever."""
        path = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        server = await asyncio.start_unix_server(self._handle, path=path, limit=MAX_LINE)
        os.chmod(path, 0o600)
        if self._status_changed or self._best_changed:
            self._schedule_fire()
        log.info("BGP speaker listening on %s", path)
        try:
            async with server:
                await server.serve_forever()
        finally:
            if self._session is not None:
                self._session.cancel()
            with contextlib.suppress(OSError):
                os.unlink(path)

    def set_peers(self, peers: Sequence[PeerSpec]) -> None:
        """The sessions ExaBGP is configured with. Routes of peers no longer listed are dropped at once."""
        configured = {p.address: p for p in peers}
        for addr in list(self._peers):
            if addr not in configured:
                self._forget_peer(addr)
        for addr, spec in configured.items():
            ps = self._peers.get(addr)
            if ps is None:
                self._peers[addr] = _Peer(addr, name=spec.name)
            elif ps.name != spec.name:
                ps.name = spec.name
        self._configured = configured
        self._status_changed = True
        self._schedule_fire()
        self._wake.set()

    def set_announced(self, prefixes: Iterable[IPv4Network]) -> None:
        """The prefixes this node originates (next hop self); ExaBGP is brought in line asynchronously."""
        desired = {IPv4Network(p) for p in prefixes}
        if desired != self._desired:
            self._desired = desired
            self._idle.clear()
            self._wake.set()

    def set_accept(self, accept: Callable[[IPv4Network], bool]) -> None:
        """Replace the import filter and re-evaluate every held route."""
        self._accept = accept
        for ps in self._peers.values():
            for net, route in ps.routes.items():
                self._index_route(ps, net, route)
        self._schedule_fire()

    def learned(self) -> dict[IPv4Network, IPv4Address]:
        """Best next hop per accepted prefix, from established peers and peers in graceful restart.

        Fresh routes beat stale ones, then higher local-pref, shorter AS path, lower peer address.
        """
        self._refresh_best()
        return dict(self._best)

    def peer_status(self) -> list[PeerStatus]:
        out = []
        for addr in sorted(self._peers):
            if not self._is_configured(addr):
                continue
            p = self._peers[addr]
            out.append(PeerStatus(addr, p.name, p.state, p.since, p.reason, len(p.routes), bool(p.stale)))
        return out

    async def withdraw_all(self, timeout: float = 30.0) -> None:
        """Planned drain: withdraw every announcement and wait until ExaBGP acknowledged it (or timeout)."""
        self.set_announced(())
        if self._conn is None:
            log.warning("withdraw_all: not connected to ExaBGP; nothing withdrawn")
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while self._conn is not None and (self._sent or not self._idle.is_set()):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("withdraw_all: timed out with %d prefixes still announced", len(self._sent))
                return
            self._idle.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(left, 1.0))

    # ================================================================== change notification

    def _schedule_fire(self) -> None:
        if self._fire_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not running yet: run() fires once started
        self._fire_scheduled = True
        loop.call_soon(self._fire)

    def _fire(self) -> None:
        self._fire_scheduled = False
        self._refresh_best()
        if not (self._best_changed or self._status_changed):
            return
        self._best_changed = self._status_changed = False
        try:
            self._on_change()
        except Exception:
            log.exception("BGP speaker on_change callback failed")

    def _status(self) -> None:
        self._status_changed = True
        self._schedule_fire()

    # ================================================================== RIB

    def _is_configured(self, addr: IPv4Address) -> bool:
        return self._configured is None or addr in self._configured

    def _peer(self, addr: IPv4Address) -> _Peer | None:
        """State of a peer an event is about; None for peers not configured (their routes are ignored)."""
        ps = self._peers.get(addr)
        if ps is None:
            if not self._is_configured(addr):
                return None
            ps = self._peers[addr] = _Peer(addr)
        return ps

    def _index_route(self, ps: _Peer, net: IPv4Network, route: Route) -> None:
        nh = route[0]
        ok = nh != ps.local and not nh.is_unspecified and self._accept(net)
        cands = self._index.get(net)
        if ok:
            if cands is None:
                cands = self._index[net] = {}
            cands[ps.address] = route
            self._dirty.add(net)
        elif cands is not None and cands.pop(ps.address, None) is not None:
            if not cands:
                del self._index[net]
            self._dirty.add(net)

    def _set_route(self, ps: _Peer, net: IPv4Network, route: Route) -> None:
        ps.routes[net] = route
        if ps.stale:
            ps.stale.discard(net)
        self._index_route(ps, net, route)

    def _del_route(self, ps: _Peer, net: IPv4Network) -> None:
        if ps.routes.pop(net, None) is None:
            return
        ps.stale.discard(net)
        cands = self._index.get(net)
        if cands is not None and cands.pop(ps.address, None) is not None:
            if not cands:
                del self._index[net]
            self._dirty.add(net)

    def _refresh_best(self) -> None:
        if not self._dirty:
            return
        peers = self._peers
        for net in self._dirty:
            cands = self._index.get(net)
            if not cands:
                if self._best.pop(net, None) is not None:
                    self._best_changed = True
                continue
            if len(cands) == 1:
                nh = next(iter(cands.values()))[0]
            else:
                best_key: tuple[bool, int, int, int] | None = None
                nh = IPv4Address(0)
                for addr, (cand_nh, rank) in cands.items():
                    key = (net in peers[addr].stale, rank[0], rank[1], int(addr))
                    if best_key is None or key < best_key:
                        best_key, nh = key, cand_nh
            if self._best.get(net) != nh:
                self._best[net] = nh
                self._best_changed = True
        self._dirty.clear()

    def _drop_routes(self, ps: _Peer, nets: Iterable[IPv4Network]) -> None:
        for net in list(nets):
            self._del_route(ps, net)

    def _cancel_stale_timer(self, ps: _Peer) -> None:
        if ps.stale_timer is not None:
            ps.stale_timer.cancel()
            ps.stale_timer = None
        ps.stale_deadline = None

    def _mark_stale(self, ps: _Peer, hold: float) -> None:
        """Keep all of ps's routes as stale for ``hold`` seconds (or drop them now if hold <= 0)."""
        if not ps.routes:
            self._cancel_stale_timer(ps)
            return
        if hold <= 0:
            self._cancel_stale_timer(ps)
            self._drop_routes(ps, ps.routes)
            return
        ps.stale.update(ps.routes)
        self._dirty.update(ps.routes)  # ranking changed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        if ps.stale_deadline is not None and ps.stale_deadline <= deadline:
            return  # already restarting: the first deadline stands
        if ps.stale_timer is not None:
            ps.stale_timer.cancel()
        ps.stale_deadline = deadline
        ps.stale_timer = loop.call_at(deadline, self._stale_expired, ps.address)

    def _stale_expired(self, addr: IPv4Address) -> None:
        ps = self._peers.get(addr)
        if ps is None:
            return
        ps.stale_timer = None
        ps.stale_deadline = None
        if ps.stale:
            log.info("BGP peer %s: graceful restart time over; dropping %d stale routes", addr, len(ps.stale))
            self._drop_routes(ps, ps.stale)
            ps.stale.clear()
            self._status()

    def _end_of_rib(self, ps: _Peer) -> None:
        ps.eor_pending = False
        if ps.stale:
            self._drop_routes(ps, ps.stale)
            ps.stale.clear()
        self._cancel_stale_timer(ps)
        self._status()

    def _forget_peer(self, addr: IPv4Address) -> None:
        ps = self._peers.pop(addr, None)
        if ps is None:
            return
        self._cancel_stale_timer(ps)
        for net in ps.routes:
            cands = self._index.get(net)
            if cands is not None and cands.pop(addr, None) is not None:
                if not cands:
                    del self._index[net]
                self._dirty.add(net)
        ps.routes.clear()
        ps.stale.clear()

    def _hold_for(self, ps: _Peer) -> float:
        return min(float(ps.gr_time), self.gr_max) if ps.gr_time > 0 else 0.0

    def _set_state(self, ps: _Peer, state: str, reason: str | None = None) -> None:
        if ps.state != state:
            ps.state = state
            ps.since = time.time()
        if reason is not None:
            ps.reason = reason
        self._status_changed = True

    # ================================================================== events

    def _apply(self, ev: api.Event) -> None:
        if isinstance(ev, api.UpdateEvent):
            ps = self._peer(ev.peer)
            if ps is None:
                return
            if ev.local is not None:
                ps.local = ev.local
            for net in ev.withdraw:
                self._del_route(ps, net)
            for nh, nets in ev.announce:
                if nh is None:
                    for net in nets:  # no usable IPv4 next hop: treat as withdrawn
                        self._del_route(ps, net)
                    continue
                route = (nh, ev.rank)
                for net in nets:
                    self._set_route(ps, net, route)
            if ev.bad:
                self._bad_lines += 1
                log.warning("BGP peer %s sent %d NLRIs that are not IPv4 unicast prefixes", ev.peer, ev.bad)
            self._status()
        elif isinstance(ev, api.EorEvent):
            ps = self._peer(ev.peer)
            if ps is not None:
                self._end_of_rib(ps)
        elif isinstance(ev, api.StateEvent):
            self._apply_state(ev)
        elif isinstance(ev, api.OpenEvent):
            ps = self._peer(ev.peer)
            if ps is not None:
                ps.gr_time = ev.graceful_restart
        elif isinstance(ev, api.NotificationEvent):
            ps = self._peer(ev.peer)
            if ps is not None:
                ps.reason = ev.text
                self._status()
        elif isinstance(ev, api.ShutdownEvent):
            log.info("ExaBGP is shutting down")

    def _apply_state(self, ev: api.StateEvent) -> None:
        ps = self._peer(ev.peer)
        if ps is None:
            return
        if ev.local is not None:
            ps.local = ev.local
        if ev.state == "up":
            log.info("BGP peer %s (%s) established", ev.peer, ps.name)
            # A new session: the peer re-sends everything and then End-of-RIB, so whatever we hold from the
            # previous one is stale from now on (normally it already is, since the down event).
            if ps.routes and len(ps.stale) != len(ps.routes):
                self._mark_stale(ps, self._hold_for(ps))
            # Peers that do not do graceful restart need not send End-of-RIB; do not wait for one from them.
            ps.eor_pending = ps.gr_time > 0
            ps.owe = set(self._desired)
            self._set_state(ps, "established", "")
            self._wake.set()
        elif ev.state == "down":
            log.info("BGP peer %s (%s) down: %s", ev.peer, ps.name, ev.reason)
            ps.eor_pending = False
            ps.owe = None
            self._mark_stale(ps, self._hold_for(ps))
            self._set_state(ps, "down", ev.reason or ps.reason)
        elif ev.state == "connected" and ps.state != "established":
            self._set_state(ps, "connect")
        self._status()

    # ================================================================== connection handling

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        old = self._session
        if old is not None and not old.done():
            log.info("new relay connection replaces the current one")
            old.cancel()
            await asyncio.wait([old])
        task = asyncio.current_task()
        assert task is not None
        self._session = task
        conn = _Conn(reader, writer)
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            if self._session is not task:
                return  # replaced: the new session owns the state
            raise
        finally:
            conn.close()
            if self._session is task:
                self._session = None
            if self._conn is conn:
                self._lost_connection()

    async def _serve(self, conn: _Conn) -> None:
        self._conn = conn
        self._resyncing = True
        self._resynced = False
        self._buffered = []
        self._status()
        log.info("ExaBGP relay connected")
        reader_task = asyncio.create_task(self._read_loop(conn))
        worker: asyncio.Task[None] | None = None
        try:
            await self._resync(conn)
            worker = asyncio.create_task(self._work_loop(conn))
            done, _ = await asyncio.wait({reader_task, worker}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = None if t.cancelled() else t.exception()
                if isinstance(exc, SpeakerConnectionLost):
                    log.warning("ExaBGP relay connection lost: %s", exc)
                elif exc is not None:
                    log.error("BGP speaker session failed", exc_info=exc)
        except SpeakerConnectionLost as exc:
            log.warning("ExaBGP relay connection lost: %s", exc)
        finally:
            tasks = [t for t in (reader_task, worker) if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _lost_connection(self) -> None:
        """ExaBGP (or at least our view of it) is gone: treat it like our own BGP restart."""
        self._conn = None
        self._resyncing = False
        self._resynced = False
        self._buffered = []
        if self._pending is not None and not self._pending.future.done():
            self._pending.future.set_exception(SpeakerConnectionLost("connection closed"))
        self._pending = None
        for ps in self._peers.values():
            ps.eor_pending = False
            ps.owe = None
            if ps.routes and len(ps.stale) != len(ps.routes):
                self._mark_stale(ps, self.gr_max)
            if ps.state != "idle":
                self._set_state(ps, "down", "no connection to ExaBGP")
        self._sent = set()
        self._idle.set()
        self._status()
        log.warning("ExaBGP relay disconnected; learned routes kept as stale for up to %.0f s", self.gr_max)

    async def _read_loop(self, conn: _Conn) -> None:
        """Read ExaBGP's stream, whole lines, in big chunks; never blocks on anything else (P11)."""
        reader = conn.reader
        partial = b""
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                if partial:
                    data = partial + data
                cut = data.rfind(b"\n")
                if cut < 0:
                    partial = data
                    if len(partial) > MAX_LINE:
                        log.error("line from ExaBGP over %d bytes; dropping the connection", MAX_LINE)
                        return
                    continue
                partial = data[cut + 1 :]
                for raw in data[:cut].split(b"\n"):
                    self._on_line(raw.decode("utf-8", "replace").rstrip("\r"))
        finally:
            conn.closed.set()
            if self._pending is not None and not self._pending.future.done():
                self._pending.future.set_exception(SpeakerConnectionLost("ExaBGP closed the stream"))

    def _on_line(self, line: str) -> None:
        try:
            kind, payload = api.classify(line)
        except api.ApiParseError as exc:
            self._bad_lines += 1
            log.warning("%s", exc)
            return
        if kind == "ack":
            pending = self._pending
            if pending is None or pending.future.done():
                log.warning("unexpected %r from ExaBGP (no command in flight)", line)
            else:
                pending.future.set_result(bool(payload))
        elif kind == "event":
            try:
                ev = api.parse_event(payload)
            except api.ApiParseError as exc:
                self._bad_lines += 1
                log.warning("bad event from ExaBGP: %s", exc)
                return
            if self._resyncing:
                self._buffered.append(ev)
            else:
                self._apply(ev)
        elif kind == "output":
            if self._pending is not None:
                self._pending.output.append(payload)
            else:
                log.debug("ExaBGP output with no command in flight: %.200s", line)

    async def _command(self, conn: _Conn, line: str) -> tuple[bool, list[Any]]:
        """Send one command and wait for its ACK; returns (ok, output lines)."""
        async with self._cmd_lock:
            if conn.closed.is_set() or self._conn is not conn:
                raise SpeakerConnectionLost("connection closed")
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            pending = self._pending = _Pending(fut)
            try:
                conn.writer.write(line.encode() + b"\n")
                await conn.writer.drain()
                ok = await asyncio.wait_for(fut, self.command_timeout)
            except TimeoutError:
                # The ACK stream is now out of step with our commands: start over on a fresh connection.
                log.error("ExaBGP did not answer %.80r within %.0f s; reconnecting", line, self.command_timeout)
                conn.close()
                raise SpeakerConnectionLost("command timed out") from None
            except (ConnectionError, OSError) as exc:
                conn.close()
                raise SpeakerConnectionLost(str(exc)) from exc
            finally:
                if self._pending is pending:
                    self._pending = None
            return ok, pending.output

    # ================================================================== resync and sending

    async def _resync(self, conn: _Conn) -> None:
        ok, out = await self._command(conn, api.SHOW_NEIGHBORS)
        neighbors: list[api.NeighborSnapshot] = []
        if ok:
            for value in out:
                try:
                    neighbors.extend(api.parse_neighbors(value))
                except api.ApiParseError as exc:
                    log.warning("resync: %s", exc)
        ok_in, out_in = await self._command(conn, api.SHOW_ADJ_RIB_IN)
        ok_out, out_out = await self._command(conn, api.SHOW_ADJ_RIB_OUT)
        if not (ok and ok_in and ok_out):
            log.warning("resync: ExaBGP refused a show command; continuing with what it returned")
        rib_in = api.parse_rib(out_in)
        rib_out = api.parse_rib(out_out)
        self._apply_snapshot(neighbors, rib_in, rib_out)
        # Events seen while the snapshot was taken are newer than (or already in) it: replay them in order.
        buffered, self._buffered = self._buffered, []
        self._resyncing = False
        for ev in buffered:
            self._apply(ev)
        self._resynced = True
        self._status()
        self._wake.set()
        log.info(
            "resynced from ExaBGP: %d neighbors (%d up), %d routes in, %d prefixes out, %d events replayed",
            len(neighbors),
            sum(1 for n in neighbors if n.up),
            sum(len(r) for r in rib_in.routes.values()),
            len(self._sent),
            len(buffered),
        )

    def _apply_snapshot(
        self, neighbors: list[api.NeighborSnapshot], rib_in: api.RibSnapshot, rib_out: api.RibSnapshot
    ) -> None:
        now = time.time()
        self._sent = set()
        for routes in rib_out.routes.values():
            self._sent.update(routes)
        for nb in neighbors:
            ps = self._peer(nb.peer)
            if ps is None:
                continue
            if nb.local is not None:
                ps.local = nb.local
            if nb.up:
                if ps.gr_time == 0 and nb.peer_graceful_restart:
                    ps.gr_time = int(self.gr_max)  # the exact time was in an OPEN we did not see
                elif not nb.peer_graceful_restart:
                    ps.gr_time = 0
                new = rib_in.routes.get(nb.peer, {})
                self._drop_routes(ps, [n for n in ps.routes if n not in new])
                for net, (nh, rank) in new.items():
                    if nh is None:
                        self._del_route(ps, net)
                    else:
                        self._set_route(ps, net, (nh, rank))
                ps.stale.clear()
                self._cancel_stale_timer(ps)
                ps.eor_pending = False
                ps.state = "established"
                ps.since = now - nb.duration
                ps.reason = ""
                # Re-send what this neighbor's Adj-RIB-Out lacks, then End-of-RIB (it may be waiting for it if
                # ExaBGP restarted and the session came up before we connected).
                have = rib_out.routes.get(nb.peer, {})
                ps.owe = {n for n in self._desired if n not in have}
            else:
                # Adj-RIB-In of a session that is down is a leftover; what we hold (stale) is better.
                state = (
                    "connect"
                    if nb.fsm in ("CONNECT", "OPENSENT", "OPENCONFIRM")
                    else ("down" if ps.state != "idle" else "idle")
                )
                self._set_state(ps, state)
        self._status_changed = True

    async def _work_loop(self, conn: _Conn) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._sync_once(conn)
            if not self._wake.is_set():
                self._idle.set()

    async def _sync_once(self, conn: _Conn) -> None:
        withdraw = self._sent - self._desired
        for line in api.render_withdraw(withdraw, chunk=self.chunk):
            ok, _ = await self._command(conn, line)
            if not ok:
                log.warning("ExaBGP refused %.60s...; assuming nothing is left to withdraw", line)
        self._sent -= withdraw
        announce = self._desired - self._sent
        if announce:
            refused = 0
            for line, batch in self._batches(announce, None):
                ok, _ = await self._command(conn, line)
                if ok:
                    self._sent.update(batch)
                else:
                    refused += len(batch)
            if refused:
                # ExaBGP refuses a global announce when it has no neighbors yet; peers get them when they come up.
                log.info("ExaBGP refused to announce %d prefixes (no neighbors yet?); retrying later", refused)
        for addr, ps in list(self._peers.items()):
            owe = ps.owe
            if owe is None or ps.state != "established" or not self._is_configured(addr):
                continue
            ps.owe = None
            owe &= self._desired
            for line, batch in self._batches(owe, addr):
                ok, _ = await self._command(conn, line)
                if ok:
                    self._sent.update(batch)
            ok, _ = await self._command(conn, api.render_eor(addr))
            if not ok:
                log.info("BGP peer %s: End-of-RIB not sent (session gone?)", addr)

    def _batches(
        self, prefixes: set[IPv4Network], neighbor: IPv4Address | None
    ) -> Iterable[tuple[str, list[IPv4Network]]]:
        ordered = sorted(prefixes)
        for i in range(0, len(ordered), self.chunk):
            batch = ordered[i : i + self.chunk]
            yield api.render_announce(batch, neighbor=neighbor, chunk=self.chunk)[0], batch
