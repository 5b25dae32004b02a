"""Calculation layer scenarios (pure): messages, their order, the local-write overlay."""

from __future__ import annotations

import ipaddress

from felixpy.calc.graph import CalcGraph
from felixpy.calc.messages import (
    InSync,
    LocalBlockRemove,
    LocalBlockUpdate,
    WorkloadEndpointRemove,
    WorkloadEndpointUpdate,
)
from felixpy.datastore.api import KIND_IPAM_BLOCK, KIND_WEP, Key, new_resource
from felixpy.datastore.syncer import Update

NODE = "node-1"
K1 = Key(KIND_WEP, "node--1-k8s-a-eth0", "ns")


def wep(ip: str, iface: str = "cali0000000001", node: str = NODE, cid: str = "c1") -> dict[str, object]:
    return new_resource(K1, {"node": node, "interfaceName": iface, "ipNetworks": [f"{ip}/32"],
                             "containerID": cid, "pod": "a"})


def block(cidr: str, node: str) -> tuple[Key, dict[str, object]]:
    k = Key(KIND_IPAM_BLOCK, cidr.replace(".", "-").replace("/", "-"))
    return k, new_resource(k, {"cidr": cidr, "affinity": f"host:{node}", "allocations": [],
                               "unallocated": [], "attributes": []})


def test_local_endpoint_and_block_messages() -> None:
    g = CalcGraph(NODE)
    bk, bv = block("10.0.0.0/26", NODE)
    ok, ov = block("10.0.0.64/26", "other")
    g.on_updates([Update(K1, wep("10.0.0.5"), "5"), Update(bk, bv, "6"), Update(ok, ov, "7")])
    g.on_in_sync()
    out = g.flush()
    assert LocalBlockUpdate(ipaddress.ip_network("10.0.0.0/26")) in out
    assert any(isinstance(m, WorkloadEndpointUpdate) and m.iface == "cali0000000001" for m in out)
    assert not any(isinstance(m, LocalBlockUpdate) and str(m.cidr) == "10.0.0.64/26" for m in out)
    assert isinstance(out[-1], InSync)
    assert g.flush() == []  # nothing changed, nothing emitted
    g.on_updates([Update(K1, None, "8"), Update(bk, None, "9")])
    out = g.flush()
    assert out == [LocalBlockRemove(ipaddress.ip_network("10.0.0.0/26")), WorkloadEndpointRemove(K1)]


def test_malformed_endpoint_is_skipped_not_fatal() -> None:
    g = CalcGraph(NODE)
    bad = new_resource(K1, {"node": NODE, "interfaceName": "cali1", "ipNetworks": ["not-an-ip"]})
    g.on_updates([Update(K1, bad, "1")])
    assert g.flush() == []
    assert g.invalid_resources == 1
    g.on_updates([Update(K1, wep("10.0.0.9"), "2")])
    assert isinstance(g.flush()[0], WorkloadEndpointUpdate)


def test_remote_endpoint_ignored() -> None:
    g = CalcGraph(NODE)
    g.on_updates([Update(K1, wep("10.0.0.5", node="elsewhere"), "1")])
    assert g.flush() == []


def test_overlay_add_then_stale_watch_events_do_not_resurrect() -> None:
    g = CalcGraph(NODE)
    # CNI ADD writes rev 10 and programs immediately.
    g.on_local_write(K1, wep("10.0.0.5"), "10", now=0)
    assert isinstance(g.flush()[0], WorkloadEndpointUpdate)
    # CNI DEL (last known rev 10) removes immediately.
    g.on_local_write(K1, None, "10", now=1)
    assert g.flush() == [WorkloadEndpointRemove(K1)]
    # The watch now delivers the ADD's own write (rev 10): stale, must not bring the endpoint back.
    g.on_updates([Update(K1, wep("10.0.0.5"), "10")])
    assert g.flush() == []
    # Then the delete (rev 11): overlay caught up, still nothing to do.
    g.on_updates([Update(K1, None, "11")])
    assert g.flush() == []
    assert len(g.overlay) == 0


def test_overlay_catches_up_and_newer_state_wins() -> None:
    g = CalcGraph(NODE)
    g.on_local_write(K1, wep("10.0.0.5"), "10", now=0)
    g.flush()
    g.on_updates([Update(K1, wep("10.0.0.5"), "10")])
    assert len(g.overlay) == 0 and g.flush() == []
    g.on_updates([Update(K1, wep("10.0.0.6", iface="cali0000000002"), "12")])
    out = g.flush()
    assert len(out) == 1 and isinstance(out[0], WorkloadEndpointUpdate)
    assert out[0].iface == "cali0000000002"


def test_overlay_expiry_falls_back_to_synced_view() -> None:
    g = CalcGraph(NODE, overlay_ttl=5)
    g.on_local_write(K1, wep("10.0.0.5"), "10", now=0)
    g.flush()
    g.expire(now=6)  # the watch never confirmed it: trust the datastore (which has nothing)
    assert g.flush() == [WorkloadEndpointRemove(K1)]


def test_local_write_already_delivered_by_the_watch_does_not_shadow_it() -> None:
    """The watch event of our own write (same revision, richer: KDD adds the Pod's labels) can arrive
    before the CNI path records the write; the synced copy must win, not a stale overlay entry."""
    from felixpy.calc.messages import WorkloadEndpointUpdate as WEU

    g = CalcGraph("n")
    key = Key(KIND_WEP, "n-k8s-p-eth0", "ns")
    rich = {"metadata": {"name": key.name, "namespace": "ns", "labels": {"app": "web"}},
            "spec": {"node": "n", "interfaceName": "cali1", "ipNetworks": ["10.0.0.1/32"], "mac": "aa:bb:cc:dd:ee:ff",
                     "containerID": "c1"}}
    poor = {"metadata": {"name": key.name, "namespace": "ns", "labels": {}},
            "spec": {**rich["spec"], "interfaceName": "cali2"}}
    g.on_updates([Update(key, rich, "7")])
    g.flush()
    g.on_local_write(key, poor, "7", 0.0)
    out = [m for m in g.flush() if isinstance(m, WEU)]
    assert out == []  # still the synced (rich) copy: iface cali1
    assert [m.iface for m in g.local_endpoints()] == ["cali1"]
    # A write newer than the synced copy does go into the overlay.
    g.on_local_write(key, poor, "8", 0.0)
    assert [m.iface for m in g.flush() if isinstance(m, WEU)] == ["cali2"]
