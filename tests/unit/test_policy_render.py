"""Policy rendering (pure) and the policy manager's desired state, plus ``nft -c`` (check mode) of whole
rendered rulesets in a throwaway network namespace (root only)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from felixpy.calc.messages import IPPoolUpdate
from felixpy.dataplane.drivers.nftables import NftTable
from felixpy.dataplane.masq_mgr import MasqManager
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.policy_render import (
    CHAIN_BASE_FORWARD,
    CHAIN_FORWARD,
    CHAIN_FROM_WL_DISPATCH,
    CHAIN_WL_TO_HOST,
    DEFAULT_OPTIONS,
    END_OF_TIER,
    MAP_FROM_WL_DISPATCH,
    MAP_TO_WL_DISPATCH,
    MAX_CHAIN_NAME,
    NO_PROFILE,
    DropKey,
    PolicyRenderError,
    RenderOptions,
    dispatch_elements,
    drop_counter_name,
    drop_log_prefix,
    endpoint_chain_name,
    nft_set_name,
    policy_chain_name,
    profile_chain_name,
    render_endpoint_chain,
    render_policy_chain,
    render_profile_chain,
    render_rule,
    rule_set_ids,
    set_id_for_selector,
    static_chains,
)
from felixpy.dataplane.shims.nft import Nft, NftError
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_LOG,
    ACTION_PASS,
    EGRESS,
    INGRESS,
    KIND_GNP,
    KIND_KNP,
    KIND_NP,
    ActivePolicyRemove,
    ActivePolicyUpdate,
    ActiveProfileUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    EntityMatch,
    IPSetDeltaUpdate,
    IPSetRemove,
    IPSetUpdate,
    Policy,
    PolicyKey,
    PortRange,
    Profile,
    Rule,
    TierPolicies,
    named_port_set_id,
    selector_set_id,
)
from felixpy.model.selector import parse_selector

N = ipaddress.ip_network
V6 = RenderOptions(ip_version=6)
A = "0x00010000"
P = "0x00020000"
ALLOW = f"meta mark set meta mark | {A} return"
KEY = PolicyKey(KIND_KNP, "ns1", "allow-web")
SEL = 'app == "client" && projectcalico.org/namespace == "ns1"'
SET4 = nft_set_name(selector_set_id(parse_selector(SEL).text), 4)


D = "0x00040000"
DENY = f"meta mark set meta mark | {D} return"


def one(rule: Rule, direction: str = INGRESS, opts: RenderOptions = DEFAULT_OPTIONS) -> str:
    """The one rule a policy rule renders to; a Deny's mark-and-return (see test_actions) reads "drop"."""
    out = render_rule(rule, direction, opts)
    assert len(out) == 1, out
    if rule.action == ACTION_DENY:
        assert out[0].endswith(DENY), out
        return (out[0].removesuffix(DENY) + "drop").strip()
    return out[0]


# -- names ------------------------------------------------------------------------------------------
def test_chain_names_readable() -> None:
    assert policy_chain_name(KEY, INGRESS) == "filter-cali-pi-knp/ns1/allow-web"
    assert policy_chain_name(PolicyKey(KIND_GNP, "", "deny-all"), EGRESS) == "filter-cali-po-gnp/deny-all"
    assert profile_chain_name("kns.default", INGRESS) == "filter-cali-pri-kns.default"
    assert profile_chain_name("ksa.ns1.default", EGRESS) == "filter-cali-pro-ksa.ns1.default"
    assert endpoint_chain_name("calic440f455693", INGRESS) == "filter-cali-tw-calic440f455693"
    assert endpoint_chain_name("calic440f455693", EGRESS) == "filter-cali-fw-calic440f455693"


def test_long_or_odd_names_are_hashed_distinctly() -> None:
    long_a = PolicyKey(KIND_NP, "ns", "x" * 200)
    long_b = PolicyKey(KIND_NP, "ns", "x" * 199 + "y")
    a, b = policy_chain_name(long_a, INGRESS), policy_chain_name(long_b, INGRESS)
    assert a != b and len(a) == MAX_CHAIN_NAME and len(b) == MAX_CHAIN_NAME
    assert a.startswith("filter-cali-pi-np/ns/xxx") and "_" in a
    odd = profile_chain_name("weird:name", INGRESS)
    assert odd.startswith("filter-cali-pri-weird.name_") and ":" not in odd
    with pytest.raises(PolicyRenderError):
        endpoint_chain_name("bad iface", INGRESS)
    with pytest.raises(PolicyRenderError):
        policy_chain_name(KEY, "sideways")


