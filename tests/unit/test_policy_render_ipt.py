"""Policy as iptables rules (pure rendering), the policy manager's desired state over the iptables
dataplane, and ``iptables-restore --test`` of whole rendered rulesets in a throwaway network namespace
(root only, both iptables backends)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from felixpy.calc.messages import IPPoolUpdate
from felixpy.dataplane.drivers.iptables import IpSets, IptablesDataplane, IptablesTable
from felixpy.dataplane.masq_mgr import MasqManager, make_nat_backend
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.policy_render import DEFAULT_OPTIONS, Marks, PolicyRenderError, RenderOptions
from felixpy.dataplane.policy_render_ipt import (
    CHAIN_FORWARD,
    CHAIN_FROM_WL_DISPATCH,
    CHAIN_INPUT,
    CHAIN_TO_WL_DISPATCH,
    CHAIN_WL_TO_HOST,
    MAX_CHAIN_NAME,
    dispatch_chains,
    endpoint_chain_name,
    hooks,
    ipset_members,
    ipset_name,
    ipset_port_members,
    policy_chain_name,
    profile_chain_name,
    read_drop_counters,
    render_endpoint_chain,
    render_policy_chain,
    render_profile_chain,
    render_rule,
    scratch_marks,
    static_chains,
)
from felixpy.dataplane.shims.iptables import Ipset, Iptables, IptablesError
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
    IPPort,
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
SET_A = "-j MARK --set-mark 0x10000/0x10000"
RET_A = "-m mark --mark 0x10000/0x10000 -j RETURN"
SET_P = "-j MARK --set-mark 0x20000/0x20000"
RET_P = "-m mark --mark 0x20000/0x20000 -j RETURN"
S0, S1 = "0x80000", "0x100000"
KEY = PolicyKey(KIND_KNP, "ns1", "allow-web")
SEL = 'app == "client" && projectcalico.org/namespace == "ns1"'
SID = selector_set_id(parse_selector(SEL).text)
SET4 = ipset_name(SID, 4)


def allow(rule: Rule, opts: RenderOptions = DEFAULT_OPTIONS) -> str:
    """The match part of an Allow rendered as one rule plus its return."""
    out = render_rule(rule, INGRESS, opts)
    assert len(out) == 2 and (out[0].endswith(" " + SET_A) or out[0] == SET_A), out
    assert out[1] == RET_A
    return out[0].removesuffix(SET_A).strip()


SET_D = "-j MARK --set-mark 0x40000/0x40000"
RET_D = "-m mark --mark 0x40000/0x40000 -j RETURN"


def one(rule: Rule, opts: RenderOptions = DEFAULT_OPTIONS) -> str:
    """The one rule a policy rule renders to; a Deny's set-mark + return (see test_actions) reads "-j DROP"."""
    out = render_rule(rule, INGRESS, opts)
    if rule.action == ACTION_DENY:
        assert len(out) >= 2 and out[-1] == RET_D and out[-2].endswith(SET_D), out
        out = [*out[:-2], out[-2].removesuffix(SET_D) + "-j DROP"]
        out = [o.strip() for o in out]
    assert len(out) == 1, out
    return out[0]


# -- names ------------------------------------------------------------------------------------------
def test_chain_names_are_calicos() -> None:
    assert policy_chain_name(KEY, INGRESS) == "cali-pi-knp/ns1/allow-web"
    assert policy_chain_name(PolicyKey(KIND_GNP, "", "deny-all"), EGRESS) == "cali-po-gnp/deny-all"
    assert profile_chain_name("kns.default", INGRESS) == "cali-pri-kns.default"
    assert profile_chain_name("ksa.ns1.default", EGRESS) == "cali-pro-ksa.ns1.default"
    assert endpoint_chain_name("calic440f455693", INGRESS) == "cali-tw-calic440f455693"
    assert endpoint_chain_name("calic440f455693", EGRESS) == "cali-fw-calic440f455693"
    # calico-compat 1.7's worked example of a shortened name.
    assert policy_chain_name(PolicyKey(KIND_NP, "ns1", "allow-web-from-frontend"), INGRESS) == \
        "cali-pi-_kqzgc18dx2v5fvqMIvB"


def test_long_or_odd_names_are_hashed_distinctly() -> None:
    a = policy_chain_name(PolicyKey(KIND_NP, "ns", "x" * 200), EGRESS)
    b = policy_chain_name(PolicyKey(KIND_NP, "ns", "x" * 199 + "y"), EGRESS)
    assert a != b and len(a) == len(b) == MAX_CHAIN_NAME and a.startswith("cali-po-_")
    assert len(profile_chain_name("ksa.a-long-namespace.a-long-account", INGRESS)) == MAX_CHAIN_NAME
    odd = profile_chain_name("weird name", INGRESS)
    assert odd.startswith("cali-pri-_") and " " not in odd
    assert profile_chain_name("_x", INGRESS) != "cali-pri-_x"  # never passes for a hash
    for bad in ("bad iface", "x" * 16, ""):
        with pytest.raises(PolicyRenderError):
            endpoint_chain_name(bad, INGRESS)
    with pytest.raises(PolicyRenderError):
        policy_chain_name(KEY, "sideways")


