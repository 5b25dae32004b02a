"""Health aggregation and the HTTP endpoints (/liveness, /readiness, /metrics, /status) on a tiny asyncio server.

Same contract as Felix: 200 when every reporter is live/ready, 503 otherwise, a text table as body.
A reporter with a timeout that has not reported within it counts as not live (a wedged loop shows up).
``/status`` (felixpy only) is the agent's own view as JSON (datastore, dataplane, BGP, IPAM, policy): what
``felixpy status`` and ``felixpy node status`` print, so the CLI never re-derives the agent's state.

Also here, as pure code: the BGP readiness rule (:func:`bgp_readiness`) and :class:`ClusterView`, the counts
and IPAM usage the agent derives from the datastore updates it already receives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


    def reporters(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "timeout": r.timeout, "live": r.live and not self._timed_out(r),
                 "ready": r.ready and not self._timed_out(r),
                 "detail": ("timed out; " if self._timed_out(r) else "") + r.detail}
                for r in self._reporters.values()]


# -- BGP readiness (calico-node's -bird-ready, with a start-up grace) -----------------------------------------


def bgp_readiness(peers: Sequence[Mapping[str, Any]], *, uptime: float, grace: float) -> tuple[bool, str]:
    """Ready when the node has no configured peers, or at least one is established; within ``grace`` seconds of
    start the sessions are still coming up and do not count. The detail names the peers that are not up, in
    calico-node's words ("BGP not established with 10.0.0.2,10.0.0.3")."""
    down = [p for p in peers if p.get("state") != "established"]
    detail = ""
    if down:
        detail = "BGP not established with " + ",".join(str(p.get("address")) for p in down)
    if not peers or len(down) < len(peers):
        return True, detail
    if uptime < grace:
        return True, f"{detail} (start-up grace {grace:g}s)"
    return False, detail


# -- what the agent knows about the cluster --------------------------------------------------------------------
@dataclass(frozen=True)
class BlockUsage:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    node: str  # affine host, "" if none
    allocated: int

    @property
    def size(self) -> int:
        return self.cidr.num_addresses


def block_usage(spec: Mapping[str, Any]) -> BlockUsage | None:
    """An IPAMBlock spec -> its usage; None when malformed (the calculation layer reports those)."""
    try:
        cidr = ipaddress.ip_network(str(spec.get("cidr", "")), strict=True)
    except ValueError:
        return None
    aff = spec.get("affinity") or ""
    node = aff[5:] if isinstance(aff, str) and aff.startswith("host:") else ""
    allocs = spec.get("allocations")
    allocated = sum(1 for a in allocs if a is not None) if isinstance(allocs, list) else 0
    return BlockUsage(cidr, node, allocated)


class ClusterView:
    """Counts by kind and per-block IPAM usage, fed the same datastore updates as the calculation layer."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._keys: dict[str, set[Any]] = {}
        self.blocks: dict[Any, BlockUsage] = {}

    def on_update(self, kind: str, key: Any, value: Mapping[str, Any] | None) -> None:
        keys = self._keys.setdefault(kind, set())
        if value is None:
            keys.discard(key)
        else:
            keys.add(key)
        if kind == "IPAMBlock":
            spec = value.get("spec") if value is not None else None
            usage = block_usage(spec) if isinstance(spec, dict) else None
            if usage is None:
                self.blocks.pop(key, None)
            else:
                self.blocks[key] = usage

    def count(self, *kinds: str) -> int:
        return sum(len(self._keys.get(k, ())) for k in kinds)

    def local_blocks(self) -> list[BlockUsage]:
        return sorted((b for b in self.blocks.values() if b.node == self.node),
                      key=lambda b: (b.cidr.version, int(b.cidr.network_address)))

    def pool_usage(self, pools: Iterable[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]
                   ) -> list[dict[str, Any]]:
        """Per pool (name, cidr): total addresses, blocks, addresses in blocks, allocated addresses."""
        out = []
        for name, cidr in sorted(pools, key=lambda p: str(p[1])):
            inside = [b for b in self.blocks.values()
                      if b.cidr.version == cidr.version and b.cidr.subnet_of(cidr)]  # type: ignore[arg-type]
            out.append({"name": name, "cidr": str(cidr), "total": cidr.num_addresses, "blocks": len(inside),
                        "in_blocks": sum(b.size for b in inside), "allocated": sum(b.allocated for b in inside)})
        return out


async def serve(health: Health, host: str, port: int, *,
                status: Callable[[], Mapping[str, Any]] | None = None) -> asyncio.Server:
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
            elif path == "/status" and status is not None:
                ok, ctype = True, "application/json"
                try:
                    body = json.dumps(status(), indent=1, sort_keys=True, default=str).encode()
                except Exception as e:  # a bug in the report must not take the health server down
                    log.exception("building /status failed")
                    ok, body, ctype = False, f"status unavailable: {e}\n".encode(), "text/plain; charset=utf-8"
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            code = b"200 OK" if ok else b"503 Service Unavailable"
            writer.write(b"HTTP/1.1 " + code + f"\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                         "\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host or None, port)
