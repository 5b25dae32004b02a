"""The ExaBGP ``process``: a tiny stdlib-only pump between ExaBGP's pipes and the agent's unix socket.

Run by ExaBGP as ``<python> -m bgp.relay --socket PATH``. ExaBGP writes to our stdin with blocking I/O, so a
helper that stops reading freezes its whole reactor, keepalives included; this relay therefore reads stdin at
all times and never blocks on anything else:

* ExaBGP -> agent: whole lines are forwarded while the agent is connected and discarded otherwise. A client
  that does not drain its socket fast enough is disconnected (it resyncs when it comes back) rather than let
  the buffer grow without bound.
* agent -> ExaBGP: only complete command lines are forwarded, so a client that dies mid-line cannot leave a
  half command in front of the next client's first one.
* ACKs are untagged. Commands forwarded for an earlier client may still be owed an ACK (and ``show`` output)
  when a new client connects; those are counted and swallowed so the new client's first ACK is its own.

It exits on stdin EOF (ExaBGP gone), so it is never orphaned. Diagnostics go to stderr (ExaBGP's log), never
to stdout, which is the command channel.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import socket
import sys
import time
from collections.abc import Sequence

READ_SIZE = 1 << 16
# An agent that lets this much of ExaBGP's output pile up is stuck; drop it instead of stalling ExaBGP.
MAX_PENDING_TO_AGENT = 64 << 20
# Same for commands ExaBGP does not take in (it reads its helpers every reactor loop, so this is a safety net).
MAX_PENDING_TO_EXABGP = 64 << 20
RETRY_INTERVAL = 0.5
ACKS = (b"done", b"error")
# Every event ExaBGP writes starts like this; ``show`` output (JSON or text) never does.
EVENT_PREFIX = b'{ "exabgp"'


def _log(msg: str) -> None:
    sys.stderr.write(f"bgp.relay[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


class Relay:
    def __init__(self, socket_path: str, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.socket_path = socket_path
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.sel = selectors.DefaultSelector()
        self.sock: socket.socket | None = None
        self.next_connect = 0.0
        # ExaBGP -> agent
        self.in_partial = b""  # tail of stdin without its newline yet
        self.to_agent = bytearray()
        # agent -> ExaBGP
        self.cmd_partial = b""
        self.to_exabgp = bytearray()
        # ACK bookkeeping: commands handed to ExaBGP whose ACK has not come back, and how many of those belong
        # to clients that have gone away.
        self.owed = 0
        self.swallow = 0
        self.connects = 0

    # ----------------------------------------------------------------- connection

    def _try_connect(self) -> None:
        self.next_connect = time.monotonic() + RETRY_INTERVAL
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            return
        s.setblocking(False)
        self.sock = s
        self.swallow = self.owed
        self.to_agent.clear()
        self.cmd_partial = b""
        self.connects += 1
        self.sel.register(s, selectors.EVENT_READ)
        if self.connects > 1 or self.swallow:
            _log(f"agent connected (swallowing {self.swallow} stale acks)")

    def _drop_agent(self, why: str) -> None:
        if self.sock is None:
            return
        _log(f"agent disconnected: {why}")
        self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.to_agent.clear()
        self.cmd_partial = b""  # never forward half a command
        self.next_connect = time.monotonic() + 0.05

    # ----------------------------------------------------------------- ExaBGP -> agent

    def _on_stdin(self) -> bool:
        """Read what ExaBGP wrote; False on EOF."""
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except BlockingIOError:
            return True
        except InterruptedError:
            return True
        if not data:
            return False
        buf = self.in_partial + data if self.in_partial else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self.in_partial = buf
            return True
        self.in_partial = buf[cut + 1 :]
        self._route_lines(buf[: cut + 1])
        return True

    def _route_lines(self, chunk: bytes) -> None:
        """Account ACKs and forward whole lines to the agent (if any)."""
        if self.owed == 0 and self.swallow == 0:
            # Fast path: nothing to account except ACKs that may arrive unrequested (none expected).
            if self.sock is not None:
                self._queue_agent(chunk)
            return
        out: list[bytes] = []
        for line in chunk.split(b"\n")[:-1]:
            if line in ACKS:
                if self.owed:
                    self.owed -= 1
                if self.swallow:
                    self.swallow -= 1
                    continue
            elif self.swallow and not line.startswith(EVENT_PREFIX):
                continue  # ``show`` output of a command sent by a client that is gone
            out.append(line)
        if out and self.sock is not None:
            out.append(b"")
            self._queue_agent(b"\n".join(out))

    def _queue_agent(self, data: bytes) -> None:
        assert self.sock is not None
        self.to_agent += data
        if len(self.to_agent) > MAX_PENDING_TO_AGENT:
            self._drop_agent("not reading (backlog over limit)")
            return
        self._flush_agent()

    def _flush_agent(self) -> None:
        if self.sock is None or not self.to_agent:
            return
        try:
            n = self.sock.send(self.to_agent)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._drop_agent(f"send: {exc}")
            return
        del self.to_agent[:n]
        self._update_sock_interest()

    def _update_sock_interest(self) -> None:
        if self.sock is None:
            return
        ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.to_agent else 0)
        self.sel.modify(self.sock, ev)

    # ----------------------------------------------------------------- agent -> ExaBGP

    def _on_sock_read(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop_agent(f"recv: {exc}")
            return
        if not data:
            self._drop_agent("closed")
            return
        buf = self.cmd_partial + data if self.cmd_partial else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self.cmd_partial = buf
            return
        self.cmd_partial = buf[cut + 1 :]
        for line in buf[:cut].split(b"\n"):
            line = line.strip()
            if not line:
                continue  # ExaBGP would answer an empty line with an error nobody waits for
            self.to_exabgp += line + b"\n"
            self.owed += 1
        if len(self.to_exabgp) > MAX_PENDING_TO_EXABGP:
            _log("ExaBGP is not reading commands; dropping the agent")
            self._drop_agent("command backlog over limit")
        self._flush_exabgp()

    def _flush_exabgp(self) -> None:
        if not self.to_exabgp:
            return
        try:
            n = os.write(self.stdout_fd, self.to_exabgp)
        except (BlockingIOError, InterruptedError):
            n = 0
        del self.to_exabgp[:n]

    # ----------------------------------------------------------------- loop

    def run(self) -> int:
        os.set_blocking(self.stdin_fd, False)
        os.set_blocking(self.stdout_fd, False)
        self.sel.register(self.stdin_fd, selectors.EVENT_READ)
        out_registered = False
        while True:
            if self.sock is None and time.monotonic() >= self.next_connect:
                self._try_connect()
            want_out = bool(self.to_exabgp)
            if want_out != out_registered:
                if want_out:
                    self.sel.register(self.stdout_fd, selectors.EVENT_WRITE)
                else:
                    self.sel.unregister(self.stdout_fd)
                out_registered = want_out
            timeout = None if self.sock is not None else max(0.0, self.next_connect - time.monotonic())
            for key, mask in self.sel.select(timeout):
                if key.fd == self.stdin_fd:
                    if not self._on_stdin():
                        return 0
                elif key.fd == self.stdout_fd:
                    try:
                        self._flush_exabgp()
                    except OSError as exc:
                        if exc.errno == errno.EPIPE:
                            return 0
                        raise
                elif self.sock is not None and key.fileobj is self.sock:
                    if mask & selectors.EVENT_WRITE:
                        self._flush_agent()
                    if self.sock is not None and mask & selectors.EVENT_READ:
                        self._on_sock_read()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bgp.relay", description="ExaBGP process <-> agent unix socket relay")
    parser.add_argument("--socket", required=True, help="the agent's unix socket")
    args = parser.parse_args(argv)
    try:
        return Relay(args.socket).run()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