def test_ipset_names_and_members() -> None:
    assert SET4 == "cali40" + SID and len(SET4) <= 31
    assert ipset_name(SID, 6).startswith("cali60s:")
    assert ipset_name("n:" + "z" * 40, 4) == ("cali40n:" + "z" * 40)[:31]
    for bad in ("masq-ipam-pools", "s:", "s:a b", ""):
        with pytest.raises(PolicyRenderError):
            ipset_name(bad, 4)
    members = ipset_members([N("0.0.0.0/0"), N("10.0.0.1/32"), N("fd00::/8"), "junk"], 4)
    assert members == [N("0.0.0.0/1"), N("10.0.0.1/32"), N("128.0.0.0/1")]
    assert ipset_members([N("::/0")], 6) == [N("::/1"), N("8000::/1")]


# -- one rule: every field ----------------------------------------------------------------------------
def test_actions() -> None:
    assert render_rule(Rule(ACTION_ALLOW), INGRESS) == [SET_A, RET_A]
    assert render_rule(Rule(ACTION_PASS), INGRESS) == [SET_P, RET_P]
    assert one(Rule(ACTION_DENY)) == "-j DROP"
    assert one(Rule(ACTION_LOG)) == '-j LOG --log-prefix "calico-packet: " --log-level 5'
    long = RenderOptions(log_prefix="p" * 40)
    assert one(Rule(ACTION_LOG), long) == f'-j LOG --log-prefix "{"p" * 29}" --log-level 5'
    with pytest.raises(PolicyRenderError):
        render_rule(Rule("Accept"), INGRESS)
    # Other mark bits move every mark, the scratch bits with them.
    m = RenderOptions(marks=Marks(accept=0x100, pass_=0x200, drop=0x400))
    assert render_rule(Rule(ACTION_ALLOW), INGRESS, m) == ["-j MARK --set-mark 0x100/0x100",
                                                          "-m mark --mark 0x100/0x100 -j RETURN"]
    assert scratch_marks(m.marks) == (0x800, 0x1000)
    assert render_rule(Rule(ACTION_DENY), INGRESS, m) == ["-j MARK --set-mark 0x400/0x400",
                                                         "-m mark --mark 0x400/0x400 -j RETURN"]
    assert scratch_marks(DEFAULT_OPTIONS.marks) == (0x80000, 0x100000)  # Felix 3.30+
    with pytest.raises(PolicyRenderError):
        scratch_marks(Marks(accept=0x40000000, pass_=0x80000000, drop=0x1))


def test_protocols() -> None:
    assert allow(Rule(ACTION_ALLOW, protocol="TCP")) == "-p tcp"
    assert allow(Rule(ACTION_ALLOW, protocol="UDPLite")) == "-p udplite"
    assert allow(Rule(ACTION_ALLOW, protocol="47")) == "-p 47"
    assert one(Rule(ACTION_DENY, not_protocol="UDP")) == "! -p udp -j DROP"
    assert one(Rule(ACTION_DENY, protocol="ICMPv6"), V6) == "-p ipv6-icmp -j DROP"
    # One -p per rule: a different negated protocol is implied, the same one cannot match.
    assert one(Rule(ACTION_DENY, protocol="TCP", not_protocol="UDP")) == "-p tcp -j DROP"
    assert render_rule(Rule(ACTION_DENY, protocol="TCP", not_protocol="6"), INGRESS) == []
    assert render_rule(Rule(ACTION_DENY, protocol="ICMP"), INGRESS, V6) == []
    assert render_rule(Rule(ACTION_DENY, protocol="ICMPv6"), INGRESS) == []
    for bad in ("300", "bogus", ""):
        with pytest.raises(PolicyRenderError):
            render_rule(Rule(ACTION_ALLOW, protocol=bad), INGRESS)


def test_ip_version() -> None:
    assert render_rule(Rule(ACTION_ALLOW, ip_version=6), INGRESS) == []
    assert render_rule(Rule(ACTION_ALLOW, ip_version=6), INGRESS, V6) == [SET_A, RET_A]
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, ip_version=5), INGRESS)


