"""NAT outgoing ("masquerade"), as Calico's masq manager does it.

Input: the IP pools (:class:`IPPoolUpdate` / :class:`IPPoolRemove`) and this host's tunnel state
(:class:`HostTunnelUpdate`). Output, pushed into whichever backend the manager was given:

- two CIDR sets: ``cali40masq-ipam-pools`` (pools with natOutgoing) and ``cali40all-ipam-pools`` (every
  pool of our IP version: disabled pools included, as in Calico, whose calculation graph passes disabled
  pools to the dataplane like any other);
- chain ``cali-nat-outgoing``: traffic from a natOutgoing pool to a destination outside ALL pools is
  masqueraded (``--random-fully``). The chain always exists (``cali-POSTROUTING`` jumps to it) and holds
  the rule only while at least one pool has natOutgoing, exactly as Felix's ``NATOutgoingChain``;
- chain ``cali-POSTROUTING``: jumps to ``cali-nat-outgoing`` and, for each tunnel device that is on and
  has an address, masquerades host-originated packets leaving it with a source address that is not the
  tunnel's (Felix's static nat POSTROUTING chain; the floating-IP chains are not implemented);
- the hook: nft base chain ``nat-POSTROUTING`` (type nat, priority srcnat+10 = 110, after kube-proxy's
  100) in the ``calico`` table; iptables: ``-j cali-POSTROUTING`` APPENDED to nat ``POSTROUTING``.

nftables names follow Calico's nft mode: chains are ``nat-<chain>`` in table ``ip calico`` (``ip6``
for IPv6), sets keep their ipset names.

``on_update`` only records; ``complete_deferred_work`` renders the small desired state and hands it to
the backend's cheap setters (the drivers diff it against the kernel, so repeating it changes nothing).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from felixpy import names
from felixpy.calc.messages import HostTunnelUpdate, IPPoolRemove, IPPoolUpdate, Message
from felixpy.dataplane.drivers.iptables import IpSets, IptablesDataplane, IptablesTable
from felixpy.dataplane.drivers.nftables import PRIO_SRCNAT, BaseChain, NftTable, Rule
from felixpy.dataplane.shims.iptables import Ipset, Iptables
from felixpy.dataplane.shims.nft import Nft

__all__ = ["IPPoolRemove", "IPPoolUpdate", "MasqManager", "NatOptions", "make_nat_backend"]

log = logging.getLogger(__name__)

MASQ_POOLS_SET_ID = "masq-ipam-pools"
ALL_POOLS_SET_ID = "all-ipam-pools"  # Calico <= 3.30; 3.31+ calls it network-ip-pools
CHAIN_POSTROUTING = "cali-POSTROUTING"
CHAIN_NAT_OUTGOING = "cali-nat-outgoing"
NFT_BASE_POSTROUTING = "nat-POSTROUTING"
NFT_NAT_PRIORITY = PRIO_SRCNAT + 10
MAX_IPSET_NAME = 31
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}\+?$")

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def ipset_name(set_id: str, ip_version: int) -> str:
    """Felix's IP set name: ``cali`` + version + ``0`` + id, cut to 31 characters."""
    return f"cali{ip_version}0{set_id}"[:MAX_IPSET_NAME]


def nft_chain(table: str, chain: str) -> str:
    """Calico's nft mode puts iptables' tables into chain names: ``nat`` + ``cali-POSTROUTING``."""
    return f"{table}-{chain}"


