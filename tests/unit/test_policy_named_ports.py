"""Named ports in the policy calculator (Calico's named-port IP sets) and in the endpoint parser."""

from __future__ import annotations

import ipaddress

from felixpy.calc.policy import PolicyCalculator, PolicyMessage
from felixpy.model.policy import (
    ACTION_ALLOW,
    INGRESS,
    KIND_GNP,
    EndpointPort,
    EntityMatch,
    IPPort,
    IPSetDeltaUpdate,
    IPSetRemove,
    IPSetUpdate,
    Policy,
    PolicyKey,
    Rule,
    named_port_set_id,
    selector_set_id,
)
from felixpy.model.policy_parse import endpoint_ports
from felixpy.model.selector import parse_selector

HTTP = EndpointPort("http", "tcp", 8080)


def canon(sel: str) -> str:
    return parse_selector(sel).text


def nps(sel: str, name: str, proto: str = "tcp") -> str:
    return named_port_set_id(canon(sel), proto, name)


def ipp(addr: str, port: int, proto: str = "tcp") -> IPPort:
    return IPPort(ipaddress.ip_address(addr), proto, port)


def policy(name: str, *rules: Rule, selector: str = "role == 'target'") -> Policy:
    return Policy(key=PolicyKey(KIND_GNP, "", name), tier="default", order=1, selector=selector,
                  types=(INGRESS,), ingress=rules)


def ep(pc: PolicyCalculator, name: str, addr: str, labels: dict[str, str], ports: tuple[EndpointPort, ...] = (),
       *, local: bool = False) -> None:
    pc.set_endpoint(name, local=local, iface=f"cali{name}", labels=labels, profiles=(),
                    addrs=[ipaddress.ip_network(addr)], ports=ports)


def sets(msgs: list[PolicyMessage]) -> dict[str, frozenset[object]]:
    return {m.set_id: frozenset(m.members) for m in msgs if isinstance(m, IPSetUpdate)}


def base() -> PolicyCalculator:
    pc = PolicyCalculator()
    ep(pc, "t", "10.0.0.1/32", {"role": "target"}, local=True)
    ep(pc, "a", "10.0.0.2/32", {"app": "web"}, (HTTP, EndpointPort("dns", "udp", 53)))
    ep(pc, "b", "10.0.0.3/32", {"app": "db"}, (EndpointPort("http", "tcp", 9090),))
    ep(pc, "c", "10.0.0.4/32", {"app": "web"})
    return pc


def test_destination_named_port_without_selector_covers_every_endpoint() -> None:
    pc = base()
    pc.set_policy(PolicyKey(KIND_GNP, "", "p"), policy(
        "p", Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=("http",)))))
    got = sets(pc.flush())
    assert got == {nps("all()", "http"): frozenset({ipp("10.0.0.2", 8080), ipp("10.0.0.3", 9090)})}


def test_named_port_set_is_filtered_by_the_side_selector_and_protocol() -> None:
    pc = base()
    pc.set_policy(PolicyKey(KIND_GNP, "", "p"), policy(
        "p", Rule(ACTION_ALLOW, protocol="UDP", source=EntityMatch(selector="app == 'web'", ports=("dns", "http")))))
    got = sets(pc.flush())
    assert got == {
        selector_set_id(canon("app == 'web'")): frozenset({ipaddress.ip_network("10.0.0.2/32"),
                                                           ipaddress.ip_network("10.0.0.4/32")}),
        nps("app == 'web'", "dns", "udp"): frozenset({ipp("10.0.0.2", 53, "udp")}),
        nps("app == 'web'", "http", "udp"): frozenset(),  # http is a TCP port
    }


