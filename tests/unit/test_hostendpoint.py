"""HostEndpoints (pure parts): parsing, selection by the calculation graph, rendering on both backends, and
the policy manager's desired state (no kernel; packets are in tests/integration/test_hostendpoint.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from felixpy.calc.graph import CalcGraph
from felixpy.calc.messages import HostTunnelUpdate
from felixpy.dataplane import policy_render as nft
from felixpy.dataplane import policy_render_ipt as ipt
from felixpy.dataplane.drivers.iptables import IpSets, IptablesDataplane, IptablesTable
from felixpy.dataplane.drivers.nftables import NftTable
from felixpy.dataplane.masq_mgr import make_nat_backend
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.shims.iptables import Ipset, Iptables
from felixpy.datastore.api import KIND_GLOBAL_NETWORK_POLICY, KIND_HOST_ENDPOINT, KIND_NODE, KIND_PROFILE, Key
from felixpy.datastore.syncer import Update
from felixpy.model.policy import (
    ACTION_ALLOW,
    ALL_HOSTS_SET_ID,
    EGRESS,
    INGRESS,
    KIND_GNP,
    ActivePolicyUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    EndpointPort,
    IPSetDeltaUpdate,
    IPSetUpdate,
    Policy,
    PolicyKey,
    Rule,
    TierPolicies,
)
from felixpy.model.policy_parse import parse_host_endpoint
from felixpy.model.resources import InvalidResource

NODE = "node1"
DENY = PolicyKey(KIND_GNP, "", "deny-node")
FWD = PolicyKey(KIND_GNP, "", "fwd")


def hep(name: str = "node1-eth0", iface: str | None = "eth0", node: str = NODE, **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"node": node, **spec}
    if iface is not None:
        s["interfaceName"] = iface
    return {"kind": "HostEndpoint", "metadata": {"name": name, "labels": {"role": "node"}}, "spec": s}


def gnp(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "GlobalNetworkPolicy", "metadata": {"name": name}, "spec": spec}


# -- parsing -------------------------------------------------------------------------------------------
def test_parse_host_endpoint() -> None:
    h = parse_host_endpoint(hep(expectedIPs=["10.0.0.1", "10.0.0.1", "fd00::1"], profiles=["p1"],
                                ports=[{"name": "ssh", "protocol": "TCP", "port": 22},
                                       {"name": "dns", "protocol": "UDP", "port": 53}]))
    assert (h.name, h.node, h.iface, h.profiles) == ("node1-eth0", NODE, "eth0", ("p1",))
    assert h.expected_ips == (ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1"))
    assert h.labels == (("role", "node"),)
    assert h.ports == (EndpointPort("ssh", "tcp", 22), EndpointPort("dns", "udp", 53))
    assert parse_host_endpoint(hep(iface="*")).iface == "*"
    assert parse_host_endpoint(hep(iface=None, expectedIPs=["10.0.0.1"])).iface == ""


@pytest.mark.parametrize(("res", "why"), [
    (hep(node=""), "spec.node"),
    (hep(iface="eth0/1"), "spec.interfaceName"),
    (hep(iface="a-very-long-interface"), "spec.interfaceName"),
    (hep(iface=None), "give interfaceName or expectedIPs"),
    (hep(expectedIPs=["10.0.0.300"]), "spec.expectedIPs[0]"),
    (hep(expectedIPs="10.0.0.1"), "spec.expectedIPs"),
    (hep(profiles=[""]), "spec.profiles[0]"),
    (hep(ports=[{"name": "ssh", "protocol": "ICMP", "port": 22}]), "spec.ports[0].protocol"),
    (hep(ports=[{"name": "ssh", "port": 70000}]), "spec.ports[0].port"),
    (hep(ports=[{"name": "-bad", "port": 22}]), "spec.ports[0].name"),
    ({"kind": "HostEndpoint", "metadata": {"name": "x", "labels": {"a": 1}}, "spec": {"node": NODE,
                                                                                      "interfaceName": "eth0"}},
     "metadata.labels"),
])
def test_parse_host_endpoint_rejects(res: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidResource) as e:
        parse_host_endpoint(res)
    assert why in str(e.value) and str(e.value).startswith("HostEndpoint ")


# -- calculation graph ---------------------------------------------------------------------------------
def graph() -> CalcGraph:
    return CalcGraph(NODE, policy_enabled=True)


def upd(kind: str, name: str, value: dict[str, Any] | None) -> Update:
    return Update(Key(kind, name), value, "1")


def eps(msgs: list[Any]) -> dict[str, EndpointPolicyUpdate]:
    return {m.endpoint: m for m in msgs if isinstance(m, EndpointPolicyUpdate)}


def test_graph_selects_local_host_endpoints() -> None:
    g = graph()
    g.on_updates([
        upd(KIND_HOST_ENDPOINT, "node1-eth0", hep(expectedIPs=["10.66.0.1"])),
        upd(KIND_HOST_ENDPOINT, "node2-eth0", hep("node2-eth0", node="node2", expectedIPs=["10.66.0.9"])),
        upd(KIND_HOST_ENDPOINT, "bad", hep("bad", iface="eth0/x")),
        upd(KIND_GLOBAL_NETWORK_POLICY, "deny-node", gnp("deny-node", selector="role == 'node'",
                                                          types=["Ingress", "Egress"])),
        # A rule selecting host endpoints: both nodes' expectedIPs are in its set.
        upd(KIND_GLOBAL_NETWORK_POLICY, "fwd", gnp(
            "fwd", selector="role == 'node'", order=10, applyOnForward=True, types=["Ingress"],
            ingress=[{"action": "Allow", "source": {"selector": "role == 'node'"}}])),
        upd(KIND_GLOBAL_NETWORK_POLICY, "prednat", gnp(
            "prednat", selector="role == 'node'", preDNAT=True, applyOnForward=True, types=["Ingress"])),
    ])
    assert g.invalid_resources == 1
    msgs = g.flush()
    got = eps(msgs)
    assert set(got) == {"hep:node1-eth0"}  # the other node's endpoint gets no chains here
    e = got["hep:node1-eth0"]
    assert (e.host, e.iface, e.profiles, e.name) == (True, "eth0", (), "hep:node1-eth0")
    # Normal tiers: both normal policies (order), never the pre-DNAT one; forward: only applyOnForward.
    assert e.tiers == (TierPolicies("default", "Deny", (FWD, DENY), (DENY,)),)
    assert e.forward_tiers == (TierPolicies("default", "Deny", (FWD,), ()),)
    # The pre-DNAT one in its own tiers (ingress only); no do-not-track policy selects it.
    assert e.pre_dnat_tiers == (TierPolicies("default", "Deny", (PolicyKey(KIND_GNP, "", "prednat"),), ()),)
    assert e.untracked_tiers == ()
    sets = [m for m in msgs if isinstance(m, IPSetUpdate)]
    assert len(sets) == 1 and sets[0].members == frozenset({ipaddress.ip_network("10.66.0.1/32"),
                                                            ipaddress.ip_network("10.66.0.9/32")})

    # Profiles: a host endpoint's profile labels apply; a label change drops the selection.
    g.on_updates([upd(KIND_PROFILE, "p1", {"kind": "Profile", "metadata": {"name": "p1"},
                                           "spec": {"labelsToApply": {"zone": "a"}}}),
                  upd(KIND_HOST_ENDPOINT, "node1-eth0", hep(profiles=["p1"]) | {
                      "metadata": {"name": "node1-eth0", "labels": {"role": "other"}}})])
    e = eps(g.flush())["hep:node1-eth0"]
    assert (e.tiers, e.forward_tiers, e.profiles) == ((), (), ("p1",))
    g.on_updates([upd(KIND_GLOBAL_NETWORK_POLICY, "zone", gnp("zone", selector="zone == 'a'"))])
    assert eps(g.flush())["hep:node1-eth0"].tiers[0].ingress == (PolicyKey(KIND_GNP, "", "zone"),)

    # Deleted, or made invalid: removed.
    g.on_updates([upd(KIND_HOST_ENDPOINT, "node1-eth0", hep(iface="")) ])
    assert EndpointPolicyRemove("hep:node1-eth0") in g.flush()
    assert g.invalid_resources == 2
    g.on_updates([upd(KIND_HOST_ENDPOINT, "node1-eth0", hep()), upd(KIND_HOST_ENDPOINT, "node1-eth0", None)])
    assert not eps(g.flush())


def test_graph_expected_ips_only_host_endpoint_is_not_enforced() -> None:
    g = graph()
    g.on_updates([upd(KIND_HOST_ENDPOINT, "h", hep("h", iface=None, expectedIPs=["10.66.0.1"])),
                  upd(KIND_GLOBAL_NETWORK_POLICY, "deny-node", gnp("deny-node", selector="role == 'node'"))])
    assert not eps(g.flush())


# -- rendering -----------------------------------------------------------------------------------------
def hep_update(tiers: tuple[TierPolicies, ...] = (), forward: tuple[TierPolicies, ...] = (),
               profiles: tuple[str, ...] = (), iface: str = "eth0") -> EndpointPolicyUpdate:
    return EndpointPolicyUpdate("hep:h", iface, tiers, profiles, name="hep:h", host=True, forward_tiers=forward)


def test_nft_host_endpoint_chains() -> None:
    tiers = (TierPolicies("default", "Deny", (DENY,), (DENY,)),)
    drops: dict[str, nft.DropKey] = {}
    rules = [r.text for r in nft.render_endpoint_chain(hep_update(tiers), INGRESS, drops=drops,
                                                       chain=nft.CHAIN_KIND_HOST)]
    assert rules[:3] == ["ct state established,related accept", "ct state invalid drop",
                         "jump filter-cali-failsafe-in"]
    assert not any("4789" in r for r in rules)
    assert "jump filter-cali-pi-gnp/deny-node" in " ".join(rules)
    assert rules[-1].endswith("drop") and "counter name" in rules[-1]  # no profile: everything else drops
    assert ("", "no-profile-matched", "ingress") in drops.values()
    out = [r.text for r in nft.render_endpoint_chain(hep_update(tiers), EGRESS, chain=nft.CHAIN_KIND_HOST)]
    assert out[2] == "jump filter-cali-failsafe-out" and not any("l4proto 4" in r for r in out)
    # Forward chain: forward tiers only, no failsafe, no profiles, no final drop.
    fwd = [r.text for r in nft.render_endpoint_chain(hep_update(tiers, (TierPolicies("default", "Deny", (FWD,), ()),),
                                                                ("p",)), INGRESS, chain=nft.CHAIN_KIND_FORWARD)]
    text = " ".join(fwd)
    assert "failsafe" not in text and "pri-p" not in text and "gnp/deny-node" not in text
    assert "jump filter-cali-pi-gnp/fwd" in text and "End of tier" not in text  # comments are separate
    assert fwd[-1].startswith("meta mark & 0x00020000 == 0") and fwd[-1].endswith("drop")  # end of tier
    with pytest.raises(nft.PolicyRenderError):
        nft.render_endpoint_chain(hep_update(), INGRESS, chain="sideways")
    assert nft.host_endpoint_chain_name("eth0", INGRESS) == "filter-cali-fh-eth0"
    assert nft.host_endpoint_chain_name("eth0", EGRESS, True) == "filter-cali-thfw-eth0"
    assert nft.host_endpoint_chain_name("*", INGRESS) == "filter-cali-fh-all/"


def test_nft_static_failsafe_and_dispatch() -> None:
    opts = nft.RenderOptions(failsafe_inbound=("tcp:22", "udp:10.0.0.0/8:68", "tcp:fd00::/8:23"),
                             failsafe_outbound=("udp:53",))
    chains = {c.name: [r.text for r in c.rules] for c in nft.static_chains(opts)}
    assert chains[nft.CHAIN_FAILSAFE_IN] == ["tcp dport 22 accept", "ip saddr 10.0.0.0/8 udp dport 68 accept"]
    assert chains[nft.CHAIN_FAILSAFE_OUT] == ["udp dport 53 accept"]
    assert chains[nft.CHAIN_INPUT][1] == "meta mark & 0x00010000 == 0x00010000 accept"  # untracked / pre-DNAT
    assert chains[nft.CHAIN_INPUT][2:] == ["meta mark set meta mark & 0xfff8ffff",
                                           "jump filter-cali-from-host-endpoint",
                                           "meta mark & 0x00010000 == 0x00010000 accept"]
    assert chains[nft.CHAIN_OUTPUT][1] == 'oifname "cali*" return'
    assert chains[nft.CHAIN_FROM_HEP] == [] and chains[nft.CHAIN_TO_HEP_FWD] == []
    base = {c.name: c.base for c in nft.static_chains(opts)}[nft.CHAIN_BASE_OUTPUT]
    assert base is not None and base.hook == "output"
    d = {c.name: [r.text for r in c.rules]
         for c in nft.host_dispatch_chains({"eth1": (False, True), "*": (True, False), "eth0": (False, False)})}
    assert d[nft.CHAIN_FROM_HEP] == ['iifname "eth0" goto filter-cali-fh-eth0',
                                     'iifname "eth1" goto filter-cali-fh-eth1',
                                     'iifname != "cali*" goto filter-cali-fh-all/']
    assert d[nft.CHAIN_FROM_HEP_FWD] == ['iifname != "cali*" goto filter-cali-fhfw-all/']
    assert d[nft.CHAIN_TO_HEP_FWD] == ['oifname "eth1" goto filter-cali-thfw-eth1']
    for bad in ("tcp", "icmp:1", "tcp:99999", "tcp:10.0.0.0/33:1", "tcp:a:b:c"):
        with pytest.raises(ValueError):
            nft.RenderOptions(failsafe_inbound=(bad,)).validate()
    v6 = {c.name: [r.text for r in c.rules] for c in nft.static_chains(
        nft.RenderOptions(ip_version=6, failsafe_inbound=opts.failsafe_inbound))}
    assert v6[nft.CHAIN_FAILSAFE_IN] == ["tcp dport 22 accept", "ip6 saddr fd00::/8 tcp dport 23 accept"]


def test_ipt_host_endpoint_chains_and_static() -> None:
    tiers = (TierPolicies("default", "Deny", (DENY,), ()),)
    rules = [r.text for r in ipt.render_endpoint_chain(hep_update(tiers), INGRESS, chain=ipt.CHAIN_KIND_HOST)]
    assert rules[2] == "-j cali-failsafe-in" and rules[-1] == "-j DROP"
    eg = [r.text for r in ipt.render_endpoint_chain(hep_update(tiers), EGRESS, chain=ipt.CHAIN_KIND_HOST)]
    assert eg[2] == "-j cali-failsafe-out" and not any("4789" in r or "-p 4 " in r for r in eg)
    fwd = [r.text for r in ipt.render_endpoint_chain(hep_update(tiers, tiers), INGRESS, chain=ipt.CHAIN_KIND_FORWARD)]
    assert "-j cali-pi-gnp/deny-node" in " ".join(fwd) and "failsafe" not in " ".join(fwd)
    assert fwd[-1] == "-m mark --mark 0/0x20000 -j DROP"
    assert ipt.host_endpoint_chain_name("*", EGRESS, True) == "cali-thfw-all/"
    assert ipt.host_endpoint_chain_name("abcdefghijklmno", EGRESS, True) == "cali-thfw-abcdefghijklmno"
    opts = nft.RenderOptions(failsafe_inbound=("tcp:22", "udp:10.0.0.0/8:68"), failsafe_outbound=("tcp:6443",))
    chains = {c.name: [r.text for r in c.rules] for c in ipt.static_chains(opts) if c.table == "filter"}
    assert chains[ipt.CHAIN_FAILSAFE_IN] == ["-p tcp -m tcp --dport 22 -j ACCEPT",
                                             "-s 10.0.0.0/8 -p udp -m udp --dport 68 -j ACCEPT"]
    assert chains[ipt.CHAIN_FAILSAFE_OUT] == ["-p tcp -m tcp --dport 6443 -j ACCEPT"]
    assert chains[ipt.CHAIN_OUTPUT] == ["-m mark --mark 0x10000/0x10000 -j ACCEPT", "-o cali+ -j RETURN",
                                        "-j MARK --set-mark 0/0x1f0000",
                                        "-j cali-to-host-endpoint", "-m mark --mark 0x10000/0x10000 -j ACCEPT"]
    assert [r.text for r in {h.chain: h for h in ipt.hooks() if h.table == "filter"}["OUTPUT"].insert] == \
        ["-j cali-OUTPUT"]
    d = {c.name: [r.text for r in c.rules]
         for c in ipt.host_dispatch_chains({"eth0": (True, False), "*": (False, False)}) if c.table == "filter"}
    assert d[ipt.CHAIN_FROM_HEP] == ["-i eth0 -g cali-fh-eth0", "! -i cali+ -g cali-fh-all/"]
    assert d[ipt.CHAIN_TO_HEP] == ["-o eth0 -g cali-th-eth0", "! -o cali+ -g cali-th-all/"]
    assert d[ipt.CHAIN_FROM_HEP_FWD] == ["-i eth0 -g cali-fhfw-eth0"] and d[ipt.CHAIN_TO_HEP_FWD] == []


# -- the manager's desired state -------------------------------------------------------------------------
def deny_policy(**kw: Any) -> Policy:
    return Policy(DENY, "default", 100, "role == 'node'", (INGRESS, EGRESS), **kw)


def fwd_policy() -> Policy:
    return Policy(FWD, "default", 10, "role == 'node'", (INGRESS,), ingress=(Rule(ACTION_ALLOW),),
                  apply_on_forward=True)


def ipt_dataplane() -> IptablesDataplane:
    dp, _masq = make_nat_backend("iptables", with_filter=True)
    assert isinstance(dp, IptablesDataplane)
    return dp


@pytest.mark.parametrize("backend", ["nft", "ipt"])
def test_manager_host_endpoints(backend: str) -> None:
    if backend == "nft":
        table = NftTable()
        m = PolicyManager(table)
        r: Any = nft

        def rules(name: str) -> tuple[str, ...] | None:
            return table.desired_rules(name)

        def names() -> set[str]:
            return set(table.chain_names())
    else:
        dp = ipt_dataplane()
        f = dp.table("filter")
        m = PolicyManager(dp)
        r = ipt

        def rules(name: str) -> tuple[str, ...] | None:
            return f.desired_rules(name)

        def names() -> set[str]:
            return set(f.chain_names())

    deny_tier = (TierPolicies("default", "Deny", (DENY,), (DENY,)),)
    fwd_tier = (TierPolicies("default", "Deny", (FWD,), ()),)
    # A workload and a host endpoint on the same manager; the workload dispatch never names eth0.
    m.on_update(ActivePolicyUpdate(deny_policy()))
    m.on_update(EndpointPolicyUpdate("ns1/a", "calia", (), ()))
    m.on_update(hep_update(deny_tier))
    m.complete_deferred_work()
    assert m.errors == {}
    assert m.endpoint_ifaces == {"calia"} and m.host_endpoint_ifaces == {"eth0"}
    fh, th = r.host_endpoint_chain_name("eth0", INGRESS), r.host_endpoint_chain_name("eth0", EGRESS)
    fhfw = r.host_endpoint_chain_name("eth0", INGRESS, True)
    assert {fh, th} <= names() and fhfw not in names()
    assert any("failsafe-in" in x for x in rules(fh) or ())
    assert len(rules(r.CHAIN_FROM_HEP) or ()) == 1 and "eth0" in (rules(r.CHAIN_FROM_HEP) or ("",))[0]
    assert rules(r.CHAIN_FROM_HEP_FWD) == ()
    # An applyOnForward policy: the forward ingress chain and its dispatch appear.
    m.on_update(ActivePolicyUpdate(fwd_policy()))
    m.on_update(hep_update(deny_tier, fwd_tier))
    m.complete_deferred_work()
    assert m.errors == {} and fhfw in names()
    assert fhfw.split()[-1] in (rules(r.CHAIN_FROM_HEP_FWD) or ("",))[0]
    assert rules(r.CHAIN_TO_HEP_FWD) == ()
    # Hidden (staged) forward policy: no forward chain.
    m.on_update(ActivePolicyUpdate(Policy(FWD, "default", 10, "role == 'node'", (INGRESS,), apply_on_forward=True,
                                          staged=True)))
    m.complete_deferred_work()
    assert fhfw not in names() and rules(r.CHAIN_FROM_HEP_FWD) == ()
    # The host endpoint goes: its chains and dispatch go, the workload stays.
    m.on_update(EndpointPolicyRemove("hep:h"))
    m.complete_deferred_work()
    assert fh not in names() and th not in names() and rules(r.CHAIN_FROM_HEP) == ()
    assert m.endpoint_ifaces == {"calia"} and m.host_endpoint_ifaces == frozenset()
    # A bad interface is an error for that endpoint only.
    m.on_update(hep_update(iface="bad iface"))
    m.complete_deferred_work()
    assert set(m.errors) == {"endpoint hep:h"}


# -- the overlay between nodes (Felix's "allow VXLAN/IPIP from other hosts") -----------------------------
def node_res(name: str, ip: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": ip}} if ip else {}
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec}


def all_hosts(msgs: list[Any]) -> list[Any]:
    return [m for m in msgs if getattr(m, "set_id", None) == ALL_HOSTS_SET_ID]


def test_graph_all_hosts_set_follows_nodes() -> None:
    g = graph()
    assert all_hosts(g.flush()) == []  # no node yet: nothing sent (a referenced missing set is empty)
    g.on_updates([upd(KIND_NODE, "node1", node_res("node1", "10.0.0.1/24")),
                  upd(KIND_NODE, "node2", node_res("node2", "10.0.0.2/24")),
                  upd(KIND_NODE, "node3", node_res("node3", None))])  # no address: not a member
    msgs = g.flush()
    assert all_hosts(msgs) == [IPSetUpdate(ALL_HOSTS_SET_ID, frozenset({ipaddress.ip_network("10.0.0.1/32"),
                                                                       ipaddress.ip_network("10.0.0.2/32")}))]
    # Sets before anything that uses them: it is among the policy messages, first of them.
    assert msgs.index(all_hosts(msgs)[0]) == min(i for i, m in enumerate(msgs) if hasattr(m, "set_id"))
    g.on_updates([upd(KIND_NODE, "node2", node_res("node2", "10.0.0.2/24"))])  # unchanged: nothing
    assert all_hosts(g.flush()) == []
    g.on_updates([upd(KIND_NODE, "node2", node_res("node2", "10.0.0.7/24")), upd(KIND_NODE, "node1", None)])
    assert all_hosts(g.flush())[0].members == frozenset({ipaddress.ip_network("10.0.0.7/32")})
    # A malformed node is treated as absent; with deltas on, only the difference is sent.
    g.policy.ip_set_deltas = True
    g.on_updates([upd(KIND_NODE, "node2", node_res("node2", "not-an-ip")),
                  upd(KIND_NODE, "node3", node_res("node3", "10.0.0.3/24"))])
    assert all_hosts(g.flush()) == [IPSetDeltaUpdate(ALL_HOSTS_SET_ID,
                                                     added=frozenset({ipaddress.ip_network("10.0.0.3/32")}),
                                                     removed=frozenset({ipaddress.ip_network("10.0.0.7/32")}))]
    # Policy off: no set at all.
    off = CalcGraph(NODE)
    off.on_updates([upd(KIND_NODE, "node1", node_res("node1", "10.0.0.1/24"))])
    assert all_hosts(off.flush()) == []


def test_nft_overlay_rules() -> None:
    hosts = "@cali40all-hosts-net"
    plain = {c.name: [r.text for r in c.rules] for c in nft.static_chains(nft.RenderOptions())}
    assert not any("l4proto 4" in r or "4789" in r for c in plain.values() for r in c)
    assert nft.static_set_ids(nft.RenderOptions()) == frozenset()
    opts = nft.RenderOptions(vxlan_enabled=True, ipip_enabled=True, vxlan_port=4790)
    chains = {c.name: [r.text for r in c.rules] for c in nft.static_chains(opts)}
    inp = chains[nft.CHAIN_INPUT]
    # First in INPUT (before the workload goto and the host endpoint dispatch), Felix's order: IPIP, VXLAN.
    assert inp[:4] == [f"meta l4proto 4 ip saddr {hosts} fib daddr type local accept",
                       "meta l4proto 4 drop",
                       f"meta l4proto udp udp dport 4790 ip saddr {hosts} fib daddr type local accept",
                       "meta l4proto udp udp dport 4790 fib daddr type local drop"]
    assert inp[4:] == plain[nft.CHAIN_INPUT]
    out = chains[nft.CHAIN_OUTPUT]
    assert out[:4] == ["meta mark & 0x00010000 == 0x00010000 accept", 'oifname "cali*" return',
                       f"meta l4proto 4 ip daddr {hosts} fib saddr type local accept",
                       f"meta l4proto udp udp dport 4790 fib saddr type local ip daddr {hosts} accept"]
    assert out[4:] == plain[nft.CHAIN_OUTPUT][2:]
    assert nft.static_set_ids(opts) == {ALL_HOSTS_SET_ID}
    only_vxlan = {c.name: [r.text for r in c.rules] for c in nft.static_chains(nft.RenderOptions(vxlan_enabled=True))}
    assert not any("l4proto 4" in r for r in only_vxlan[nft.CHAIN_INPUT] + only_vxlan[nft.CHAIN_OUTPUT])
    assert sum("4789" in r for r in only_vxlan[nft.CHAIN_INPUT]) == 2
    # IPv4 only.
    v6 = {c.name: [r.text for r in c.rules] for c in nft.static_chains(nft.RenderOptions(ip_version=6,
                                                                                         vxlan_enabled=True))}
    assert not any("4789" in r for r in v6[nft.CHAIN_INPUT])
    assert nft.nft_set_name(ALL_HOSTS_SET_ID, 4) == "cali40all-hosts-net"
    with pytest.raises(nft.PolicyRenderError):
        nft.nft_set_name("all-hosts", 4)  # only the one fixed untyped id


def test_ipt_overlay_rules() -> None:
    opts = nft.RenderOptions(vxlan_enabled=True, ipip_enabled=True)
    plain = {c.name: [r.text for r in c.rules] for c in ipt.static_chains(nft.RenderOptions()) if c.table == "filter"}
    chains = {c.name: [r.text for r in c.rules] for c in ipt.static_chains(opts) if c.table == "filter"}
    hosts = "cali40all-hosts-net"
    assert chains[ipt.CHAIN_INPUT][:4] == [
        f"-p 4 -m set --match-set {hosts} src -m addrtype --dst-type LOCAL -j ACCEPT",
        "-p 4 -j DROP",
        f"-p udp -m udp --dport 4789 -m set --match-set {hosts} src -m addrtype --dst-type LOCAL -j ACCEPT",
        "-p udp -m udp --dport 4789 -m addrtype --dst-type LOCAL -j DROP"]
    assert chains[ipt.CHAIN_INPUT][4:] == plain[ipt.CHAIN_INPUT]
    assert chains[ipt.CHAIN_OUTPUT] == [
        "-m mark --mark 0x10000/0x10000 -j ACCEPT",
        "-o cali+ -j RETURN",
        f"-p 4 -m set --match-set {hosts} dst -m addrtype --src-type LOCAL -j ACCEPT",
        f"-p udp -m udp --dport 4789 -m addrtype --src-type LOCAL -m set --match-set {hosts} dst -j ACCEPT",
        *plain[ipt.CHAIN_OUTPUT][2:]]
    assert ipt.ipset_name(ALL_HOSTS_SET_ID, 4) == hosts


@pytest.mark.parametrize("backend", ["nft", "ipt"])
def test_manager_overlay_follows_pools(backend: str) -> None:
    """The configured flags, or the pools (HostTunnelUpdate), turn the overlay rules on; the all-hosts set is
    programmed (empty until it arrives) while they are on; a rewrite keeps the dispatch chains."""
    hosts_member = ipaddress.ip_network("10.0.0.2/32")
    if backend == "nft":
        table = NftTable()
        m = PolicyManager(table)
        r: Any = nft

        def rules(name: str) -> tuple[str, ...]:
            return table.desired_rules(name) or ()

        def set_members() -> set[str] | None:
            if "cali40all-hosts-net" not in table.set_names():
                return None
            return set((table.desired_elements("cali40all-hosts-net") or {}).keys())
    else:
        dp = ipt_dataplane()
        m = PolicyManager(dp)
        r = ipt

        def rules(name: str) -> tuple[str, ...]:
            return dp.table("filter").desired_rules(name) or ()

        def set_members() -> set[str] | None:
            assert dp.ipsets is not None
            got = dp.ipsets.desired_members("cali40all-hosts-net")
            return None if got is None else set(got)

    def tunnel(vxlan: bool, ipip: bool) -> HostTunnelUpdate:
        return HostTunnelUpdate(node_ip=None, vxlan_enabled=vxlan, vxlan_tunnel_ip=None, vxlan_mac="",
                                ipip_enabled=ipip, ipip_tunnel_ip=None)

    m.on_update(EndpointPolicyUpdate("ns1/a", "calia", (), ()))
    m.on_update(hep_update())
    m.complete_deferred_work()
    assert not any("4789" in x for x in rules(r.CHAIN_INPUT)) and set_members() is None
    m.on_update(tunnel(True, False))
    m.complete_deferred_work()
    assert m.errors == {}
    assert sum("4789" in x for x in rules(r.CHAIN_INPUT)) == 2 and sum("4789" in x for x in rules(r.CHAIN_OUTPUT)) == 1
    assert set_members() == set()  # referenced before it arrived: empty
    # The rewrite of the static chains must not have emptied the dispatch chains.
    assert any("calia" in x for x in rules(r.CHAIN_FROM_WL_DISPATCH)) or backend == "nft"
    assert any("eth0" in x for x in rules(r.CHAIN_FROM_HEP))
    m.on_update(IPSetUpdate(ALL_HOSTS_SET_ID, frozenset({hosts_member})))
    m.on_update(tunnel(True, True))
    m.complete_deferred_work()
    got = set_members()
    assert got is not None and len(got) == 1 and "10.0.0.2" in next(iter(got))
    assert any("4 " in x and "DROP" in x.upper() for x in rules(r.CHAIN_INPUT))
    m.on_update(tunnel(False, False))
    m.complete_deferred_work()
    assert not any("4789" in x for x in rules(r.CHAIN_INPUT)) and set_members() is not None  # data still kept
    # Configured on: pools cannot turn it off.
    if backend == "nft":
        m2 = PolicyManager(NftTable(), options=nft.RenderOptions(vxlan_enabled=True))
        m2.on_update(tunnel(False, False))
        assert m2.options.vxlan_enabled


# -- untracked (do-not-track) and pre-DNAT policy ----------------------------------------------------------
UNTRACKED = PolicyKey(KIND_GNP, "", "untracked")
PRE_DNAT = PolicyKey(KIND_GNP, "", "prednat")


def raw_update(untracked: tuple[TierPolicies, ...] = (), pre_dnat: tuple[TierPolicies, ...] = (),
               iface: str = "eth0") -> EndpointPolicyUpdate:
    return EndpointPolicyUpdate("hep:h", iface, (), (), name="hep:h", host=True, untracked_tiers=untracked,
                                pre_dnat_tiers=pre_dnat)


def test_graph_untracked_and_pre_dnat_tiers() -> None:
    g = graph()
    g.on_updates([
        upd(KIND_HOST_ENDPOINT, "node1-eth0", hep()),
        upd(KIND_GLOBAL_NETWORK_POLICY, "untracked", gnp(
            "untracked", selector="role == 'node'", doNotTrack=True, applyOnForward=True, types=["Ingress", "Egress"])),
        upd(KIND_GLOBAL_NETWORK_POLICY, "prednat", gnp(
            "prednat", selector="role == 'node'", preDNAT=True, applyOnForward=True, types=["Ingress"])),
    ])
    e = eps(g.flush())["hep:node1-eth0"]
    assert e.untracked_tiers == (TierPolicies("default", "Deny", (UNTRACKED,), (UNTRACKED,)),)
    assert e.pre_dnat_tiers == (TierPolicies("default", "Deny", (PRE_DNAT,), ()),)
    assert e.tiers == () and e.forward_tiers == ()  # neither is normal policy


def test_nft_untracked_and_pre_dnat_chains() -> None:
    t = (TierPolicies("default", "Deny", (UNTRACKED,), (UNTRACKED,)),)
    drops: dict[str, nft.DropKey] = {}
    raw = [r.text for r in nft.render_endpoint_chain(raw_update(t), INGRESS, drops=drops,
                                                     chain=nft.CHAIN_KIND_UNTRACKED)]
    # Before conntrack: no ct state rules; the raw failsafe chain first; Allow -> notrack; no tier-end drop.
    assert raw[0] == "jump raw-cali-failsafe-in" and not any(r.startswith("ct state") for r in raw)
    assert "meta mark & 0x00020000 == 0 jump filter-cali-pi-gnp/untracked" in raw
    assert raw[-2:] == ["meta mark & 0x00010000 == 0x00010000 notrack", "meta mark & 0x00010000 == 0x00010000 return"]
    assert set(drops.values()) == {("default", "gnp/untracked", "ingress")}
    out = [r.text for r in nft.render_endpoint_chain(raw_update(t), EGRESS, chain=nft.CHAIN_KIND_UNTRACKED)]
    assert out[0] == "jump raw-cali-failsafe-out"
    p = (TierPolicies("default", "Deny", (PRE_DNAT,), ()),)
    pre = [r.text for r in nft.render_endpoint_chain(raw_update(pre_dnat=p), INGRESS, chain=nft.CHAIN_KIND_PRE_DNAT)]
    assert pre[:3] == ["ct state established,related accept", "ct state invalid drop", "jump filter-cali-failsafe-in"]
    assert pre[-1] == "meta mark & 0x00010000 == 0x00010000 return" and "notrack" not in " ".join(pre)
    assert nft.host_endpoint_chain_name("eth0", INGRESS, False, "raw") == "raw-cali-fh-eth0"
    assert nft.host_endpoint_chain_name("eth0", EGRESS, False, "raw") == "raw-cali-th-eth0"
    assert nft.host_endpoint_chain_name("*", INGRESS, False, "mangle") == "mangle-cali-fh-all/"
    for bad in ((EGRESS, False, "mangle"), (INGRESS, True, "raw"), (INGRESS, False, "nat")):
        with pytest.raises(nft.PolicyRenderError):
            nft.host_endpoint_chain_name("eth0", *bad)
    # Policy chains: a pre-DNAT policy has only an ingress chain; the table is the policy's kind.
    pol = Policy(PRE_DNAT, "default", 1, "all()", (INGRESS, EGRESS), pre_dnat=True, apply_on_forward=True)
    assert [(c.name, c.table) for c in nft.policy_chains(pol)] == [("filter-cali-pi-gnp/prednat", "mangle")]
    unt = Policy(UNTRACKED, "default", 1, "all()", (INGRESS,), do_not_track=True, apply_on_forward=True)
    assert [c.table for c in nft.policy_chains(unt)] == ["raw"]
    # Base chains at raw / mangle priority; workload traffic returns first; raw failsafe passes replies.
    opts = nft.RenderOptions(failsafe_inbound=("tcp:22",), failsafe_outbound=("udp:10.0.0.0/8:53",))
    st = {c.name: c for c in nft.static_chains(opts)}
    for name, hook, prio in ((nft.CHAIN_BASE_RAW_PREROUTING, "prerouting", -300),
                             (nft.CHAIN_BASE_RAW_OUTPUT, "output", -300),
                             (nft.CHAIN_BASE_MANGLE_PREROUTING, "prerouting", -150)):
        base = st[name].base
        assert base is not None and (base.hook, base.priority) == (hook, prio)
    text = {n: [r.text for r in c.rules] for n, c in st.items()}
    assert text[nft.CHAIN_RAW_PREROUTING][:3] == ["meta mark set meta mark & 0xfff8ffff", 'iifname "cali*" return',
                                                  "jump raw-cali-from-host-endpoint"]
    assert text[nft.CHAIN_MANGLE_PREROUTING][:3] == ["ct state established,related accept",
                                                     "meta mark & 0x00010000 == 0x00010000 accept",
                                                     'iifname "cali*" return']
    assert text[nft.CHAIN_RAW_FAILSAFE_IN] == ["tcp dport 22 accept", "ip saddr 10.0.0.0/8 udp sport 53 accept"]
    assert text[nft.CHAIN_RAW_FAILSAFE_OUT] == ["ip daddr 10.0.0.0/8 udp dport 53 accept", "tcp sport 22 accept"]
    d = {c.name: [r.text for r in c.rules] for c in nft.host_dispatch_chains(
        {"eth0": (False, False, True, False, True), "*": (False, False, False, True)})}
    assert d[nft.CHAIN_RAW_FROM_HEP] == ['iifname "eth0" goto raw-cali-fh-eth0']
    assert d[nft.CHAIN_RAW_TO_HEP] == ['oifname != "cali*" goto raw-cali-th-all/']
    assert d[nft.CHAIN_MANGLE_FROM_HEP] == ['iifname "eth0" goto mangle-cali-fh-eth0']


def test_ipt_untracked_and_pre_dnat_chains() -> None:
    t = (TierPolicies("default", "Deny", (UNTRACKED,), ()),)
    raw = [r.text for r in ipt.render_endpoint_chain(raw_update(t), INGRESS, chain=ipt.CHAIN_KIND_UNTRACKED)]
    assert raw[0] == "-j cali-failsafe-in" and not any("conntrack" in r for r in raw)
    assert raw[-2:] == ["-m mark --mark 0x10000/0x10000 -j CT --notrack", "-m mark --mark 0x10000/0x10000 -j RETURN"]
    p = (TierPolicies("default", "Deny", (PRE_DNAT,), ()),)
    pre = [r.text for r in ipt.render_endpoint_chain(raw_update(pre_dnat=p), INGRESS, chain=ipt.CHAIN_KIND_PRE_DNAT)]
    assert pre[2] == "-j cali-failsafe-in" and pre[-1] == "-m mark --mark 0x10000/0x10000 -j RETURN"
    assert ipt.host_endpoint_chain_name("eth0", INGRESS, False, "mangle") == "cali-fh-eth0"
    opts = nft.RenderOptions(failsafe_inbound=("tcp:22",), failsafe_outbound=("tcp:6443",))
    by_table: dict[str, dict[str, list[str]]] = {}
    for c in ipt.static_chains(opts):
        by_table.setdefault(c.table, {})[c.name] = [r.text for r in c.rules]
    assert by_table["raw"]["cali-failsafe-in"] == ["-p tcp -m tcp --dport 22 -j ACCEPT",
                                                   "-p tcp -m tcp --sport 6443 -j ACCEPT"]
    assert by_table["raw"]["cali-PREROUTING"] == ["-j MARK --set-mark 0/0x1f0000", "-i cali+ -j RETURN",
                                                  "-j cali-from-host-endpoint",
                                                  "-m mark --mark 0x10000/0x10000 -j ACCEPT"]
    assert by_table["mangle"]["cali-failsafe-in"] == ["-p tcp -m tcp --dport 22 -j ACCEPT"]
    assert by_table["filter"]["cali-FORWARD"][:2] == ["-j MARK --set-mark 0/0x1e0000",
                                                      "-m mark --mark 0/0x10000 -j cali-from-hep-forward"]
    hooks = {(h.table, h.chain): [r.text for r in h.insert] for h in ipt.hooks(opts)}
    assert hooks[("raw", "PREROUTING")] == hooks[("mangle", "PREROUTING")] == ["-j cali-PREROUTING"]
    assert hooks[("raw", "OUTPUT")] == ["-j cali-OUTPUT"]
    d = {(c.table, c.name): [r.text for r in c.rules]
         for c in ipt.host_dispatch_chains({"eth0": (False, False, True, True, True)})}
    assert d[("raw", "cali-from-host-endpoint")] == ["-i eth0 -g cali-fh-eth0"]
    assert d[("raw", "cali-to-host-endpoint")] == ["-o eth0 -g cali-th-eth0"]
    assert d[("mangle", "cali-from-host-endpoint")] == ["-i eth0 -g cali-fh-eth0"]
    assert d[("filter", "cali-from-hep-forward")] == []


def ipt_dataplane_raw(with_raw: bool = True) -> IptablesDataplane:
    ipt_runner = Iptables()
    names = ("nat", "filter", "raw", "mangle") if with_raw else ("nat", "filter")
    return IptablesDataplane([IptablesTable(n, ipt_runner) for n in names], IpSets(Ipset()))


@pytest.mark.parametrize("backend", ["nft", "ipt"])
def test_manager_untracked_and_pre_dnat(backend: str) -> None:
    def tables() -> dict[str, Any]:
        return {"filter": table, "raw": table, "mangle": table} if backend == "nft" else \
            {n: dp.table(n) for n in ("filter", "raw", "mangle")}

    if backend == "nft":
        table = NftTable()
        m = PolicyManager(table)
        r: Any = nft
    else:
        dp = ipt_dataplane_raw()
        m = PolicyManager(dp)
        r = ipt
    t = tables()
    unt = Policy(UNTRACKED, "default", 1, "role == 'node'", (INGRESS,), ingress=(Rule(ACTION_ALLOW),),
                 do_not_track=True, apply_on_forward=True)
    pre = Policy(PRE_DNAT, "default", 1, "role == 'node'", (INGRESS,), ingress=(Rule(ACTION_ALLOW),),
                 pre_dnat=True, apply_on_forward=True)
    m.on_update(ActivePolicyUpdate(unt))
    m.on_update(ActivePolicyUpdate(pre))
    # A workload's tiers list every policy selecting it; it never jumps to untracked / pre-DNAT ones.
    m.on_update(EndpointPolicyUpdate("ns1/a", "calia", (TierPolicies("default", "Deny", (UNTRACKED, PRE_DNAT), ()),),
                                     ()))
    m.on_update(raw_update((TierPolicies("default", "Deny", (UNTRACKED,), ()),),
                           (TierPolicies("default", "Deny", (PRE_DNAT,), ()),)))
    m.complete_deferred_work()
    assert m.errors == {}
    pi_unt, pi_pre = r.policy_chain_name(UNTRACKED, INGRESS), r.policy_chain_name(PRE_DNAT, INGRESS)
    assert t["raw"].has_chain(pi_unt) and t["mangle"].has_chain(pi_pre)
    if backend == "ipt":
        assert not t["filter"].has_chain(pi_unt) and not t["filter"].has_chain(pi_pre)
    raw_fh = r.host_endpoint_chain_name("eth0", INGRESS, False, "raw")
    raw_th = r.host_endpoint_chain_name("eth0", EGRESS, False, "raw")
    man_fh = r.host_endpoint_chain_name("eth0", INGRESS, False, "mangle")
    assert any(pi_unt in x for x in t["raw"].desired_rules(raw_fh) or ())
    assert any(pi_pre in x for x in t["mangle"].desired_rules(man_fh) or ())
    assert t["raw"].desired_rules(raw_th) is None  # no untracked egress policy: no chain
    wl = " ".join(t["filter"].desired_rules(r.endpoint_chain_name("calia", INGRESS)) or ())
    assert "gnp/untracked" not in wl and "gnp/prednat" not in wl and "Start of tier" not in wl
    from_hep = r.CHAIN_RAW_FROM_HEP if backend == "nft" else r.CHAIN_FROM_HEP
    assert raw_fh in " ".join(t["raw"].desired_rules(from_hep) or ())
    # The endpoint loses its untracked policy: the chain and its dispatch go.
    m.on_update(raw_update((), (TierPolicies("default", "Deny", (PRE_DNAT,), ()),)))
    m.complete_deferred_work()
    assert t["raw"].desired_rules(raw_fh) is None and t["raw"].desired_rules(from_hep) == ()
    assert t["mangle"].desired_rules(man_fh) is not None
    m.on_update(EndpointPolicyRemove("hep:h"))
    m.complete_deferred_work()
    assert t["mangle"].desired_rules(man_fh) is None and m.errors == {}


def test_manager_ipt_without_raw_table_reports() -> None:
    m = PolicyManager(ipt_dataplane_raw(with_raw=False))
    m.on_update(ActivePolicyUpdate(Policy(UNTRACKED, "default", 1, "all()", (INGRESS,), do_not_track=True,
                                          apply_on_forward=True)))
    m.on_update(raw_update((TierPolicies("default", "Deny", (UNTRACKED,), ()),)))
    m.complete_deferred_work()
    assert set(m.errors) == {"policy gnp/untracked", "endpoint hep:h"}
    assert "raw table" in m.errors["policy gnp/untracked"]