def test_set_names() -> None:
    sid = selector_set_id("a")
    assert nft_set_name(sid, 4) == "cali40s-" + sid[2:]
    assert nft_set_name(sid, 6).startswith("cali60s-")
    assert set_id_for_selector("app=='client'") == selector_set_id(parse_selector("app=='client'").text)
    for bad in ("masq-ipam-pools", "s:", "s:a b", ""):
        with pytest.raises(PolicyRenderError):
            nft_set_name(bad, 4)
    with pytest.raises(PolicyRenderError):
        set_id_for_selector("app ==")


# -- one rule: every field ----------------------------------------------------------------------------
def test_actions() -> None:
    assert one(Rule(ACTION_ALLOW)) == ALLOW
    assert one(Rule(ACTION_PASS)) == f"meta mark set meta mark | {P} return"
    assert one(Rule(ACTION_DENY)) == "drop"
    assert one(Rule(ACTION_LOG)) == 'log prefix "calico-packet: " level notice'
    with pytest.raises(PolicyRenderError):
        render_rule(Rule("Accept"), INGRESS)


def test_protocols() -> None:
    assert one(Rule(ACTION_ALLOW, protocol="TCP")) == f"meta l4proto tcp {ALLOW}"
    assert one(Rule(ACTION_ALLOW, protocol="UDPLite")) == f"meta l4proto udplite {ALLOW}"
    assert one(Rule(ACTION_ALLOW, protocol="47")) == f"meta l4proto 47 {ALLOW}"
    assert one(Rule(ACTION_DENY, not_protocol="UDP")) == "meta l4proto != udp drop"
    assert one(Rule(ACTION_DENY, protocol="ICMPv6"), opts=V6) == "meta l4proto ipv6-icmp drop"
    # ICMP is IPv4 only, ICMPv6 IPv6 only.
    assert render_rule(Rule(ACTION_DENY, protocol="ICMP"), INGRESS, V6) == []
    assert render_rule(Rule(ACTION_DENY, protocol="ICMPv6"), INGRESS) == []
    for bad in ("300", "bogus", ""):
        with pytest.raises(PolicyRenderError):
            render_rule(Rule(ACTION_ALLOW, protocol=bad), INGRESS)


def test_ip_version() -> None:
    assert render_rule(Rule(ACTION_ALLOW, ip_version=6), INGRESS) == []
    assert one(Rule(ACTION_ALLOW, ip_version=6), opts=V6) == ALLOW
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, ip_version=5), INGRESS)


def test_nets_and_not_nets() -> None:
    r = Rule(ACTION_ALLOW, source=EntityMatch(nets=(N("10.0.0.0/8"),)),
             destination=EntityMatch(nets=(N("192.168.1.0/24"), N("192.168.0.0/24"), N("192.168.1.5/32"))))
    assert one(r) == f"ip saddr 10.0.0.0/8 ip daddr 192.168.0.0/23 {ALLOW}"  # collapsed
    r = Rule(ACTION_ALLOW, source=EntityMatch(not_nets=(N("10.1.0.0/16"), N("10.3.0.0/16"), N("fd00::/8"))))
    assert one(r) == f"ip saddr != {{ 10.1.0.0/16, 10.3.0.0/16 }} {ALLOW}"
    # Only other-version nets: the rule cannot match here; other-version not-nets just vanish.
    assert render_rule(Rule(ACTION_ALLOW, source=EntityMatch(nets=(N("fd00::/8"),))), INGRESS) == []
    assert one(Rule(ACTION_ALLOW, source=EntityMatch(not_nets=(N("10.0.0.0/8"),))), opts=V6) == ALLOW
    assert one(Rule(ACTION_ALLOW, destination=EntityMatch(nets=(N("fd00::/8"),))), opts=V6) == \
        f"ip6 daddr fd00::/8 {ALLOW}"