@dataclass(frozen=True)
class NatOptions:
    """Felix's NAT settings (defaults = Felix's defaults).

    - ``random_fully``: ``--random-fully`` / ``fully-random`` on the masquerade (Felix adds it whenever
      iptables and the kernel support it, which they do here).
    - ``snat_address``: ``NATOutgoingAddress``: SNAT to this address instead of masquerading.
    - ``out_interface``: ``IptablesNATOutgoingInterfaceFilter``: only packets leaving this interface
      (``eth+`` style wildcard allowed).
    - ``port_range``: ``NATPortRange``: TCP and UDP get source ports from this range.
    - ``tunnel_masq``: masquerade host packets leaving a tunnel device with a non-tunnel source.
    """

    random_fully: bool = True
    snat_address: IPAddr | None = None
    out_interface: str = ""
    port_range: tuple[int, int] | None = None
    tunnel_masq: bool = True

    def validate(self, ip_version: int) -> None:
        if self.snat_address is not None and (
                not isinstance(self.snat_address, ipaddress.IPv4Address | ipaddress.IPv6Address)
                or self.snat_address.version != ip_version):
            raise ValueError(f"NAT outgoing address {self.snat_address!r} is not an IPv{ip_version} address")
        if self.out_interface and not _IFACE_RE.match(self.out_interface):
            raise ValueError(f"invalid NAT outgoing interface filter {self.out_interface!r}")
        if self.port_range is not None:
            lo, hi = self.port_range
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 65535):
                raise ValueError(f"invalid NAT port range {self.port_range!r} (want 1 <= min <= max <= 65535)")


# -- pure rendering ---------------------------------------------------------------------------------
def _nft_iface(iface: str) -> str:
    return f'"{iface[:-1]}*"' if iface.endswith("+") else f'"{iface}"'


def nat_outgoing_rules_nft(*, ip_version: int, active: bool, opts: NatOptions) -> list[Rule]:
    """Rules of ``nat-cali-nat-outgoing`` in nft syntax."""
    if not active:
        return []
    ip = "ip" if ip_version == 4 else "ip6"
    match = (f"{ip} saddr @{ipset_name(MASQ_POOLS_SET_ID, ip_version)} "
             f"{ip} daddr != @{ipset_name(ALL_POOLS_SET_ID, ip_version)}")
    if opts.out_interface:
        match += f" oifname {_nft_iface(opts.out_interface)}"
    rnd = " fully-random" if opts.random_fully else ""
    addr = ""
    if opts.snat_address is not None:
        addr = str(opts.snat_address) if ip_version == 4 else f"[{opts.snat_address}]"

    def action(ports: str) -> str:
        if addr:
            return f"snat to {addr}{':' + ports if ports else ''}{rnd}"
        return f"masquerade{' to :' + ports if ports else ''}{rnd}"

    rules: list[Rule] = []
    if opts.port_range is not None:
        ports = f"{opts.port_range[0]}-{opts.port_range[1]}"
        for proto in ("tcp", "udp"):
            rules.append(Rule(f"meta l4proto {proto} {match} counter {action(ports)}"))
            rules.append(Rule(f"meta l4proto {proto} {match} return"))
    rules.append(Rule(f"{match} counter {action('')}"))
    return rules


def nat_outgoing_rules_iptables(*, ip_version: int, active: bool, opts: NatOptions) -> list[str]:
    """Rules of ``cali-nat-outgoing`` as iptables rule specs."""
    if not active:
        return []
    match = (f"-m set --match-set {ipset_name(MASQ_POOLS_SET_ID, ip_version)} src "
             f"-m set ! --match-set {ipset_name(ALL_POOLS_SET_ID, ip_version)} dst")
    if opts.out_interface:
        match += f" -o {opts.out_interface}"
    rnd = " --random-fully" if opts.random_fully else ""

    def action(ports: str) -> str:
        if opts.snat_address is not None:
            addr = str(opts.snat_address) if ip_version == 4 else f"[{opts.snat_address}]"
            return f"-j SNAT --to-source {addr}{':' + ports if ports else ''}{rnd}"
        return f"-j MASQUERADE{' --to-ports ' + ports if ports else ''}{rnd}"

    rules: list[str] = []
    if opts.port_range is not None:
        ports = f"{opts.port_range[0]}-{opts.port_range[1]}"
        for proto in ("tcp", "udp"):
            rules.append(f"-p {proto} {match} {action(ports)}")
            rules.append(f"-p {proto} {match} -j RETURN")
    rules.append(f"{match} {action('')}")
    return rules


def _vxlan_ports() -> str:
    # Keep masqueraded UDP off the VXLAN port (Calico issue 12244): the wider side of 4789 above 1024.
    lo, hi, port = 1024, 65535, names.VXLAN_PORT
    return f"{lo}-{port - 1}" if port - lo >= hi - port else f"{port + 1}-{hi}"


