"""Policy calculator: scenarios, Felix-style replays (forward, reversed, split, squashed) and property tests
against a brute-force oracle, with a mock dataplane that checks the ordering contract message by message."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felixpy.calc.policy import WELL_KNOWN_TIERS, LabelIndex, PolicyCalculator, PolicyMessage, missing_profile
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_PASS,
    EGRESS,
    INGRESS,
    KIND_GNP,
    KIND_KNP,
    KIND_NP,
    ActivePolicyRemove,
    ActivePolicyUpdate,
    ActiveProfileRemove,
    ActiveProfileUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    EntityMatch,
    IPNet,
    IPSetDeltaUpdate,
    IPSetRemove,
    IPSetUpdate,
    NetworkSet,
    Policy,
    PolicyKey,
    Profile,
    Rule,
    SetMember,
    Tier,
    TierPolicies,
    selector_set_id,
)
from felixpy.model.selector import parse_selector

# ---------------------------------------------------------------------------------------------------------
# Helpers


def net(text: str) -> IPNet:
    return ipaddress.ip_network(text)


def sid(selector: str) -> str:
    return selector_set_id(parse_selector(selector).text)


def gnp(name: str, selector: str, *, tier: str = "default", order: float | None = None,
        types: tuple[str, ...] = (INGRESS,), src: str = "", dst: str = "", not_src: str = "",
        staged: bool = False) -> Policy:
    rule = Rule(ACTION_ALLOW, source=EntityMatch(selector=src, not_selector=not_src),
                destination=EntityMatch(selector=dst))
    return Policy(key=PolicyKey(KIND_GNP, "", name), tier=tier, order=order, selector=selector, types=types,
                  ingress=(rule,) if INGRESS in types else (), egress=(rule,) if EGRESS in types else (),
                  staged=staged)


def add(inp: Inputs, p: Policy) -> Policy:
    inp.policies[p.key] = p
    return p


def rule_set_ids(rules: Sequence[Rule]) -> set[str]:
    out = set()
    for r in rules:
        for side in (r.source, r.destination):
            for s in (side.selector, side.not_selector):
                if s:
                    out.add(sid(s))
    return out


class Dataplane:
    """Applies messages one at a time and asserts that nothing ever refers to something missing."""

    def __init__(self) -> None:
        self.sets: dict[str, frozenset[SetMember]] = {}
        self.policies: dict[PolicyKey, Policy] = {}
        self.profiles: dict[str, Profile] = {}
        self.endpoints: dict[str, EndpointPolicyUpdate] = {}

    def state(self) -> tuple[Any, ...]:
        return (self.sets, self.policies, self.profiles, self.endpoints)

    def _users_of_set(self, set_id: str) -> list[str]:
        users = [k.id for k, p in self.policies.items() if set_id in rule_set_ids(p.ingress + p.egress)]
        users += [n for n, p in self.profiles.items() if set_id in rule_set_ids(p.ingress + p.egress)]
        return users

    def apply(self, msgs: Sequence[PolicyMessage]) -> None:
        for m in msgs:
            if isinstance(m, IPSetUpdate):
                self.sets[m.set_id] = m.members
            elif isinstance(m, IPSetDeltaUpdate):
                old = self.sets[m.set_id]
                assert m.removed <= old and not (m.added & old) and (m.added or m.removed), m
                self.sets[m.set_id] = (old - m.removed) | m.added
            elif isinstance(m, IPSetRemove):
                assert m.set_id in self.sets
                assert not self._users_of_set(m.set_id), f"set {m.set_id} removed while in use"
                del self.sets[m.set_id]
            elif isinstance(m, ActivePolicyUpdate | ActiveProfileUpdate):
                item = m.policy if isinstance(m, ActivePolicyUpdate) else m.profile
                missing = rule_set_ids(item.ingress + item.egress) - self.sets.keys()
                assert not missing, f"{m} uses missing sets {missing}"
                if isinstance(m, ActivePolicyUpdate):
                    self.policies[m.policy.key] = m.policy
                else:
                    self.profiles[m.profile.name] = m.profile
            elif isinstance(m, ActivePolicyRemove):
                assert m.key in self.policies
                assert not any(m.key in t.ingress + t.egress for e in self.endpoints.values() for t in e.tiers)
                del self.policies[m.key]
            elif isinstance(m, ActiveProfileRemove):
                assert m.name in self.profiles
                assert not any(m.name in e.profiles for e in self.endpoints.values())
                del self.profiles[m.name]
            elif isinstance(m, EndpointPolicyUpdate):
                for t in m.tiers:
                    for k in t.ingress + t.egress:
                        assert k in self.policies, f"{m.endpoint} jumps to inactive {k}"
                for p in m.profiles:
                    assert p in self.profiles, f"{m.endpoint} jumps to inactive profile {p}"
                self.endpoints[m.endpoint] = m
            elif isinstance(m, EndpointPolicyRemove):
                assert m.endpoint in self.endpoints
                del self.endpoints[m.endpoint]
            else:  # pragma: no cover
                raise AssertionError(f"unexpected message {m!r}")


@dataclass(frozen=True)
class Ep:
    local: bool
    labels: tuple[tuple[str, str], ...]
    addrs: tuple[IPNet, ...] = ()
    profiles: tuple[str, ...] = ()
    iface: str = ""


@dataclass
class Inputs:
    eps: dict[str, Ep] = field(default_factory=dict)
    nets: dict[str, NetworkSet] = field(default_factory=dict)
    policies: dict[PolicyKey, Policy] = field(default_factory=dict)
    tiers: dict[str, Tier] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)

    def copy(self) -> Inputs:
        return Inputs(dict(self.eps), dict(self.nets), dict(self.policies), dict(self.tiers), dict(self.profiles))


def oracle(inp: Inputs) -> tuple[Any, ...]:
    """The expected dataplane, computed from scratch the slow, obvious way."""

    def tier_info(name: str) -> tuple[float, str] | None:
        t = inp.tiers.get(name)
        if t is None:
            return WELL_KNOWN_TIERS.get(name)
        known = {"kube-admin": 1000.0, "default": 1e6, "kube-baseline": 1e7}
        order = t.order if t.order is not None else known.get(name, math.inf)
        return order, t.default_action

    local = {k: e for k, e in inp.eps.items() if e.local}
    ep_pols: dict[str, list[Policy]] = {k: [] for k in local}
    active: dict[PolicyKey, Policy] = {}
    for pk, p in inp.policies.items():
        if p.staged or tier_info(p.tier) is None:
            continue
        sel = parse_selector(p.selector)
        for k, e in local.items():
            if sel.matches(dict(e.labels)):
                ep_pols[k].append(p)
                active[pk] = p
    profiles = {n: inp.profiles.get(n, missing_profile(n)) for e in local.values() for n in e.profiles}
    sets: dict[str, frozenset[IPNet]] = {}
    all_rules = [r for p in active.values() for r in p.ingress + p.egress]
    all_rules += [r for pr in profiles.values() for r in pr.ingress + pr.egress]
    for r in all_rules:
        for side in (r.source, r.destination):
            for text in (side.selector, side.not_selector):
                if not text:
                    continue
                sel = parse_selector(text)
                members: set[IPNet] = set()
                for e in inp.eps.values():
                    if sel.matches(dict(e.labels)):
                        members.update(e.addrs)
                for ns in inp.nets.values():
                    if sel.matches(dict(ns.labels)):
                        members.update(ns.nets)
                sets[selector_set_id(sel.text)] = frozenset(members)
    endpoints: dict[str, EndpointPolicyUpdate] = {}
    for k, e in local.items():
        tiers: list[tuple[float, str, TierPolicies]] = []
        for tname in {p.tier for p in ep_pols[k]}:
            info = tier_info(tname)
            assert info is not None
            pols = sorted((p for p in ep_pols[k] if p.tier == tname),
                          key=lambda p: (math.inf if p.order is None else p.order,
                                         f"{p.key.name}/{p.key.namespace}/{p.key.kind}"))
            tiers.append((info[0], tname, TierPolicies(
                tname, info[1], tuple(p.key for p in pols if INGRESS in p.types),
                tuple(p.key for p in pols if EGRESS in p.types))))
        tiers.sort(key=lambda t: (t[0], t[1]))
        endpoints[k] = EndpointPolicyUpdate(k, e.iface, tuple(t[2] for t in tiers), e.profiles)
    return (sets, active, profiles, endpoints)


class Driver:
    """Feeds input snapshots to a calculator as diffs and checks the result against the oracle."""

    def __init__(self, deltas: bool = False) -> None:
        self.calc = PolicyCalculator(ip_set_deltas=deltas)
        self.dp = Dataplane()
        self.cur = Inputs()

    def _ops(self, new: Inputs) -> list[tuple[str, Any, Any]]:
        ops: list[tuple[str, Any, Any]] = []
        for attr in ("tiers", "profiles", "nets", "policies", "eps"):
            old_d: Mapping[Any, Any] = getattr(self.cur, attr)
            new_d: Mapping[Any, Any] = getattr(new, attr)
            for k in sorted(old_d.keys() | new_d.keys(), key=str):
                if old_d.get(k) != new_d.get(k):
                    ops.append((attr, k, new_d.get(k)))
        return ops

    def _do(self, attr: str, k: Any, v: Any) -> None:
        c = self.calc
        if attr == "eps":
            if v is None:
                c.remove_endpoint(k)
            else:
                c.set_endpoint(k, local=v.local, iface=v.iface, labels=dict(v.labels), profiles=v.profiles,
                               addrs=v.addrs)
        else:
            setters: dict[str, Callable[[Any, Any], None]] = {
                "tiers": c.set_tier, "profiles": c.set_profile, "nets": c.set_network_set, "policies": c.set_policy}
            setters[attr](k, v)

    def flush(self) -> list[PolicyMessage]:
        msgs = self.calc.flush()
        self.dp.apply(msgs)
        return msgs

    def goto(self, new: Inputs, *, split: bool = False, reverse_ops: bool = False) -> list[PolicyMessage]:
        ops = self._ops(new)
        if reverse_ops:
            ops.reverse()
        out: list[PolicyMessage] = []
        for op in ops:
            self._do(*op)
            if split:
                out += self.flush()
        out += self.flush()
        self.cur = new.copy()
        assert self.dp.state() == oracle(new)
        assert self.calc.flush() == []  # nothing changed, nothing emitted
        return out


def kinds(msgs: Sequence[PolicyMessage]) -> list[str]:
    return [type(m).__name__ for m in msgs]


# ---------------------------------------------------------------------------------------------------------
# Scenarios

WEB = (("app", "web"), ("projectcalico.org/namespace", "ns1"))
CLIENT = (("app", "client"), ("projectcalico.org/namespace", "ns1"))


def base() -> Inputs:
    inp = Inputs()
    inp.profiles["kns.ns1"] = Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),), egress=(Rule(ACTION_ALLOW),))
    add(inp, gnp("allow-web", "app == 'web'", src="app == 'client'"))
    return inp


def test_policy_selecting_local_endpoint_emits_sets_then_policy_then_endpoint() -> None:
    d = Driver()
    inp = base()
    inp.eps["ns1/web"] = Ep(True, WEB, (net("10.0.0.1/32"),), ("kns.ns1",), "caliweb")
    inp.eps["ns1/client"] = Ep(False, CLIENT, (net("10.0.1.1/32"), net("fd00::1/128")), ("kns.ns1",))
    msgs = d.goto(inp)
    assert kinds(msgs) == ["IPSetUpdate", "ActiveProfileUpdate", "ActivePolicyUpdate", "EndpointPolicyUpdate"]
    assert msgs[0] == IPSetUpdate(sid("app == 'client'"), frozenset({net("10.0.1.1/32"), net("fd00::1/128")}))
    pk = PolicyKey(KIND_GNP, "", "allow-web")
    assert msgs[3] == EndpointPolicyUpdate("ns1/web", "caliweb", (TierPolicies("default", ACTION_DENY, (pk,), ()),),
                                           ("kns.ns1",))


def test_nothing_local_means_nothing_emitted() -> None:
    d = Driver()
    inp = base()
    inp.eps["ns1/client"] = Ep(False, CLIENT, (net("10.0.1.1/32"),), ("kns.ns1",))
    assert d.goto(inp) == []


def test_label_change_moves_endpoint_in_and_out_of_set_and_policy() -> None:
    d = Driver()
    inp = base()
    inp.eps["ns1/web"] = Ep(True, WEB, (net("10.0.0.1/32"),), ("kns.ns1",))
    inp.eps["ns1/x"] = Ep(True, (("app", "other"),), (net("10.0.0.2/32"),), ("kns.ns1",))
    d.goto(inp)
    # x becomes a client: joins the source set; it does not match the policy selector.
    inp.eps["ns1/x"] = replace(inp.eps["ns1/x"], labels=(("app", "client"),))
    msgs = d.goto(inp)
    assert msgs == [IPSetUpdate(sid("app == 'client'"), frozenset({net("10.0.0.2/32")}))]
    # x becomes web: leaves the set, gains the policy.
    inp.eps["ns1/x"] = replace(inp.eps["ns1/x"], labels=(("app", "web"),))
    msgs = d.goto(inp)
    assert kinds(msgs) == ["IPSetUpdate", "EndpointPolicyUpdate"]
    assert msgs[0] == IPSetUpdate(sid("app == 'client'"), frozenset())
    # web stops being web: the policy still applies to x.
    inp.eps["ns1/web"] = replace(inp.eps["ns1/web"], labels=(("app", "db"),))
    assert kinds(d.goto(inp)) == ["EndpointPolicyUpdate"]


def test_remote_endpoint_only_affects_set_membership() -> None:
    d = Driver()
    inp = base()
    inp.eps["ns1/web"] = Ep(True, WEB, (net("10.0.0.1/32"),), ("kns.ns1",))
    d.goto(inp)
    inp.eps["n2/web"] = Ep(False, WEB, (net("10.0.9.1/32"),), ("kns.ns1",))  # remote web: no policy change
    assert d.goto(inp) == []
    inp.eps["n2/client"] = Ep(False, CLIENT, (net("10.0.9.2/32"),), ("kns.ns1",))
    assert d.goto(inp) == [IPSetUpdate(sid("app == 'client'"), frozenset({net("10.0.9.2/32")}))]


def test_removing_last_local_endpoint_deactivates_policy_and_sets_in_reverse_order() -> None:
    d = Driver()
    inp = base()
    inp.eps["ns1/web"] = Ep(True, WEB, (net("10.0.0.1/32"),), ("kns.ns1",))
    inp.eps["n2/client"] = Ep(False, CLIENT, (net("10.0.9.2/32"),), ("kns.ns1",))
    d.goto(inp)
    del inp.eps["ns1/web"]
    msgs = d.goto(inp)
    assert kinds(msgs) == ["EndpointPolicyRemove", "ActivePolicyRemove", "ActiveProfileRemove", "IPSetRemove"]
    assert d.dp.sets == {} and d.dp.policies == {}


def test_tier_ordering_and_policy_ordering() -> None:
    d = Driver()
    inp = Inputs()
    sel = "app == 'web'"
    pols = [gnp("b", sel, order=10), gnp("a", sel, order=10), gnp("z", sel, order=None), gnp("c", sel, order=1),
            gnp("sec1", sel, tier="security"), gnp("adm", sel, tier="kube-admin"),
            gnp("base", sel, tier="kube-baseline", types=(EGRESS,)), gnp("late", sel, tier="zz-late")]
    for p in pols:
        inp.policies[p.key] = p
    inp.tiers["security"] = Tier("security", 100.0, ACTION_PASS)
    inp.tiers["zz-late"] = Tier("zz-late", None)  # no order: after every ordered tier
    inp.eps["w"] = Ep(True, WEB)
    d.goto(inp)
    ep = d.dp.endpoints["w"]
    assert [(t.name, t.default_action) for t in ep.tiers] == [
        ("security", ACTION_PASS), ("kube-admin", ACTION_PASS), ("default", ACTION_DENY),
        ("kube-baseline", ACTION_PASS), ("zz-late", ACTION_DENY)]
    assert [k.name for k in ep.tiers[2].ingress] == ["c", "a", "b", "z"]
    assert ep.tiers[3].ingress == () and [k.name for k in ep.tiers[3].egress] == ["base"]
    # Same order: ties break on "<name>/<namespace>/<kind>".
    t1 = Policy(PolicyKey(KIND_NP, "ns2", "x"), "default", 10, sel, (INGRESS,))
    t2 = Policy(PolicyKey(KIND_KNP, "ns1", "x"), "default", 10, sel, (INGRESS,))
    inp.policies[t1.key] = t1
    inp.policies[t2.key] = t2
    d.goto(inp)
    assert [k.id for k in d.dp.endpoints["w"].tiers[2].ingress] == ["gnp/c", "gnp/a", "gnp/b", "knp/ns1/x",
                                                                   "np/ns2/x", "gnp/z"]
    # Reordering tiers re-sorts endpoints and nothing else.
    inp.tiers["security"] = Tier("security", 1e9, ACTION_PASS)
    msgs = d.goto(inp)
    assert kinds(msgs) == ["EndpointPolicyUpdate"]


def test_policy_in_undefined_tier_waits_for_the_tier() -> None:
    d = Driver()
    inp = Inputs()
    add(inp, gnp("p", "all()", tier="custom", src="app == 'x'"))
    inp.eps["w"] = Ep(True, WEB)
    assert kinds(d.goto(inp)) == ["EndpointPolicyUpdate"]
    assert d.calc.missing_tiers == {"custom"}
    assert d.dp.endpoints["w"].tiers == ()
    inp.tiers["custom"] = Tier("custom", 5.0)
    assert kinds(d.goto(inp)) == ["IPSetUpdate", "ActivePolicyUpdate", "EndpointPolicyUpdate"]
    assert d.calc.missing_tiers == set()
    del inp.tiers["custom"]
    assert kinds(d.goto(inp)) == ["EndpointPolicyUpdate", "ActivePolicyRemove", "IPSetRemove"]


def test_staged_policy_is_never_programmed() -> None:
    d = Driver()
    inp = Inputs()
    p = add(inp, gnp("p", "all()", src="app == 'x'", staged=True))
    inp.eps["w"] = Ep(True, WEB)
    d.goto(inp)
    assert d.dp.policies == {} and d.dp.sets == {} and d.dp.endpoints["w"].tiers == ()
    inp.policies[p.key] = replace(p, staged=False)  # promoted
    assert kinds(d.goto(inp)) == ["IPSetUpdate", "ActivePolicyUpdate", "EndpointPolicyUpdate"]


def test_profile_fallback_and_missing_profile_fails_closed() -> None:
    d = Driver()
    inp = Inputs()
    prof = Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW, source=EntityMatch(selector="role == 'x'")),))
    inp.profiles[prof.name] = prof
    inp.eps["w"] = Ep(True, WEB, profiles=("kns.ns1", "ksa.ns1.default"), iface="cali1")
    msgs = d.goto(inp)
    assert kinds(msgs) == ["IPSetUpdate", "ActiveProfileUpdate", "ActiveProfileUpdate", "EndpointPolicyUpdate"]
    assert msgs[-1] == EndpointPolicyUpdate("w", "cali1", (), ("kns.ns1", "ksa.ns1.default"))
    assert d.dp.profiles["ksa.ns1.default"] == missing_profile("ksa.ns1.default")
    inp.profiles["ksa.ns1.default"] = Profile("ksa.ns1.default")
    assert d.goto(inp) == [ActiveProfileUpdate(Profile("ksa.ns1.default"))]


def test_network_sets_and_not_selector_join_sets() -> None:
    d = Driver()
    inp = Inputs()
    add(inp, gnp("p", "all()", src="role == 'db'", not_src="env == 'prod'"))
    inp.eps["w"] = Ep(True, WEB)
    inp.nets["gns/db"] = NetworkSet("", "db", (("role", "db"),), (net("192.168.0.0/24"), net("fd10::/64")))
    inp.nets["ns1/prod"] = NetworkSet("ns1", "prod", (("env", "prod"),), (net("172.16.0.0/12"),))
    d.goto(inp)
    assert d.dp.sets == {sid("role == 'db'"): frozenset({net("192.168.0.0/24"), net("fd10::/64")}),
                         sid("env == 'prod'"): frozenset({net("172.16.0.0/12")})}
    inp.nets["gns/db"] = replace(inp.nets["gns/db"], nets=(net("192.168.1.0/24"),))
    assert d.goto(inp) == [IPSetUpdate(sid("role == 'db'"), frozenset({net("192.168.1.0/24")}))]


def test_shared_address_and_deltas() -> None:
    d = Driver(deltas=True)
    inp = Inputs()
    add(inp, gnp("p", "all()", src="has(app)"))
    inp.eps["w"] = Ep(True, WEB, (net("10.0.0.1/32"),))
    inp.eps["r"] = Ep(False, CLIENT, (net("10.0.0.1/32"),))  # same address twice (e.g. a stale endpoint)
    assert d.goto(inp)[0] == IPSetUpdate(sid("has(app)"), frozenset({net("10.0.0.1/32")}))
    del inp.eps["r"]
    assert d.goto(inp) == []  # still a member through w
    inp.eps["r2"] = Ep(False, CLIENT, (net("10.0.0.3/32"),))
    inp.eps["w"] = replace(inp.eps["w"], addrs=(net("10.0.0.2/32"),))
    assert d.goto(inp) == [IPSetDeltaUpdate(sid("has(app)"), added=frozenset({net("10.0.0.2/32"), net("10.0.0.3/32")}),
                                            removed=frozenset({net("10.0.0.1/32")}))]


def test_policy_change_swaps_sets_after_the_policy_update() -> None:
    d = Driver()
    inp = Inputs()
    p = add(inp, gnp("p", "all()", src="app == 'a'"))
    inp.eps["w"] = Ep(True, WEB)
    d.goto(inp)
    inp.policies[p.key] = gnp("p", "all()", src="app == 'b'")
    msgs = d.goto(inp)
    assert kinds(msgs) == ["IPSetUpdate", "ActivePolicyUpdate", "IPSetRemove"]
    assert msgs[2] == IPSetRemove(sid("app == 'a'"))


def test_endpoint_moving_between_policies_keeps_references_valid() -> None:
    d = Driver()
    inp = Inputs()
    add(inp, gnp("p1", "app == 'web'", src="x == '1'"))
    add(inp, gnp("p2", "app == 'db'", src="x == '2'"))
    inp.eps["w"] = Ep(True, WEB)
    d.goto(inp)
    inp.eps["w"] = replace(inp.eps["w"], labels=(("app", "db"),))
    msgs = d.goto(inp)
    assert kinds(msgs) == ["IPSetUpdate", "ActivePolicyUpdate", "EndpointPolicyUpdate", "ActivePolicyRemove",
                           "IPSetRemove"]


def test_local_endpoint_becomes_remote() -> None:
    d = Driver()
    inp = base()
    inp.eps["w"] = Ep(True, WEB, (net("10.0.0.1/32"),), ("kns.ns1",))
    d.goto(inp)
    inp.eps["w"] = replace(inp.eps["w"], local=False)
    assert kinds(d.goto(inp)) == ["EndpointPolicyRemove", "ActivePolicyRemove", "ActiveProfileRemove",
                                  "IPSetRemove"]
    inp.eps["w"] = replace(inp.eps["w"], local=True, iface="caliw")
    assert kinds(d.goto(inp)) == ["IPSetUpdate", "ActiveProfileUpdate", "ActivePolicyUpdate",
                                  "EndpointPolicyUpdate"]


def test_invalid_selector_is_counted_and_skipped() -> None:
    d = Driver()
    calc = d.calc
    bad = gnp("bad", "app == ", src="")
    calc.set_policy(bad.key, bad)
    calc.set_endpoint("w", local=True, iface="", labels={"app": "web"}, profiles=(), addrs=())
    msgs = calc.flush()
    assert calc.invalid_inputs == 1
    assert kinds(msgs) == ["EndpointPolicyUpdate"] and msgs[0] == EndpointPolicyUpdate("w", "", (), ())
    bad_rule = gnp("bad2", "all()", src="has(")
    calc.set_policy(bad_rule.key, bad_rule)
    assert calc.flush() == [] and calc.invalid_inputs == 2


# ---------------------------------------------------------------------------------------------------------
# Felix-style replay: a list of states visited forward, reversed, one key per flush, and squashed.


def states() -> list[Inputs]:
    s: list[Inputs] = []
    a = base()
    a.eps["ns1/web"] = Ep(True, WEB, (net("10.0.0.1/32"),), ("kns.ns1",), "caliweb")
    s.append(a.copy())
    a.eps["n2/client"] = Ep(False, CLIENT, (net("10.0.9.2/32"),), ("kns.ns1",))
    a.nets["gns/ext"] = NetworkSet("", "ext", (("app", "client"),), (net("203.0.113.0/24"),))
    s.append(a.copy())
    a.tiers["sec"] = Tier("sec", 10.0, ACTION_PASS)
    add(a, gnp("deny-db", "has(app)", tier="sec", types=(INGRESS, EGRESS), dst="app == 'db'"))
    a.eps["ns1/db"] = Ep(True, (("app", "db"),), (net("10.0.0.3/32"),), ("kns.ns1", "ksa.ns1.db"))
    s.append(a.copy())
    a.eps["ns1/web"] = replace(a.eps["ns1/web"], labels=CLIENT)
    add(a, gnp("staged", "all()", staged=True, src="app == 'web'"))
    s.append(a.copy())
    del a.eps["ns1/db"]
    a.tiers["sec"] = Tier("sec", None, ACTION_DENY)
    s.append(a.copy())
    s.append(Inputs())
    return s


@pytest.mark.parametrize("deltas", [False, True])
@pytest.mark.parametrize("mode", ["forward", "reversed", "split", "reversed-ops", "squashed"])
def test_replay(mode: str, deltas: bool) -> None:
    seq = states()
    if mode == "reversed":
        seq = seq[::-1]
    if mode == "squashed":
        # From empty straight to each state, one fresh calculator each.
        for st_ in seq:
            Driver(deltas).goto(st_)
        return
    d = Driver(deltas)
    for st_ in seq:
        d.goto(st_, split=mode == "split", reverse_ops=mode == "reversed-ops")


# ---------------------------------------------------------------------------------------------------------
# Property test: random inputs and flush points against the oracle.

SELECTORS = ["all()", "app == 'a'", "app == 'b'", "has(app)", "!has(app)", "app != 'a'", "app in {'a', 'b'}",
             "env == 'x' && app == 'a'", "env == 'x' || app == 'b'", "app starts with 'a'", "!(env == 'x')"]
LABELS = st.dictionaries(st.sampled_from(["app", "env"]), st.sampled_from(["a", "b", "x"]), max_size=2).map(
    lambda d: tuple(sorted(d.items())))
ADDRS = st.lists(st.sampled_from([net(f"10.0.0.{i}/32") for i in range(4)] + [net("fd00::1/128")]),
                 max_size=2).map(tuple)


def _policy(name: str, data: Any) -> Policy:
    types = data[3]
    rules = tuple(Rule(ACTION_ALLOW, source=EntityMatch(selector=s, not_selector=n)) for s, n in data[4])
    return Policy(PolicyKey(KIND_GNP, "", name), tier=data[0], order=data[1], selector=data[2], types=types,
                  ingress=rules if INGRESS in types else (), egress=rules if EGRESS in types else (),
                  staged=data[5])


OPS = st.one_of(
    st.tuples(st.just("eps"), st.sampled_from(["e0", "e1", "e2", "e3"]),
              st.none() | st.builds(Ep, st.booleans(), LABELS, ADDRS,
                                    st.lists(st.sampled_from(["pa", "pb"]), max_size=2, unique=True).map(tuple),
                                    st.sampled_from(["", "cali1"]))),
    st.tuples(st.just("nets"), st.sampled_from(["n0", "n1"]),
              st.none() | st.builds(lambda lab, nets: NetworkSet("", "n", lab, nets), LABELS,
                                    st.lists(st.sampled_from([net("192.168.0.0/24"), net("10.0.0.1/32")]),
                                             max_size=2).map(tuple))),
    st.tuples(st.just("policies"), st.sampled_from(["p0", "p1", "p2"]),
              st.none() | st.tuples(st.sampled_from(["default", "t1", "t2", "kube-admin"]),
                                    st.sampled_from([None, 1.0, 2.0]), st.sampled_from(SELECTORS),
                                    st.sampled_from([(INGRESS,), (EGRESS,), (INGRESS, EGRESS)]),
                                    st.lists(st.tuples(st.sampled_from(["", *SELECTORS]),
                                                       st.sampled_from(["", *SELECTORS])), max_size=2),
                                    st.booleans())),
    st.tuples(st.just("tiers"), st.sampled_from(["t1", "default"]),
              st.none() | st.tuples(st.sampled_from([None, 5.0, 2e6]), st.sampled_from([ACTION_DENY, ACTION_PASS]))),
    st.tuples(st.just("profiles"), st.sampled_from(["pa", "pb"]),
              st.none() | st.lists(st.sampled_from(SELECTORS), max_size=2)),
)


def _materialise(op: tuple[str, str, Any]) -> tuple[str, Any, Any]:
    attr, name, v = op
    if v is None:
        key: Any = PolicyKey(KIND_GNP, "", name) if attr == "policies" else name
        return attr, key, None
    if attr == "policies":
        p = _policy(name, v)
        return attr, p.key, p
    if attr == "tiers":
        return attr, name, Tier(name, v[0], v[1])
    if attr == "profiles":
        rules = tuple(Rule(ACTION_ALLOW, destination=EntityMatch(selector=s)) for s in v)
        return attr, name, Profile(name, ingress=rules)
    return attr, name, v


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(OPS, st.booleans()), max_size=30), st.booleans())
def test_random_sequences_match_oracle(steps: list[tuple[tuple[str, str, Any], bool]], deltas: bool) -> None:
    d = Driver(deltas)
    inp = Inputs()
    for op, flush_now in steps:
        attr, key, value = _materialise(op)
        target: dict[Any, Any] = getattr(inp, attr)
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
        d._do(attr, key, value)
        if flush_now:
            d.flush()
            assert d.dp.state() == oracle(inp)
    d.flush()
    assert d.dp.state() == oracle(inp)
    assert d.calc.flush() == []
    # Squashed: a fresh calculator fed only the final state ends in the same place.
    fresh = Driver(deltas)
    fresh.goto(inp)
    assert fresh.dp.state() == d.dp.state()


# ---------------------------------------------------------------------------------------------------------
# Label index


def test_label_index_only_evaluates_affected_selectors() -> None:
    calls: list[tuple[str, str, bool]] = []
    idx: LabelIndex[str] = LabelIndex(lambda s, i, m: calls.append((s.text, i, m)))
    evaluated: list[str] = []

    sels = [parse_selector(t) for t in ("app == 'a'", "env == 'x'", "!has(app)", "all()")]
    for s in sels:
        idx.add_selector(s)
    idx.set_item("i", {"app": "a"})
    assert sorted(c[0] for c in calls) == sorted(['all()', 'app == "a"'])
    calls.clear()
    # Wrap the env selector's matcher to prove a change of "app" never evaluates it.
    env = sels[1]
    original = env.matches

    def counting(labels: Mapping[str, str]) -> bool:
        evaluated.append("env")
        return original(labels)

    try:
        env.matches = counting
        idx.set_item("i", {"app": "b"})
        idx.set_item("i", {})
    finally:
        env.matches = original
    assert evaluated == []
    assert calls == [('app == "a"', "i", False), ("!has(app)", "i", True)]
    calls.clear()
    idx.remove_item("i")
    assert sorted(calls) == sorted([("!has(app)", "i", False), ("all()", "i", False)])
    assert idx.matches(sels[3]) == frozenset()


def test_scale_1000_endpoints_200_policies() -> None:
    """Correctness at scale (the speed is measured by hand / in bench, never asserted here)."""
    calc = PolicyCalculator()
    for i in range(200):
        ns = f"ns{i % 20}"
        p = Policy(PolicyKey(KIND_NP, ns, f"p{i}"), "default", float(i % 7),
                   f"projectcalico.org/namespace == '{ns}' && app == 'app{i % 10}'", (INGRESS, EGRESS),
                   ingress=(Rule(ACTION_ALLOW, source=EntityMatch(
                       selector=f"projectcalico.org/namespace == '{ns}' && role == 'r{i % 5}'")),),
                   egress=(Rule(ACTION_ALLOW, destination=EntityMatch(selector=f"app == 'app{i % 13}'")),))
        calc.set_policy(p.key, p)
    for i in range(1000):
        calc.set_endpoint(f"ns{i % 20}/pod{i}", local=i % 10 == 0, iface=f"cali{i}",
                          labels={"projectcalico.org/namespace": f"ns{i % 20}", "app": f"app{i % 10}",
                                  "role": f"r{i % 5}"},
                          profiles=(f"kns.ns{i % 20}",), addrs=(ipaddress.ip_network(f"10.1.{i // 250}.{i % 250}/32"),))
    msgs = calc.flush()
    eps = [m for m in msgs if isinstance(m, EndpointPolicyUpdate)]
    assert len(eps) == 100
    assert sum(len(t.ingress) for m in eps for t in m.tiers) > 0
    # One label change touches one endpoint's policies and the sets it belongs to, nothing else.
    calc.set_endpoint("ns0/pod0", local=True, iface="cali0",
                      labels={"projectcalico.org/namespace": "ns0", "app": "app1", "role": "r0"},
                      profiles=("kns.ns0",), addrs=(ipaddress.ip_network("10.1.0.0/32"),))
    msgs = calc.flush()
    assert {type(m) for m in msgs} <= {IPSetUpdate, ActivePolicyUpdate, ActivePolicyRemove, EndpointPolicyUpdate,
                                       IPSetRemove}
    assert [m.endpoint for m in msgs if isinstance(m, EndpointPolicyUpdate)] == ["ns0/pod0"]