def test_selectors() -> None:
    r = Rule(ACTION_ALLOW, source=EntityMatch(selector=SEL), destination=EntityMatch(not_selector="role == 'db'"))
    other = nft_set_name(selector_set_id(parse_selector("role == 'db'").text), 4)
    assert one(r) == f"ip saddr @{SET4} ip daddr != @{other} {ALLOW}"
    assert one(r, EGRESS) == one(r, INGRESS)  # source/destination are the packet's in both directions
    v6 = one(r, opts=V6)
    assert f"ip6 saddr @{SET4.replace('cali40', 'cali60')}" in v6


def test_ports() -> None:
    r = Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(
        ports=(PortRange(8000, 8080), PortRange(80, 80), PortRange(8050, 8100), PortRange(8101, 8101))))
    assert one(r) == f"meta l4proto tcp th dport {{ 80, 8000-8101 }} {ALLOW}"
    r = Rule(ACTION_DENY, protocol="UDP", source=EntityMatch(ports=(PortRange(53, 53),),
                                                             not_ports=(PortRange(1, 1023),)))
    assert one(r) == "meta l4proto udp th sport 53 th sport != 1-1023 drop"
    with pytest.raises(PolicyRenderError, match="ports need protocol"):
        render_rule(Rule(ACTION_ALLOW, destination=EntityMatch(ports=(PortRange(80, 80),))), INGRESS)
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=(PortRange(9, 8),))), INGRESS)
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, protocol="TCP",
                         destination=EntityMatch(ports=(PortRange(1, 70000),))), INGRESS)


def _nps(selector: str, name: str, proto: str = "tcp", v: int = 4) -> str:
    return nft_set_name(named_port_set_id(parse_selector(selector).text, proto, name), v)


def test_named_ports_use_named_port_sets() -> None:
    only_named = EntityMatch(ports=("http",))
    http_all = _nps("all()", "http")
    assert http_all.startswith("cali40n-")
    assert one(Rule(ACTION_ALLOW, protocol="TCP", destination=only_named)) == \
        f"meta l4proto tcp ip daddr . meta l4proto . th dport @{http_all} {ALLOW}"
    # The set is filtered by the side's selector; UDP rules look up UDP ports; source ports use sport.
    assert one(Rule(ACTION_ALLOW, protocol="UDP", source=EntityMatch(selector=SEL, ports=("dns",)))) == \
        f"meta l4proto udp ip saddr @{SET4} ip saddr . meta l4proto . th sport @{_nps(SEL, 'dns', 'udp')} {ALLOW}"
    # Numeric and named ports are alternatives: one rule each.
    mixed = EntityMatch(ports=(PortRange(80, 80), "http", "web"))
    assert render_rule(Rule(ACTION_ALLOW, protocol="TCP", destination=mixed), INGRESS) == [
        f"meta l4proto tcp th dport 80 {ALLOW}",
        f"meta l4proto tcp ip daddr . meta l4proto . th dport @{http_all} {ALLOW}",
        f"meta l4proto tcp ip daddr . meta l4proto . th dport @{_nps('all()', 'web')} {ALLOW}"]
    # Two sides with alternatives: every combination.
    both = Rule(ACTION_DENY, protocol="TCP", source=EntityMatch(ports=(PortRange(1, 2), "a")), destination=mixed)
    assert len(render_rule(both, INGRESS)) == 6
    # Negated named ports exclude (filtered by the positive selector, as in Calico).
    assert one(Rule(ACTION_DENY, protocol="TCP", destination=EntityMatch(
        selector=SEL, not_ports=("http", PortRange(22, 22))))) == \
        f"meta l4proto tcp ip daddr @{SET4} th dport != 22 " \
        f"ip daddr . meta l4proto . th dport != @{_nps(SEL, 'http')} drop"
    assert one(Rule(ACTION_ALLOW, protocol="TCP", destination=only_named), opts=V6) == \
        f"meta l4proto tcp ip6 daddr . meta l4proto . th dport @{_nps('all()', 'http', v=6)} {ALLOW}"
    # The sets a rule needs include its named-port sets.
    r = Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(selector=SEL, ports=("http",)))
    assert rule_set_ids(r) == {selector_set_id(parse_selector(SEL).text),
                               named_port_set_id(parse_selector(SEL).text, "tcp", "http")}