def tunnel_masq_rules_nft(tunnels: Sequence[str], *, vxlan: bool, random_fully: bool) -> list[Rule]:
    rnd = " fully-random" if random_fully else ""
    rules: list[Rule] = []
    for t in tunnels:
        match = f'oifname "{t}" fib saddr . oif type != local fib saddr type local'
        if vxlan:
            rules.append(Rule(f"meta l4proto udp {match} masquerade to :{_vxlan_ports()}{rnd}"))
        rules.append(Rule(f"{match} masquerade{rnd}"))
    return rules


def tunnel_masq_rules_iptables(tunnels: Sequence[str], *, vxlan: bool, random_fully: bool) -> list[str]:
    rnd = " --random-fully" if random_fully else ""
    rules: list[str] = []
    for t in tunnels:
        match = f"-o {t} -m addrtype ! --src-type LOCAL --limit-iface-out -m addrtype --src-type LOCAL"
        if vxlan:
            rules.append(f"-p udp {match} -j MASQUERADE --to-ports {_vxlan_ports()}{rnd}")
        rules.append(f"{match} -j MASQUERADE{rnd}")
    return rules


class MasqManager:
    def __init__(self, dataplane: NftTable | IptablesDataplane | IptablesTable, *, ip_version: int = 4,
                 options: NatOptions | None = None) -> None:
        if ip_version not in (4, 6):
            raise ValueError(f"ip_version must be 4 or 6, not {ip_version}")
        self.options = options if options is not None else NatOptions()
        self.options.validate(ip_version)
        if isinstance(dataplane, NftTable):
            want = "ip" if ip_version == 4 else "ip6"
            if dataplane.family != want:
                raise ValueError(f"an IPv{ip_version} masq manager needs an nft table of family {want}, "
                                 f"not {dataplane.family}")
        elif isinstance(dataplane, IptablesDataplane):
            if "nat" not in dataplane.tables or dataplane.ipsets is None:
                raise ValueError("the iptables backend needs a nat table and IP sets")
            if dataplane.ipsets.ip_version != ip_version:
                raise ValueError(f"the IP sets are IPv{dataplane.ipsets.ip_version}, this manager IPv{ip_version}")
        elif isinstance(dataplane, IptablesTable):
            raise ValueError("the iptables backend needs IP sets too: give an IptablesDataplane (the nat "
                             "IptablesTable plus IpSets), e.g. from make_nat_backend('iptables')")
        else:
            raise ValueError(f"unsupported dataplane backend {dataplane!r}")
        self._dp: NftTable | IptablesDataplane = dataplane
        self.ip_version = ip_version
        self._pools: dict[IPNet, IPPoolUpdate] = {}
        self._host: HostTunnelUpdate | None = None
        self._dirty = True  # program the (empty) sets and chains from the start, as Felix does

    # -- messages (cheap) ---------------------------------------------------------------------------
    def on_update(self, msg: Message) -> None:
        if isinstance(msg, IPPoolUpdate):
            if msg.cidr.version != self.ip_version:
                return
            if self._pools.get(msg.cidr) != msg:
                self._pools[msg.cidr] = msg
                self._dirty = True
        elif isinstance(msg, IPPoolRemove):
            if self._pools.pop(msg.cidr, None) is not None:
                self._dirty = True
        elif isinstance(msg, HostTunnelUpdate) and self._host != msg:
            self._host = msg
            self._dirty = True

    # -- state --------------------------------------------------------------------------------------
    @property
    def masq_pools(self) -> frozenset[IPNet]:
        return frozenset(c for c, p in self._pools.items() if p.nat_outgoing)

    @property
    def all_pools(self) -> frozenset[IPNet]:
        return frozenset(self._pools)

    def tunnels(self) -> list[str]:
        """Tunnel devices that are on and have an address (Felix's static nat POSTROUTING)."""
        h = self._host
        if h is None or self.ip_version != 4 or not self.options.tunnel_masq:
            return []
        out = []
        if h.ipip_enabled and h.ipip_tunnel_ip is not None:
            out.append(names.IPIP_IFACE)
        if h.vxlan_enabled and h.vxlan_tunnel_ip is not None:
            out.append(names.VXLAN_IFACE)
        return out

    # -- dataplane thread ---------------------------------------------------------------------------
    def complete_deferred_work(self) -> None:
        if not self._dirty:
            return
        masq = sorted(self.masq_pools, key=str)
        every = sorted(self.all_pools, key=str)
        active = bool(masq)
        vxlan = self._host is not None and self._host.vxlan_enabled
        masq_set = ipset_name(MASQ_POOLS_SET_ID, self.ip_version)
        all_set = ipset_name(ALL_POOLS_SET_ID, self.ip_version)
        dp = self._dp
        if isinstance(dp, NftTable):
            addr = "ipv4_addr" if self.ip_version == 4 else "ipv6_addr"
            dp.set_set(masq_set, addr, masq, flags=("interval",))
            dp.set_set(all_set, addr, every, flags=("interval",))
            out_chain = nft_chain("nat", CHAIN_NAT_OUTGOING)
            post_chain = nft_chain("nat", CHAIN_POSTROUTING)
            dp.set_chain(out_chain, nat_outgoing_rules_nft(ip_version=self.ip_version, active=active,
                                                           opts=self.options))
            dp.set_chain(post_chain, [f"jump {out_chain}", *tunnel_masq_rules_nft(
                self.tunnels(), vxlan=vxlan, random_fully=self.options.random_fully)])
            dp.set_chain(NFT_BASE_POSTROUTING, [f"jump {post_chain}"],
                         base=BaseChain("nat", "postrouting", NFT_NAT_PRIORITY))
        else:
            assert dp.ipsets is not None
            dp.ipsets.set_ipset(masq_set, "hash:net", masq)
            dp.ipsets.set_ipset(all_set, "hash:net", every)
            nat = dp.table("nat")
            nat.set_chain(CHAIN_NAT_OUTGOING, nat_outgoing_rules_iptables(
                ip_version=self.ip_version, active=active, opts=self.options))
            nat.set_chain(CHAIN_POSTROUTING, [f"-j {CHAIN_NAT_OUTGOING}", *tunnel_masq_rules_iptables(
                self.tunnels(), vxlan=vxlan, random_fully=self.options.random_fully)])
            # Appended, never inserted: Felix's MASQUERADE must come after kube-proxy's mark-based one.
            nat.set_hooks("POSTROUTING", append=[f"-j {CHAIN_POSTROUTING}"])
        self._dirty = False
        log.debug("NAT outgoing: %d of %d pools masqueraded", len(masq), len(every))


