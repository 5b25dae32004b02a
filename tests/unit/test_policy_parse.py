"""Unit tests for felixpy.model.policy_parse: v3 / k8s policy resources -> felixpy.model.policy values."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from felixpy.datastore import conversion as cv
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
    EntityMatch,
    NetworkSet,
    Policy,
    PolicyKey,
    PortRange,
    Profile,
    Rule,
    Tier,
)
from felixpy.model.policy_parse import (
    KIND_STAGED_GNP,
    KIND_STAGED_KNP,
    KIND_STAGED_NP,
    endpoint_labels,
    parse_network_set,
    parse_policy,
    parse_profile,
    parse_tier,
)
from felixpy.model.resources import InvalidResource
from felixpy.model.selector import parse_selector


def sel(text: str) -> str:
    """Canonical text, to compare against without caring how the expected text is spelled."""
    return parse_selector(text).text


def np_res(spec: dict[str, Any], name: str = "p", namespace: str = "ns1") -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def gnp_res(spec: dict[str, Any], name: str = "g") -> dict[str, Any]:
    return {"kind": "GlobalNetworkPolicy", "metadata": {"name": name}, "spec": spec}


def knp(spec: dict[str, Any], name: str = "k", namespace: str = "ns1",
        warnings: list[str] | None = None) -> Policy:
    res = cv.k8s_network_policy_to_resource({"metadata": {"name": name, "namespace": namespace}, "spec": spec})
    return parse_policy(res, KIND_KNP, warnings=warnings)


def np_rule(rule: dict[str, Any], direction: str = "ingress", namespace: str = "ns1") -> Rule:
    p = parse_policy(np_res({direction: [rule]}, namespace=namespace), KIND_NP)
    return (p.ingress if direction == "ingress" else p.egress)[0]


def gnp_rule(rule: dict[str, Any], direction: str = "ingress") -> Rule:
    p = parse_policy(gnp_res({direction: [rule]}), KIND_GNP)
    return (p.ingress if direction == "ingress" else p.egress)[0]


NS1 = 'projectcalico.org/namespace == "ns1"'
K8S = 'projectcalico.org/orchestrator == "k8s"'


# --- Kubernetes NetworkPolicy ----------------------------------------------------------------------------


def test_k8s_default_deny_ingress() -> None:
    p = knp({"podSelector": {}, "policyTypes": ["Ingress"]}, name="default-deny")
    assert p.key == PolicyKey(KIND_KNP, "ns1", "default-deny")
    assert p.key.id == "knp/ns1/default-deny"
    assert p.tier == "default" and p.order == 1000.0
    assert p.selector == sel(f"({K8S}) && {NS1}")
    assert p.types == (INGRESS,)
    assert p.ingress == () and p.egress == ()
    assert not p.staged


def test_k8s_default_deny_egress_and_both() -> None:
    assert knp({"podSelector": {}, "policyTypes": ["Egress"]}).types == (EGRESS,)
    assert knp({"podSelector": {}, "policyTypes": ["Egress", "Ingress"]}).types == (INGRESS, EGRESS)


def test_k8s_no_policy_types_defaults_as_kubernetes() -> None:
    # The API server's defaulting: Ingress always, Egress when there are egress rules.
    p = knp({"podSelector": {}, "egress": [{}]})
    assert p.types == (INGRESS, EGRESS)
    assert p.egress == (Rule(action=ACTION_ALLOW),)
    assert knp({"podSelector": {}}).types == (INGRESS,)
    assert knp({"podSelector": {}, "egress": []}).types == (INGRESS,)
    assert knp({"podSelector": {}, "ingress": [{}]}).types == (INGRESS,)
    assert knp({"podSelector": {}, "policyTypes": [], "egress": [{}]}).types == (INGRESS, EGRESS)
    # Given explicitly, policyTypes wins (egress rules without Egress are inert, as in Calico).
    assert knp({"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{}]}).types == (INGRESS,)


def test_k8s_allow_all_ingress() -> None:
    p = knp({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]})
    assert p.selector == sel(f'({K8S} && app == "web") && {NS1}')
    assert p.ingress == (Rule(action=ACTION_ALLOW),)


def test_k8s_pod_selector_same_namespace() -> None:
    p = knp({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                             "ports": [{"port": 80}]}]})
    (r,) = p.ingress
    assert r.protocol == "TCP"  # k8s default protocol
    assert r.source.selector == sel(f'({NS1}) && ({K8S} && app == "client")')
    assert r.destination.ports == (PortRange(80, 80),)
    assert r.destination.selector == ""


def test_k8s_namespace_selector() -> None:
    p = knp({"podSelector": {}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]},
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"x": "y"}}}]},
    ]})
    r1, r2 = p.ingress
    assert r1.source.selector == sel(f'(pcns.team == "a") && ({K8S})')
    # An empty namespaceSelector means every namespace: only namespaced endpoints, not host endpoints.
    assert r2.source.selector == sel(f'(has(projectcalico.org/namespace)) && ({K8S} && x == "y")')


def test_k8s_match_expressions() -> None:
    p = knp({"podSelector": {"matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["a", "b"]},
        {"key": "env", "operator": "NotIn", "values": ["prod"]},
        {"key": "x", "operator": "Exists"},
        {"key": "y", "operator": "DoesNotExist"},
    ]}})
    assert p.selector == sel(f'({K8S} && tier in {{"a", "b"}} && env not in {{"prod"}} && has(x) && !has(y))'
                             f' && {NS1}')
    labels = {"projectcalico.org/orchestrator": "k8s", "projectcalico.org/namespace": "ns1", "tier": "b", "x": "1"}
    assert parse_selector(p.selector).matches(labels)
    assert not parse_selector(p.selector).matches({**labels, "y": ""})


def test_k8s_ip_block_except() -> None:
    p = knp({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.4/32"]}}]}]})
    (r,) = p.egress
    assert r.destination == EntityMatch(nets=(ipaddress.ip_network("10.0.0.0/8"),),
                                        not_nets=(ipaddress.ip_network("10.1.0.0/16"),
                                                  ipaddress.ip_network("10.2.3.4/32")))
    assert r.source == EntityMatch()


def test_k8s_ports_per_protocol_and_peer() -> None:
    p = knp({"podSelector": {}, "ingress": [{
        "from": [{"podSelector": {}}, {"ipBlock": {"cidr": "192.168.0.0/16"}}],
        "ports": [{"port": 81}, {"port": 80}, {"port": "http"}, {"protocol": "UDP", "port": 53},
                  {"port": 8000, "endPort": 8080}, {"port": 82}],
    }]})
    # One rule per protocol (sorted) x peer; numeric ports merged into ranges, named ports kept.
    assert [(r.protocol, bool(r.source.nets)) for r in p.ingress] == [
        ("TCP", False), ("TCP", True), ("UDP", False), ("UDP", True)]
    assert p.ingress[0].destination.ports == ("http", PortRange(80, 82), PortRange(8000, 8080))
    assert p.ingress[2].destination.ports == (PortRange(53, 53),)


def test_k8s_protocol_without_port_allows_all_ports() -> None:
    p = knp({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}, {"protocol": "UDP", "port": 53}]}]})
    (r,) = p.ingress
    assert r.protocol == "UDP" and r.destination.ports == ()


def test_k8s_empty_port_entry_allows_everything() -> None:
    p = knp({"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {}]}]})
    assert p.ingress == (Rule(action=ACTION_ALLOW),)


def test_k8s_sctp() -> None:
    p = knp({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 9}]}]})
    assert p.ingress[0].protocol == "SCTP"


def test_k8s_bad_rule_is_dropped_with_warning() -> None:
    warnings: list[str] = []
    p = knp({"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]},
        {"ports": [{"port": "http", "endPort": 90}]},
        {"from": [{"podSelector": {"matchLabels": {"app": "ok"}}}]},
    ]}, warnings=warnings)
    assert len(p.ingress) == 1 and "app" in p.ingress[0].source.selector
    assert len(warnings) == 2
    assert "spec.ingress[0]" in warnings[0] and "10.0.0.300/8" in warnings[0]
    assert "spec.ingress[1]" in warnings[1]
    assert all(w.startswith("KubernetesNetworkPolicy ns1/k:") for w in warnings)


def test_k8s_bad_pod_selector_rejects_policy() -> None:
    with pytest.raises(InvalidResource, match=r"spec\.podSelector"):
        knp({"podSelector": {"matchLabels": {"bad key": "x"}}})
    with pytest.raises(InvalidResource, match="operator"):
        knp({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}})


def test_v3_form_of_k8s_policy() -> None:
    res = np_res({"order": 1000, "selector": "projectcalico.org/orchestrator == 'k8s'", "types": ["Ingress"]},
                 name="knp.default.deny")
    p = parse_policy(res, KIND_NP)
    assert p.key == PolicyKey(KIND_KNP, "ns1", "deny")
    assert p.selector == knp({"podSelector": {}}).selector


def test_k8s_selector_value_with_quote() -> None:
    p = knp({"podSelector": {"matchLabels": {"a": "it's"}}})
    assert parse_selector(p.selector).matches(
        {"a": "it's", "projectcalico.org/orchestrator": "k8s", "projectcalico.org/namespace": "ns1"})


# --- NetworkPolicy scoping -------------------------------------------------------------------------------


def test_np_selector_scoped_to_namespace() -> None:
    p = parse_policy(np_res({"selector": "app == 'web' || app == 'api'"}), KIND_NP)
    assert p.key == PolicyKey(KIND_NP, "ns1", "p")
    assert p.selector == sel(f'(app == "web" || app == "api") && {NS1}')
    assert not parse_selector(p.selector).matches({"app": "web", "projectcalico.org/namespace": "ns2"})


def test_np_empty_selector_is_whole_namespace() -> None:
    assert parse_policy(np_res({}), KIND_NP).selector == sel(NS1)


def test_np_rule_selector_scoped() -> None:
    r = np_rule({"action": "Allow", "source": {"selector": "app == 'a'"}})
    assert r.source.selector == sel(f'({NS1}) && (app == "a")')


def test_np_rule_not_selector_scopes_positive_selector() -> None:
    r = np_rule({"action": "Deny", "source": {"notSelector": "app == 'a'"}})
    assert r.source.selector == sel(NS1)
    assert r.source.not_selector == sel('app == "a"')


def test_np_rule_nets_only_not_scoped() -> None:
    r = np_rule({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}})
    assert r.source.selector == "" and r.source.nets == (ipaddress.ip_network("10.0.0.0/8"),)


def test_np_rule_namespace_selector() -> None:
    r = np_rule({"action": "Allow", "source": {"selector": "app == 'a'", "namespaceSelector": "team == 'x'"}})
    assert r.source.selector == sel('(pcns.team == "x") && (app == "a")')
    r = np_rule({"action": "Allow", "source": {"namespaceSelector": "team == 'x'"}})
    assert r.source.selector == sel('pcns.team == "x"')


def test_namespace_selector_all_and_global() -> None:
    r = np_rule({"action": "Allow", "source": {"namespaceSelector": "all()"}})
    assert r.source.selector == sel("has(projectcalico.org/namespace)")
    r = np_rule({"action": "Allow", "source": {"namespaceSelector": "global()", "selector": "role == 'db'"}})
    assert r.source.selector == sel('(!has(projectcalico.org/namespace)) && (role == "db")')
    s = parse_selector(r.source.selector)
    assert s.matches({"role": "db"}) and not s.matches({"role": "db", "projectcalico.org/namespace": "ns1"})
    # all() inside a quoted value is left alone.
    r = np_rule({"action": "Allow", "source": {"namespaceSelector": "x == 'all()' || all()"}})
    assert r.source.selector == sel('pcns.x == "all()" || has(projectcalico.org/namespace)')


def test_np_rule_service_accounts() -> None:
    r = np_rule({"action": "Allow", "source": {"serviceAccounts": {"names": ["web", "api"]}}})
    assert r.source.selector == sel(f'({NS1}) && (projectcalico.org/serviceaccount in {{"api", "web"}})')
    r = np_rule({"action": "Allow", "destination": {"serviceAccounts": {"selector": "role == 'x'"}}}, "egress")
    assert r.destination.selector == sel(f'({NS1}) && (pcsa.role == "x")')
    r = np_rule({"action": "Allow", "source": {"selector": "a == 'b'", "namespaceSelector": "all()",
                                               "serviceAccounts": {"names": ["s"], "selector": "k == 'v'"}}})
    assert r.source.selector == sel('((has(projectcalico.org/namespace)) && (a == "b")) && '
                                    '((pcsa.k == "v") && (projectcalico.org/serviceaccount in {"s"}))')


def test_np_service_account_selector_on_policy() -> None:
    p = parse_policy(np_res({"selector": "a == 'b'", "serviceAccountSelector": "role == 'x'"}), KIND_NP)
    assert p.selector == sel(f'((a == "b") && {NS1}) && (pcsa.role == "x")')


def test_equal_selectors_give_equal_text() -> None:
    r1 = np_rule({"action": "Allow", "source": {"selector": "app=='a'"}})
    r2 = np_rule({"action": "Allow", "source": {"selector": '  app  ==  "a" '}})
    assert r1.source.selector == r2.source.selector


def test_rule_explicit_all_differs_from_no_selector() -> None:
    r = gnp_rule({"action": "Allow", "source": {"selector": "all()"}})
    assert r.source.selector == "all()"
    assert gnp_rule({"action": "Allow"}).source.selector == ""


# --- GlobalNetworkPolicy ---------------------------------------------------------------------------------


def test_gnp_basics() -> None:
    p = parse_policy(gnp_res({"order": 10, "tier": "security", "selector": "role == 'x'"}, name="security.g"),
                     KIND_GNP)
    assert p.key == PolicyKey(KIND_GNP, "", "security.g")
    assert p.tier == "security" and p.order == 10.0
    assert p.selector == sel('role == "x"')


def test_gnp_empty_selector_is_all() -> None:
    p = parse_policy(gnp_res({}), KIND_GNP)
    assert p.selector == "all()" and p.order is None and p.tier == "default"


def test_gnp_namespace_selector() -> None:
    p = parse_policy(gnp_res({"selector": "app == 'a'", "namespaceSelector": "env == 'prod'"}), KIND_GNP)
    assert p.selector == sel('(app == "a") && (pcns.env == "prod")')
    p = parse_policy(gnp_res({"namespaceSelector": "all()"}), KIND_GNP)
    assert p.selector == sel("has(projectcalico.org/namespace)")


def test_gnp_rules_not_scoped() -> None:
    r = gnp_rule({"action": "Allow", "source": {"selector": "a == 'b'"}})
    assert r.source.selector == sel('a == "b"')
    r = gnp_rule({"action": "Allow", "source": {"namespaceSelector": "t == 'x'"}})
    assert r.source.selector == sel('pcns.t == "x"')
    r = gnp_rule({"action": "Allow", "source": {"serviceAccounts": {"names": ["a"]}}})
    assert r.source.selector == sel('projectcalico.org/serviceaccount in {"a"}')


def test_gnp_namespace_in_metadata_ignored() -> None:
    res = gnp_res({})
    res["metadata"]["namespace"] = "x"
    assert parse_policy(res, KIND_GNP).key == PolicyKey(KIND_GNP, "", "g")


def test_gnp_untracked_and_prednat_flags() -> None:
    p = parse_policy(gnp_res({"doNotTrack": True, "applyOnForward": True}), KIND_GNP)
    assert p.do_not_track and p.apply_on_forward and not p.pre_dnat
    p = parse_policy(gnp_res({"preDNAT": True, "applyOnForward": True, "ingress": [{"action": "Deny"}]}), KIND_GNP)
    assert p.pre_dnat


@pytest.mark.parametrize(("spec", "needle"), [
    ({"doNotTrack": True, "preDNAT": True, "applyOnForward": True}, "cannot both"),
    ({"doNotTrack": True}, "applyOnForward"),
    ({"preDNAT": True, "applyOnForward": True, "egress": [{"action": "Allow"}]}, "egress"),
    ({"preDNAT": True, "applyOnForward": True, "types": ["Egress"]}, "egress"),
    ({"doNotTrack": "maybe", "applyOnForward": True}, "doNotTrack"),
])
def test_gnp_flag_validation(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidResource, match=needle):
        parse_policy(gnp_res(spec), KIND_GNP)


def test_np_ignores_gnp_only_flags() -> None:
    p = parse_policy(np_res({"doNotTrack": True}), KIND_NP)
    assert not p.do_not_track


# --- types defaulting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "types"), [
    ({}, (INGRESS,)),
    ({"ingress": [{"action": "Allow"}]}, (INGRESS,)),
    ({"egress": [{"action": "Allow"}]}, (EGRESS,)),
    ({"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}, (INGRESS, EGRESS)),
    ({"types": ["Egress", "Ingress"]}, (INGRESS, EGRESS)),
    ({"types": ["egress"], "ingress": [{"action": "Allow"}]}, (EGRESS,)),
])
def test_types(spec: dict[str, Any], types: tuple[str, ...]) -> None:
    assert parse_policy(np_res(spec), KIND_NP).types == types


# --- rule fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "action"), [
    ("Allow", ACTION_ALLOW), ("deny", ACTION_DENY), ("Pass", ACTION_PASS), ("next-tier", ACTION_PASS),
    ("Log", ACTION_LOG),
])
def test_actions(raw: str, action: str) -> None:
    assert gnp_rule({"action": raw}).action == action


@pytest.mark.parametrize(("raw", "proto"), [
    ("TCP", "TCP"), ("tcp", "TCP"), ("udp", "UDP"), ("icmpv6", "ICMPv6"), ("ICMP", "ICMP"),
    ("sctp", "SCTP"), ("udplite", "UDPLite"), (6, "6"), ("47", "47"), (255, "255"),
])
def test_protocols(raw: Any, proto: str) -> None:
    assert gnp_rule({"action": "Allow", "protocol": raw}).protocol == proto
    assert gnp_rule({"action": "Allow", "notProtocol": raw}).not_protocol == proto


def test_ports_and_ranges_and_named() -> None:
    r = gnp_rule({"action": "Allow", "protocol": "TCP",
                  "source": {"ports": [1024, "2000:3000"], "notPorts": ["2500"]},
                  "destination": {"ports": [80, "http", "8080:8081", "0:65535"]}})
    assert r.source.ports == (PortRange(1024, 1024), PortRange(2000, 3000))
    assert r.source.not_ports == (PortRange(2500, 2500),)
    assert r.destination.ports == (PortRange(80, 80), "http", PortRange(8080, 8081), PortRange(0, 65535))


def test_ports_allowed_with_protocol_number() -> None:
    r = gnp_rule({"action": "Allow", "protocol": 17, "destination": {"ports": [53]}})
    assert r.protocol == "17" and r.destination.ports == (PortRange(53, 53),)


def test_icmp_fields() -> None:
    r = gnp_rule({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}, "notICMP": {"type": 3}})
    assert (r.icmp_type, r.icmp_code, r.not_icmp_type, r.not_icmp_code) == (8, 0, 3, None)
    r = gnp_rule({"action": "Allow", "protocol": "ICMPv6", "ipVersion": 6, "icmp": {"type": 128}})
    assert r.icmp_type == 128 and r.ip_version == 6


def test_nets_normalised() -> None:
    r = gnp_rule({"action": "Allow", "ipVersion": 4, "destination": {"nets": ["10.1.2.3/8", "192.168.1.1"]}})
    assert r.destination.nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.1/32"))
    r = gnp_rule({"action": "Allow", "source": {"notNets": ["fd00::1/64"]}})
    assert r.source.not_nets == (ipaddress.ip_network("fd00::/64"),)


def test_rule_metadata() -> None:
    r = gnp_rule({"action": "Allow", "metadata": {"annotations": {"b": "2", "a": "1"}}})
    assert r.metadata == (("a", "1"), ("b", "2"))


def test_policy_key_ids() -> None:
    assert parse_policy(np_res({}), KIND_NP).key.id == "np/ns1/p"
    assert parse_policy(gnp_res({}), KIND_GNP).key.id == "gnp/g"


# --- invalid input: each with a clear message naming the field ------------------------------------------


@pytest.mark.parametrize(("rule", "needle"), [
    ({"action": "Accept"}, r"spec\.ingress\[0\]\.action: unknown action 'Accept'"),
    ({}, r"spec\.ingress\[0\]\.action"),
    ({"action": "Allow", "protocol": "tcpx"}, r"spec\.ingress\[0\]\.protocol: unknown protocol 'tcpx'"),
    ({"action": "Allow", "protocol": 0}, r"protocol: protocol number 0 is out of range"),
    ({"action": "Allow", "protocol": 256}, r"protocol: protocol number 256"),
    ({"action": "Allow", "protocol": True}, r"protocol"),
    ({"action": "Allow", "notProtocol": "bogus"}, r"notProtocol"),
    ({"action": "Allow", "destination": {"ports": [80]}}, r"destination: ports can only be used with protocol"),
    ({"action": "Allow", "protocol": "ICMP", "destination": {"ports": [80]}}, r"ports can only be used"),
    ({"action": "Allow", "protocol": "UDPLite", "source": {"notPorts": [80]}}, r"source: ports can only"),
    ({"action": "Allow", "protocol": "TCP", "destination": {"ports": [70000]}}, r"ports\[0\]: 70000 is out of range"),
    ({"action": "Allow", "protocol": "TCP", "destination": {"ports": ["90:80"]}}, r"first port above its last"),
    ({"action": "Allow", "protocol": "TCP", "destination": {"ports": ["80:x"]}}, r"invalid port range"),
    ({"action": "Allow", "protocol": "TCP", "destination": {"ports": ["bad name!"]}}, r"invalid port name"),
    ({"action": "Allow", "protocol": "TCP", "destination": {"ports": [True]}}, r"invalid port"),
    ({"action": "Allow", "protocol": "TCP", "icmp": {"type": 8}}, r"icmp/notICMP can only be used"),
    ({"action": "Allow", "icmp": {"type": 8}}, r"icmp/notICMP"),
    ({"action": "Allow", "protocol": "ICMP", "icmp": {"code": 1}}, r"icmp\.code: an ICMP code needs an ICMP type"),
    ({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 255}}, r"icmp\.type: 255 is out of range"),
    ({"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 1, "code": 256}}, r"notICMP\.code"),
    ({"action": "Allow", "protocol": "ICMP", "ipVersion": 6}, r"ipVersion: protocol ICMP does not match"),
    ({"action": "Allow", "protocol": "ICMPv6", "ipVersion": 4}, r"ipVersion"),
    ({"action": "Allow", "ipVersion": 5}, r"ipVersion: must be 4 or 6"),
    ({"action": "Allow", "source": {"nets": ["10.0.0.0/33"]}}, r"source\.nets\[0\]: invalid CIDR '10\.0\.0\.0/33'"),
    ({"action": "Allow", "destination": {"notNets": ["nope"]}}, r"destination\.notNets\[0\]: invalid CIDR"),
    ({"action": "Allow", "source": {"nets": "10.0.0.0/8"}}, r"source\.nets: must be a list"),
    ({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}, "destination": {"nets": ["fd00::/8"]}},
     r"mixes IPv4 and IPv6"),
    ({"action": "Allow", "ipVersion": 6, "source": {"nets": ["10.0.0.0/8"]}}, r"ipVersion 6 does not match"),
    ({"action": "Allow", "source": {"selector": "app =="}}, r"source\.selector: invalid selector"),
    ({"action": "Allow", "source": {"notSelector": "(a"}}, r"source\.notSelector: invalid selector"),
    ({"action": "Allow", "source": {"namespaceSelector": "has("}}, r"source\.namespaceSelector: invalid selector"),
    ({"action": "Allow", "source": {"serviceAccounts": {"selector": "a ="}}}, r"serviceAccounts\.selector"),
    ({"action": "Allow", "source": {"serviceAccounts": {"names": [""]}}}, r"serviceAccounts\.names\[0\]"),
    ({"action": "Allow", "source": {"selector": 5}}, r"source\.selector: must be a string"),
    ({"action": "Allow", "source": {"bogus": 1}}, r"source: unknown field"),
    ({"action": "Allow", "destination": {"services": {"name": "x"}}}, r"destination\.services: .*not supported"),
    ({"action": "Allow", "http": {"methods": ["GET"]}}, r"http: HTTP matches are not supported"),
    ({"action": "Allow", "frobnicate": 1}, r"unknown field"),
    ("Allow", r"spec\.ingress\[0\]: must be an object"),
])
def test_invalid_rules(rule: Any, needle: str) -> None:
    with pytest.raises(InvalidResource, match=needle) as exc:
        parse_policy(np_res({"ingress": [rule]}), KIND_NP)
    assert str(exc.value).startswith("NetworkPolicy ns1/p: ")


@pytest.mark.parametrize(("res", "kind", "needle"), [
    (np_res({}, namespace=""), KIND_NP, r"metadata\.namespace: missing"),
    (np_res({}, name=""), KIND_NP, r"metadata\.name: missing"),
    (np_res({"selector": "a ="}), KIND_NP, r"spec\.selector: invalid selector"),
    (np_res({"order": "first"}), KIND_NP, r"spec\.order: must be a number"),
    (np_res({"order": float("nan")}), KIND_NP, r"spec\.order: must be a finite"),
    (np_res({"types": ["Sideways"]}), KIND_NP, r"spec\.types\[0\]: unknown policy type"),
    (np_res({"ingress": {"action": "Allow"}}), KIND_NP, r"spec\.ingress: must be a list"),
    (np_res({"serviceAccountSelector": "x =="}), KIND_NP, r"spec\.serviceAccountSelector"),
    (np_res({"tier": 3}), KIND_NP, r"spec\.tier: must be a string"),
    (gnp_res({"namespaceSelector": "!"}), KIND_GNP, r"spec\.namespaceSelector"),
    ({"metadata": {"name": "x"}, "spec": []}, KIND_GNP, r"spec: must be an object"),
    (np_res({}), "Pod", r"not a policy kind"),
    (np_res({}, name="knp.default."), KIND_NP, r"metadata\.name"),
])
def test_invalid_policies(res: Any, kind: str, needle: str) -> None:
    with pytest.raises(InvalidResource, match=needle):
        parse_policy(res, kind)


def test_order_accepts_numeric_text() -> None:
    assert parse_policy(np_res({"order": "5.5"}), KIND_NP).order == 5.5


# --- staged kinds ----------------------------------------------------------------------------------------


def test_staged_kinds() -> None:
    p = parse_policy(np_res({"stagedAction": "Set"}), KIND_STAGED_NP)
    assert p.staged and p.key == PolicyKey(KIND_NP, "ns1", "staged:p")
    p = parse_policy(gnp_res({}), KIND_STAGED_GNP)
    assert p.staged and p.key == PolicyKey(KIND_GNP, "", "staged:g")
    res = cv.k8s_network_policy_to_resource({"metadata": {"name": "k", "namespace": "ns1"},
                                             "spec": {"podSelector": {}}})
    p = parse_policy(res, KIND_STAGED_KNP)
    assert p.staged and p.key == PolicyKey(KIND_KNP, "ns1", "staged:k") and p.order == 1000.0


# --- tiers, profiles, network sets, label inheritance ----------------------------------------------------


def test_parse_tier() -> None:
    assert parse_tier({"metadata": {"name": "sec"}, "spec": {"order": 100, "defaultAction": "Pass"}}) == \
        Tier("sec", 100.0, ACTION_PASS)
    assert parse_tier({"metadata": {"name": "other"}, "spec": {}}) == Tier("other", None, ACTION_DENY)
    assert parse_tier({"metadata": {"name": "default"}}).order == 1_000_000.0
    assert parse_tier({"metadata": {"name": "default"}, "spec": {"order": 5}}).order == 5.0


@pytest.mark.parametrize(("res", "needle"), [
    ({"metadata": {"name": "t"}, "spec": {"defaultAction": "Allow"}}, r"Tier t: spec\.defaultAction"),
    ({"metadata": {"name": "t"}, "spec": {"order": "x"}}, r"spec\.order"),
    ({"metadata": {}, "spec": {}}, r"metadata\.name"),
])
def test_parse_tier_invalid(res: Any, needle: str) -> None:
    with pytest.raises(InvalidResource, match=needle):
        parse_tier(res)


def test_parse_profile_from_namespace() -> None:
    res = cv.namespace_to_profile({"metadata": {"name": "shop", "labels": {"team": "a"}}})
    p = parse_profile(res)
    assert p.name == "kns.shop"
    assert p.ingress == (Rule(action=ACTION_ALLOW),) and p.egress == (Rule(action=ACTION_ALLOW),)
    assert p.labels_to_apply == (("pcns.projectcalico.org/name", "shop"), ("pcns.team", "a"))


def test_parse_profile_from_service_account() -> None:
    res = cv.service_account_to_profile({"metadata": {"name": "web", "namespace": "shop", "labels": {"r": "x"}}})
    p = parse_profile(res)
    assert p == Profile("ksa.shop.web", labels_to_apply=(("pcsa.projectcalico.org/name", "web"), ("pcsa.r", "x")))


def test_parse_profile_rules_not_scoped_and_invalid() -> None:
    p = parse_profile({"metadata": {"name": "x"}, "spec": {"ingress": [{"action": "Allow",
                                                                          "source": {"selector": "a == 'b'"}}]}})
    assert p.ingress[0].source.selector == sel('a == "b"')
    with pytest.raises(InvalidResource, match=r"Profile x: spec\.egress\[0\]\.action"):
        parse_profile({"metadata": {"name": "x"}, "spec": {"egress": [{"action": "nope"}]}})
    with pytest.raises(InvalidResource, match=r"labelsToApply\.a: must be a string"):
        parse_profile({"metadata": {"name": "x"}, "spec": {"labelsToApply": {"a": 1}}})


def test_parse_network_sets() -> None:
    g = parse_network_set({"metadata": {"name": "g", "labels": {"a": "b"}},
                           "spec": {"nets": ["10.0.0.1/24", "fd00::/64"]}}, True)
    assert g == NetworkSet("", "g", (("a", "b"),), (ipaddress.ip_network("10.0.0.0/24"),
                                                     ipaddress.ip_network("fd00::/64")))
    n = parse_network_set({"metadata": {"name": "n", "namespace": "ns1"}, "spec": {"nets": ["1.2.3.4"]}}, False)
    assert n.namespace == "ns1" and n.labels == (("projectcalico.org/namespace", "ns1"),)
    assert n.nets == (ipaddress.ip_network("1.2.3.4/32"),)
    # A namespaced rule selector in ns1 matches it; one in another namespace does not.
    r = np_rule({"action": "Allow", "source": {"selector": "all()"}})
    assert parse_selector(r.source.selector).matches(dict(n.labels))
    r2 = np_rule({"action": "Allow", "source": {"selector": "all()"}}, namespace="ns2")
    assert not parse_selector(r2.source.selector).matches(dict(n.labels))
    assert parse_network_set({"metadata": {"name": "e"}}, True).nets == ()


@pytest.mark.parametrize(("res", "global_", "needle"), [
    ({"metadata": {"name": "g"}, "spec": {"nets": ["300.0.0.0/8"]}}, True, r"GlobalNetworkSet g: spec\.nets\[0\]"),
    ({"metadata": {"name": "n", "namespace": "x"}, "spec": {"nets": [1]}}, False, r"NetworkSet x/n: spec\.nets\[0\]"),
    ({"metadata": {"name": "n"}, "spec": {}}, False, r"metadata\.namespace"),
    ({"metadata": {"name": "g", "labels": []}}, True, r"metadata\.labels"),
])
def test_parse_network_set_invalid(res: Any, global_: bool, needle: str) -> None:
    with pytest.raises(InvalidResource, match=needle):
        parse_network_set(res, global_)


def test_endpoint_labels_inheritance() -> None:
    kns = Profile("kns.shop", labels_to_apply=(("pcns.team", "a"), ("shared", "ns")))
    ksa = Profile("ksa.shop.web", labels_to_apply=(("pcsa.r", "x"), ("shared", "sa"), ("app", "from-sa")))
    labels = endpoint_labels({"app": "web", "projectcalico.org/namespace": "shop"}, [kns, ksa])
    assert labels == {"app": "web", "projectcalico.org/namespace": "shop", "pcns.team": "a", "pcsa.r": "x",
                      "shared": "ns"}
    assert endpoint_labels({}, []) == {}


def test_end_to_end_selection_with_inherited_labels() -> None:
    """A k8s policy allowing from namespaces labelled team=a matches a pod whose namespace has that label."""
    kns = parse_profile(cv.namespace_to_profile({"metadata": {"name": "other", "labels": {"team": "a"}}}))
    pod = endpoint_labels({"projectcalico.org/namespace": "other", "projectcalico.org/orchestrator": "k8s"}, [kns])
    p = knp({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]})
    assert parse_selector(p.ingress[0].source.selector).matches(pod)
    p2 = knp({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})
    assert not parse_selector(p2.ingress[0].source.selector).matches(pod)  # other namespace