def test_label_and_port_changes_touch_only_the_affected_sets() -> None:
    pc = base()
    pc.ip_set_deltas = True
    pc.set_policy(PolicyKey(KIND_GNP, "", "p"), policy(
        "p", Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(selector="app == 'web'", ports=("http",))),
        Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(ports=("admin",)))))
    first = sets(pc.flush())
    web_http, any_admin = nps("app == 'web'", "http"), nps("all()", "admin")
    assert first[web_http] == {ipp("10.0.0.2", 8080)} and first[any_admin] == frozenset()

    # c declares the port: only the http set changes, by a delta.
    ep(pc, "c", "10.0.0.4/32", {"app": "web"}, (EndpointPort("http", "tcp", 8081),))
    assert pc.flush() == [IPSetDeltaUpdate(web_http, added=frozenset({ipp("10.0.0.4", 8081)}),
                                           removed=frozenset())]
    # A port name nobody's rules use: nothing at all.
    ep(pc, "c", "10.0.0.4/32", {"app": "web"}, (EndpointPort("http", "tcp", 8081), EndpointPort("x", "tcp", 1)))
    assert pc.flush() == []
    # b gets the web label: it joins with its own http port number.
    ep(pc, "b", "10.0.0.3/32", {"app": "web"}, (EndpointPort("http", "tcp", 9090),))
    web = selector_set_id(canon("app == 'web'"))  # the rule's selector set gains b too
    assert set(pc.flush()) == {IPSetDeltaUpdate(web, added=frozenset({ipaddress.ip_network("10.0.0.3/32")}),
                                           removed=frozenset()),
                          IPSetDeltaUpdate(web_http, added=frozenset({ipp("10.0.0.3", 9090)}), removed=frozenset())}
    # The port number changes and the address moves.
    ep(pc, "a", "10.0.0.9/32", {"app": "web"}, (EndpointPort("http", "tcp", 80),))
    assert set(pc.flush()) == {IPSetDeltaUpdate(web, added=frozenset({ipaddress.ip_network("10.0.0.9/32")}),
                                           removed=frozenset({ipaddress.ip_network("10.0.0.2/32")})),
                          IPSetDeltaUpdate(web_http, added=frozenset({ipp("10.0.0.9", 80)}),
                                           removed=frozenset({ipp("10.0.0.2", 8080)}))}
    # admin appears on an endpoint that no selector restricts.
    ep(pc, "t", "10.0.0.1/32", {"role": "target"}, (EndpointPort("admin", "tcp", 9999),), local=True)
    assert set(pc.flush()) == {IPSetDeltaUpdate(any_admin, added=frozenset({ipp("10.0.0.1", 9999)}),
                                           removed=frozenset())}
    pc.remove_endpoint("b")
    assert set(pc.flush()) == {IPSetDeltaUpdate(web, added=frozenset(), removed=frozenset({ipaddress.ip_network(
                              "10.0.0.3/32")})),
                          IPSetDeltaUpdate(web_http, added=frozenset(), removed=frozenset({ipp("10.0.0.3", 9090)}))}
    # The policy goes: its sets go after it.
    pc.set_policy(PolicyKey(KIND_GNP, "", "p"), None)
    removed = [m.set_id for m in pc.flush() if isinstance(m, IPSetRemove)]
    assert sorted(removed) == sorted([web_http, any_admin, selector_set_id(canon("app == 'web'"))])


def test_two_set_kinds_share_one_selector() -> None:
    pc = base()
    r1 = Rule(ACTION_ALLOW, protocol="TCP", destination=EntityMatch(selector="app == 'web'", ports=("http",)))
    r2 = Rule(ACTION_ALLOW, protocol="TCP", source=EntityMatch(selector="app == 'web'"))
    pc.set_policy(PolicyKey(KIND_GNP, "", "p"), policy("p", r1, r2))
    got = sets(pc.flush())
    assert set(got) == {nps("app == 'web'", "http"), selector_set_id(canon("app == 'web'"))}
    # Dropping the named-port rule keeps the selector set and its members.
    pc.set_policy(PolicyKey(KIND_GNP, "", "p"), policy("p", r2))
    assert [m for m in pc.flush() if isinstance(m, IPSetRemove | IPSetUpdate)] == [IPSetRemove(nps("app == 'web'",
                                                                                                   "http"))]
    ep(pc, "c", "10.0.0.5/32", {"app": "web"})
    assert sets(pc.flush()) == {selector_set_id(canon("app == 'web'")): frozenset(
        {ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("10.0.0.5/32")})}


def test_endpoint_ports_parser() -> None:
    res = {"spec": {"ports": [
        {"name": "http", "protocol": "TCP", "port": 8080},
        {"name": "dns", "protocol": "udp", "port": 53},
        {"name": "s", "protocol": "SCTP", "port": 9},
        {"name": "", "protocol": "TCP", "port": 1, "hostPort": 30000},  # hostPort only: no name
        {"name": "bad", "protocol": "ICMP", "port": 1},
        {"name": "big", "protocol": "TCP", "port": 70000},
        {"name": "noproto", "port": 81},
        "junk",
    ]}}
    assert endpoint_ports(res) == (HTTP, EndpointPort("dns", "udp", 53), EndpointPort("s", "sctp", 9),
                                   EndpointPort("noproto", "tcp", 81))
    assert endpoint_ports({"spec": {}}) == ()
    assert endpoint_ports({"spec": {"ports": "x"}}) == ()