def make_nat_backend(kind: str = "nftables", *, ip_version: int = 4, netns: str | None = None,
                     iptables_backend: str = "system", options: NatOptions | None = None,
                     with_filter: bool = False) -> tuple[NftTable | IptablesDataplane, MasqManager]:
    """(driver for the dataplane loop, manager) for ``kind`` ``nftables`` (table ``ip calico``) or
    ``iptables`` (nat table + ``cali40`` IP sets, applied in that order by one driver).

    ``with_filter`` (iptables only): the driver also owns the filter, raw and mangle tables, for the policy
    manager (``PolicyManager(dp)``); the tables share one ``Iptables`` runner and the IP sets."""
    dp: NftTable | IptablesDataplane
    if kind == "nftables":
        dp = NftTable(Nft(netns), family="ip" if ip_version == 4 else "ip6")
    elif kind == "iptables":
        ipt = Iptables(ip_version=ip_version, backend=iptables_backend, netns=netns)
        # With policy: filter, plus raw (doNotTrack host endpoint policy) and mangle (preDNAT policy).
        extra = ["filter", "raw", "mangle"] if with_filter else []
        tables = [IptablesTable("nat", ipt), *(IptablesTable(t, ipt) for t in extra)]
        dp = IptablesDataplane(tables, IpSets(Ipset(netns=netns), ip_version=ip_version))
    else:
        raise ValueError(f"NAT backend must be nftables or iptables, not {kind!r}")
    return dp, MasqManager(dp, ip_version=ip_version, options=options)