def test_single_nets_inline() -> None:
    r = Rule(ACTION_ALLOW, source=EntityMatch(nets=(N("10.0.0.0/8"),), not_nets=(N("10.9.0.0/16"), N("fd00::/8"))),
             destination=EntityMatch(nets=(N("192.168.1.0/24"), N("192.168.0.0/24"))))  # collapses to one
    assert allow(r) == "--source 10.0.0.0/8 --destination 192.168.0.0/23 ! --source 10.9.0.0/16"
    assert render_rule(Rule(ACTION_ALLOW, source=EntityMatch(nets=(N("fd00::/8"),))), INGRESS) == []
    assert allow(Rule(ACTION_ALLOW, destination=EntityMatch(nets=(N("fd00::/8"),))), V6) == "--destination fd00::/8"


def test_several_nets_become_match_blocks() -> None:
    r = Rule(ACTION_DENY, protocol="TCP", source=EntityMatch(nets=(N("10.1.0.0/16"), N("10.3.0.0/16"))),
             destination=EntityMatch(not_nets=(N("10.65.0.0/16"), N("10.67.0.0/16"))))
    assert render_rule(r, INGRESS) == [
        f"-j MARK --set-mark {S0}/{S0}",
        f"-j MARK --set-mark 0/{S1}",
        f"-m mark --mark {S0}/{S0} --source 10.1.0.0/16 -j MARK --set-mark {S1}/{S1}",
        f"-m mark --mark {S0}/{S0} --source 10.3.0.0/16 -j MARK --set-mark {S1}/{S1}",
        f"-m mark --mark 0/{S1} -j MARK --set-mark 0/{S0}",
        f"-m mark --mark {S0}/{S0} --destination 10.65.0.0/16 -j MARK --set-mark 0/{S0}",
        f"-m mark --mark {S0}/{S0} --destination 10.67.0.0/16 -j MARK --set-mark 0/{S0}",
        f"-p tcp -m mark --mark {S0}/{S0} {SET_D}",
        RET_D,
    ]


def test_selectors() -> None:
    r = Rule(ACTION_ALLOW, source=EntityMatch(selector=SEL), destination=EntityMatch(not_selector="role == 'db'"))
    other = ipset_name(selector_set_id(parse_selector("role == 'db'").text), 4)
    assert allow(r) == f"-m set --match-set {SET4} src -m set ! --match-set {other} dst"
    assert render_rule(r, EGRESS) == render_rule(r, INGRESS)  # the packet's source and destination
    assert f"--match-set {SET4.replace('cali40', 'cali60')} src" in allow(r, V6)
    with pytest.raises(PolicyRenderError):
        render_rule(Rule(ACTION_ALLOW, source=EntityMatch(selector="app ==")), INGRESS)


def test_ports() -> None:
    r = Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(
        ports=(PortRange(8000, 8080), PortRange(80, 80), PortRange(8050, 8100), PortRange(8101, 8101))))
    assert allow(r) == "-p tcp -m multiport --destination-ports 80,8000:8101"
    r = Rule(ACTION_DENY, protocol="UDP",
             source=EntityMatch(ports=(PortRange(53, 53),), not_ports=(PortRange(1, 1023),)))
    assert one(r) == "-p udp -m multiport --source-ports 53 -m multiport ! --source-ports 1:1023 -j DROP"
    # 15 multiport slots, a range costs two: 20 ports need two alternatives (a match block).
    many = tuple(PortRange(p, p) for p in range(100, 140, 2))
    out = render_rule(Rule(ACTION_DENY, protocol="TCP", destination=EntityMatch(ports=many)), INGRESS)
    assert [r for r in out if "multiport" in r] == [
        f"-m mark --mark {S0}/{S0} -p tcp -m multiport --destination-ports "
        + ",".join(str(p) for p in range(100, 130, 2)) + f" -j MARK --set-mark {S1}/{S1}",
        f"-m mark --mark {S0}/{S0} -p tcp -m multiport --destination-ports 130,132,134,136,138 "
        f"-j MARK --set-mark {S1}/{S1}"]
    assert out[-2:] == [f"-p tcp -m mark --mark {S0}/{S0} {SET_D}", RET_D]
    ranges = tuple(PortRange(p, p + 1) for p in range(1000, 1040, 4))  # 10 ranges = 20 slots, negated
    out = render_rule(Rule(ACTION_DENY, protocol="TCP", destination=EntityMatch(not_ports=ranges)), INGRESS)
    assert sum("-j MARK --set-mark 0/0x80000" in r for r in out) == 2 and out[-1] == RET_D
    with pytest.raises(PolicyRenderError, match="ports need protocol"):
        render_rule(Rule(ACTION_ALLOW, destination=EntityMatch(ports=(PortRange(80, 80),))), INGRESS)
    for bad in (PortRange(9, 8), PortRange(1, 70000)):
        with pytest.raises(PolicyRenderError):
            render_rule(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=(bad,))), INGRESS)


