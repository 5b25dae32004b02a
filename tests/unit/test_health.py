"""Health aggregation, the BGP readiness rule, the agent's cluster view and the HTTP endpoints (a real asyncio
server on an ephemeral loopback port)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from felixpy import health, metrics
from felixpy.datastore.api import Key

UP = {"address": "10.0.0.2", "state": "established"}
DOWN = {"address": "10.0.0.3", "state": "down"}


def test_bgp_readiness_rule() -> None:
    assert health.bgp_readiness([], uptime=0, grace=60) == (True, "")
    assert health.bgp_readiness([UP], uptime=500, grace=60) == (True, "")
    ok, detail = health.bgp_readiness([UP, DOWN], uptime=500, grace=60)
    assert ok and detail == "BGP not established with 10.0.0.3"
    ok, detail = health.bgp_readiness([DOWN], uptime=10, grace=60)
    assert ok and "grace" in detail
    assert health.bgp_readiness([DOWN, {**DOWN, "address": "10.0.0.4"}], uptime=61, grace=60) == (
        False, "BGP not established with 10.0.0.3,10.0.0.4")


def test_health_reporters_and_timeouts() -> None:
    now = [0.0]
    h = health.Health(clock=lambda: now[0])
    h.register("A", timeout=10)
    h.register("B")
    h.report("A", ready=True)
    assert not h.ready()
    h.report("B", ready=True, detail="fine")
    assert h.ready() and h.live()
    now[0] = 11.0
    assert not h.live() and not h.ready()
    reps = {r["name"]: r for r in h.reporters()}
    assert reps["A"]["detail"].startswith("timed out") and not reps["A"]["ready"]
    assert reps["B"] == {"name": "B", "timeout": 0.0, "live": True, "ready": True, "detail": "fine"}


def block(cidr: str, node: str, allocated: int) -> dict[str, Any]:
    size = ipaddress.ip_network(cidr).num_addresses
    allocs: list[int | None] = [0] * allocated + [None] * (size - allocated)
    return {"spec": {"cidr": cidr, "affinity": f"host:{node}" if node else None, "allocations": allocs}}


def test_cluster_view_counts_and_ipam_usage() -> None:
    v = health.ClusterView("n1")
    k1, k2, k3 = (Key("IPAMBlock", n) for n in ("b1", "b2", "b3"))
    v.on_update("IPAMBlock", k1, block("10.244.1.0/26", "n1", 3))
    v.on_update("IPAMBlock", k2, block("10.244.2.0/26", "n2", 5))
    v.on_update("IPAMBlock", k3, block("10.99.0.0/30", "n1", 1))
    v.on_update("Node", Key("Node", "n1"), {})
    v.on_update("Node", Key("Node", "n2"), {})
    v.on_update("Node", Key("Node", "n2"), None)
    assert v.count("Node") == 1 and v.count("IPAMBlock") == 3
    assert [(str(b.cidr), b.allocated, b.size) for b in v.local_blocks()] == [
        ("10.99.0.0/30", 1, 4), ("10.244.1.0/26", 3, 64)]
    pools = v.pool_usage([("default", ipaddress.ip_network("10.244.0.0/16"))])
    assert pools == [{"name": "default", "cidr": "10.244.0.0/16", "total": 65536, "blocks": 2, "in_blocks": 128,
                      "allocated": 8}]
    v.on_update("IPAMBlock", k2, {"spec": {"cidr": "not-a-cidr"}})  # malformed: dropped, not counted
    v.on_update("IPAMBlock", k1, None)
    assert v.pool_usage([("default", ipaddress.ip_network("10.244.0.0/16"))])[0]["blocks"] == 0


def test_ipam_metrics_remove_vanished_pools() -> None:
    metrics.set_ipam_usage({"10.1.0.0/16": (65536, 64, 3, 1)}, (64, 3))
    assert metrics.sample("felixpy_ipam_pool_addresses", {"pool": "10.1.0.0/16", "state": "free"}) == 65533
    metrics.set_ipam_usage({}, (0, 0))
    assert metrics.sample("felixpy_ipam_pool_addresses", {"pool": "10.1.0.0/16", "state": "free"}) is None


async def _get(port: int, path: str) -> tuple[int, str]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_http_endpoints() -> None:
    h = health.Health()
    h.register("Dataplane")
    h.register("BGP")
    h.report("Dataplane", ready=True)
    h.report("BGP", ready=False, detail="BGP not established with 10.0.0.3")
    reports: list[dict[str, Any]] = [{"node": "n1", "bgp": {"peers": []}}]

    def status() -> dict[str, Any]:
        if not reports:
            raise RuntimeError("broken")
        return reports[0]

    srv = await health.serve(h, "127.0.0.1", 0, status=status)
    port = srv.sockets[0].getsockname()[1]
    try:
        code, body = await _get(port, "/readiness")
        assert code == 503 and "BGP not established with 10.0.0.3" in body
        assert (await _get(port, "/liveness"))[0] == 200
        code, body = await _get(port, "/status")
        assert code == 200 and json.loads(body) == reports[0]
        code, body = await _get(port, "/metrics")
        assert code == 200 and "felix_int_dataplane_apply_time_seconds" in body
        h.report("BGP", ready=True, detail="")
        assert (await _get(port, "/readiness"))[0] == 200
        reports.clear()
        code, body = await _get(port, "/status")
        assert code == 503 and "broken" in body
        assert (await _get(port, "/nope"))[0] == 404
    finally:
        srv.close()
        await srv.wait_closed()