def test_icmp() -> None:
    assert one(Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=8)) == f"meta l4proto icmp icmp type 8 {ALLOW}"
    assert one(Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=3, icmp_code=4)) == \
        f"meta l4proto icmp icmp type 3 icmp code 4 {ALLOW}"
    assert one(Rule(ACTION_DENY, protocol="ICMP", not_icmp_type=0)) == "meta l4proto icmp icmp type != 0 drop"
    assert one(Rule(ACTION_DENY, protocol="ICMP", not_icmp_type=3, not_icmp_code=1)) == \
        "meta l4proto icmp icmp type . icmp code != { 3 . 1 } drop"
    assert one(Rule(ACTION_ALLOW, protocol="ICMPv6", icmp_type=128), opts=V6) == \
        f"meta l4proto ipv6-icmp icmpv6 type 128 {ALLOW}"
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, protocol="TCP", icmp_type=8), INGRESS)
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, protocol="ICMP", icmp_code=1), INGRESS)
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=256), INGRESS)


def test_everything_together_in_calico_order() -> None:
    r = Rule(ACTION_ALLOW, protocol="TCP", not_protocol="UDP",
             source=EntityMatch(nets=(N("10.0.0.0/8"),), selector=SEL, ports=(PortRange(1024, 65535),),
                                not_nets=(N("10.9.0.0/16"),), not_selector="x == 'y'"),
             destination=EntityMatch(nets=(N("10.65.0.0/16"),), ports=(PortRange(443, 443),),
                                     not_ports=(PortRange(444, 444),)))
    xset = nft_set_name(selector_set_id(parse_selector("x == 'y'").text), 4)
    assert one(r) == (f"meta l4proto tcp ip saddr 10.0.0.0/8 ip saddr @{SET4} th sport 1024-65535 "
                      f"ip daddr 10.65.0.0/16 th dport 443 meta l4proto != udp ip saddr != 10.9.0.0/16 "
                      f"ip saddr != @{xset} th dport != 444 {ALLOW}")


# -- chains -------------------------------------------------------------------------------------------
def test_policy_chain_comments() -> None:
    pol = Policy(KEY, "default", 1000, "app == 'web'", (INGRESS,), ingress=(
        Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(selector=SEL),
             destination=EntityMatch(ports=(PortRange(80, 80),)), metadata=(("owner", 'te"am'),)),
        Rule(ACTION_DENY, ip_version=6),  # not rendered in v4: the header goes on the first real rule
        Rule(ACTION_DENY)))
    rules = render_policy_chain(pol, INGRESS)
    assert [r.text for r in rules] == [f"meta l4proto tcp ip saddr @{SET4} th dport 80 {ALLOW}", DENY]
    assert rules[0].comment == "KubernetesNetworkPolicy ns1/allow-web ingress; owner=te am"
    assert rules[1].comment == ""
    assert render_policy_chain(pol, EGRESS) == []
    g = render_profile_chain(Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),)), INGRESS)
    assert g[0].comment == "Profile kns.ns1 ingress"
    long = render_policy_chain(Policy(PolicyKey(KIND_GNP, "", "n" * 300), "default", None, "", (INGRESS,),
                                      ingress=(Rule(ACTION_DENY),)), INGRESS)
    assert len(long[0].comment.encode()) <= 100


def ep(tiers: tuple[TierPolicies, ...], profiles: tuple[str, ...] = ("kns.ns1",)) -> EndpointPolicyUpdate:
    return EndpointPolicyUpdate("ns1/pod-a", "calia", tiers, profiles)