def test_named_ports_use_hash_ip_port_sets() -> None:
    http = ipset_name(named_port_set_id("all()", "tcp", "http"), 4)
    assert http.startswith("cali40n:") and len(http) <= 31
    assert allow(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=("http",)))) == \
        f"-p tcp -m set --match-set {http} dst,dst"
    dns = ipset_name(named_port_set_id("all()", "udp", "dns"), 4)
    assert allow(Rule(ACTION_ALLOW, protocol="UDP", source=EntityMatch(ports=("dns",)))) == \
        f"-p udp -m set --match-set {dns} src,src"
    # Numeric and named ports are alternatives: a match block.
    out = render_rule(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=(PortRange(80, 80), "http"))),
                      INGRESS)
    assert any("-m multiport --destination-ports 80 -j MARK --set-mark 0x100000/0x100000" in r for r in out), out
    assert any(f"--match-set {http} dst,dst -j MARK --set-mark 0x100000/0x100000" in r for r in out), out
    assert out[-2] == "-p tcp -m mark --mark 0x80000/0x80000 -j MARK --set-mark 0x10000/0x10000"
    assert one(Rule(ACTION_DENY, protocol="TCP", destination=EntityMatch(not_ports=("http", PortRange(22, 22))))) \
        == f"-p tcp -m multiport ! --destination-ports 22 -m set ! --match-set {http} dst,dst -j DROP"
    assert ipset_port_members({IPPort(ipaddress.ip_address("10.0.0.2"), "tcp", 80),
                               IPPort(ipaddress.ip_address("10.0.0.1"), "udp", 53),
                               IPPort(ipaddress.ip_address("fd00::1"), "tcp", 80), N("10.0.0.9/32")}, 4) == \
        ["10.0.0.1,udp:53", "10.0.0.2,tcp:80"]


def test_icmp() -> None:
    assert allow(Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=8)) == "-p icmp -m icmp --icmp-type 8"
    assert allow(Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=3, icmp_code=4)) == "-p icmp -m icmp --icmp-type 3/4"
    assert one(Rule(ACTION_DENY, protocol="ICMP", not_icmp_type=0)) == "-p icmp -m icmp ! --icmp-type 0 -j DROP"
    assert one(Rule(ACTION_DENY, protocol="ICMP", icmp_type=3, not_icmp_type=3, not_icmp_code=1)) == \
        "-p icmp -m icmp --icmp-type 3 -m icmp ! --icmp-type 3/1 -j DROP"
    assert allow(Rule(ACTION_ALLOW, protocol="ICMPv6", icmp_type=128), V6) == \
        "-p ipv6-icmp -m icmp6 --icmpv6-type 128"
    for bad in (Rule(ACTION_ALLOW, protocol="TCP", icmp_type=8), Rule(ACTION_ALLOW, protocol="ICMP", icmp_code=1),
                Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=256),
                Rule(ACTION_ALLOW, protocol="ICMP", not_icmp_code=1)):
        with pytest.raises(PolicyRenderError):
            render_rule(bad, INGRESS)


def test_everything_together_in_calico_order() -> None:
    r = Rule(ACTION_ALLOW, protocol="TCP",
             source=EntityMatch(nets=(N("10.0.0.0/8"),), selector=SEL, ports=(PortRange(1024, 65535),),
                                not_nets=(N("10.9.0.0/16"),), not_selector="x == 'y'"),
             destination=EntityMatch(nets=(N("10.65.0.0/16"),), ports=(PortRange(443, 443),),
                                     not_ports=(PortRange(444, 444),)))
    xset = ipset_name(selector_set_id(parse_selector("x == 'y'").text), 4)
    assert allow(r) == (f"-p tcp --source 10.0.0.0/8 -m set --match-set {SET4} src "
                        "-m multiport --source-ports 1024:65535 --destination 10.65.0.0/16 "
                        "-m multiport --destination-ports 443 ! --source 10.9.0.0/16 "
                        f"-m set ! --match-set {xset} src -m multiport ! --destination-ports 444")


# -- chains -------------------------------------------------------------------------------------------
def test_policy_chain_comments_and_trailing_return() -> None:
    pol = Policy(KEY, "default", 1000, "app == 'web'", (INGRESS,), ingress=(
        Rule(ACTION_DENY, ip_version=6),  # not rendered in v4: the header goes on the first real rule
        Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(selector=SEL),
             destination=EntityMatch(ports=(PortRange(80, 80),)), metadata=(("owner", 'te"am'),)),
        Rule(ACTION_DENY), Rule(ACTION_ALLOW)))
    rules = render_policy_chain(pol, INGRESS)
    assert [(r.text, r.comment) for r in rules] == [
        (f"-p tcp -m set --match-set {SET4} src -m multiport --destination-ports 80 {SET_A}",
         "KubernetesNetworkPolicy ns1/allow-web ingress; owner=te am"),
        (RET_A, "owner=te am"),
        (SET_D, ""),
        (RET_D, ""),
        (SET_A, ""),  # the last return is trimmed: falling off the end returns
    ]
    assert render_policy_chain(pol, EGRESS) == []
    g = render_profile_chain(Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),)), INGRESS)
    assert [(r.text, r.comment) for r in g] == [(SET_A, "Profile kns.ns1 ingress")]
    long = render_policy_chain(Policy(PolicyKey(KIND_GNP, "", "n" * 300), "default", None, "", (INGRESS,),
                                      ingress=(Rule(ACTION_DENY),)), INGRESS)
    assert len(long[0].comment.encode()) <= 100


