"""The nftables driver's fast paths give the same answers as the plain computations they replace.

No kernel: these look at desired state only (interval collapsing, rule and comment checks, the
unchanged-chain shortcut, the reverse index of references, and the incremental unprogrammability check
compared with a full walk over every desired object)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from felixpy.dataplane.drivers.nftables import (
    BaseChain,
    NftTable,
    Rule,
    _collapse_cidrs,
    _SetSpec,
    check_nft_rule,
)

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _random_nets(rng: random.Random, v6: bool) -> list[IPNet]:
    bits = 128 if v6 else 32
    out: list[IPNet] = []
    for _ in range(rng.randint(0, 40)):
        plen = rng.choice([bits, bits, bits - 1, bits - 2, bits - 7, rng.randint(0, bits)])
        base = rng.choice([0, (1 << bits) - 1, rng.getrandbits(bits), (rng.getrandbits(6) << (bits - 8))])
        out.append(ipaddress.IPv6Network((base, plen), strict=False) if v6
                   else ipaddress.IPv4Network((base, plen), strict=False))
    return out


@pytest.mark.parametrize("v6", [False, True])
def test_collapse_on_integers_matches_ipaddress(v6: bool) -> None:
    rng = random.Random(4 + v6)
    for _ in range(500):
        nets = set(_random_nets(rng, v6))
        want = [str(n) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]
        assert _collapse_cidrs([str(n) for n in nets], v6) == want


def test_collapse_examples() -> None:
    assert _collapse_cidrs(["10.0.0.1/32", "10.0.0.0/32", "10.0.0.2/31", "10.0.1.0/24"], False) == \
        ["10.0.0.0/30", "10.0.1.0/24"]
    assert _collapse_cidrs(["0.0.0.0/0", "1.2.3.4/32"], False) == ["0.0.0.0/0"]
    assert _collapse_cidrs(["255.255.255.255/32", "255.255.255.254/32"], False) == ["255.255.255.254/31"]
    assert _collapse_cidrs(["::/0", "::1/128"], True) == ["::/0"]
    assert _collapse_cidrs(["::ffff:0:0/128", "::ffff:0:1/128"], True) == ["::ffff:0:0/127"]
    assert _collapse_cidrs([], False) == []


def test_set_accepts_network_objects_and_text_alike() -> None:
    t = NftTable()
    nets = [ipaddress.ip_network(x) for x in ("10.0.0.0/25", "10.0.0.128/25", "10.9.0.1")]
    t.set_set("a", "ipv4_addr", nets, flags=("interval",))
    t.set_set("b", "ipv4_addr", [str(n) for n in nets], flags=("interval",))
    assert t.desired_elements("a") == t.desired_elements("b") == {"10.0.0.0/25": "", "10.0.0.128/25": "",
                                                                  "10.9.0.1/32": ""}
    assert list(t._sets["a"].elements()) == ["10.0.0.0/24", "10.9.0.1/32"]
    t.set_set("c", "ipv4_addr", [ipaddress.ip_network("10.9.0.1")])
    assert t.desired_elements("c") == {"10.9.0.1": ""}
    with pytest.raises(ValueError, match="interval"):
        t.set_set("d", "ipv4_addr", [ipaddress.ip_network("10.9.0.0/24")])
    with pytest.raises(ValueError, match="not IPv4"):
        t.set_set("d", "ipv4_addr", [ipaddress.ip_network("fd00::/64")], flags=("interval",))
    assert "d" not in t.set_names()


def test_element_changes_recollapse() -> None:
    t = NftTable()
    t.set_set("a", "ipv4_addr", ["10.0.0.0/32", "10.0.0.1/32"], flags=("interval",))
    assert list(t._sets["a"].elements()) == ["10.0.0.0/31"]
    t.remove_set_elements("a", ["10.0.0.1"])
    assert list(t._sets["a"].elements()) == ["10.0.0.0/32"]
    t.add_set_elements("a", ["10.0.0.1", "10.0.0.2/31"])
    assert list(t._sets["a"].elements()) == ["10.0.0.0/30"]


def test_rule_checks() -> None:
    assert check_nft_rule("accept") == (frozenset(), frozenset())
    assert check_nft_rule("ip saddr @s1 jump c1") == (frozenset({"c1"}), frozenset({"s1"}))
    assert check_nft_rule('iifname "a;#comment" goto c2') == (frozenset({"c2"}), frozenset())
    assert check_nft_rule("@th,16,8 1 accept") == (frozenset(), frozenset())
    assert check_nft_rule("meta mark set 0x1 counter comments_are_not_here") == (frozenset(), frozenset())
    for bad in ("accept; drop", "accept # x", 'accept comment "x"', "ip saddr 1.2.3.4\naccept", 'a "b'):
        with pytest.raises(ValueError):
            check_nft_rule(bad)
    t = NftTable()
    for comment in ('a"b', "a\x01b", "x" * 200):
        with pytest.raises(ValueError, match="comment"):
            t.set_chain("c", [Rule("accept", comment)])
    t.set_chain("c", [Rule("accept", "x" * (128 - 16 - 7))])  # the longest comment that fits
    with pytest.raises(ValueError, match="too long"):
        t.set_chain("c", [Rule("accept", "x" * (128 - 16 - 6))])


def test_unchanged_chain_is_not_dirty_and_bad_rules_still_fail() -> None:
    t = NftTable()
    rules = ["ip saddr @s accept", Rule("jump other", "why")]
    t.set_chain("c", rules)
    t._dirty_chains.clear()
    t.set_chain("c", list(rules))  # equal rules, a new list
    t.set_chain("c", ["ip  saddr @s accept", Rule("jump other", "why")])  # same after normalising
    assert not t._dirty_chains
    t.set_chain("c", list(rules), base=BaseChain("filter", "input", 0))
    assert t._dirty_chains == {"c"}
    with pytest.raises(ValueError):
        t.set_chain("c", [*rules, "accept; drop"])
    assert t.desired_rules("c") == ("ip saddr @s accept", "jump other")
    assert t.has_chain("c") and not t.has_chain("other")


def _full_walk(t: NftTable) -> dict[str, str]:
    """Which desired objects cannot be programmed, looking at every object (the plain definition)."""
    bad = dict(t._failed)
    chains, sets = t._chains, t._sets
    for name, spec in chains.items():
        if name in bad:
            continue
        for j in sorted(spec.jumps):
            if j not in chains:
                bad[name] = f"jumps to chain {j} which is not desired"
                break
            if chains[j].base is not None:
                bad[name] = f"jumps to base chain {j}"
                break
        else:
            for s in sorted(spec.sets):
                if s not in sets:
                    bad[name] = f"refers to set @{s} which is not desired"
                    break
    for name, sspec in sets.items():
        missing = sorted(x for x in sspec.verdict_targets() if x not in chains)
        if missing:
            bad["@" + name] = f"a verdict refers to chain {missing[0]} which is not desired"
    changed = True
    while changed:
        changed = False
        for name, spec in chains.items():
            if name in bad:
                continue
            why = next((f"jumps to chain {j} which cannot be programmed" for j in sorted(spec.jumps)
                        if j in bad and j not in t._kchains), None)
            why = why or next((f"refers to set @{s} which cannot be programmed" for s in sorted(spec.sets)
                               if "@" + s in bad and s not in t._ksets), None)
            if why:
                bad[name] = why
                changed = True
        for name, sspec in sets.items():
            if "@" + name in bad:
                continue
            x = next((x for x in sorted(sspec.verdict_targets()) if x in bad and x not in t._kchains), None)
            if x is not None:
                bad["@" + name] = f"a verdict refers to chain {x} which cannot be programmed"
                changed = True
    return bad


def _referrers_from_scratch(t: NftTable) -> dict[str, set[str]]:
    idx: dict[str, set[str]] = {}
    for name, spec in t._chains.items():
        for key in spec.refs():
            idx.setdefault(key, set()).add(name)
    for name, sspec in t._sets.items():
        for target in sspec.verdict_targets():
            idx.setdefault(target, set()).add("@" + name)
    return idx


def test_incremental_unprogrammable_matches_full_walk() -> None:
    rng = random.Random(44)
    names = [f"c{i}" for i in range(12)]
    set_names = [f"s{i}" for i in range(4)]
    map_names = ["m0", "m1"]
    t = NftTable()
    for step in range(3000):
        op = rng.random()
        if op < 0.45:
            name = rng.choice(names)
            rules: list[str | Rule] = []
            for _ in range(rng.randint(0, 3)):
                kind = rng.random()
                if kind < 0.4:
                    rules.append(f"{rng.choice(['jump', 'goto'])} {rng.choice(names)}")
                elif kind < 0.6:
                    rules.append(f"ip saddr @{rng.choice(set_names + map_names)} accept")
                elif kind < 0.7:
                    rules.append(f"iifname vmap @{rng.choice(map_names)}")
                else:
                    rules.append(Rule("counter accept", rng.choice(["", "why"])))
            base = BaseChain("filter", "forward", 0) if rng.random() < 0.1 else None
            t.set_chain(name, rules, base=base)
        elif op < 0.55:
            t.remove_chain(rng.choice(names))
        elif op < 0.65:
            t.set_set(rng.choice(set_names), "ipv4_addr", [f"10.0.0.{rng.randint(0, 3)}"])
        elif op < 0.8:
            targets = rng.sample(names, rng.randint(0, 3))
            t.set_map(rng.choice(map_names), "ifname", "verdict",
                      {f"if{i}": f"{rng.choice(['jump', 'goto'])} {x}" for i, x in enumerate(targets)})
        elif op < 0.9:
            t.remove_set(rng.choice(set_names + map_names))
        elif op < 0.95 and t._chains:
            t._failed[rng.choice(sorted(t._chains))] = "rejected by nft"  # as after a failed transaction
        else:
            t.set_chain(rng.choice(names), ["accept"])  # setting a chain again clears its rejection
        assert _referrers_from_scratch(t) == t._referrers, step
        bad = t._unprogrammable()
        assert bad == _full_walk(t), step
        # What apply() keeps afterwards: only unprogrammable objects stay dirty.
        t._dirty_chains = {c for c in t._dirty_chains if c in bad}
        t._dirty_sets = {s for s in t._dirty_sets if "@" + s in bad}
        t._bad = bad


def test_verdict_targets_cache_follows_changes() -> None:
    spec = _SetSpec(("ifname",), "ifname", (), "verdict", {"a": "jump x"})
    assert spec.verdict_targets() == {"x"}
    spec.members["b"] = "goto y"
    spec.reset()
    assert spec.verdict_targets() == {"x", "y"}