def test_endpoint_chain_golden() -> None:
    k2 = PolicyKey(KIND_GNP, "", "baseline")
    tiers = (TierPolicies("security", "Pass", ingress=(k2,), egress=()),
             TierPolicies("default", "Deny", ingress=(KEY,), egress=(KEY,)))
    drops: dict[str, DropKey] = {}
    got = [(r.text, r.comment) for r in render_endpoint_chain(ep(tiers), INGRESS, drops=drops)]
    c_base, c_web = ctr("security", "gnp/baseline"), ctr("default", "knp/ns1/allow-web")
    c_eot, c_prof, c_end = ctr("default", END_OF_TIER), ctr("", "profile/kns.ns1"), ctr("", NO_PROFILE)
    on_d = f"meta mark & {D} == {D}"
    assert got == [
        ("ct state established,related accept", ""),
        ("ct state invalid drop", ""),
        ("meta mark set meta mark & 0xfff8ffff", ""),
        ("meta mark set meta mark & 0xfffdffff", "Start of tier security"),
        (f"meta mark & {P} == 0 jump filter-cali-pi-gnp/baseline", ""),
        (f'{on_d} counter name "{c_base}" drop', "Drop if policy gnp/baseline denied"),
        (f"meta mark & {A} == {A} return", "Return if policy accepted"),
        ("meta mark set meta mark & 0xfffdffff", "Start of tier default"),
        (f"meta mark & {P} == 0 jump filter-cali-pi-knp/ns1/allow-web", ""),
        (f'{on_d} counter name "{c_web}" drop', "Drop if policy knp/ns1/allow-web denied"),
        (f"meta mark & {A} == {A} return", "Return if policy accepted"),
        (f'meta mark & {P} == 0 counter name "{c_eot}" drop',
         "End of tier default. Drop if no policies passed packet"),
        ("jump filter-cali-pri-kns.ns1", ""),
        (f'{on_d} counter name "{c_prof}" drop', "Drop if profile kns.ns1 denied"),
        (f"meta mark & {A} == {A} return", "Return if profile accepted"),
        (f'counter name "{c_end}" drop', "Drop if no profiles matched"),
    ]
    assert drops == {c_base: ("security", "gnp/baseline", "ingress"),
                     c_web: ("default", "knp/ns1/allow-web", "ingress"), c_eot: ("default", END_OF_TIER, "ingress"),
                     c_prof: ("", "profile/kns.ns1", "ingress"),
                     c_end: ("", NO_PROFILE, "ingress")}
    egress = [r.text for r in render_endpoint_chain(ep(tiers), EGRESS)]
    assert egress[3:5] == ["udp dport 4789 drop", "meta l4proto 4 drop"]
    assert "jump filter-cali-po-knp/ns1/allow-web" in egress[6]
    assert f'counter name "{ctr("default", "knp/ns1/allow-web", "egress")}" drop' in egress[7]
    assert not any("security" in r.comment for r in render_endpoint_chain(ep(tiers), EGRESS))
    opts = RenderOptions(allow_vxlan_from_workloads=True, allow_ipip_from_workloads=True, drop_invalid=False)
    assert [r.text for r in render_endpoint_chain(ep(()), EGRESS, opts)] == [
        "ct state established,related accept", "meta mark set meta mark & 0xfff8ffff",
        "jump filter-cali-pro-kns.ns1",
        f'meta mark & {D} == {D} counter name "{ctr("", "profile/kns.ns1", "egress")}" drop',
        f"meta mark & {A} == {A} return", f'counter name "{ctr("", NO_PROFILE, "egress")}" drop']


def ctr(tier: str, policy: str, direction: str = "ingress") -> str:
    return drop_counter_name((tier, policy, direction))


def test_endpoint_chain_logs_drops_with_pod_and_policy() -> None:
    tiers = (TierPolicies("default", "Deny", ingress=(KEY,), egress=()),)
    e = EndpointPolicyUpdate("ns1/node--1-k8s-pod--a-eth0", "calia", tiers, ("kns.ns1",), name="ns1/pod-a")
    texts = [r.text for r in render_endpoint_chain(e, INGRESS, RenderOptions(log_drops=True, drop_log_rate=5))]
    assert (f"meta mark & {D} == {D} limit rate 5/second burst 10 packets "
            'log prefix "calico-drop ns1/pod-a knp/ns1/allow-web ingress: " level warn') in texts
    assert (f"meta mark & {P} == 0 limit rate 5/second burst 10 packets "
            'log prefix "calico-drop ns1/pod-a tier default end ingress: " level warn') in texts
    # Each log rule sits right before the drop it describes.
    i = next(i for i, t in enumerate(texts) if "knp/ns1/allow-web ingress" in t)
    assert texts[i + 1] == f'meta mark & {D} == {D} counter name "{ctr("default", "knp/ns1/allow-web")}" drop'
    assert len(drop_log_prefix(EndpointPolicyUpdate("n" * 200, "calia", (), ()), "x" * 50, 127).encode()) == 127


