"""ExaBGP 5 process API, pure parts: rendering commands and parsing what ExaBGP writes to its helper.

The stream from ExaBGP mixes three kinds of lines (lab pitfall P5):

* JSON events, one object per line, always with an ``"exabgp"`` key (API format version ``5.0.0``);
* plain ``done`` / ``error`` acknowledgements, one per command;
* the output of ``show`` commands: a JSON array line (``show neighbor json``) or, with
  ``show-routes-format = v2``, one JSON object per route without an ``"exabgp"`` key
  (``show adj-rib in|out json``).

:func:`classify` tells them apart; the ``parse_*`` functions turn them into small value objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal

# NLRIs per announce/withdraw line: ExaBGP caps one command at 1 MiB, and its reactor handles queued changes
# in small slices anyway; 500 /26s is about 8 KiB.
CHUNK = 500
FAMILY = "ipv4 unicast"

LineKind = Literal["ack", "event", "output", "empty"]


class ApiParseError(ValueError):
    """A line from ExaBGP that does not have the expected shape."""


# --------------------------------------------------------------------------------------------- commands


def _chunks(prefixes: Iterable[IPv4Network], size: int) -> Iterator[list[IPv4Network]]:
    batch: list[IPv4Network] = []
    for p in sorted(prefixes):
        batch.append(p)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _scope(neighbor: IPv4Address | None) -> str:
    return f"neighbor {neighbor} " if neighbor is not None else ""


def render_announce(
    prefixes: Iterable[IPv4Network], *, neighbor: IPv4Address | None = None, chunk: int = CHUNK
) -> list[str]:
    """``announce attributes next-hop self nlri ...`` lines (to every peer, or one ``neighbor``)."""
    return [
        f"{_scope(neighbor)}announce attributes next-hop self nlri {' '.join(map(str, batch))}"
        for batch in _chunks(prefixes, chunk)
    ]


def render_withdraw(
    prefixes: Iterable[IPv4Network], *, neighbor: IPv4Address | None = None, chunk: int = CHUNK
) -> list[str]:
    """``withdraw attributes nlri ...`` lines."""
    return [
        f"{_scope(neighbor)}withdraw attributes nlri {' '.join(map(str, batch))}" for batch in _chunks(prefixes, chunk)
    ]


def render_eor(neighbor: IPv4Address) -> str:
    return f"neighbor {neighbor} announce eor {FAMILY}"


SHOW_NEIGHBORS = "show neighbor json"
SHOW_ADJ_RIB_IN = "show adj-rib in json"
SHOW_ADJ_RIB_OUT = "show adj-rib out json"


# --------------------------------------------------------------------------------------------- lines


def classify(line: str) -> tuple[LineKind, Any]:
    """Split one line (without its newline) into its kind and payload.

    ``ack``: payload is True for ``done``, False for ``error``. ``event``: the decoded event object.
    ``output``: a decoded JSON value for JSON show output, else the raw text. Raises ApiParseError for a line
    that starts like JSON but does not decode.
    """
    if not line:
        return "empty", None
    if line == "done":
        return "ack", True
    if line == "error":
        return "ack", False
    first = line[0]
    if first == "{" or first == "[":
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ApiParseError(f"undecodable JSON line from ExaBGP: {line[:200]!r}") from exc
        if isinstance(obj, dict) and "exabgp" in obj:
            return "event", obj
        return "output", obj
    return "output", line


# --------------------------------------------------------------------------------------------- events


Rank = tuple[int, int]  # (-local_pref, as-path length): smaller is better


@dataclass(frozen=True, slots=True)
class StateEvent:
    peer: IPv4Address
    local: IPv4Address | None
    state: str  # connected | up | down
    reason: str = ""


@dataclass(frozen=True, slots=True)
class OpenEvent:
    peer: IPv4Address
    graceful_restart: int  # restart time the peer advertised; 0 = no graceful restart capability


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    peer: IPv4Address
    local: IPv4Address | None
    rank: Rank
    announce: tuple[tuple[IPv4Address | None, tuple[IPv4Network, ...]], ...]  # (next hop or None, prefixes)
    withdraw: tuple[IPv4Network, ...]
    bad: int = 0  # NLRIs that could not be parsed (not IPv4 unicast prefixes)


@dataclass(frozen=True, slots=True)
class EorEvent:
    peer: IPv4Address


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    peer: IPv4Address
    text: str


@dataclass(frozen=True, slots=True)
class ShutdownEvent:
    """ExaBGP is stopping; stdin EOF follows."""


@dataclass(frozen=True, slots=True)
class OtherEvent:
    kind: str


Event = StateEvent | OpenEvent | UpdateEvent | EorEvent | NotificationEvent | ShutdownEvent | OtherEvent


def _addr(value: object) -> IPv4Address | None:
    if not isinstance(value, str):
        return None
    try:
        return IPv4Address(value)
    except ValueError:
        return None


def _net(item: object) -> IPv4Network | None:
    raw = item.get("nlri") if isinstance(item, dict) else item
    if not isinstance(raw, str):
        return None
    try:
        return IPv4Network(raw)
    except ValueError:
        return None


def rank_of(attributes: Mapping[str, Any] | None) -> Rank:
    """Path preference from BGP attributes (higher local-pref, then shorter AS path, wins)."""
    if not attributes:
        return (-100, 0)
    lp = attributes.get("local-preference", 100)
    path = attributes.get("as-path", ())
    try:
        local_pref = int(lp)
    except (TypeError, ValueError):
        local_pref = 100
    path_len = len(path) if isinstance(path, list | tuple) else 0
    return (-local_pref, path_len)


def _notification_text(n: Mapping[str, Any], direction: str) -> str:
    code, sub = n.get("code"), n.get("subcode")
    msg = str(n.get("message") or "").strip()
    text = f"notification {direction or 'exchanged'} ({code},{sub})"
    return f"{text} {msg}" if msg else text


def parse_event(obj: Mapping[str, Any]) -> Event:
    """Turn one decoded JSON event into a value object; raises ApiParseError if its shape is wrong."""
    kind = obj.get("type")
    nb = obj.get("neighbor")
    if kind == "notification" and not isinstance(nb, dict):
        if obj.get("notification") == "shutdown":
            return ShutdownEvent()
        return OtherEvent("notification")
    if not isinstance(nb, dict):
        return OtherEvent(str(kind))
    addresses = nb.get("address")
    if not isinstance(addresses, dict):
        raise ApiParseError(f"{kind} event without neighbor address")
    peer = _addr(addresses.get("peer"))
    if peer is None:
        return OtherEvent(f"{kind} (not an IPv4 peer)")
    local = _addr(addresses.get("local"))
    direction = str(nb.get("direction") or "")
    if kind == "state":
        return StateEvent(peer, local, str(nb.get("state", "")), str(nb.get("reason", "") or ""))
    if kind == "open":
        if direction != "receive":
            return OtherEvent("open sent")
        caps = (nb.get("open") or {}).get("capabilities") or {}
        gr = caps.get("64")
        time_ = 0
        if isinstance(gr, dict):
            try:
                time_ = int(gr.get("time", 0))
            except (TypeError, ValueError):
                time_ = 0
        return OpenEvent(peer, time_)
    if kind == "notification":
        n = nb.get("notification")
        return NotificationEvent(peer, _notification_text(n if isinstance(n, dict) else {}, direction))
    if kind == "update":
        if direction and direction != "receive":
            return OtherEvent("update sent")
        msg = nb.get("message")
        if not isinstance(msg, dict):
            raise ApiParseError("update event without message")
        if "eor" in msg:
            eor = msg["eor"] or {}
            if eor.get("afi") == "ipv4" and eor.get("safi") == "unicast":
                return EorEvent(peer)
            return OtherEvent("eor (other family)")
        upd = msg.get("update")
        if not isinstance(upd, dict):
            return OtherEvent("update without body")
        return _parse_update(peer, local, upd)
    return OtherEvent(str(kind))


def _parse_update(peer: IPv4Address, local: IPv4Address | None, upd: Mapping[str, Any]) -> UpdateEvent:
    bad = 0
    announce: list[tuple[IPv4Address | None, tuple[IPv4Network, ...]]] = []
    ann = (upd.get("announce") or {}).get(FAMILY) or {}
    if isinstance(ann, dict):
        for nh_text, items in ann.items():
            nh = _addr(nh_text)
            nets: list[IPv4Network] = []
            for item in items if isinstance(items, list) else ():
                net = _net(item)
                if net is None:
                    bad += 1
                else:
                    nets.append(net)
            announce.append((nh, tuple(nets)))
    withdraw: list[IPv4Network] = []
    wd = (upd.get("withdraw") or {}).get(FAMILY) or []
    for item in wd if isinstance(wd, list) else ():
        net = _net(item)
        if net is None:
            bad += 1
        else:
            withdraw.append(net)
    return UpdateEvent(peer, local, rank_of(upd.get("attribute")), tuple(announce), tuple(withdraw), bad)


# --------------------------------------------------------------------------------------------- show output


@dataclass(frozen=True, slots=True)
class NeighborSnapshot:
    peer: IPv4Address
    local: IPv4Address | None
    up: bool
    fsm: str  # IDLE ACTIVE CONNECT OPENSENT OPENCONFIRM ESTABLISHED
    duration: int  # seconds up (meaningful only when up)
    peer_graceful_restart: bool


def parse_neighbors(value: object) -> list[NeighborSnapshot]:
    """The array printed by ``show neighbor json``."""
    if not isinstance(value, list):
        raise ApiParseError("show neighbor json did not return an array")
    out: list[NeighborSnapshot] = []
    for item in value:
        if not isinstance(item, dict):
            continue
        peer_d = item.get("peer") or {}
        local_d = item.get("local") or {}
        peer = _addr(peer_d.get("address"))
        if peer is None:
            continue
        caps = peer_d.get("capabilities") or {}
        try:
            duration = int(item.get("duration") or 0)
        except (TypeError, ValueError):
            duration = 0
        out.append(
            NeighborSnapshot(
                peer=peer,
                local=_addr(local_d.get("address")),
                # "state" is derived from the uptime in whole seconds, so a session younger than 1 s reads
                # "down" in 5.0.15; the FSM state is exact.
                up=str(item.get("fsm") or "").upper() == "ESTABLISHED",
                fsm=str(item.get("fsm") or ""),
                duration=duration,
                peer_graceful_restart=bool(caps.get("graceful-restart")),
            )
        )
    return out


@dataclass
class RibSnapshot:
    """``show adj-rib in|out json`` (v2 format), grouped by peer."""

    routes: dict[IPv4Address, dict[IPv4Network, tuple[IPv4Address | None, Rank]]] = field(default_factory=dict)
    bad: int = 0


def parse_rib(lines: Sequence[object]) -> RibSnapshot:
    snap = RibSnapshot()
    for obj in lines:
        if not isinstance(obj, dict):
            snap.bad += 1
            continue
        peer = _addr((obj.get("peer") or {}).get("address"))
        route = obj.get("route") or {}
        nlri = route.get("nlri") if isinstance(route, dict) else None
        if peer is None or not isinstance(nlri, dict):
            snap.bad += 1
            continue
        fam = nlri.get("family") or {}
        if fam and (fam.get("afi") != "ipv4" or fam.get("safi") != "unicast"):
            continue
        try:
            net = IPv4Network(nlri.get("prefix"))
        except (TypeError, ValueError):
            snap.bad += 1
            continue
        snap.routes.setdefault(peer, {})[net] = (_addr(nlri.get("nexthop")), rank_of(route.get("attributes")))
    return snap
