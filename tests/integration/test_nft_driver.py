"""The nftables driver against the real kernel, each test in its own network namespace.

Another program's edits (drift, leftovers of an older agent, a foreign table) are made with the nft
command, as an administrator would."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from felixpy.dataplane.drivers.nftables import BaseChain, NftTable, Rule
from felixpy.dataplane.shims.nft import Nft, NftError

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxnft{os.getpid() % 100000}{secrets.token_hex(2)}"
NAT = BaseChain("nat", "postrouting", 110)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def listing(ns: str, table: str = "ip calico") -> list[dict[str, Any]]:
    out = json.loads(nft(ns, "-j", "-a", "list", "table", *table.split()))["nftables"]
    return [o for o in out if "metainfo" not in o]


def rules(ns: str, chain: str) -> list[dict[str, Any]]:
    return [o["rule"] for o in listing(ns) if "rule" in o and o["rule"]["chain"] == chain]


def handles(ns: str) -> list[int]:
    return sorted(o["rule"]["handle"] for o in listing(ns) if "rule" in o)


def elements(ns: str, name: str) -> list[Any]:
    for o in listing(ns):
        s = o.get("set") or o.get("map")
        if s is not None and s["name"] == name:
            return list(s.get("elem", []))
    raise AssertionError(f"no set {name}")


def chains(ns: str) -> set[str]:
    return {o["chain"]["name"] for o in listing(ns) if "chain" in o}


@pytest.fixture
def ns(make_ns: Callable[[], str]) -> str:
    return make_ns()


@pytest.fixture
def shim(ns: str) -> Iterator[Nft]:
    s = Nft(f"/run/netns/{ns}")
    yield s
    NftTable(s).delete_table()  # the namespace goes too; this checks the driver can clean up itself


def desire(t: NftTable, *, extra_pool: bool = False) -> None:
    pools = ["10.65.0.0/16"] + (["10.66.0.0/16"] if extra_pool else [])
    t.set_set("cali40masq-ipam-pools", "ipv4_addr", pools, flags=["interval"])
    t.set_set("cali40all-ipam-pools", "ipv4_addr", [*pools, "10.70.0.0/16"], flags=["interval"])
    t.set_chain("nat-POSTROUTING", ["jump nat-cali-POSTROUTING"], base=NAT)
    t.set_chain("nat-cali-POSTROUTING", ["jump nat-cali-nat-outgoing"])
    t.set_chain("nat-cali-nat-outgoing", [Rule(
        "ip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools counter masquerade fully-random",
        "nat outgoing")])


@pytest.mark.parametrize("backend", ["lib", "cli"])
def test_apply_is_one_transaction_then_nothing(ns: str, backend: str) -> None:
    s = Nft(f"/run/netns/{ns}", backend=backend)
    assert s.backend == backend
    t = NftTable(s)
    desire(t)
    st = t.apply()
    assert st.transactions == 1 and st.chains_written == 3 and st.sets_written == 2 and st.failed == {}
    base = next(o["chain"] for o in listing(ns) if "chain" in o and o["chain"]["name"] == "nat-POSTROUTING")
    assert (base["type"], base["hook"], base["prio"], base["policy"]) == ("nat", "postrouting", 110, "accept")
    [r] = rules(ns, "nat-cali-nat-outgoing")
    assert r["comment"].startswith("cali:") and r["comment"].endswith("; nat outgoing")
    assert any("masquerade" in e for e in r["expr"])
    assert t.apply().transactions == 0  # nothing dirty
    t.queue_resync()
    st = t.apply()
    assert st.resynced and st.transactions == 0  # re-read: already right
    t.delete_table()


def test_restart_adopts_without_rewriting(ns: str, shim: Nft) -> None:
    first = NftTable(shim)
    desire(first)
    first.apply()
    before = handles(ns)
    second = NftTable(Nft(f"/run/netns/{ns}"))  # a new agent: empty cache, same desired state
    desire(second)
    st = second.apply()
    assert st.resynced and st.transactions == 0 and st.commands == 0
    assert handles(ns) == before  # no rule was rewritten


def test_only_changed_chains_and_elements_are_written(ns: str, shim: Nft) -> None:
    t = NftTable(shim, removals_allowed=True)
    desire(t)
    t.apply()
    post = {r["handle"] for r in rules(ns, "nat-cali-POSTROUTING")}
    desire(t, extra_pool=True)
    st = t.apply()
    assert (st.chains_written, st.elements_added, st.elements_removed) == (0, 2, 0)
    t.set_chain("nat-cali-nat-outgoing", ["ip saddr @cali40masq-ipam-pools counter masquerade"])
    st = t.apply()
    assert st.chains_written == 1 and st.elements_added == 0
    assert {r["handle"] for r in rules(ns, "nat-cali-POSTROUTING")} == post  # untouched
    desire(t)
    st = t.apply()
    assert st.elements_removed == 2 and st.chains_written == 1
    assert elements(ns, "cali40masq-ipam-pools") == [{"prefix": {"addr": "10.65.0.0", "len": 16}}]


def test_drift_is_repaired_on_resync(ns: str, shim: Nft) -> None:
    t = NftTable(shim, removals_allowed=True)
    desire(t)
    t.apply()
    [r] = rules(ns, "nat-cali-nat-outgoing")
    nft(ns, "delete", "rule", "ip", "calico", "nat-cali-nat-outgoing", "handle", str(r["handle"]))
    nft(ns, "delete", "element", "ip", "calico", "cali40all-ipam-pools", "{ 10.70.0.0/16 }")
    nft(ns, "add", "rule", "ip", "calico", "nat-cali-POSTROUTING", "accept")  # a foreign rule in our chain
    nft(ns, "flush", "chain", "ip", "calico", "nat-POSTROUTING")
    nft(ns, "delete", "chain", "ip", "calico", "nat-POSTROUTING")
    assert t.apply().transactions == 0  # the cache does not know yet
    t.queue_resync()
    st = t.apply()
    assert st.resynced and st.transactions == 1 and st.chains_written == 3 and st.elements_added == 1
    assert len(rules(ns, "nat-cali-nat-outgoing")) == 1
    assert [x["expr"] for x in rules(ns, "nat-cali-POSTROUTING")] == [[{"jump": {"target": "nat-cali-nat-outgoing"}}]]
    assert "nat-POSTROUTING" in chains(ns)
    assert {"prefix": {"addr": "10.70.0.0", "len": 16}} in elements(ns, "cali40all-ipam-pools")
    t.queue_resync()
    assert t.apply().transactions == 0


def test_nothing_removed_or_rewritten_before_allow_removals(ns: str, shim: Nft) -> None:
    # An older agent left a chain, a set, a stale element and different rules behind.
    nft(ns, "-f", "-", stdin="""
        add table ip calico
        add chain ip calico nat-cali-old
        add rule ip calico nat-cali-old counter
        add set ip calico cali40old { type ipv4_addr; }
        add set ip calico cali40all-ipam-pools { type ipv4_addr; flags interval; }
        add element ip calico cali40all-ipam-pools { 10.99.0.0/16 }
        add chain ip calico nat-cali-POSTROUTING
        add rule ip calico nat-cali-POSTROUTING counter comment "cali:0000000000000000"
    """)
    t = NftTable(shim)
    desire(t)
    st = t.apply()
    assert st.deferred == 4  # stale chain, stale set, stale element, rewrite of the non-empty chain
    assert {"nat-cali-old", "nat-POSTROUTING", "nat-cali-nat-outgoing"} <= chains(ns)
    assert {"prefix": {"addr": "10.99.0.0", "len": 16}} in elements(ns, "cali40all-ipam-pools")
    assert len(elements(ns, "cali40all-ipam-pools")) == 3  # the desired ones were added
    assert [x["comment"] for x in rules(ns, "nat-cali-POSTROUTING")] == ["cali:0000000000000000"]
    t.allow_removals()
    st = t.apply()
    assert st.deferred == 0 and st.chains_deleted == 1 and st.sets_deleted == 1 and st.elements_removed == 1
    assert "nat-cali-old" not in chains(ns)
    assert not any("set" in o and o["set"]["name"] == "cali40old" for o in listing(ns))
    assert [x["expr"] for x in rules(ns, "nat-cali-POSTROUTING")] == [[{"jump": {"target": "nat-cali-nat-outgoing"}}]]


def test_other_tables_are_never_touched(ns: str, shim: Nft) -> None:
    nft(ns, "-f", "-", stdin="""
        add table ip kube-proxy
        add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100; }
        add rule ip kube-proxy nat-postrouting counter
        add table ip6 calico
        add chain ip6 calico mine
    """)
    before = nft(ns, "list", "ruleset")
    t = NftTable(shim, removals_allowed=True)
    desire(t)
    t.apply()
    t.delete_table()
    assert nft(ns, "list", "ruleset") == before


@pytest.mark.parametrize("backend", ["lib", "cli"])
def test_bad_rules_are_reported_and_the_rest_applied(ns: str, backend: str) -> None:
    t = NftTable(Nft(f"/run/netns/{ns}", backend=backend), removals_allowed=True)
    desire(t)
    t.apply()
    # nft rejects the first; the second refers to a chain that is not desired; the third is fine.
    t.set_chain("nat-cali-nat-outgoing", ["ip saddr @cali40masq-ipam-pools bogus-keyword masquerade"])
    t.set_chain("nat-cali-POSTROUTING", ["jump nat-cali-nat-outgoing", "jump nat-cali-missing"])
    t.set_chain("nat-cali-extra", ["counter"])
    st = t.apply()
    assert set(st.failed) == {"nat-cali-nat-outgoing", "nat-cali-POSTROUTING"}
    assert "not desired" in st.failed["nat-cali-POSTROUTING"] and "Error" in st.failed["nat-cali-nat-outgoing"]
    assert "nat-cali-extra" in chains(ns)  # the good part went in
    [r] = rules(ns, "nat-cali-nat-outgoing")  # the rejected chain keeps its working rule
    assert any("masquerade" in e for e in r["expr"])
    assert "nat-cali-POSTROUTING" in t.status()
    assert t.apply().transactions == 0  # not retried over and over
    # Fixing the input fixes the dataplane.
    desire(t)
    st = t.apply()
    assert st.failed == {} and t.status() == ""


def test_a_new_chain_jumping_to_a_rejected_new_chain_waits(ns: str, shim: Nft) -> None:
    t = NftTable(shim, removals_allowed=True)
    t.set_chain("a", ["jump b"])
    t.set_chain("b", ["this is not nft"])
    t.set_chain("c", ["counter"])
    st = t.apply()
    assert set(st.failed) == {"a", "b"} and "cannot be programmed" in st.failed["a"]
    assert chains(ns) == {"c"}


def test_sets_maps_and_recreation(ns: str, shim: Nft) -> None:
    t = NftTable(shim, removals_allowed=True)
    t.set_chain("fw-cali1", ["counter accept"])
    t.set_chain("fw-cali2", ["counter drop"])
    t.set_map("disp", "ifname", "verdict", {"cali1": "goto fw-cali1", "cali2": "goto fw-cali2"})
    t.set_chain("dispatch", ["iifname vmap @disp", "ip saddr @nets counter"])
    # Overlapping and adjacent CIDRs are collapsed (the kernel refuses overlapping intervals).
    t.set_set("nets", "ipv4_addr", ["10.0.0.0/25", "10.0.0.128/25", "10.0.0.5", "10.1.0.0/16"], flags=["interval"])
    assert t.apply().failed == {}
    assert elements(ns, "nets") == [{"prefix": {"addr": "10.0.0.0", "len": 24}},
                                    {"prefix": {"addr": "10.1.0.0", "len": 16}}]
    t.set_map("disp", "ifname", "verdict", {"cali1": "goto fw-cali2", "cali3": "drop"})
    st = t.apply()
    assert (st.elements_added, st.elements_removed) == (2, 2)
    assert sorted(json.dumps(e) for e in elements(ns, "disp")) == sorted(
        json.dumps(e) for e in [["cali1", {"goto": {"target": "fw-cali2"}}], ["cali3", {"drop": None}]])
    # A type change recreates the set, refilling the chain that uses it in the same transaction.
    t.set_set("nets", "ipv4_addr", ["10.2.0.1"])
    st = t.apply()
    assert st.sets_written == 1 and st.chains_written == 1 and st.failed == {}
    assert elements(ns, "nets") == ["10.2.0.1"]
    t.queue_resync()
    assert t.apply().transactions == 0
    # A verdict to a chain that is not desired is refused for that map only.
    t.set_map("disp", "ifname", "verdict", {"cali9": "goto nowhere"})
    assert "@disp" in t.apply().failed


def test_base_chain_change_waits_for_removals_then_recreates(ns: str, shim: Nft) -> None:
    t = NftTable(shim)
    t.set_chain("nat-POSTROUTING", ["counter"], base=NAT)
    t.apply()
    t.set_chain("nat-POSTROUTING", ["counter"], base=BaseChain("nat", "postrouting", 120))
    assert t.apply().deferred == 1
    t.allow_removals()
    assert t.apply().chains_written == 1
    base = next(o["chain"] for o in listing(ns) if "chain" in o)
    assert base["prio"] == 120 and len(rules(ns, "nat-POSTROUTING")) == 1


def test_a_deferred_map_keeps_the_chains_it_jumps_to(ns: str, shim: Nft) -> None:
    """S (staying: it cannot be rewritten) uses map M, which jumps to C. Removing M and C must defer both
    (M is still used, so C is still a target) instead of failing every apply with EBUSY."""
    t = NftTable(shim, removals_allowed=True)
    t.set_chain("C", ["accept"])
    t.set_map("M", "ifname", "verdict", {"x": "jump C"})
    t.set_chain("S", ["iifname vmap @M"])
    assert t.apply().failed == {}
    t.set_chain("S", ["ip saddr @nope accept"])  # refers to an undesired set: S stays as the kernel has it
    t.remove_set("M")
    t.remove_chain("C")
    stats = t.apply()  # must not raise
    assert set(stats.failed) == {"S"} and stats.deferred == 2
    assert {"C", "S"} <= chains(ns) and elements(ns, "M")
    # Once S is fixed, M and C go.
    t.set_chain("S", ["accept"])
    assert t.apply().failed == {}
    assert chains(ns) == {"S"}


def test_missing_table_and_errors_from_the_shim(ns: str, shim: Nft) -> None:
    with pytest.raises(NftError) as e:
        shim.list_json("table ip nosuch")
    assert e.value.not_found
    with pytest.raises(NftError, match="syntax error"):
        shim.run("add table ip x\nthis is not nft\n")
    assert "x" not in shim.table_names("ip")  # all or nothing
    t = NftTable(shim)
    assert t.apply().transactions == 0  # nothing desired: no empty table is created
    assert "calico" not in shim.table_names("ip")


def test_a_stale_cache_costs_one_failed_apply_then_heals(ns: str, shim: Nft) -> None:
    t = NftTable(shim, removals_allowed=True)
    t.set_chain("x", ["counter"])
    t.apply()
    nft(ns, "flush", "chain", "ip", "calico", "x")
    nft(ns, "delete", "chain", "ip", "calico", "x")  # behind the driver's back, no resync asked
    t.set_chain("x", ["counter", "accept"])
    with pytest.raises(NftError, match="No such file or directory"):
        t.apply()  # "flush chain x" on a chain that is gone: the input is fine, the cache is not
    assert t.errors == {}
    st = t.apply()
    assert st.resynced and st.chains_written == 1 and len(rules(ns, "x")) == 2


def test_named_counters(ns: str, shim: Nft) -> None:
    """Counters are created before and deleted after the chains that use them; a chain using a counter that
    is not desired waits; a restart adopts them; read_counters reads them in one call."""
    t = NftTable(shim, removals_allowed=True)
    t.set_chain("c", ['meta l4proto icmp counter name "cali-drop-x" drop'])
    assert t.apply().failed == {"c": "refers to counter cali-drop-x which is not desired"}
    t.set_counter("cali-drop-x")
    assert t.apply().failed == {}
    assert [o["counter"]["name"] for o in listing(ns) if "counter" in o] == ["cali-drop-x"]
    assert t.read_counters() == {"cali-drop-x": (0, 0)}
    # A restart adopts the counter and the chain: nothing is written.
    t2 = NftTable(shim, removals_allowed=True)
    t2.set_counter("cali-drop-x")
    t2.set_chain("c", ['meta l4proto icmp counter name "cali-drop-x" drop'])
    assert t2.apply().commands == 0
    # Removing the counter while the chain still uses it: the chain is kept as it is, the counter too.
    t2.remove_counter("cali-drop-x")
    stats = t2.apply()
    assert "c" in stats.failed and [o for o in listing(ns) if "counter" in o]
    t2.remove_chain("c")
    assert t2.apply().failed == {}
    assert not [o for o in listing(ns) if "counter" in o] and "c" not in chains(ns)
    assert t2.read_counters() == {}