def test_endpoint_chain_missing_and_staged() -> None:
    tiers = (TierPolicies("default", "Deny", ingress=(KEY,), egress=()),)
    # A policy chain that is not there yet is left out, but the tier still drops (fails closed).
    texts = [r.text for r in render_endpoint_chain(ep(tiers), INGRESS, available=lambda c: "pri" in c)]
    assert not any("jump filter-cali-pi" in t for t in texts)
    assert f'meta mark & {P} == 0 counter name "{ctr("default", END_OF_TIER)}" drop' in texts
    assert "jump filter-cali-pri-kns.ns1" in texts
    # Staged: no jump and no end-of-tier drop.
    texts = [r.text for r in render_endpoint_chain(ep(tiers), INGRESS, staged=lambda k: k == KEY)]
    assert not any("0x00020000" in t for t in texts)
    with pytest.raises(PolicyRenderError):
        render_endpoint_chain(ep((TierPolicies("t", "Allow", (KEY,), ()),)), INGRESS)


def test_static_and_dispatch() -> None:
    chains = {c.name: c for c in static_chains()}
    base = chains[CHAIN_BASE_FORWARD].base
    assert base is not None and (base.hook, base.priority) == ("forward", 0)
    assert [r.text for r in chains[CHAIN_FORWARD].rules] == [
        "meta mark set meta mark & 0xfff9ffff",  # all but the accept bit (untracked / pre-DNAT verdict)
        "meta mark & 0x00010000 == 0 jump filter-cali-from-hep-forward",
        'iifname "cali*" jump filter-cali-from-wl-dispatch',
        'oifname "cali*" jump filter-cali-to-wl-dispatch',
        "jump filter-cali-to-hep-forward"]
    assert [r.text for r in chains[CHAIN_FROM_WL_DISPATCH].rules] == [
        f"iifname vmap @{MAP_FROM_WL_DISPATCH}", "drop"]
    assert chains[CHAIN_WL_TO_HOST].rules[-1].text == "accept"
    drop = {c.name: c for c in static_chains(RenderOptions(endpoint_to_host_action="DROP"))}
    assert drop[CHAIN_WL_TO_HOST].rules[-1].text == "drop"
    v6 = {c.name: c for c in static_chains(V6)}
    assert "icmpv6 type" in v6[CHAIN_WL_TO_HOST].rules[0].text
    fw, tw = dispatch_elements(["calib", "calia"])
    assert fw == {"calia": "goto filter-cali-fw-calia", "calib": "goto filter-cali-fw-calib"}
    assert tw["calia"] == "goto filter-cali-tw-calia"
    with pytest.raises(ValueError):
        RenderOptions(endpoint_to_host_action="MAYBE").validate()
    with pytest.raises(ValueError):
        RenderOptions(log_prefix='a"b').validate()


# -- the manager's desired state (no kernel) ------------------------------------------------------------
def pol(key: PolicyKey = KEY, *rules: Rule, types: tuple[str, ...] = (INGRESS,), **kw: object) -> Policy:
    return Policy(key, "default", 100, "app == 'web'", types, ingress=rules, **kw)  # type: ignore[arg-type]


def test_manager_desired_state() -> None:
    t = NftTable()
    m = PolicyManager(t)
    sid = selector_set_id(parse_selector(SEL).text)
    m.on_update(IPSetUpdate(sid, frozenset({N("10.65.0.7/32"), N("fd00::7/128")})))
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_ALLOW, source=EntityMatch(selector=SEL)))))
    m.on_update(ActiveProfileUpdate(Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),), egress=(Rule(ACTION_ALLOW),))))
    m.on_update(EndpointPolicyUpdate("ns1/a", "calia", (TierPolicies("default", "Deny", (KEY,), ()),), ("kns.ns1",)))
    m.complete_deferred_work()
    assert m.errors == {}
    assert t.desired_elements(SET4) == {"10.65.0.7/32": ""}  # the v6 member is not in the ip table
    m.on_update(IPSetDeltaUpdate(sid, added=frozenset({N("10.65.0.8/32")}), removed=frozenset({N("10.65.0.7/32")})))
    m.complete_deferred_work()
    assert t.desired_elements(SET4) == {"10.65.0.8/32": ""}
    assert t.desired_rules("filter-cali-pi-knp/ns1/allow-web") == (f"ip saddr @{SET4} {ALLOW}",)
    assert "filter-cali-po-knp/ns1/allow-web" not in t.chain_names()
    assert t.desired_elements(MAP_FROM_WL_DISPATCH) == {"calia": "goto filter-cali-fw-calia"}
    assert t.desired_elements(MAP_TO_WL_DISPATCH) == {"calia": "goto filter-cali-tw-calia"}
    assert "jump filter-cali-pi-knp/ns1/allow-web" in " ".join(t.desired_rules("filter-cali-tw-calia") or ())

    # The set goes while still used: kept, empty. The policy goes: the endpoint chain stops jumping to it.
    m.on_update(IPSetRemove(sid))
    m.complete_deferred_work()
    assert t.desired_elements(SET4) == {}
    m.on_update(ActivePolicyRemove(KEY))
    m.complete_deferred_work()
    assert "filter-cali-pi-knp/ns1/allow-web" not in t.chain_names()
    assert SET4 not in t.set_names()
    assert "jump filter-cali-pi" not in " ".join(t.desired_rules("filter-cali-tw-calia") or ())
    m.on_update(EndpointPolicyRemove("ns1/a"))
    m.complete_deferred_work()
    assert "filter-cali-tw-calia" not in t.chain_names()
    assert t.desired_elements(MAP_FROM_WL_DISPATCH) == {}