def ep(tiers: tuple[TierPolicies, ...], profiles: tuple[str, ...] = ("kns.ns1",)) -> EndpointPolicyUpdate:
    return EndpointPolicyUpdate("ns1/pod-a", "calia", tiers, profiles)


def test_endpoint_chain_golden() -> None:
    k2 = PolicyKey(KIND_GNP, "", "baseline")
    tiers = (TierPolicies("security", "Pass", ingress=(k2,), egress=()),
             TierPolicies("default", "Deny", ingress=(KEY,), egress=(KEY,)))
    drops: dict[str, tuple[str, str, str]] = {}
    got = [(r.text, r.comment) for r in render_endpoint_chain(ep(tiers), INGRESS, drops=drops)]
    c = {k[1]: n for n, k in drops.items()}
    on_d = "-m mark --mark 0x40000/0x40000 -j DROP"
    assert got == [
        ("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", ""),
        ("-m conntrack --ctstate INVALID -j DROP", ""),
        ("-j MARK --set-mark 0/0x70000", ""),
        ("-j MARK --set-mark 0/0x20000", "Start of tier security"),
        ("-m mark --mark 0/0x20000 -j cali-pi-gnp/baseline", ""),
        (on_d, f"drop:{c['gnp/baseline']}; Drop if policy gnp/baseline denied"),
        (RET_A, "Return if policy accepted"),
        ("-j MARK --set-mark 0/0x20000", "Start of tier default"),
        ("-m mark --mark 0/0x20000 -j cali-pi-knp/ns1/allow-web", ""),
        (on_d, f"drop:{c['knp/ns1/allow-web']}; Drop if policy knp/ns1/allow-web denied"),
        (RET_A, "Return if policy accepted"),
        ("-m mark --mark 0/0x20000 -j DROP",
         f"drop:{c['end-of-tier']}; End of tier default. Drop if no policies passed packet"),
        ("-j cali-pri-kns.ns1", ""),
        (on_d, f"drop:{c['profile/kns.ns1']}; Drop if profile kns.ns1 denied"),
        (RET_A, "Return if profile accepted"),
        ("-j DROP", f"drop:{c['no-profile-matched']}; Drop if no profiles matched"),
    ]
    assert set(drops.values()) == {("security", "gnp/baseline", "ingress"), ("default", "knp/ns1/allow-web", "ingress"),
                                   ("default", "end-of-tier", "ingress"), ("", "profile/kns.ns1", "ingress"),
                                   ("", "no-profile-matched", "ingress")}
    egress = [r.text for r in render_endpoint_chain(ep(tiers), EGRESS)]
    assert egress[3:5] == ["-p udp -m multiport --destination-ports 4789 -j DROP", "-p 4 -j DROP"]
    assert egress[6] == "-m mark --mark 0/0x20000 -j cali-po-knp/ns1/allow-web"
    opts = RenderOptions(allow_vxlan_from_workloads=True, allow_ipip_from_workloads=True, drop_invalid=False)
    assert [r.text for r in render_endpoint_chain(ep(()), EGRESS, opts)] == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "-j MARK --set-mark 0/0x70000",
        "-j cali-pro-kns.ns1", on_d, RET_A, "-j DROP"]
    # Drop logging: a rate-limited LOG before each drop, its prefix cut to 29 bytes, pod first.
    e = EndpointPolicyUpdate("ns1/x", "calia", tiers, ("kns.ns1",), name="ns1/pod-a")
    texts = [r.text for r in render_endpoint_chain(e, INGRESS, RenderOptions(log_drops=True))]
    i = texts.index("-m mark --mark 0/0x20000 -j cali-pi-knp/ns1/allow-web")
    assert texts[i + 1] == ('-m mark --mark 0x40000/0x40000 -m limit --limit 10/sec --limit-burst 20 -j LOG '
                            '--log-prefix "calico-drop ns1/pod-a knp/ns1" --log-level 4')
    assert texts[i + 2] == on_d


