"""Pure formatting of ``felixpy ipam show`` (calicoctl's table, %.5g numbers, rounded percentages) and the
merging of several ``ipam release --from-report`` reports."""

from __future__ import annotations

import ipaddress
from typing import Any

from felixpy.ctl.ipam import format_borrowed, format_ip, format_show, intersect, render_table, with_pct
from felixpy.ipam.block import Block
from felixpy.ipam.check import Allocation


def block(cidr: str, n_used: int, host: str = "n1", node: str = "n1") -> dict[str, Any]:
    b = Block.new(ipaddress.ip_network(cidr), host=host, claim_time=0, sequence_number=1)
    b.auto_assign(n_used, "h1", {"node": node, "namespace": "ns", "pod": "p"})
    return {"spec": b.to_spec()}


def pool(cidr: str) -> dict[str, Any]:
    return {"spec": {"cidr": cidr}}


def test_show_matches_calicoctl_layout() -> None:
    text = format_show([pool("192.168.0.0/16")], [block("192.168.1.0/26", 5)], show_blocks=True)
    assert text.splitlines() == [
        "+----------+----------------+-----------+------------+--------------+",
        "| GROUPING |      CIDR      | IPS TOTAL | IPS IN USE |   IPS FREE   |",
        "+----------+----------------+-----------+------------+--------------+",
        "| IP Pool  | 192.168.0.0/16 |     65536 | 5 (0%)     | 65531 (100%) |",
        "| Block    | 192.168.1.0/26 |        64 | 5 (8%)     | 59 (92%)     |",
        "+----------+----------------+-----------+------------+--------------+",
    ]
    assert "Block" not in format_show([pool("192.168.0.0/16")], [block("192.168.1.0/26", 5)], show_blocks=False)


def test_numbers_and_orphan_blocks() -> None:
    assert with_pct(1048576, 1048576) == "1.0486e+06 (100%)"
    text = format_show([pool("10.0.0.0/24")], [block("10.0.0.0/26", 2), block("172.16.0.0/26", 1)],
                       show_blocks=True)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "GROUPING" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == ["IP Pool", "Block", "Block"]
    assert "172.16.0.0/26" in rows[2] and "1 (2%)" in rows[2]


def test_show_ip() -> None:
    blocks = [block("10.0.0.0/26", 1)]
    assert format_ip("10.0.0.0", blocks).splitlines() == [
        "IP 10.0.0.0 is in use", "Handle ID: h1", "Attributes:", "  namespace: ns", "  node: n1", "  pod: p"]
    assert format_ip("10.0.0.1", blocks) == "10.0.0.1 is not assigned"
    assert format_ip("10.1.0.1", blocks) == "10.1.0.1 is not assigned"


def test_borrowed_and_table() -> None:
    text = format_borrowed([block("10.0.0.0/26", 1, host="n1", node="n2"), block("10.0.1.0/26", 1)])
    assert "| 10.0.0.0 | n2             | 10.0.0.0/26 | n1          | pod  | ns/p         |" in text
    assert "10.0.1.0 " not in text
    assert render_table(["A"], [["x"]]).splitlines()[1] == "| A |"


def test_reports_intersect_on_same_allocation() -> None:
    a = Allocation(ip="10.0.0.1", block="10.0.0.0/26", handle="h", sequence_number=1)
    b = Allocation(ip="10.0.0.2", block="10.0.0.0/26", handle="h2", sequence_number=1)
    reused = Allocation(ip="10.0.0.2", block="10.0.0.0/26", handle="h3", sequence_number=9)
    assert intersect([{a.ip: a, b.ip: b}, {a.ip: a, b.ip: reused}]) == {a.ip: a}
    assert intersect([]) == {}