def test_manager_late_policy_and_placeholder_set() -> None:
    t = NftTable()
    m = PolicyManager(t)
    m.on_update(EndpointPolicyUpdate("ns1/a", "calia", (TierPolicies("default", "Deny", (KEY,), ()),), ()))
    m.complete_deferred_work()
    assert "jump filter-cali-pi" not in " ".join(t.desired_rules("filter-cali-tw-calia") or ())
    # The policy arrives before its set: the set is programmed empty, the endpoint now jumps to it.
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_ALLOW, source=EntityMatch(selector=SEL)))))
    m.complete_deferred_work()
    assert t.desired_elements(SET4) == {}
    assert "jump filter-cali-pi-knp/ns1/allow-web" in " ".join(t.desired_rules("filter-cali-tw-calia") or ())
    # Staged: never jumped to.
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_ALLOW), staged=True)))
    m.complete_deferred_work()
    assert "filter-cali-pi-knp/ns1/allow-web" not in t.chain_names()
    assert "0x00020000 == 0 drop" not in " ".join(t.desired_rules("filter-cali-tw-calia") or ())


def test_manager_bad_input_keeps_going() -> None:
    t = NftTable()
    m = PolicyManager(t)
    good = pol(KEY, Rule(ACTION_DENY))
    m.on_update(ActivePolicyUpdate(good))
    m.complete_deferred_work()
    bad = pol(KEY, Rule(ACTION_ALLOW, destination=EntityMatch(ports=(PortRange(80, 80),))))  # no protocol
    m.on_update(ActivePolicyUpdate(bad))
    m.on_update(IPSetUpdate("no-type-prefix", frozenset()))
    m.on_update(EndpointPolicyUpdate("ns1/x", "bad iface!", (), ()))
    m.on_update(EndpointPolicyUpdate("ns1/b", "calib", (), ("kns.ns1",)))
    m.complete_deferred_work()
    assert set(m.errors) == {"policy knp/ns1/allow-web", "set no-type-prefix", "endpoint ns1/x"}
    assert t.desired_rules("filter-cali-pi-knp/ns1/allow-web") == (DENY,)  # the last good version stays
    assert m.endpoint_ifaces == {"calib"}
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_ALLOW))))
    m.complete_deferred_work()
    assert "policy knp/ns1/allow-web" not in m.errors


def test_manager_two_endpoints_one_iface() -> None:
    t = NftTable()
    m = PolicyManager(t)
    m.on_update(EndpointPolicyUpdate("ns1/old", "calia", (), ("p-old",)))
    m.on_update(EndpointPolicyUpdate("ns1/new", "calia", (), ("p-new",)))
    for p in ("p-old", "p-new"):
        m.on_update(ActiveProfileUpdate(Profile(p)))
    m.complete_deferred_work()
    assert "jump filter-cali-pri-p-new" in (t.desired_rules("filter-cali-tw-calia") or ())
    m.on_update(EndpointPolicyRemove("ns1/new"))
    m.complete_deferred_work()
    assert "jump filter-cali-pri-p-old" in (t.desired_rules("filter-cali-tw-calia") or ())


def test_manager_family() -> None:
    assert PolicyManager(NftTable(family="ip6")).ip_version == 6
    with pytest.raises(ValueError):
        PolicyManager(NftTable(family="inet"))


