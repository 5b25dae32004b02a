"""The iptables driver and the IP set driver against the real kernel, for both iptables backends, each
test in its own network namespace. Other programs' rules are added with the iptables command."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Callable

import pytest

from felixpy.dataplane.drivers.iptables import IpSets, IptablesDataplane, IptablesTable
from felixpy.dataplane.drivers.nftables import Rule
from felixpy.dataplane.shims.iptables import Ipset, Iptables, IptablesError

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxipt{os.getpid() % 100000}{secrets.token_hex(2)}"
MASQ = ("-m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst "
        "-j MASQUERADE --random-fully")


@pytest.fixture(params=["legacy", "nft"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ns(make_ns: Callable[[], str]) -> str:
    return make_ns()


def ipt(ns: str, backend: str, *args: str) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}", "-w", *args],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def save(ns: str, backend: str, table: str = "nat") -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}-save", "-t", table],
                         capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if ln.startswith(("-A", ":"))]


def chain_rules(ns: str, backend: str, chain: str) -> list[str]:
    return [ln for ln in save(ns, backend) if ln.startswith(f"-A {chain} ")]


def cali_chains(ns: str, backend: str) -> set[str]:
    return {ln[1:].split()[0] for ln in save(ns, backend) if ln.startswith(":cali-")}


def ipset_names(ns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "ipset", "list", "-n"], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def make(ns: str, backend: str, *, removals: bool = False) -> IptablesDataplane:
    t = IptablesTable("nat", Iptables(backend=backend, netns=f"/run/netns/{ns}"), removals_allowed=removals)
    return IptablesDataplane([t], IpSets(Ipset(netns=f"/run/netns/{ns}"), removals_allowed=removals))


def desire(dp: IptablesDataplane, pools: tuple[str, ...] = ("10.65.0.0/16",)) -> None:
    assert dp.ipsets is not None
    dp.ipsets.set_ipset("cali40masq-ipam-pools", "hash:net", pools)
    dp.ipsets.set_ipset("cali40all-ipam-pools", "hash:net", [*pools, "10.70.0.0/16"])
    nat = dp.table("nat")
    nat.set_chain("cali-nat-outgoing", [Rule(MASQ, "nat outgoing")])
    nat.set_chain("cali-POSTROUTING", ["-j cali-nat-outgoing"])
    nat.set_hooks("POSTROUTING", append=["-j cali-POSTROUTING"])


def cleanup(dp: IptablesDataplane, ns: str, backend: str) -> None:
    """Desire nothing, allow removals: everything of ours must go, nothing else."""
    nat = dp.table("nat")
    for c in nat.chain_names():
        nat.remove_chain(c)
    nat.set_hooks("POSTROUTING")
    assert dp.ipsets is not None
    for name in ("cali40masq-ipam-pools", "cali40all-ipam-pools"):
        dp.ipsets.remove_ipset(name)
    dp.allow_removals()
    dp.apply()
    assert cali_chains(ns, backend) == set()
    assert not any("cali" in ln for ln in save(ns, backend))
    assert not {n for n in ipset_names(ns) if n.startswith("cali")}


def test_apply_then_nothing_then_cleanup(ns: str, backend: str) -> None:
    ipt(ns, backend, "-t", "nat", "-A", "POSTROUTING", "-o", "eth9", "-j", "MASQUERADE")  # kube-proxy-ish
    dp = make(ns, backend)
    desire(dp)
    st = dp.apply()["nat"]
    assert st.transactions == 1 and st.chains_written == 2 and st.hooks_written == 1 and st.failed == {}
    post = chain_rules(ns, backend, "POSTROUTING")
    assert post[0] == "-A POSTROUTING -o eth9 -j MASQUERADE"
    assert re.fullmatch(r'-A POSTROUTING -m comment --comment "?cali:[\w-]{16}"? -j cali-POSTROUTING', post[1])
    [masq] = chain_rules(ns, backend, "cali-nat-outgoing")
    assert "--random-fully" in masq and '"nat outgoing"' in masq and "cali40masq-ipam-pools src" in masq
    assert {"cali40masq-ipam-pools", "cali40all-ipam-pools"} <= ipset_names(ns)
    assert dp.apply()["nat"].transactions == 0
    dp.queue_resync()
    st = dp.apply()["nat"]
    assert st.resynced and st.transactions == 0
    cleanup(dp, ns, backend)
    assert chain_rules(ns, backend, "POSTROUTING") == ["-A POSTROUTING -o eth9 -j MASQUERADE"]


def test_restart_adopts_without_rewriting(ns: str, backend: str) -> None:
    dp = make(ns, backend)
    desire(dp)
    dp.apply()
    before = save(ns, backend)
    again = make(ns, backend)
    desire(again)
    st = again.apply()["nat"]
    assert st.resynced and st.transactions == 0 and st.lines == 0
    assert save(ns, backend) == before
    cleanup(again, ns, backend)


def test_hook_stays_appended_after_the_sync(ns: str, backend: str) -> None:
    dp = make(ns, backend)
    desire(dp)
    dp.apply()
    # Someone appends after our hook: before the sync we leave it, after it we move ours to the end.
    ipt(ns, backend, "-t", "nat", "-A", "POSTROUTING", "-o", "eth8", "-j", "MASQUERADE")
    dp.queue_resync()
    st = dp.apply()["nat"]
    assert st.deferred == 1 and chain_rules(ns, backend, "POSTROUTING")[-1].endswith("-j MASQUERADE")
    dp.allow_removals()
    st = dp.apply()["nat"]
    assert st.hooks_written == 1
    post = chain_rules(ns, backend, "POSTROUTING")
    assert post[0] == "-A POSTROUTING -o eth8 -j MASQUERADE" and post[1].endswith("-j cali-POSTROUTING")
    assert len(post) == 2
    dp.queue_resync()
    assert dp.apply()["nat"].transactions == 0
    cleanup(dp, ns, backend)


def test_drift_is_repaired(ns: str, backend: str) -> None:
    dp = make(ns, backend, removals=True)
    desire(dp)
    dp.apply()
    ipt(ns, backend, "-t", "nat", "-F", "cali-nat-outgoing")
    ipt(ns, backend, "-t", "nat", "-A", "cali-POSTROUTING", "-j", "ACCEPT")  # a foreign rule in our chain
    ipt(ns, backend, "-t", "nat", "-D", "POSTROUTING", "1")  # our hook
    subprocess.run(["ip", "netns", "exec", ns, "ipset", "del", "cali40all-ipam-pools", "10.70.0.0/16"], check=True)
    dp.queue_resync()
    st = dp.apply()["nat"]
    assert st.chains_written == 2 and st.hooks_written == 1
    assert len(chain_rules(ns, backend, "cali-nat-outgoing")) == 1
    assert [r.endswith("-j cali-nat-outgoing") for r in chain_rules(ns, backend, "cali-POSTROUTING")] == [True]
    assert chain_rules(ns, backend, "POSTROUTING")[-1].endswith("-j cali-POSTROUTING")
    out = subprocess.run(["ip", "netns", "exec", ns, "ipset", "save", "cali40all-ipam-pools"], capture_output=True,
                         text=True, check=True).stdout
    assert "add cali40all-ipam-pools 10.70.0.0/16" in out
    dp.queue_resync()
    assert dp.apply()["nat"].transactions == 0
    cleanup(dp, ns, backend)


def test_leftovers_removed_only_after_allow_removals(ns: str, backend: str) -> None:
    # An older Felix: a chain of ours with a hook without hash comment, an old IP set, a stale member.
    ipt(ns, backend, "-t", "nat", "-N", "cali-old")
    ipt(ns, backend, "-t", "nat", "-A", "cali-old", "-j", "RETURN")
    ipt(ns, backend, "-t", "nat", "-I", "POSTROUTING", "-j", "cali-old")
    subprocess.run(["ip", "netns", "exec", ns, "ipset", "restore"], check=True, text=True, input=(
        "create cali40old hash:net family inet\ncreate cali40all-ipam-pools hash:net family inet\n"
        "add cali40all-ipam-pools 10.99.0.0/16\n"))
    dp = make(ns, backend)
    desire(dp)
    st = dp.apply()["nat"]
    assert st.deferred == 2  # the stale chain and the stale hook
    assert "cali-old" in cali_chains(ns, backend) and "cali40old" in ipset_names(ns)
    assert chain_rules(ns, backend, "POSTROUTING")[0] == "-A POSTROUTING -j cali-old"
    members = subprocess.run(["ip", "netns", "exec", ns, "ipset", "save", "cali40all-ipam-pools"],
                             capture_output=True, text=True, check=True).stdout
    assert "10.99.0.0/16" in members and "10.65.0.0/16" in members
    dp.allow_removals()
    st = dp.apply()["nat"]
    assert st.chains_deleted == 1 and st.deferred == 0
    assert cali_chains(ns, backend) == {"cali-POSTROUTING", "cali-nat-outgoing"}
    assert [r.endswith("-j cali-POSTROUTING") for r in chain_rules(ns, backend, "POSTROUTING")] == [True]
    assert "cali40old" not in ipset_names(ns)
    members = subprocess.run(["ip", "netns", "exec", ns, "ipset", "save", "cali40all-ipam-pools"],
                             capture_output=True, text=True, check=True).stdout
    assert "10.99.0.0/16" not in members
    cleanup(dp, ns, backend)


def test_rejected_chain_is_reported_and_the_rest_applied(ns: str, backend: str) -> None:
    dp = make(ns, backend, removals=True)
    desire(dp)
    dp.apply()
    nat = dp.table("nat")
    nat.set_chain("cali-nat-outgoing", ["-m set --match-set cali40nosuch src -j MASQUERADE"])
    nat.set_chain("cali-POSTROUTING", ["-j cali-nat-outgoing", "-j cali-missing"])
    nat.set_chain("cali-extra", ["-j RETURN"])
    st = dp.apply()["nat"]
    assert set(st.failed) == {"cali-nat-outgoing", "cali-POSTROUTING"}
    assert "cali40nosuch" in st.failed["cali-nat-outgoing"] and "not desired" in st.failed["cali-POSTROUTING"]
    assert "cali-extra" in cali_chains(ns, backend)
    assert "cali40masq-ipam-pools" in chain_rules(ns, backend, "cali-nat-outgoing")[0]  # kept as it was
    assert dp.apply()["nat"].transactions == 0
    assert "cali-nat-outgoing" in dp.status()
    desire(dp)
    nat.remove_chain("cali-extra")
    st = dp.apply()["nat"]
    assert st.failed == {} and dp.status() == "" and "cali-extra" not in cali_chains(ns, backend)
    cleanup(dp, ns, backend)


def test_ipset_members_and_type_changes(ns: str, backend: str) -> None:
    sets = IpSets(Ipset(netns=f"/run/netns/{ns}"))
    sets.set_ipset("cali40s", "hash:net", ["10.0.0.0/8", "10.1.0.1"])
    assert sets.apply() == 3
    sets.set_ipset("cali40s", "hash:net", ["10.0.0.0/8", "10.2.0.0/16"])
    assert sets.apply() == 1  # the add; the delete waits for the sync
    sets.allow_removals()
    assert sets.apply() == 1
    sets.set_ipset("cali40s", "hash:ip", ["10.3.0.1"])  # unused set: destroyed and re-created
    sets.apply()
    out = subprocess.run(["ip", "netns", "exec", ns, "ipset", "save", "cali40s"], capture_output=True, text=True,
                         check=True).stdout
    assert "hash:ip" in out and "add cali40s 10.3.0.1" in out and "10.0.0.0/8" not in out
    sets.queue_resync()
    assert sets.apply() == 0
    sets.remove_ipset("cali40s")
    assert sets.apply() == 1 and "cali40s" not in ipset_names(ns)


def test_shim_errors_name_the_line(ns: str, backend: str) -> None:
    shim = Iptables(backend=backend, netns=f"/run/netns/{ns}")
    assert shim.mode() == backend
    with pytest.raises(IptablesError) as e:
        shim.restore("*nat\n:cali-x - [0:0]\n-A cali-x --bogus\nCOMMIT\n")
    assert e.value.line == 3
    assert "cali-x" not in cali_chains(ns, backend)  # all or nothing


def test_a_stale_cache_costs_one_failed_apply_then_heals(ns: str, backend: str) -> None:
    dp = make(ns, backend, removals=True)
    desire(dp)
    dp.apply()
    ipt(ns, backend, "-t", "nat", "-D", "POSTROUTING", "1")  # our hook, behind the driver's back
    dp.table("nat").set_hooks("POSTROUTING", append=["-j cali-POSTROUTING", "-j RETURN"])
    with pytest.raises(IptablesError):
        dp.apply()  # "-D" of a rule that is gone
    st = dp.apply()["nat"]
    assert st.resynced and st.hooks_written == 1 and st.failed == {}
    post = chain_rules(ns, backend, "POSTROUTING")
    assert [p.split("cali:")[1][17:].strip(' "') for p in post] == ["-j cali-POSTROUTING", "-j RETURN"]
    cleanup(dp, ns, backend)


def test_auto_backend_follows_the_host(make_ns: Callable[[], str]) -> None:
    """Felix's auto-detection: kubelet's hint chain wins, else the backend with more rules."""
    legacy_ns, nft_ns = make_ns(), make_ns()
    ipt(legacy_ns, "legacy", "-A", "INPUT", "-j", "ACCEPT")
    ipt(nft_ns, "nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
    assert Iptables(backend="auto", netns=f"/run/netns/{legacy_ns}").backend == "legacy"
    assert Iptables(backend="auto", netns=f"/run/netns/{nft_ns}").backend == "nft"
    assert Iptables(netns=f"/run/netns/{nft_ns}").backend == "system"