def test_read_drop_counters() -> None:
    save = "\n".join([
        "*filter",
        ":cali-tw-calia - [0:0]",
        '[3:180] -A cali-tw-calia -m comment --comment "cali:abcdefghijklmnop" -m comment --comment '
        '"drop:cali-drop-aaaa; Drop if policy x denied" -m mark --mark 0x40000/0x40000 -j DROP',
        '[2:100] -A cali-tw-calib -m comment --comment "cali:abcdefghijklmnoq" -m comment --comment '
        '"drop:cali-drop-aaaa; Drop if policy x denied" -m mark --mark 0x40000/0x40000 -j DROP',
        '[7:700] -A cali-tw-calib -m comment --comment "cali:abcdefghijklmnor" -m comment --comment '
        '"drop:cali-drop-bbbb; Drop if no profiles matched" -j DROP',
        '[9:900] -A cali-tw-calib -m comment --comment "cali:abcdefghijklmnos" -j DROP',
        "COMMIT"])
    assert read_drop_counters(save) == {"cali-drop-aaaa": (5, 280), "cali-drop-bbbb": (7, 700)}


def test_endpoint_chain_missing_and_staged() -> None:
    tiers = (TierPolicies("default", "Deny", ingress=(KEY,), egress=()),)
    texts = [r.text for r in render_endpoint_chain(ep(tiers), INGRESS, available=lambda c: "pri" in c)]
    assert not any("-j cali-pi" in t for t in texts)
    assert "-m mark --mark 0/0x20000 -j DROP" in texts and "-j cali-pri-kns.ns1" in texts
    texts = [r.text for r in render_endpoint_chain(ep(tiers), INGRESS, staged=lambda k: k == KEY)]
    assert not any("0x20000" in t for t in texts)
    with pytest.raises(PolicyRenderError):
        render_endpoint_chain(ep((TierPolicies("t", "Allow", (KEY,), ()),)), INGRESS)


def test_static_hooks_and_dispatch() -> None:
    chains = {c.name: [r.text for r in c.rules] for c in static_chains() if c.table == "filter"}
    assert chains[CHAIN_FORWARD] == ["-j MARK --set-mark 0/0x1e0000",
                                     "-m mark --mark 0/0x10000 -j cali-from-hep-forward",
                                     "-i cali+ -j cali-from-wl-dispatch", "-o cali+ -j cali-to-wl-dispatch",
                                     "-j cali-to-hep-forward"]
    assert chains[CHAIN_INPUT] == ["-i cali+ -g cali-wl-to-host", "-m mark --mark 0x10000/0x10000 -j ACCEPT",
                                   "-j MARK --set-mark 0/0x1f0000",
                                   "-j cali-from-host-endpoint", "-m mark --mark 0x10000/0x10000 -j ACCEPT"]
    assert chains[CHAIN_WL_TO_HOST] == ["-j cali-from-wl-dispatch", "-j ACCEPT"]
    drop = {c.name: [r.text for r in c.rules] for c in static_chains(RenderOptions(endpoint_to_host_action="DROP"))}
    assert drop[CHAIN_WL_TO_HOST][-1] == "-j DROP"
    v6 = {c.name: [r.text for r in c.rules] for c in static_chains(V6)}
    assert v6[CHAIN_WL_TO_HOST][0] == "-p ipv6-icmp -m icmp6 --icmpv6-type 130 -j ACCEPT"
    other = {c.name: [r.text for r in c.rules] for c in static_chains(RenderOptions(iface_prefix="veth"))}
    assert other[CHAIN_INPUT][0] == "-i veth+ -g cali-wl-to-host"
    h = {x.chain: x for x in hooks()}
    assert [r.text for r in h["FORWARD"].insert] == ["-j cali-FORWARD"]
    assert [(r.text, r.comment) for r in h["FORWARD"].append] == [
        ("-m mark --mark 0x10000/0x10000 -j ACCEPT", "Policy explicitly accepted packet.")]
    assert [r.text for r in h["INPUT"].insert] == ["-j cali-INPUT"] and h["INPUT"].append == ()
    d = {c.name: [(r.text, r.comment) for r in c.rules] for c in dispatch_chains(["calib", "calia"])}
    assert d[CHAIN_FROM_WL_DISPATCH] == [("-i calia -g cali-fw-calia", ""), ("-i calib -g cali-fw-calib", ""),
                                         ("-j DROP", "Unknown interface")]
    assert d[CHAIN_TO_WL_DISPATCH][0] == ("-o calia -g cali-tw-calia", "")
    assert {c.name: [r.text for r in c.rules] for c in dispatch_chains([])}[CHAIN_TO_WL_DISPATCH] == ["-j DROP"]


# -- the manager's desired state over the iptables dataplane (no kernel) --------------------------------
def dataplane(v: int = 4) -> IptablesDataplane:
    dp, _masq = make_nat_backend("iptables", ip_version=v, with_filter=True)
    assert isinstance(dp, IptablesDataplane)
    return dp


def pol(key: PolicyKey = KEY, *rules: Rule, **kw: object) -> Policy:
    return Policy(key, "default", 100, "app == 'web'", (INGRESS,), ingress=rules, **kw)  # type: ignore[arg-type]


