"""Leak analysis for ``felixpy ipam check`` (felixpy.ipam.check.analyse) and the report's shape, which
follows calicoctl's ``ipam check -o`` report (allocations keyed by IP, leakedHandles with ID/UID/Revision)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from felixpy.datastore.api import Key, KVPair
from felixpy.ipam.block import Block
from felixpy.ipam.check import (
    DUPLICATE_USE,
    ORPHANED_AFFINITY,
    Allocation,
    analyse,
    format_check,
)
from felixpy.ipam.release import Outcome, ReportError, candidates, check_report_usable, parse_timestamp

CIDR = ipaddress.ip_network("10.9.0.0/30")


def block(allocs: list[tuple[int, str, dict[str, str]]], *, host: str = "n1") -> dict[str, Any]:
    b = Block.new(CIDR, host=host, claim_time=0, sequence_number=100)
    for o, h, attrs in allocs:
        b.assign(o, h, attrs)
    return {"kind": "IPAMBlock", "metadata": {"name": "10-9-0-0-30"}, "spec": b.to_spec()}


def handle(hid: str, n: int = 1) -> tuple[dict[str, Any], str, str]:
    return ({"kind": "IPAMHandle", "metadata": {"name": hid}, "spec": {"handleID": hid, "block": {str(CIDR): n}}},
            "7", "")


def wep(ns: str, pod: str, ips: list[str], cid: str = "") -> dict[str, Any]:
    return {"kind": "WorkloadEndpoint", "metadata": {"name": f"n1-k8s-{pod}-eth0", "namespace": ns},
            "spec": {"pod": pod, "node": "n1", "ipNetworks": ips, "containerID": cid, "interfaceName": "cali0"}}


def node(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec}


def pod_attrs(pod: str) -> dict[str, str]:
    return {"node": "n1", "namespace": "default", "pod": pod, "timestamp": "2020-01-01 00:00:00 +0000 UTC"}


POOL = {"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.9.0.0/16"}}


def test_leak_in_use_and_report_shape() -> None:
    blocks = [block([(0, "k8s-pod-network.live", pod_attrs("web")), (1, "k8s-pod-network.gone", pod_attrs("old"))])]
    an = analyse(blocks=blocks, handles=[handle("k8s-pod-network.live"), handle("k8s-pod-network.gone"),
                                         handle("orphan-handle")],
                 affinities=[], pools=[POOL], weps=[wep("default", "web", ["10.9.0.0/32"])], nodes=[node("n1")])
    assert an.not_in_use == ["10.9.0.1"]
    live = an.allocations["10.9.0.0"][0]
    assert live.in_use and live.owners == ["Workload(default/n1-k8s-web-eth0)"]
    assert [h.id for h in an.leaked_handles] == ["orphan-handle"]
    rep = an.report(cluster_info={"spec": {"clusterGUID": "g1", "clusterType": "k8s,bgp", "datastoreReady": True}},
                    revision="5", generated_at="2020-01-01T00:00:00Z")
    assert rep["clusterGUID"] == "g1" and rep["clusterInformationRevision"] == "5" and not rep["datastoreLocked"]
    leaked = rep["allocations"]["10.9.0.1"][0]
    assert leaked["inUse"] is False and leaked["handle"] == "k8s-pod-network.gone" and leaked["pod"] == "old"
    assert leaked["sequenceNumber"] == 100
    assert rep["leakedHandles"] == [{"ID": "orphan-handle", "UID": None, "Revision": "7"}]
    assert set(candidates(rep)) == {"10.9.0.1"}
    text = "\n".join(format_check(an))
    assert "Found 1 IPs that are allocated in IPAM but not actually in use." in text
    assert "Found 1 handles with no matching IPs (and 2 handles with matches)." in text


def test_pod_without_ip_yet_and_tunnel_address_count_as_in_use() -> None:
    # A pod mid-ADD: its endpoint exists but carries no address yet; the allocation names it.
    tunnel = {"node": "n1", "type": "vxlanTunnelAddress"}
    blocks = [block([(0, "k8s-pod-network.c1", pod_attrs("starting")), (1, "vxlan-tunnel-addr-n1", tunnel),
                     (2, "k8s-pod-network.c9", {"node": "n1"})])]
    an = analyse(blocks=blocks, handles=[], affinities=[], pools=[POOL],
                 weps=[wep("default", "starting", []), wep("other", "x", [], cid="c9")], nodes=[node("n1")])
    assert an.not_in_use == []
    # The same tunnel allocation once its node is gone is a leak.
    an2 = analyse(blocks=blocks, handles=[], affinities=[], pools=[POOL], weps=[], nodes=[])
    assert an2.not_in_use == ["10.9.0.0", "10.9.0.1", "10.9.0.2"]
    assert any(p.kind == ORPHANED_AFFINITY for p in an2.problems)


def test_node_tunnel_ip_and_duplicates_and_unallocated() -> None:
    blocks = [block([(0, "ipip-tunnel-addr-n1", {"node": "n1"})])]
    an = analyse(blocks=blocks, handles=[handle("ipip-tunnel-addr-n1")], affinities=[], pools=[POOL],
                 weps=[wep("a", "p1", ["10.9.0.3/32"]), wep("b", "p2", ["10.9.0.3/32"]),
                       wep("c", "p3", ["192.0.2.1/32"])],
                 nodes=[node("n1", bgp={"ipv4IPIPTunnelAddr": "10.9.0.0"})])
    assert an.allocations["10.9.0.0"][0].owners == ["Node(n1)"]
    assert an.in_use_not_allocated == ["10.9.0.3"] and an.in_use_not_in_pool == ["192.0.2.1"]
    assert [p.ip for p in an.problems if p.kind == DUPLICATE_USE] == ["10.9.0.3"]


def test_orphaned_affinity_and_borrowed() -> None:
    aff = {"kind": "BlockAffinity", "metadata": {"name": "gone-10-9-0-0-30"},
           "spec": {"node": "gone", "cidr": str(CIDR), "state": "confirmed", "type": "host", "deleted": False}}
    blocks = [block([(0, "h", {"node": "n2"})], host="n1")]
    an = analyse(blocks=blocks, handles=[handle("h")], affinities=[aff], pools=[POOL], weps=[],
                 nodes=[node("n1"), node("n2")])
    assert an.orphaned_affinities == [{"name": "gone-10-9-0-0-30", "node": "gone", "cidr": str(CIDR)}]
    assert an.allocations["10.9.0.0"][0].borrowed


def test_report_round_trip_and_guards() -> None:
    a = Allocation(ip="10.9.0.1", block=str(CIDR), handle="h", sequence_number=3, in_use=False, owners=[])
    assert Allocation.from_json(a.to_json()) == a
    assert candidates({"allocations": {"10.9.0.1": [a.to_json()]}}) == {"10.9.0.1": a}
    # Two allocations of one address (a duplicate) are never release candidates.
    assert candidates({"allocations": {"10.9.0.1": [a.to_json(), a.to_json()]}}) == {}
    bads: list[dict[str, Any]] = [{}, {"allocations": []}, {"allocations": {"x": [a.to_json()]}},
                                  {"allocations": {"10.0.0.1": [1]}}]
    for bad in bads:
        with pytest.raises(ReportError):
            candidates(bad)
    check_report_usable({"clusterGUID": "g"}, report_time=0, now=100, min_age=60, cluster_info=None)
    with pytest.raises(ReportError, match="at least 60s old"):
        check_report_usable({}, report_time=0, now=10, min_age=60, cluster_info=None)
    other = KVPair(Key("ClusterInformation", "default"), {"spec": {"clusterGUID": "h"}}, "1")
    with pytest.raises(ReportError, match="another cluster"):
        check_report_usable({"clusterGUID": "g"}, report_time=0, now=100, min_age=60, cluster_info=other)


def test_parse_timestamp() -> None:
    assert parse_timestamp("2020-01-01 00:00:00 +0000 UTC") == 1577836800.0
    assert parse_timestamp("2020-01-01 00:00:01.123456789 +0000 UTC") == 1577836801.123456
    assert parse_timestamp("2020-01-01T00:00:00Z") == 1577836800.0
    assert parse_timestamp("") is None and parse_timestamp("yesterday") is None


def test_release_judgement() -> None:
    """The fresh-read checks a release makes before its compare-and-swap (felixpy.ipam.release)."""
    from felixpy.ipam.release import Releaser

    blocks = [block([(0, "k8s-pod-network.live", pod_attrs("web")), (1, "k8s-pod-network.gone", pod_attrs("old")),
                     (2, "k8s-pod-network.new", {**pod_attrs("new"), "timestamp": "2030-01-01 00:00:00 +0000 UTC"})])]
    an = analyse(blocks=blocks, handles=[], affinities=[], pools=[], weps=[wep("default", "web", [])], nodes=[])
    rel = Releaser(object(), now=parse_timestamp("2030-01-01 00:00:30 +0000 UTC") or 0, min_age=60)  # type: ignore[arg-type]
    report = an.allocations["10.9.0.1"][0]
    assert rel._judge("10.9.0.1", report, an) is None
    assert rel._judge("10.9.0.1", None, an) is None
    live = rel._judge("10.9.0.0", None, an)
    assert live is not None and live.refused and "in use" in live.reason
    young = rel._judge("10.9.0.2", None, an)
    assert young is not None and young.refused and "allocated 30s ago" in young.reason
    other = Allocation(ip="10.9.0.1", block=str(CIDR), handle="k8s-pod-network.someone-else", sequence_number=100)
    changed = rel._judge("10.9.0.1", other, an)
    assert changed is not None and changed.refused and "now belongs to handle" in changed.reason
    reused = Allocation(ip="10.9.0.1", block=str(CIDR), handle="k8s-pod-network.gone", sequence_number=7)
    assert "re-allocated" in (rel._judge("10.9.0.1", reused, an) or Outcome("", False, "")).reason
    free = rel._judge("10.9.0.3", None, an)
    assert free is not None and not free.refused and "not assigned" in free.reason