# -- nft -c on whole rendered rulesets ------------------------------------------------------------------
class CheckOnlyNft(Nft):
    """The real nft command in check mode (``nft -c -f -``) inside a namespace: the kernel validates the
    driver's whole transaction, nothing is committed."""

    def __init__(self, ns: str) -> None:
        super().__init__(f"/run/netns/{ns}", backend="cli")
        self.ns = ns
        self.batches: list[str] = []

    def run(self, commands: str, *, dry_run: bool = False) -> None:
        self.batches.append(commands)
        p = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-c", "-f", "-"], input=commands,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise NftError(p.stderr.strip(), rc=p.returncode, commands=commands)


@pytest.fixture
def check_ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("nft -c needs root (CAP_NET_ADMIN in a fresh namespace)")
    name = f"fxpolr{os.getpid() % 100000}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def full_state(m: PolicyManager, v: int) -> None:
    net = N("10.0.0.0/8") if v == 4 else N("fd00::/8")
    member = N("10.65.0.7/32") if v == 4 else N("fd00::7/128")
    sid = selector_set_id(parse_selector(SEL).text)
    m.on_update(IPSetUpdate(sid, frozenset({member})))
    icmp = "ICMP" if v == 4 else "ICMPv6"
    every = (
        Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(nets=(net,), selector=SEL, ports=(PortRange(1, 2),)),
             destination=EntityMatch(ports=(PortRange(80, 80), PortRange(8000, 8080)), not_ports=(PortRange(81, 81),),
                                     not_nets=(net,), not_selector="role == 'db'"), metadata=(("a", "b"),)),
        Rule(ACTION_PASS, protocol=icmp, icmp_type=8, icmp_code=0, not_icmp_type=3, not_icmp_code=1),
        Rule(ACTION_DENY, protocol="SCTP", not_protocol="TCP", destination=EntityMatch(ports=("named",))),
        Rule(ACTION_LOG, protocol="UDPLite", source=EntityMatch(ports=(PortRange(5, 5),))),
        Rule(ACTION_DENY, protocol="99"),
    )
    keys = [PolicyKey(KIND_KNP, "ns1", "allow-web"), PolicyKey(KIND_GNP, "", "g" * 250)]
    for k in keys:
        m.on_update(ActivePolicyUpdate(Policy(k, "default", 1, "", (INGRESS, EGRESS), ingress=every, egress=every)))
    m.on_update(ActiveProfileUpdate(Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),), egress=every)))
    for i in range(3):
        m.on_update(EndpointPolicyUpdate(f"ns1/p{i}", f"cali{i:011x}", (
            TierPolicies("sec", "Pass", tuple(keys), tuple(keys)),
            TierPolicies("default", "Deny", (keys[0],), ())), ("kns.ns1",)))


@pytest.mark.root
@pytest.mark.parametrize("family", ["ip", "ip6"])
def test_full_ruleset_passes_nft_check(check_ns: str, family: str) -> None:
    nft = CheckOnlyNft(check_ns)
    t = NftTable(nft, family=family, removals_allowed=True)
    m = PolicyManager(t, options=RenderOptions(endpoint_to_host_action="DROP"))
    v = 4 if family == "ip" else 6
    full_state(m, v)
    m.complete_deferred_work()
    # The NAT manager shares the table: names must not collide.
    masq = MasqManager(t, ip_version=v)
    masq.on_update(IPPoolUpdate(N("10.65.0.0/16") if v == 4 else N("fd00:65::/64"), True, False, "Never", "Never"))
    masq.complete_deferred_work()
    stats = t.apply()
    assert stats.failed == {} and m.errors == {}
    assert stats.transactions == 1 and len(nft.batches) == 1
    batch = nft.batches[0]
    # Sets are declared in the same transaction, before any rule uses them.
    set_decl = batch.index(f"add set {family} calico cali{4 if family == 'ip' else 6}0s-")
    assert set_decl < batch.index("add rule")
    assert "add map" in batch and "goto filter-cali-fw-cali00000000000" in batch
    assert f"add chain {family} calico nat-POSTROUTING" in batch


@pytest.mark.root
def test_nft_check_catches_bad_text(check_ns: str) -> None:
    """The check is real: a rule nft refuses is reported by the driver."""
    nft = CheckOnlyNft(check_ns)
    t = NftTable(nft, removals_allowed=True)
    t.set_chain("filter-x", ["meta l4proto tcp th dport { 5-1 } drop"])
    stats = t.apply()
    assert "filter-x" in stats.failed