def test_manager_desired_state() -> None:
    dp = dataplane()
    f, sets = dp.table("filter"), dp.ipsets
    assert sets is not None and set(dp.tables) == {"nat", "filter", "raw", "mangle"}
    m = PolicyManager(dp)
    assert m.ip_version == 4
    m.on_update(IPSetUpdate(SID, frozenset({N("10.65.0.7/32"), N("fd00::7/128")})))
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_ALLOW, source=EntityMatch(selector=SEL)))))
    m.on_update(ActiveProfileUpdate(Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),), egress=(Rule(ACTION_ALLOW),))))
    m.on_update(EndpointPolicyUpdate("ns1/a", "calia", (TierPolicies("default", "Deny", (KEY,), ()),), ("kns.ns1",)))
    m.complete_deferred_work()
    assert m.errors == {}
    assert sets.desired_members(SET4) == frozenset({"10.65.0.7"})  # the v6 member is not in the v4 sets
    assert f.desired_rules("cali-pi-knp/ns1/allow-web") == (f"-m set --match-set {SET4} src {SET_A}",)
    assert "cali-po-knp/ns1/allow-web" not in f.chain_names()
    assert f.desired_rules(CHAIN_FROM_WL_DISPATCH) == ("-i calia -g cali-fw-calia", "-j DROP")
    assert f.desired_hooks("FORWARD") == (("-j cali-FORWARD",), ("-m mark --mark 0x10000/0x10000 -j ACCEPT",))
    assert f.desired_hooks("INPUT") == (("-j cali-INPUT",), ())
    assert "-m mark --mark 0/0x20000 -j cali-pi-knp/ns1/allow-web" in (f.desired_rules("cali-tw-calia") or ())

    # The set goes while still used: kept, empty. The policy goes: the endpoint chain stops jumping to it.
    m.on_update(IPSetRemove(SID))
    m.complete_deferred_work()
    assert sets.desired_members(SET4) == frozenset()
    m.on_update(ActivePolicyRemove(KEY))
    m.complete_deferred_work()
    assert "cali-pi-knp/ns1/allow-web" not in f.chain_names() and sets.desired_members(SET4) is None
    assert "cali-pi-" not in " ".join(f.desired_rules("cali-tw-calia") or ())
    m.on_update(EndpointPolicyRemove("ns1/a"))
    m.complete_deferred_work()
    assert "cali-tw-calia" not in f.chain_names()
    assert f.desired_rules(CHAIN_FROM_WL_DISPATCH) == ("-j DROP",)


def test_manager_bad_input_keeps_going() -> None:
    dp = dataplane()
    f = dp.table("filter")
    m = PolicyManager(dp)
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_DENY))))
    m.complete_deferred_work()
    m.on_update(ActivePolicyUpdate(pol(KEY, Rule(ACTION_ALLOW, destination=EntityMatch(ports=(PortRange(80, 80),))))))
    m.on_update(IPSetUpdate("no-type-prefix", frozenset()))
    m.on_update(EndpointPolicyUpdate("ns1/x", "bad iface!", (), ()))
    m.on_update(EndpointPolicyUpdate("ns1/b", "calib", (), ("kns.ns1",)))
    m.complete_deferred_work()
    assert set(m.errors) == {"policy knp/ns1/allow-web", "set no-type-prefix", "endpoint ns1/x"}
    assert f.desired_rules("cali-pi-knp/ns1/allow-web") == (SET_D,)  # the last good version stays
    assert m.endpoint_ifaces == {"calib"}


def test_manager_needs_filter_table_and_sets() -> None:
    nat_only, _ = make_nat_backend("iptables")
    assert isinstance(nat_only, IptablesDataplane)
    with pytest.raises(ValueError, match="filter table"):
        PolicyManager(nat_only)
    with pytest.raises(ValueError, match="filter table"):
        PolicyManager(IptablesDataplane([IptablesTable("filter")]))
    with pytest.raises(ValueError):
        PolicyManager(IptablesTable("filter"))  # type: ignore[arg-type]
    assert PolicyManager(dataplane(6)).ip_version == 6
    # The NAT-only default is unchanged.
    assert set(nat_only.tables) == {"nat"}


# -- iptables-restore --test on whole rendered rulesets ---------------------------------------------------
class CheckOnlyIptables(Iptables):
    """The real iptables-restore in test mode (``--test``: parse and check every rule against the kernel's
    matches and targets, commit nothing) inside a namespace; ``save`` reads the real (empty) table."""

    def __init__(self, ns: str, backend: str, ip_version: int) -> None:
        super().__init__(ip_version=ip_version, backend=backend, netns=f"/run/netns/{ns}")
        self.ns = ns
        self.inputs: list[str] = []

    def restore(self, text: str) -> None:
        self.inputs.append(text)
        binary = f"{'ip6tables' if self.ip_version == 6 else 'iptables'}-{self.backend}-restore"
        p = subprocess.run(["ip", "netns", "exec", self.ns, binary, "--test", "--noflush"], input=text,
                           capture_output=True, text=True)
        if p.returncode != 0:
            m = re.search(r"line:? (\d+)", p.stderr)
            raise IptablesError(p.stderr.strip(), rc=p.returncode, line=int(m.group(1)) if m else None)


