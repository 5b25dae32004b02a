"""Network policy in the kernel with real packets: the policy manager over the iptables dataplane (filter
table + ipsets, as ``make_nat_backend('iptables', with_filter=True)`` builds it for the agent), for both
iptables backends. The same truth table as tests/integration/test_policy_mgr.py (the nftables backend).

Topology: a "node" namespace (ip_forward, 192.0.2.1 on its loopback) and three "pods", each in its own
namespace behind a ``cali*`` veth, wired as Calico's CNI does: A 10.65.0.2 (``calia``), B 10.65.0.3
(``calib``), and C 10.65.0.4 (``calic``), which never gets an endpoint (an unknown workload interface).
FORWARD's policy is DROP, so forwarded pod traffic passes only through the accept-bit rule appended to
FORWARD. A connection that times out (1 s) was dropped. After each test a fresh driver with nothing
desired removes every chain, hook and ipset it finds, and the test checks none is left."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from felixpy.dataplane.drivers.iptables import IptablesApplyStats, IptablesDataplane
from felixpy.dataplane.masq_mgr import make_nat_backend
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.shims.netns import in_netns, write_sysctl
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_PASS,
    EGRESS,
    INGRESS,
    KIND_GNP,
    KIND_KNP,
    ActivePolicyUpdate,
    ActiveProfileUpdate,
    EndpointPolicyUpdate,
    EntityMatch,
    IPSetUpdate,
    Policy,
    PolicyKey,
    PortRange,
    Profile,
    Rule,
    TierPolicies,
    selector_set_id,
)
from felixpy.model.selector import parse_selector
from tests.integration.test_policy_mgr import (
    drops_scenario,
    named_ports_scenario,
    remove_together_scenario,
    tcp_connects,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxpoli{os.getpid() % 100000}{secrets.token_hex(2)}"
PODS = {"a": "10.65.0.2", "b": "10.65.0.3", "c": "10.65.0.4"}
NODE_IP = "192.0.2.1"
N = ipaddress.ip_network
SEL_B = 'role == "b"'
SID_B = selector_set_id(parse_selector(SEL_B).text)
SET_B = f"cali40{SID_B}"
PROFILE = Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),), egress=(Rule(ACTION_ALLOW),))
WEB = PolicyKey(KIND_KNP, "ns1", "allow-web")
SEC = PolicyKey(KIND_GNP, "", "security")
OPEN = PolicyKey(KIND_GNP, "", "open")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def new_dataplane(node: str, backend: str) -> IptablesDataplane:
    dp, _masq = make_nat_backend("iptables", netns=f"/run/netns/{node}", iptables_backend=backend,
                                 with_filter=True)
    assert isinstance(dp, IptablesDataplane)
    return dp


@dataclass
class Lab:
    node: str
    backend: str
    pods: dict[str, str]  # pod -> namespace
    dp: IptablesDataplane
    mgr: PolicyManager
    servers: list[socket.socket] = field(default_factory=list)

    def path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    def send(self, *msgs: object) -> IptablesApplyStats:
        for m in msgs:
            self.mgr.on_update(m)
        self.mgr.complete_deferred_work()
        stats = self.dp.apply()
        assert all(s.failed == {} for s in stats.values()) and self.mgr.errors == {}
        return stats["filter"]

    def serve(self, ns: str, port: int) -> None:
        with in_netns(self.path(ns)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        self.servers.append(s)

    def tcp(self, src: str, dst_ip: str, port: int) -> bool:
        ns = self.node if src == "node" else self.pods[src]
        return tcp_connects(self.path(ns), dst_ip, port)

    def ping(self, src: str, dst_ip: str) -> bool:
        p = subprocess.run(["ip", "netns", "exec", self.pods[src], "ping", "-c1", "-W1", "-q", dst_ip],
                           capture_output=True)
        return p.returncode == 0

    def save(self, *, counters: bool = False) -> list[str]:
        """Our filter lines as iptables-save prints them (with packet counters if asked)."""
        out = sh("ip", "netns", "exec", self.node, f"iptables-{self.backend}-save", *(["-c"] if counters else []),
                 "-t", "filter")
        return [ln for ln in out.splitlines() if "cali" in ln and not ln.startswith("#")]

    def ruleset(self) -> str:
        return "\n".join(self.save()) + "\n" + "\n".join(sorted(self.ipsets()))

    def ipsets(self) -> set[str]:
        return set(sh("ip", "netns", "exec", self.node, "ipset", "list", "-n").split())


@pytest.fixture(params=["legacy", "nft"])
def lab(request: pytest.FixtureRequest, make_ns: Callable[[], str]) -> Iterator[Lab]:
    backend = str(request.param)
    node = make_ns()
    pods = {p: make_ns() for p in PODS}
    sh("ip", "-n", node, "link", "set", "lo", "up")
    sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    for p, ip in PODS.items():
        ns, host = pods[p], f"cali{p}"
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", host, "netns", node)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        sh("ip", "-n", node, "link", "set", host, "up")
        sh("ip", "-n", node, "route", "add", f"{ip}/32", "dev", host, "scope", "link")
    sh("ip", "-n", node, "route", "add", "169.254.1.1/32", "dev", "lo")
    with in_netns(f"/run/netns/{node}"):
        write_sysctl("net/ipv4/ip_forward", 1)
        for p in PODS:
            write_sysctl(f"net/ipv4/conf/cali{p}/proxy_arp", 1)
            write_sysctl(f"net/ipv4/neigh/cali{p}/proxy_delay", 0)
    # FORWARD policy DROP (as Docker leaves it): forwarded pod traffic needs the appended accept-bit rule.
    sh("ip", "netns", "exec", node, f"iptables-{backend}", "-w", "-P", "FORWARD", "DROP")
    dp = new_dataplane(node, backend)
    dp.allow_removals()
    lab = Lab(node, backend, pods, dp, PolicyManager(dp))
    for p in ("a", "b"):
        lab.serve(pods[p], 8080)
        lab.serve(pods[p], 9090)
    lab.serve(node, 7070)
    try:
        yield lab
    finally:
        for s in lab.servers:
            s.close()
        # A driver that wants nothing removes all of ours (hooks, chains, then the sets).
        cleaner = new_dataplane(node, backend)
        cleaner.allow_removals()
        cleaner.apply()
        left, sets = lab.save(), {s for s in lab.ipsets() if s.startswith("cali")}
        assert left == [] and sets == set(), (left, sets)


def not_rewritten(before: list[str], after: list[str]) -> bool:
    """Same rules, and no rule's packet counter went back (a flushed and refilled chain starts at 0;
    a late packet of an earlier connection may still add to a counter)."""
    def split(ln: str) -> tuple[int, str]:
        m = re.match(r"\[(\d+):\d+\] (.*)", ln)
        return (int(m.group(1)), m.group(2)) if m else (0, ln)

    b, a = [split(ln) for ln in before], [split(ln) for ln in after]
    return [t for _, t in b] == [t for _, t in a] and all(na >= nb for (nb, _), (na, _) in zip(b, a, strict=True))


def endpoint(pod: str, tiers: tuple[TierPolicies, ...] = (), profiles: tuple[str, ...] = ("kns.ns1",)
             ) -> EndpointPolicyUpdate:
    return EndpointPolicyUpdate(f"ns1/pod-{pod}", f"cali{pod}", tiers, profiles)


def web_policy(*extra: Rule) -> Policy:
    """Selects pod A: TCP 8080 from pods matching role == "b" (set SID_B)."""
    allow = Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(selector=SEL_B),
                 destination=EntityMatch(ports=(PortRange(8080, 8080),)))
    return Policy(WEB, "default", 100, "app == 'a'", (INGRESS,), ingress=(allow, *extra))


def base_state(lab: Lab) -> IptablesApplyStats:
    return lab.send(ActiveProfileUpdate(PROFILE), endpoint("a"), endpoint("b"))


def test_profile_fallback_default_deny_sets_and_icmp(lab: Lab) -> None:
    a, b = PODS["a"], PODS["b"]
    assert not lab.tcp("c", a, 8080)  # nothing programmed yet: FORWARD's DROP policy
    base_state(lab)
    saved = lab.save()
    # Calico's layout: our hooks at the top of FORWARD and INPUT, the accept appended to FORWARD.
    assert any(re.match(r"-A FORWARD .*-j cali-FORWARD", ln) for ln in saved)
    assert any(re.match(r"-A INPUT .*-j cali-INPUT", ln) for ln in saved)
    assert any(ln.startswith("-A FORWARD") and "--mark 0x10000/0x10000" in ln and "-j ACCEPT" in ln for ln in saved)
    assert any(ln.startswith("-A cali-from-wl-dispatch -i calia") and "-g cali-fw-calia" in ln for ln in saved)
    # No policy selects the pods: the namespace profile allows everything.
    assert lab.tcp("b", a, 8080) and lab.tcp("b", a, 9090) and lab.ping("b", a) and lab.tcp("a", b, 9090)
    # Pod C's interface has no endpoint: dropped both ways ("Unknown interface").
    assert not lab.tcp("c", a, 8080)
    assert not lab.tcp("a", PODS["c"], 8080)
    # Workload -> host: egress policy (the profile) allowed it, then DefaultEndpointToHostAction ACCEPT.
    assert lab.tcp("b", NODE_IP, 7070)

    # A policy selects A: only TCP 8080 from B's set; the rest ends in the end-of-tier drop.
    lab.send(IPSetUpdate(SID_B, frozenset({N(f"{b}/32")})), ActivePolicyUpdate(web_policy()),
             endpoint("a", (TierPolicies("default", "Deny", (WEB,), ()),)))
    assert SET_B in lab.ipsets()
    assert lab.tcp("b", a, 8080)
    assert not lab.tcp("b", a, 9090)
    assert not lab.ping("b", a)
    assert lab.tcp("a", b, 9090)  # A's egress and B's ingress are untouched
    assert lab.tcp("node", a, 9090)  # host -> pod gets no policy, as in Calico

    # ICMP allowed by type (echo request), then B leaves the set.
    lab.send(ActivePolicyUpdate(web_policy(Rule(ACTION_ALLOW, protocol="ICMP", icmp_type=8))))
    assert lab.ping("b", a)
    lab.send(IPSetUpdate(SID_B, frozenset()))
    assert not lab.tcp("b", a, 8080)
    assert lab.ping("b", a)

    # Egress policy on B also governs B -> host (through the INPUT hook).
    deny_host = Policy(PolicyKey(KIND_KNP, "ns1", "no-host"), "default", 1, "app == 'b'", (EGRESS,),
                       egress=(Rule(ACTION_DENY, destination=EntityMatch(nets=(N(f"{NODE_IP}/32"),))),
                               Rule(ACTION_ALLOW)))
    lab.send(ActivePolicyUpdate(deny_host), endpoint("b", (TierPolicies("default", "Deny", (), (deny_host.key,)),)))
    assert not lab.tcp("b", NODE_IP, 7070)
    assert not lab.tcp("b", PODS["a"], 9090)  # A's ingress still only allows 8080 from the set
    lab.send(IPSetUpdate(SID_B, frozenset({N(f"{b}/32")})))
    assert lab.tcp("b", a, 8080)


def test_tiers_pass_end_of_tier_drop_and_match_blocks(lab: Lab) -> None:
    a = PODS["a"]
    base_state(lab)
    sec = Policy(SEC, "security", 1, "all()", (INGRESS,), ingress=(
        Rule(ACTION_PASS, protocol="ICMP"),
        Rule(ACTION_DENY, protocol="TCP", destination=EntityMatch(ports=(PortRange(9090, 9090),)))))
    opened = Policy(OPEN, "default", 1, "all()", (INGRESS,), ingress=(
        Rule(ACTION_ALLOW, protocol="TCP"), Rule(ACTION_ALLOW, protocol="ICMP")))
    tiers = (TierPolicies("security", "Deny", (SEC,), ()), TierPolicies("default", "Deny", (OPEN,), ()))
    lab.send(ActivePolicyUpdate(sec), ActivePolicyUpdate(opened), endpoint("a", tiers))
    assert lab.ping("b", a)  # passed on by the security tier, allowed by the default tier
    assert not lab.tcp("b", a, 9090)  # denied in the security tier
    assert not lab.tcp("b", a, 8080)  # no verdict in the security tier: its end-of-tier drop
    tiers = (TierPolicies("security", "Pass", (SEC,), ()), TierPolicies("default", "Deny", (OPEN,), ()))
    lab.send(endpoint("a", tiers))
    assert lab.tcp("b", a, 8080)
    assert not lab.tcp("b", a, 9090)

    # Several CIDRs and more than 15 ports (match blocks on the scratch marks), positive and negated.
    many = tuple(PortRange(p, p) for p in (*range(7000, 7030), 8080))
    opened = Policy(OPEN, "default", 1, "all()", (INGRESS,), ingress=(
        Rule(ACTION_ALLOW, protocol="TCP",
             source=EntityMatch(nets=(N("10.65.0.3/32"), N("10.65.0.9/32")), not_nets=(N("10.66.0.0/16"),
                                                                                     N("10.67.0.0/16"))),
             destination=EntityMatch(ports=many)),))
    lab.send(ActivePolicyUpdate(opened))
    assert lab.tcp("b", a, 8080)
    opened = Policy(OPEN, "default", 1, "all()", (INGRESS,), ingress=(
        Rule(ACTION_ALLOW, protocol="TCP",
             source=EntityMatch(nets=(N("10.65.0.2/32"), N("10.65.0.9/32")), not_nets=(N("10.66.0.0/16"),
                                                                                     N("10.67.0.0/16"))),
             destination=EntityMatch(ports=many)),))
    lab.send(ActivePolicyUpdate(opened))
    assert not lab.tcp("b", a, 8080)  # B is in none of the source CIDRs
    opened = Policy(OPEN, "default", 1, "all()", (INGRESS,), ingress=(
        Rule(ACTION_ALLOW, protocol="TCP",
             source=EntityMatch(nets=(N("10.65.0.0/24"), N("10.64.0.0/24")), not_nets=(N("10.65.0.3/32"),
                                                                                     N("10.67.0.0/16"))),
             destination=EntityMatch(ports=many)),))
    lab.send(ActivePolicyUpdate(opened))
    assert not lab.tcp("b", a, 8080)  # B is in an excluded CIDR


def test_incremental_update_and_restart(lab: Lab) -> None:
    base_state(lab)
    lab.send(IPSetUpdate(SID_B, frozenset({N(f"{PODS['b']}/32")})), ActivePolicyUpdate(web_policy()),
             endpoint("a", (TierPolicies("default", "Deny", (WEB,), ()),)))
    assert lab.tcp("b", PODS["a"], 8080) and not lab.tcp("b", PODS["a"], 9090)
    chain = "cali-pi-knp/ns1/allow-web"
    before = lab.save(counters=True)
    assert any(f"-A {chain} " in ln and not ln.startswith("[0:0]") for ln in before)

    # One policy changes: one chain is rewritten (its counters start again), nothing else is touched.
    changed = web_policy(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=(PortRange(9090, 9090),))))
    stats = lab.send(ActivePolicyUpdate(changed))
    assert (stats.transactions, stats.chains_written, stats.hooks_written) == (1, 1, 0)
    after = lab.save(counters=True)
    others_before = [ln for ln in before if f"-A {chain} " not in ln]
    assert not_rewritten(others_before, [ln for ln in after if f"-A {chain} " not in ln])
    assert sum(not ln.startswith("[0:0]") for ln in others_before) > 3  # counting traffic: a real proof
    assert all(ln.startswith("[0:0]") for ln in after if f"-A {chain} " in ln)
    assert lab.tcp("b", PODS["a"], 9090)

    # A set change is an ipset member change only.
    assert lab.dp.ipsets is not None
    lab.mgr.on_update(IPSetUpdate(SID_B, frozenset({N(f"{PODS['b']}/32"), N("10.65.9.9/32")})))
    lab.mgr.complete_deferred_work()
    assert lab.dp.ipsets.apply_updates() == 1
    assert lab.dp.apply()["filter"].transactions == 0

    # Agent restart: a fresh driver and manager over the programmed kernel write nothing.
    snapshot = lab.save(counters=True)
    dp = new_dataplane(lab.node, lab.backend)
    mgr = PolicyManager(dp)
    for m in (ActiveProfileUpdate(PROFILE), endpoint("b"), ActivePolicyUpdate(changed),
              IPSetUpdate(SID_B, frozenset({N(f"{PODS['b']}/32"), N("10.65.9.9/32")})),
              endpoint("a", (TierPolicies("default", "Deny", (WEB,), ()),))):
        mgr.on_update(m)
    mgr.complete_deferred_work()
    assert dp.ipsets is not None and dp.ipsets.apply_updates() == 0
    stats_all = dp.apply()
    assert all(s.resynced and s.transactions == 0 and s.deferred == 0 for s in stats_all.values())
    dp.allow_removals()
    stats_all = dp.apply()
    assert all(s.transactions == 0 and s.deferred == 0 for s in stats_all.values())
    assert not_rewritten(snapshot, lab.save(counters=True))
    assert lab.tcp("b", PODS["a"], 9090) and not lab.tcp("c", PODS["a"], 9090)


def test_named_ports(lab: Lab) -> None:
    """The nft suite's named-port scenario on hash:ip,port ipsets; a restart changes no set member."""
    def fresh(msgs: list[object]) -> int:
        dp = new_dataplane(lab.node, lab.backend)
        mgr = PolicyManager(dp)
        for m in msgs:
            mgr.on_update(m)
        mgr.complete_deferred_work()
        assert dp.ipsets is not None
        return dp.ipsets.apply_updates() + sum(s.transactions for s in dp.apply().values())

    named_ports_scenario(lab, fresh)


def test_drops_counted_and_logged(lab: Lab) -> None:
    """The nft suite's drop scenario: rule comments and iptables-save -c counters; LOG's 29-byte prefix."""
    drops_scenario(lab, lambda opts: PolicyManager(lab.dp, options=opts), 29)


def test_endpoint_and_its_profiles_removed_in_one_apply(lab: Lab) -> None:
    remove_together_scenario(lab)
