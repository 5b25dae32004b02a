"""The nftables and iptables drivers' desired-state side, without a kernel: validation of bad input
(clear ValueError, nothing recorded), canonical set elements and the rule hash scheme."""

from __future__ import annotations

import pytest

from felixpy.dataplane.drivers.iptables import IpSets, IptablesTable
from felixpy.dataplane.drivers.nftables import BaseChain, NftTable, Rule, check_nft_rule, rule_hashes


def test_rule_hashes_chain_over_name_and_every_rule() -> None:
    a = rule_hashes("c", ["accept", "drop"])
    assert len(a) == 2 and all(len(h) == 16 for h in a)
    assert rule_hashes("c", ["accept"]) == a[:1]  # a prefix hashes the same
    assert rule_hashes("d", ["accept", "drop"]) != a  # the chain name counts
    assert rule_hashes("c", ["counter", "drop"])[1] != a[1]  # a change ripples to the rules after it
    assert rule_hashes("c", ["accept", "accept"])[0] != rule_hashes("c", ["accept", "accept"])[1]


@pytest.mark.parametrize("text, why", [
    ("accept; flush ruleset", "';' would end"),
    ("accept # sneaky", "'#' would start"),
    ("accept\nflush ruleset", "one line"),
    ('ip saddr 1.2.3.4 accept comment "x"', "Rule.comment"),
    ('iifname "eth0 accept', "unbalanced"),
    ("", "non-empty"),
])
def test_nft_rule_text_that_would_escape_its_rule_is_refused(text: str, why: str) -> None:
    t = NftTable()
    with pytest.raises(ValueError, match=why):
        t.set_chain("c", ["accept", text])
    assert t.chain_names() == frozenset()


def test_nft_references_are_extracted() -> None:
    jumps, sets = check_nft_rule('iifname "a;b#" ip saddr @s1 ip daddr @th,16,8 vmap { 1 : jump c1, 2 : goto c2 }')
    assert jumps == {"c1", "c2"} and sets == {"s1"}  # "@th,16,8" is a raw payload, not a set


def test_nft_bad_names_types_elements_and_base_chains() -> None:
    t = NftTable()
    with pytest.raises(ValueError, match="invalid chain name"):
        t.set_chain("bad name", [])
    with pytest.raises(ValueError, match="hook"):
        t.set_chain("c", [], base=BaseChain("filter", "sideways", 0))
    with pytest.raises(ValueError, match="policy"):
        t.set_chain("c", [], base=BaseChain("filter", "input", 0, "maybe"))
    with pytest.raises(ValueError, match="unsupported set element type"):
        t.set_set("s", "ipv4_address", [])
    with pytest.raises(ValueError, match="not an IPv4 address"):
        t.set_set("s", "ipv4_addr", ["10.0.0.300"], flags=["interval"])
    with pytest.raises(ValueError, match="needs a set with flags interval"):
        t.set_set("s", "ipv4_addr", ["10.0.0.0/8"])
    with pytest.raises(ValueError, match="not IPv4"):
        t.set_set("s", "ipv4_addr", ["fd00::/64"], flags=["interval"])
    with pytest.raises(ValueError, match="unknown flag"):
        t.set_set("s", "ipv4_addr", [], flags=["fast"])
    with pytest.raises(ValueError, match="invalid verdict"):
        t.set_map("m", "ifname", "verdict", {"cali1": "jump"})
    with pytest.raises(ValueError, match="comment"):
        t.set_chain("c", [Rule("accept", 'say "hi"')])
    with pytest.raises(ValueError, match="sequence of rules"):
        t.set_chain("c", "accept")  # type: ignore[arg-type]
    assert t.chain_names() == frozenset() and t.set_names() == frozenset()


def test_nft_canonical_elements() -> None:
    t = NftTable()
    t.set_set("s", "ipv4_addr", ["10.0.0.1", "10.1.0.0/16", "10.1.2.3/16"], flags=["interval"])
    assert set(t.desired_elements("s") or {}) == {"10.0.0.1/32", "10.1.0.0/16"}
    t.set_set("p", "ipv4_addr . inet_proto . inet_service", ["10.0.0.1 . tcp . 80", ("10.0.0.2", 17, "53")])
    assert set(t.desired_elements("p") or {}) == {"10.0.0.1 . 6 . 80", "10.0.0.2 . 17 . 53"}
    t.set_map("m", "ifname", "verdict", {"cali1": "goto  c1", "cali2": "drop"})
    assert t.desired_elements("m") == {"cali1": "goto c1", "cali2": "drop"}


@pytest.mark.parametrize("text, why", [
    ("-j ACCEPT\nCOMMIT", "one line"),
    ("-A POSTROUTING -j ACCEPT", "is a command"),
    ("-F", "is a command"),
    ('-m comment --comment "open', "No closing quotation"),
    ("-m comment --comment 'x' -j ACCEPT", "double quotes only"),
    ("-j", "without a target"),
])
def test_iptables_rule_text_is_validated(text: str, why: str) -> None:
    t = IptablesTable("nat")
    with pytest.raises(ValueError, match=why):
        t.set_chain("cali-x", [text])
    assert t.chain_names() == frozenset()


def test_iptables_names_and_hooks() -> None:
    t = IptablesTable("nat")
    with pytest.raises(ValueError, match="starting with 'cali-'"):
        t.set_chain("KUBE-X", [])
    with pytest.raises(ValueError, match="28 characters"):
        t.set_chain("cali-" + "x" * 30, [])
    with pytest.raises(ValueError, match="set_chain"):
        t.set_hooks("cali-POSTROUTING", append=["-j ACCEPT"])
    with pytest.raises(ValueError, match="table must be one of"):
        IptablesTable("broute")
    s = IpSets()
    with pytest.raises(ValueError, match="starting with 'cali40'"):
        s.set_ipset("foo", "hash:net", [])
    with pytest.raises(ValueError, match="type must be one of"):
        s.set_ipset("cali40x", "hash:mac", [])
    with pytest.raises(ValueError, match="invalid hash:net member"):
        s.set_ipset("cali40x", "hash:net", ["10.0.0.0/33"])
    with pytest.raises(ValueError, match="not IPv4"):
        s.set_ipset("cali40x", "hash:net", ["fd00::/64"])
    s.set_ipset("cali40x", "hash:net", ["10.0.0.1", "10.0.0.0/8"])
    assert s.desired_members("cali40x") == frozenset({"10.0.0.1", "10.0.0.0/8"})  # as `ipset save` prints them
