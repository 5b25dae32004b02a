"""felixpy.bgpctl.BgpControl's published route snapshot: it re-runs the import rules only for prefixes whose next
hop changed (and for everything when the rules' other inputs change); after every step the snapshot must equal
the import rules applied from scratch to what the speaker has learned. The speaker's RIB is fed with event lines
in ExaBGP's exact format (no loop running, so BgpControl publishes inline)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bgp import routes
from felixpy.bgpctl import BgpControl
from felixpy.calc.messages import BgpAnnounceUpdate, BgpRoutesUpdate, HostTunnelUpdate, Message
from felixpy.ipam.pools import IPPool
from tests.unit.test_exabgp_speaker import P1, P2, update, withdraw

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.pools = [IPPool(name="p", cidr=N("10.244.0.0/16"), block_size=26)]
        self.out: list[BgpRoutesUpdate] = []
        self.ctl = BgpControl(str(tmp), submit=self._submit, pools=lambda: self.pools,
                              ipip_available=lambda: False, sync_timeout=0.0)
        self.announce: frozenset[N] = frozenset()
        self.host: HostTunnelUpdate | None = None

    def _submit(self, msgs: Sequence[Message]) -> None:
        self.out += [m for m in msgs if isinstance(m, BgpRoutesUpdate)]

    def feed(self, *lines: str) -> None:
        for line in lines:
            self.ctl.speaker._on_line(line)
        self.ctl.pools_changed()  # any change notification publishes (inline: no running loop)

    def expected(self) -> tuple[Any, ...]:
        host = self.host
        mine = [host.node_ip.ip] if host is not None and host.node_ip is not None else []
        decided = routes.kernel_routes(self.ctl.speaker.learned(), self.pools,
                                       my_subnet=host.node_ip if host else None, local_blocks=self.announce,
                                       reject_cidrs=(), ipip_available=False, my_addresses=mine)
        return tuple(sorted(((kr.dst, kr.gateway, kr.device, kr.onlink) for kr in decided.values()),
                            key=lambda t: (int(t[0].network_address), t[0].prefixlen)))

    def current(self) -> tuple[Any, ...]:
        assert self.out, "nothing published"
        return self.out[-1].routes


def test_snapshot_follows_every_kind_of_change(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.feed(update(P1, ["10.244.1.0/26", "10.244.2.0/26", "192.168.7.0/24"]))
    assert h.current() == h.expected()
    assert {r[0] for r in h.current()} == {N("10.244.1.0/26"), N("10.244.2.0/26")}  # outside the pool: rejected

    h.feed(update(P2, ["10.244.3.0/26"]), update(P1, ["10.244.1.0/26"], nh=P2))  # new prefix, changed next hop
    assert h.current() == h.expected()
    assert (N("10.244.1.0/26"), A(P2), None, False) in h.current()

    h.feed(withdraw(P1, ["10.244.2.0/26"]))
    assert h.current() == h.expected()
    assert N("10.244.2.0/26") not in {r[0] for r in h.current()}

    # The rules' other inputs: each change re-decides prefixes whose next hop did not change.
    h.pools = [*h.pools, IPPool(name="q", cidr=N("192.168.0.0/16"), block_size=26)]
    h.ctl.pools_changed()
    assert h.current() == h.expected()
    assert N("192.168.7.0/24") in {r[0] for r in h.current()}

    h.announce = frozenset({N("10.244.3.0/26")})  # now one of our own blocks: never installed from a peer
    h.ctl.on_message(BgpAnnounceUpdate(h.announce))
    assert h.current() == h.expected()
    assert N("10.244.3.0/26") not in {r[0] for r in h.current()}

    h.host = HostTunnelUpdate(node_ip=ipaddress.IPv4Interface(f"{P1}/24"), vxlan_enabled=False,
                              vxlan_tunnel_ip=None, vxlan_mac="", ipip_enabled=False, ipip_tunnel_ip=None)
    h.ctl.on_message(h.host)  # P1 is now this node: routes via it are refused
    assert h.current() == h.expected()
    assert all(r[1] != A(P1) for r in h.current())

    h.announce = frozenset()
    h.ctl.on_message(BgpAnnounceUpdate(h.announce))
    assert h.current() == h.expected()
    assert N("10.244.3.0/26") in {r[0] for r in h.current()}


def test_unchanged_rib_publishes_nothing_new(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.feed(update(P1, ["10.244.1.0/26"]))
    n = len(h.out)
    h.ctl.pools_changed()
    h.feed(update(P1, ["10.244.1.0/26"]))  # the same route again
    assert len(h.out) == n
