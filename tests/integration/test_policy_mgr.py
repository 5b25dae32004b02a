"""Network policy in the kernel with real packets: the policy manager over the nftables driver.

Topology: a "node" namespace (ip_forward, 192.0.2.1 on its loopback) and three "pods", each in its own
namespace behind a ``cali*`` veth, wired as Calico's CNI does (pod address /32, default route via
169.254.1.1, proxy ARP on the host side): A 10.65.0.2 (``calia``), B 10.65.0.3 (``calib``), and C
10.65.0.4 (``calic``), which never gets an endpoint (an unknown workload interface).

Servers are TCP listening sockets created in the right namespace by this thread; a connection that
times out (1 s) was dropped. ICMP uses ``ping -c1 -W1`` inside the pod namespace."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from felixpy import metrics
from felixpy.dataplane.drivers.nftables import NftApplyStats, NftTable
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.policy_render import RenderOptions
from felixpy.dataplane.shims.netns import in_netns, write_sysctl
from felixpy.dataplane.shims.nft import Nft
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_PASS,
    EGRESS,
    INGRESS,
    KIND_GNP,
    KIND_KNP,
    ActivePolicyUpdate,
    ActiveProfileRemove,
    ActiveProfileUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    EntityMatch,
    IPPort,
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

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxpol{os.getpid() % 100000}{secrets.token_hex(2)}"
PODS = {"a": "10.65.0.2", "b": "10.65.0.3", "c": "10.65.0.4"}
NODE_IP = "192.0.2.1"
N = ipaddress.ip_network
SEL_B = 'role == "b"'
SID_B = selector_set_id(parse_selector(SEL_B).text)
PROFILE = Profile("kns.ns1", ingress=(Rule(ACTION_ALLOW),), egress=(Rule(ACTION_ALLOW),))
WEB = PolicyKey(KIND_KNP, "ns1", "allow-web")
SEC = PolicyKey(KIND_GNP, "", "security")
OPEN = PolicyKey(KIND_GNP, "", "open")


def tcp_connects(netns_path: str, dst_ip: str, port: int) -> bool:
    """A fresh TCP connection from inside ``netns_path`` gets through (1 s to connect)."""
    with in_netns(netns_path):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(1.0)
    try:
        c.connect((dst_ip, port))
        return True
    except (TimeoutError, OSError):
        return False
    finally:
        c.close()


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Lab:
    node: str
    pods: dict[str, str]  # pod -> namespace
    table: NftTable
    mgr: PolicyManager
    servers: list[socket.socket] = field(default_factory=list)

    def path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    def send(self, *msgs: object) -> NftApplyStats:
        for m in msgs:
            self.mgr.on_update(m)
        self.mgr.complete_deferred_work()
        stats = self.table.apply()
        assert stats.failed == {} and self.mgr.errors == {}
        return stats

    def serve(self, ns: str, port: int) -> None:
        with in_netns(self.path(ns)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        self.servers.append(s)

    def tcp(self, src: str, dst_ip: str, port: int) -> bool:
        """A fresh TCP connection from pod ``src`` (or the node) gets through."""
        ns = self.node if src == "node" else self.pods[src]
        return tcp_connects(self.path(ns), dst_ip, port)

    def ping(self, src: str, dst_ip: str) -> bool:
        p = subprocess.run(["ip", "netns", "exec", self.pods[src], "ping", "-c1", "-W1", "-q", dst_ip],
                           capture_output=True)
        return p.returncode == 0

    def ruleset(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.node, "nft", "list", "table", "ip", "calico"],
                              capture_output=True, text=True, check=True).stdout

    def rules_json(self) -> list[dict[str, Any]]:
        p = subprocess.run(["ip", "netns", "exec", self.node, "nft", "-j", "-a", "list", "table", "ip", "calico"],
                           capture_output=True, text=True, check=True)
        return [o["rule"] for o in json.loads(p.stdout)["nftables"] if "rule" in o]


@pytest.fixture
def lab(make_ns: Callable[[], str]) -> Iterator[Lab]:
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
    # Proxy ARP answers for 169.254.1.1 only if the node has a route for it out another interface.
    sh("ip", "-n", node, "route", "add", "169.254.1.1/32", "dev", "lo")
    with in_netns(f"/run/netns/{node}"):
        write_sysctl("net/ipv4/ip_forward", 1)
        for p in PODS:
            write_sysctl(f"net/ipv4/conf/cali{p}/proxy_arp", 1)
            write_sysctl(f"net/ipv4/neigh/cali{p}/proxy_delay", 0)
    table = NftTable(Nft(f"/run/netns/{node}"), removals_allowed=True)
    lab = Lab(node, pods, table, PolicyManager(table))
    for p in ("a", "b"):
        lab.serve(pods[p], 8080)
        lab.serve(pods[p], 9090)
    lab.serve(node, 7070)
    yield lab
    for s in lab.servers:
        s.close()
    table.delete_table()


def endpoint(pod: str, tiers: tuple[TierPolicies, ...] = (), profiles: tuple[str, ...] = ("kns.ns1",)
             ) -> EndpointPolicyUpdate:
    return EndpointPolicyUpdate(f"ns1/pod-{pod}", f"cali{pod}", tiers, profiles)


def web_policy(*extra: Rule) -> Policy:
    """Selects pod A: TCP 8080 from pods matching role == "b" (set SID_B)."""
    allow = Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(selector=SEL_B),
                 destination=EntityMatch(ports=(PortRange(8080, 8080),)))
    return Policy(WEB, "default", 100, "app == 'a'", (INGRESS,), ingress=(allow, *extra))


def base_state(lab: Lab) -> NftApplyStats:
    return lab.send(ActiveProfileUpdate(PROFILE), endpoint("a"), endpoint("b"))


def test_profile_fallback_default_deny_sets_and_icmp(lab: Lab) -> None:
    a, b = PODS["a"], PODS["b"]
    # Before any policy (no table at all) everything flows.
    assert lab.tcp("c", a, 8080)
    base_state(lab)
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
    assert lab.tcp("b", PODS["a"], 9090) is False  # A's ingress still only allows 8080 from the set
    lab.send(IPSetUpdate(SID_B, frozenset({N(f"{b}/32")})))
    assert lab.tcp("b", a, 8080)


def test_tiers_pass_and_end_of_tier_drop(lab: Lab) -> None:
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
    # With the tier's default action Pass, unmatched traffic goes on to the next tier.
    tiers = (TierPolicies("security", "Pass", (SEC,), ()), TierPolicies("default", "Deny", (OPEN,), ()))
    lab.send(endpoint("a", tiers))
    assert lab.tcp("b", a, 8080)
    assert not lab.tcp("b", a, 9090)


def test_incremental_update_and_restart(lab: Lab) -> None:
    base_state(lab)
    lab.send(IPSetUpdate(SID_B, frozenset({N(f"{PODS['b']}/32")})), ActivePolicyUpdate(web_policy()),
             endpoint("a", (TierPolicies("default", "Deny", (WEB,), ()),)))
    before = {r["handle"]: r["chain"] for r in lab.rules_json()}
    assert not lab.tcp("b", PODS["a"], 9090)

    # One policy changes: one chain is rewritten, nothing else is touched (same rule handles).
    changed = web_policy(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=(PortRange(9090, 9090),))))
    stats = lab.send(ActivePolicyUpdate(changed))
    assert (stats.transactions, stats.chains_written, stats.sets_written) == (1, 1, 0)
    after = {r["handle"]: r["chain"] for r in lab.rules_json()}
    chain = "filter-cali-pi-knp/ns1/allow-web"
    assert {h: c for h, c in before.items() if c != chain} == {h: c for h, c in after.items() if c != chain}
    assert set(before) & {h for h, c in after.items() if c == chain} == set()
    assert lab.tcp("b", PODS["a"], 9090)

    # A set change is element-level only.
    stats = lab.send(IPSetUpdate(SID_B, frozenset({N(f"{PODS['b']}/32"), N("10.65.9.9/32")})))
    assert (stats.chains_written, stats.elements_added, stats.elements_removed) == (0, 1, 0)

    # Agent restart: a fresh driver and manager over the programmed kernel write nothing.
    table = NftTable(Nft(lab.path(lab.node)))
    mgr = PolicyManager(table)
    for m in (ActiveProfileUpdate(PROFILE), endpoint("b"), ActivePolicyUpdate(changed),
              IPSetUpdate(SID_B, frozenset({N(f"{PODS['b']}/32"), N("10.65.9.9/32")})),
              endpoint("a", (TierPolicies("default", "Deny", (WEB,), ()),))):
        mgr.on_update(m)
    mgr.complete_deferred_work()
    stats = table.apply()
    assert stats.resynced and stats.commands == 0 and stats.deferred == 0
    table.allow_removals()
    stats = table.apply()
    assert stats.commands == 0 and stats.deferred == 0
    assert {r["handle"] for r in lab.rules_json()} == set(after)


def remove_together_scenario(lab: Any) -> None:
    """A pod deleted together with the last users of its profiles (CNI DEL of the namespace's last pod): the
    endpoint's chains, the profile chains they jump to and the drop counters go in one apply that succeeds
    (the profile chains must not be deleted while the endpoint chains still refer to them). Shared by the
    nft and iptables suites."""
    sa = Profile("ksa.ns1.default", ingress=(Rule(ACTION_ALLOW),), egress=(Rule(ACTION_ALLOW),))
    lab.send(ActiveProfileUpdate(PROFILE), ActiveProfileUpdate(sa), endpoint("a", profiles=("kns.ns1", sa.name)),
             endpoint("b"))
    assert lab.ping("a", PODS["b"])
    lab.send(EndpointPolicyRemove("ns1/pod-a"), ActiveProfileRemove(sa.name))
    lab.send(EndpointPolicyRemove("ns1/pod-b"), ActiveProfileRemove(PROFILE.name))
    ruleset = lab.ruleset()
    for gone in ("kns.ns1", "ksa.ns1.default", "calia", "calib"):
        assert gone not in ruleset, f"{gone} left behind:\n{ruleset}"


def named_ports_scenario(lab: Any, fresh: Callable[[list[object]], int] | None = None) -> None:
    """Named ports through named-port sets (shared by the nft and iptables suites): A's "web" is 9090, B's
    is 8080, so one rule opens a different port on each."""
    a, b = PODS["a"], PODS["b"]
    lab.send(ActiveProfileUpdate(PROFILE), endpoint("a"), endpoint("b"))
    key = PolicyKey(KIND_KNP, "ns1", "named")
    web = named_port_set_id("all()", "tcp", "web")
    tiers = (TierPolicies("default", "Deny", (key,), ()),)

    def pol(*rules: Rule) -> Policy:
        return Policy(key, "default", 1, "all()", (INGRESS,), ingress=rules)

    def members(a_port: int) -> IPSetUpdate:
        return IPSetUpdate(web, frozenset({IPPort(ipaddress.ip_address(a), "tcp", a_port),
                                           IPPort(ipaddress.ip_address(b), "tcp", 8080)}))

    only_web = pol(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=("web",))))
    msgs: list[object] = [members(9090), ActivePolicyUpdate(only_web), endpoint("a", tiers), endpoint("b", tiers)]
    lab.send(*msgs)
    assert lab.tcp("b", a, 9090) and not lab.tcp("b", a, 8080)
    assert lab.tcp("a", b, 8080) and not lab.tcp("a", b, 9090)
    if fresh is not None:
        assert fresh([ActiveProfileUpdate(PROFILE), *msgs]) == 0, "a restart rewrote the named-port set"
    # The endpoint's port changes: only the set changes.
    lab.send(members(8080))
    assert lab.tcp("b", a, 8080) and not lab.tcp("b", a, 9090)
    # Numeric and named ports together are alternatives.
    lab.send(members(9090), ActivePolicyUpdate(pol(Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(
        ports=(PortRange(7000, 7000), "web", PortRange(8080, 8080)))))))
    assert lab.tcp("b", a, 9090) and lab.tcp("b", a, 8080)
    # A negated named port: deny every TCP port but "web", then allow.
    lab.send(ActivePolicyUpdate(pol(Rule(ACTION_DENY, protocol="TCP", destination=EntityMatch(not_ports=("web",))),
                                    Rule(ACTION_ALLOW))))
    assert lab.tcp("b", a, 9090) and not lab.tcp("b", a, 8080)
    assert lab.tcp("a", b, 8080) and not lab.tcp("a", b, 9090)


def test_named_ports(lab: Lab) -> None:
    def fresh(msgs: list[object]) -> int:
        table = NftTable(Nft(lab.path(lab.node)), removals_allowed=True)
        mgr = PolicyManager(table)
        for m in msgs:
            mgr.on_update(m)
        mgr.complete_deferred_work()
        return table.apply().commands

    named_ports_scenario(lab, fresh)


@contextlib.contextmanager
def netns_logging() -> Iterator[None]:
    """Kernel log lines from non-init namespaces (net.netfilter.nf_log_all_netns=1), old value restored."""
    path = "/proc/sys/net/netfilter/nf_log_all_netns"
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def kernel_log_lines(marker: str) -> list[str]:
    p = subprocess.run(["dmesg"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot read the kernel log: {p.stderr.strip()}")
    return [ln for ln in p.stdout.splitlines() if marker in ln]


def drops_scenario(lab: Any, make_mgr: Callable[[RenderOptions], PolicyManager], log_prefix_limit: int) -> None:
    """Denied traffic is counted per (tier, policy, direction), exported as metrics, and logged with the
    pod and the policy (shared by the nft and iptables suites)."""
    lab.mgr = make_mgr(RenderOptions(log_drops=True))
    a, b = PODS["a"], PODS["b"]
    name = f"n{secrets.token_hex(2)}/pod-a"  # unique in the kernel log
    key = PolicyKey(KIND_KNP, "ns1", "no-ping")
    pol = Policy(key, "default", 1, "all()", (INGRESS,), ingress=(
        Rule(ACTION_DENY, protocol="ICMP"), Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(
            ports=(PortRange(8080, 8080),)))))
    ep_a = EndpointPolicyUpdate("ns1/pod-a", "calia", (TierPolicies("default", "Deny", (key,), ()),), ("kns.ns1",),
                                name=name)
    with netns_logging():
        lab.send(ActiveProfileUpdate(PROFILE), ActivePolicyUpdate(pol), ep_a, endpoint("b"))
        assert all(v == (0, 0) for v in lab.mgr.drop_counters().values())
        assert not lab.ping("b", a) and not lab.ping("b", a)
        assert lab.tcp("b", a, 8080)
        assert not lab.tcp("b", a, 9090)
        assert lab.ping("a", b)  # nothing selects B's ingress or A's egress
        counts = lab.mgr.drop_counters()
        assert counts[("default", "knp/ns1/no-ping", "ingress")][0] == 2, counts
        assert counts[("default", "end-of-tier", "ingress")][0] >= 1, counts  # the SYN (and retransmits)
        assert counts[("", "no-profile-matched", "egress")] == (0, 0)
        lab.mgr.publish_drop_metrics()
        exported = [ln for ln in metrics.render().decode().splitlines()
                    if ln.startswith("felixpy_policy_dropped_packets{") and 'policy="knp/ns1/no-ping"' in ln
                    and 'direction="ingress"' in ln and 'tier="default"' in ln]
        assert len(exported) == 1 and exported[0].endswith(" 2.0"), exported
        prefix = f"calico-drop {name} knp/ns1/no-ping ingress: "[:log_prefix_limit]
        lines = kernel_log_lines(prefix)
    assert len(lines) >= 2 and all("PROTO=ICMP" in ln for ln in lines), lines


def test_drops_counted_and_logged(lab: Lab) -> None:
    drops_scenario(lab, lambda opts: PolicyManager(lab.table, options=opts), 127)


def test_endpoint_and_its_profiles_removed_in_one_apply(lab: Lab) -> None:
    remove_together_scenario(lab)