@pytest.fixture
def check_ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("iptables-restore --test needs root (CAP_NET_ADMIN in a fresh namespace)")
    name = f"fxiptr{os.getpid() % 100000}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)  # takes its ipsets and tables with it


def full_state(m: PolicyManager, v: int) -> None:
    net, net2 = (N("10.0.0.0/8"), N("172.16.0.0/12")) if v == 4 else (N("fd00::/16"), N("fd10::/16"))
    member = N("10.65.0.7/32") if v == 4 else N("fd00::7/128")
    m.on_update(IPSetUpdate(SID, frozenset({member, N("0.0.0.0/0") if v == 4 else N("::/0")})))
    icmp = "ICMP" if v == 4 else "ICMPv6"
    many = tuple(PortRange(p, p + 1) for p in range(2000, 2100, 5))
    every = (
        Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(nets=(net,), selector=SEL, ports=(PortRange(1, 2),)),
             destination=EntityMatch(ports=(PortRange(80, 80), PortRange(8000, 8080)), not_ports=(PortRange(81, 81),),
                                     not_nets=(net2,), not_selector="role == 'db'"), metadata=(("a", "b"),)),
        Rule(ACTION_PASS, protocol=icmp, icmp_type=8, icmp_code=0, not_icmp_type=3, not_icmp_code=1),
        Rule(ACTION_DENY, protocol="SCTP", not_protocol="TCP", destination=EntityMatch(ports=("named",))),
        Rule(ACTION_LOG, protocol="UDPLite", source=EntityMatch(ports=(PortRange(5, 5),))),
        Rule(ACTION_DENY, protocol="UDP", source=EntityMatch(nets=(net, net2), not_nets=(net2, net)),
             destination=EntityMatch(ports=many, not_ports=many)),
        Rule(ACTION_DENY, not_protocol="99"),
        Rule(ACTION_ALLOW, protocol=icmp, not_icmp_type=4),
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
@pytest.mark.parametrize("backend", ["legacy", "nft"])
@pytest.mark.parametrize("v", [4, 6])
def test_full_ruleset_passes_iptables_restore_test(check_ns: str, backend: str, v: int) -> None:
    ipt = CheckOnlyIptables(check_ns, backend, v)
    # The sets are created for real: a set match is checked against the kernel's sets.
    sets = IpSets(Ipset(netns=f"/run/netns/{check_ns}"), ip_version=v, removals_allowed=True)
    dp = IptablesDataplane([IptablesTable("nat", ipt, removals_allowed=True),
                            IptablesTable("filter", ipt, removals_allowed=True)], sets)
    m = PolicyManager(dp, options=RenderOptions(endpoint_to_host_action="DROP"))
    full_state(m, v)
    m.complete_deferred_work()
    masq = MasqManager(dp, ip_version=v)  # the NAT manager shares the sets: names must not collide
    masq.on_update(IPPoolUpdate(N("10.65.0.0/16") if v == 4 else N("fd00:65::/64"), True, False, "Never", "Never"))
    masq.complete_deferred_work()
    stats = dp.apply()
    assert m.errors == {} and stats["filter"].failed == {} and stats["nat"].failed == {}
    assert stats["filter"].transactions == 1 and len(ipt.inputs) == 2
    text = next(t for t in ipt.inputs if t.startswith("*filter"))
    assert ":cali-FORWARD - [0:0]" in text and "-I FORWARD 1 " in text and "-A FORWARD " in text
    assert "-g cali-fw-cali00000000000" in text and f"--match-set {ipset_name(SID, v)} src" in text
    assert all(len(ln.split()[0][1:]) <= 28 for ln in text.splitlines() if ln.startswith(":"))
    assert ipset_name(SID, v) in sets._ksets and f"cali{v}0masq-ipam-pools" in sets._ksets


@pytest.mark.root
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_iptables_restore_test_catches_bad_rules(check_ns: str, backend: str) -> None:
    """The check is real: a rule the kernel refuses (a set that does not exist) is reported."""
    ipt = CheckOnlyIptables(check_ns, backend, 4)
    t = IptablesTable("filter", ipt, removals_allowed=True)
    t.set_chain("cali-x", ["-m set --match-set cali40s:missing src -j DROP"])
    t.set_chain("cali-y", ["-p tcp -m multiport --destination-ports 5:1 -j DROP"])
    stats = t.apply()
    assert set(stats.failed) == {"cali-x", "cali-y"}
