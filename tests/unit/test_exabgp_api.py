"""ExaBGP process-API parsing and command rendering (pure). The sample lines are what ExaBGP 5.0.15 printed
in the lab (tests/integration/test_exabgp_speaker.py runs the real thing)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from bgp import api

A = IPv4Address
N = IPv4Network

HDR = '{ "exabgp": "5.0.0", "time": 1795599868.5, "host" : "vm", "pid" : 27136, "ppid" : 27130, "counter": 1, '
NB = '"neighbor": { "address": { "local": "192.168.77.2", "peer": "192.168.77.1" }, "asn": { "local": 64512, "peer": 64512 }, "router-id": "192.168.77.2" '  # noqa: E501


def ev(kind: str, body: str) -> str:
    return f'{HDR}"type": "{kind}", {NB}, {body} }} }}'


UP = ev("state", '"state": "up"')
DOWN = ev("state", '"state": "down", "reason": "closing connection"')
OPEN = ev(
    "open",
    '"direction": "receive", "open": { "version": 4, "asn": 64512, "hold_time": 9, "router_id": "192.168.77.1", '
    '"capabilities": { "1": { "name": "multiprotocol", "families": [ "ipv4/unicast" ] }, "64": { "name": '
    '"graceful restart", "time": 120, "address-family-flags": { "ipv4/unicast": [ "restart" ] }, "restart-flags": '
    '[ "forwarding" ]  }, "2": { "name": "route-refresh", "variant": "RFC" } } }',
)
ANNOUNCE = ev(
    "update",
    '"direction": "receive", "message": { "update": { "attribute": { "origin": "igp", "local-preference": 100 }, '
    '"announce": { "ipv4 unicast": { "192.168.77.1": [ { "nlri": "10.244.1.0/26" }, { "nlri": "10.244.1.64/26" } ] '
    "} } } }",
)
WITHDRAW = ev(
    "update",
    '"direction": "receive", "message": { "update": { "withdraw": { "ipv4 unicast": '
    '[ { "nlri": "10.244.1.64/26" } ] } } }',
)
EOR = ev("update", '"direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } }')
SHUTDOWN = f'{HDR}"type": "notification", "notification": "shutdown" }}'
NEIGHBORS = (
    '[{"state": "up", "duration": 9, "fsm": "ESTABLISHED", "local": {"capabilities": {"graceful-restart": true}, '
    '"address": "192.168.77.2", "as": 64512, "id": "192.168.77.2", "hold": 9}, "peer": {"capabilities": '
    '{"graceful-restart": true}, "address": "192.168.77.1", "as": 64512, "id": "192.168.77.1", "hold": 9}}, '
    '{"state": "down", "duration": 20, "fsm": "IDLE", "local": {"address": "192.168.77.2"}, "peer": '
    '{"capabilities": {"graceful-restart": null}, "address": "192.168.77.3"}}]'
)
RIB_LINE = (
    '{"peer": {"address": "192.168.77.1"}, "route": {"nlri": {"prefix": "10.244.1.0/26", "nexthop": "192.168.77.1", '
    '"family": {"afi": "ipv4", "safi": "unicast"}}, "attributes": {"origin": "igp", "local-preference": 100}}}'
)


def parsed(line: str) -> api.Event:
    kind, obj = api.classify(line)
    assert kind == "event"
    return api.parse_event(obj)


def test_classify() -> None:
    assert api.classify("done") == ("ack", True)
    assert api.classify("error") == ("ack", False)
    assert api.classify("") == ("empty", None)
    assert api.classify(UP)[0] == "event"
    kind, value = api.classify(NEIGHBORS)
    assert kind == "output" and isinstance(value, list)
    kind, value = api.classify(RIB_LINE)
    assert kind == "output" and value["peer"]["address"] == "192.168.77.1"
    assert api.classify("192.168.77.1 ipv4 unicast 10.244.1.0/26 next-hop 192.168.77.1")[0] == "output"
    with pytest.raises(api.ApiParseError):
        api.classify('{ "exabgp": truncated')


def test_state_open_and_shutdown() -> None:
    assert parsed(UP) == api.StateEvent(A("192.168.77.1"), A("192.168.77.2"), "up", "")
    assert parsed(DOWN) == api.StateEvent(A("192.168.77.1"), A("192.168.77.2"), "down", "closing connection")
    assert parsed(OPEN) == api.OpenEvent(A("192.168.77.1"), 120)
    no_gr = OPEN.replace('"64"', '"99"')
    assert parsed(no_gr) == api.OpenEvent(A("192.168.77.1"), 0)
    assert isinstance(parsed(SHUTDOWN), api.ShutdownEvent)


def test_update_withdraw_eor() -> None:
    up = parsed(ANNOUNCE)
    assert isinstance(up, api.UpdateEvent)
    assert up.peer == A("192.168.77.1") and up.local == A("192.168.77.2")
    assert up.announce == ((A("192.168.77.1"), (N("10.244.1.0/26"), N("10.244.1.64/26"))),)
    assert up.rank == (-100, 0) and up.withdraw == () and up.bad == 0
    wd = parsed(WITHDRAW)
    assert isinstance(wd, api.UpdateEvent) and wd.withdraw == (N("10.244.1.64/26"),) and wd.announce == ()
    assert parsed(EOR) == api.EorEvent(A("192.168.77.1"))


def test_update_attributes_compact_and_bad_nlri() -> None:
    line = ev(
        "update",
        '"direction": "receive", "message": { "update": { "attribute": { "local-preference": 200, "as-path": '
        '[ 65001, 65002 ] }, "announce": { "ipv4 unicast": { "10.0.0.9": [ "10.1.0.0/24", { "nlri": "bogus" } ] '
        "} } } }",
    )
    up = parsed(line)
    assert isinstance(up, api.UpdateEvent)
    assert up.rank == (-200, 2)
    assert up.announce == ((A("10.0.0.9"), (N("10.1.0.0/24"),)),)
    assert up.bad == 1


def test_sent_updates_are_ignored() -> None:
    line = ANNOUNCE.replace('"direction": "receive"', '"direction": "send"')
    assert isinstance(parsed(line), api.OtherEvent)


def test_notification_with_neighbor() -> None:
    line = ev(
        "notification",
        '"direction": "receive", "notification": { "code": 6, "subcode": 2, "data": "", "message": "admin down" }',
    )
    got = parsed(line)
    assert got == api.NotificationEvent(A("192.168.77.1"), "notification receive (6,2) admin down")


def test_event_without_address_is_an_error() -> None:
    with pytest.raises(api.ApiParseError):
        api.parse_event({"exabgp": "5.0.0", "type": "state", "neighbor": {"state": "up"}})


def test_parse_neighbors() -> None:
    got = api.parse_neighbors(api.classify(NEIGHBORS)[1])
    assert got == [
        api.NeighborSnapshot(A("192.168.77.1"), A("192.168.77.2"), True, "ESTABLISHED", 9, True),
        api.NeighborSnapshot(A("192.168.77.3"), A("192.168.77.2"), False, "IDLE", 20, False),
    ]
    with pytest.raises(api.ApiParseError):
        api.parse_neighbors({"not": "a list"})
    # ExaBGP 5.0.15 says "down" for a session established less than a second ago; the FSM is what counts
    fresh = {"state": "down", "duration": 0, "fsm": "ESTABLISHED", "peer": {"address": "1.2.3.4"}}
    young = api.parse_neighbors([fresh])
    assert young[0].up


def test_parse_rib() -> None:
    other_family = RIB_LINE.replace('"afi": "ipv4"', '"afi": "ipv6"')
    snap = api.parse_rib([api.classify(RIB_LINE)[1], api.classify(other_family)[1], "garbage", {"peer": {}}])
    assert snap.routes == {A("192.168.77.1"): {N("10.244.1.0/26"): (A("192.168.77.1"), (-100, 0))}}
    assert snap.bad == 2


def test_render_commands() -> None:
    nets = [N(f"10.0.{i}.0/24") for i in (3, 1, 2)]
    assert api.render_announce(nets, chunk=2) == [
        "announce attributes next-hop self nlri 10.0.1.0/24 10.0.2.0/24",
        "announce attributes next-hop self nlri 10.0.3.0/24",
    ]
    assert api.render_announce(nets[:1], neighbor=A("10.9.9.9")) == [
        "neighbor 10.9.9.9 announce attributes next-hop self nlri 10.0.3.0/24"
    ]
    assert api.render_withdraw(nets) == ["withdraw attributes nlri 10.0.1.0/24 10.0.2.0/24 10.0.3.0/24"]
    assert api.render_announce([]) == []
    assert api.render_eor(A("10.9.9.9")) == "neighbor 10.9.9.9 announce eor ipv4 unicast"
