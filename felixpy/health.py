"""Health aggregation and the HTTP endpoints (/liveness, /readiness, /metrics) on a tiny asyncio server.

Same contract as Felix: 200 when every reporter is live/ready, 503 otherwise, a text table as body.
A reporter with a timeout that has not reported within it counts as not live (a wedged loop shows up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from felixpy import metrics

log = logging.getLogger(__name__)


@dataclass
class _Reporter:
    name: str
    timeout: float
    live: bool = True
    ready: bool = False
    detail: str = ""
    last: float = 0.0


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._reporters: dict[str, _Reporter] = {}
        self._clock = clock

    def register(self, name: str, timeout: float = 0.0) -> None:
        self._reporters[name] = _Reporter(name, timeout, last=self._clock())

    def report(self, name: str, *, live: bool = True, ready: bool | None = None, detail: str | None = None) -> None:
        r = self._reporters[name]
        r.live = live
        if ready is not None:
            r.ready = ready
        if detail is not None:
            r.detail = detail
        r.last = self._clock()

    def _timed_out(self, r: _Reporter) -> bool:
        return r.timeout > 0 and self._clock() - r.last > r.timeout

    def live(self) -> bool:
        return all(r.live and not self._timed_out(r) for r in self._reporters.values())

    def ready(self) -> bool:
        return all(r.ready and not self._timed_out(r) for r in self._reporters.values())

    def table(self) -> str:
        rows = [("COMPONENT", "TIMEOUT", "LIVENESS", "READINESS", "DETAIL")]
        for r in self._reporters.values():
            stale = self._timed_out(r)
            rows.append((r.name, f"{r.timeout:g}s" if r.timeout else "-",
                         "reporting live" if r.live and not stale else "reporting non-live",
                         "reporting ready" if r.ready and not stale else "reporting non-ready",
                         ("timed out; " if stale else "") + r.detail))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows) + "\n"


async def serve(health: Health, host: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            ctype = "text/plain; charset=utf-8"
            if path == "/liveness":
                ok, body = health.live(), health.table().encode()
            elif path == "/readiness":
                ok, body = health.ready(), health.table().encode()
            elif path == "/metrics":
                ok, body, ctype = True, metrics.render(), metrics.CONTENT_TYPE
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            status = b"200 OK" if ok else b"503 Service Unavailable"
            writer.write(b"HTTP/1.1 " + status + f"\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                         "\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host or None, port)
