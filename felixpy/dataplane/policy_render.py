"""Network policy as nftables rules (pure: text in, text out, no I/O).

Layout (table ``ip calico`` / ``ip6 calico``, shared with the NAT chains, so every name here follows
Calico's nft mode, ``filter-<iptables chain>``; the NAT manager's ``nat-*`` chains never collide):

- base chains ``filter-FORWARD`` and ``filter-INPUT`` (type filter, priority filter = 0, policy accept);
- ``filter-cali-FORWARD``: clears our mark bits, then ``iifname "cali*"`` jumps to the from-workload
  dispatch chain and ``oifname "cali*"`` to the to-workload one (pod to pod on one node runs both:
  the sender's egress chain, then the receiver's ingress chain, which starts by clearing the marks);
  back in ``filter-FORWARD`` a packet with the accept bit is accepted;
- dispatch: chains ``filter-cali-from-wl-dispatch`` / ``filter-cali-to-wl-dispatch`` hold one rule each,
  ``iifname vmap @cali-from-wl-dispatch`` (``oifname``, ``@cali-to-wl-dispatch``): named verdict maps
  from interface to ``goto filter-cali-fw-<iface>`` / ``goto filter-cali-tw-<iface>``, so endpoints come
  and go by map elements; an interface not in the map falls to ``drop`` ("Unknown interface");
- ``filter-cali-INPUT``: ``iifname "cali*" goto filter-cali-wl-to-host``, which runs the from-workload
  dispatch (egress policy applies to pod -> host traffic) and then DefaultEndpointToHostAction;
- endpoint chains ``filter-cali-tw-<iface>`` (to the workload: ingress policy) and
  ``filter-cali-fw-<iface>`` (from the workload: egress policy), Calico's structure (calico-compat 1.6);
- policy chains ``filter-cali-pi-<id>`` / ``filter-cali-po-<id>`` (``PolicyKey.id``, e.g.
  ``knp/ns1/allow-web``), profile chains ``filter-cali-pri-<name>`` / ``filter-cali-pro-<name>``;
- selector IP sets: ``cali40<set id>`` with ``:`` made ``-`` (``cali40s-<hash>``), interval sets of
  ``ipv4_addr`` (``cali60...``, ``ipv6_addr`` in the ip6 table).

Host endpoints (Calico's layout, calico-compat 1.4-1.6): ``filter-cali-INPUT`` continues (after the
workload goto) by clearing the marks, ``jump filter-cali-from-host-endpoint`` and accepting on A; the base
chain ``filter-OUTPUT`` (hook output) -> ``filter-cali-OUTPUT`` returns for workload interfaces, then the
same with ``filter-cali-to-host-endpoint``; ``filter-cali-FORWARD`` starts with ``filter-cali-from-hep-
forward`` and ends with ``filter-cali-to-hep-forward``. The dispatch chains hold ``iifname "<if>" goto
filter-cali-fh-<if>`` (``oifname``, ``-th-``; ``-fhfw-`` / ``-thfw-`` for forwarded traffic) per host
endpoint, the all-interfaces one (``*``, chain suffix ``all/``) last for non-workload interfaces. A host
endpoint chain is the workload one with the failsafe jump after conntrack (``filter-cali-failsafe-in`` /
``-out``: Felix's FailsafeInbound/OutboundHostPorts, accepted before any policy); a forward chain has no
failsafe, no profiles and no final drop (only applyOnForward policies, and only when it has some).

Verdicts and marks (Calico's bits, calico-compat 1.2): a policy chain never accepts. An Allow rule sets
the accept bit A and returns, Pass sets the pass bit P and returns, Deny sets the drop bit D and returns
(Felix 3.30+), Log logs and goes on. The endpoint chain jumps to each policy of a tier while P is clear,
drops a packet with D right after the jump (counting it in that policy's named counter, so a drop is
attributed to endpoint, tier and policy), returns as soon as A is set, drops at the end of a tier nobody
passed (unless the tier's default action is Pass), then tries the profiles the same way and finally drops.
Only ``filter-FORWARD`` (A set) and the workload-to-host chain give the final ``accept``, so one place
decides, as in Felix.

Overlay between nodes (Felix's filterInputChain / filterOutputChain, felix/rules/static.go): with
``RenderOptions.ipip_enabled`` / ``vxlan_enabled``, ``filter-cali-INPUT`` starts by accepting IPIP (proto 4)
/ VXLAN (udp dport ``vxlan_port``) from the all-hosts set (``cali40all-hosts-net``) to a local address and
dropping the rest of it, and ``filter-cali-OUTPUT`` accepts the same from a local address to the set before
host endpoint egress, so no host endpoint policy can cut the pod network between nodes.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from felixpy.dataplane.drivers.nftables import PRIO_FILTER, PRIO_MANGLE, PRIO_RAW, BaseChain, legal_set_name
from felixpy.dataplane.drivers.nftables import Rule as NftRule
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_PASS,
    ACTIONS,
    ALL_HOSTS_SET_ID,
    EGRESS,
    HEP_ALL_INTERFACES,
    INGRESS,
    KIND_GNP,
    KIND_KNP,
    KIND_NP,
    EndpointPolicyUpdate,
    EntityMatch,
    IPNet,
    NamedPortSet,
    Policy,
    PolicyKey,
    PortRange,
    Profile,
    Rule,
    TierPolicies,
    rule_named_port_sets,
    selector_set_id,
    side_named_port_sets,
)
from felixpy.model.selector import SelectorError, parse_selector

# -- names ------------------------------------------------------------------------------------------
CHAIN_BASE_FORWARD = "filter-FORWARD"
CHAIN_BASE_INPUT = "filter-INPUT"
CHAIN_BASE_OUTPUT = "filter-OUTPUT"
CHAIN_OUTPUT = "filter-cali-OUTPUT"
CHAIN_FROM_HEP = "filter-cali-from-host-endpoint"
CHAIN_TO_HEP = "filter-cali-to-host-endpoint"
CHAIN_FROM_HEP_FWD = "filter-cali-from-hep-forward"
CHAIN_TO_HEP_FWD = "filter-cali-to-hep-forward"
CHAIN_FAILSAFE_IN = "filter-cali-failsafe-in"
CHAIN_FAILSAFE_OUT = "filter-cali-failsafe-out"
CHAIN_FORWARD = "filter-cali-FORWARD"
CHAIN_INPUT = "filter-cali-INPUT"
CHAIN_WL_TO_HOST = "filter-cali-wl-to-host"
CHAIN_FROM_WL_DISPATCH = "filter-cali-from-wl-dispatch"
CHAIN_TO_WL_DISPATCH = "filter-cali-to-wl-dispatch"
MAP_FROM_WL_DISPATCH = "cali-from-wl-dispatch"  # sets and chains have separate namespaces in nft
MAP_TO_WL_DISPATCH = "cali-to-wl-dispatch"

PREFIX_POLICY_IN = "filter-cali-pi-"
PREFIX_POLICY_OUT = "filter-cali-po-"
PREFIX_PROFILE_IN = "filter-cali-pri-"
PREFIX_PROFILE_OUT = "filter-cali-pro-"
PREFIX_TO_WL = "filter-cali-tw-"
PREFIX_FROM_WL = "filter-cali-fw-"
PREFIX_FROM_HEP = "filter-cali-fh-"  # traffic from the host endpoint into the host: its ingress policy
PREFIX_TO_HEP = "filter-cali-th-"  # from the host out through the endpoint: egress policy
PREFIX_FROM_HEP_FWD = "filter-cali-fhfw-"
PREFIX_TO_HEP_FWD = "filter-cali-thfw-"
# The chain suffix of an all-interfaces host endpoint: "/" is in no interface name, so it never collides.
HEP_ALL_SUFFIX = "all/"
# Untracked (do-not-track, raw priority) and pre-DNAT (mangle priority) policy: Felix's raw / mangle tables,
# here base chains of our one table named as Felix's nft mode names them.
CHAIN_BASE_RAW_PREROUTING = "raw-PREROUTING"
CHAIN_BASE_RAW_OUTPUT = "raw-OUTPUT"
CHAIN_BASE_MANGLE_PREROUTING = "mangle-PREROUTING"
CHAIN_RAW_PREROUTING = "raw-cali-PREROUTING"
CHAIN_RAW_OUTPUT = "raw-cali-OUTPUT"
CHAIN_MANGLE_PREROUTING = "mangle-cali-PREROUTING"
CHAIN_RAW_FROM_HEP = "raw-cali-from-host-endpoint"
CHAIN_RAW_TO_HEP = "raw-cali-to-host-endpoint"
CHAIN_MANGLE_FROM_HEP = "mangle-cali-from-host-endpoint"
CHAIN_RAW_FAILSAFE_IN = "raw-cali-failsafe-in"  # raw's also pass replies of the other direction's ports
CHAIN_RAW_FAILSAFE_OUT = "raw-cali-failsafe-out"
TABLE_FILTER, TABLE_RAW, TABLE_MANGLE = "filter", "raw", "mangle"
# Endpoint chain kinds (render_endpoint_chain's ``chain``).
CHAIN_KIND_WORKLOAD = "workload"
CHAIN_KIND_HOST = "host"
CHAIN_KIND_FORWARD = "forward"
CHAIN_KIND_UNTRACKED = "untracked"  # a host endpoint's do-not-track chain (raw)
CHAIN_KIND_PRE_DNAT = "prednat"  # a host endpoint's pre-DNAT chain (mangle, ingress only)
_CHAIN_KINDS = (CHAIN_KIND_WORKLOAD, CHAIN_KIND_HOST, CHAIN_KIND_FORWARD, CHAIN_KIND_UNTRACKED, CHAIN_KIND_PRE_DNAT)
# The table (Felix's; nft: the chain name's prefix) each endpoint chain kind lives in.
CHAIN_KIND_TABLE = {CHAIN_KIND_WORKLOAD: TABLE_FILTER, CHAIN_KIND_HOST: TABLE_FILTER, CHAIN_KIND_FORWARD: TABLE_FILTER,
                    CHAIN_KIND_UNTRACKED: TABLE_RAW, CHAIN_KIND_PRE_DNAT: TABLE_MANGLE}


def policy_table(policy: Policy) -> str:
    """Where a policy's chains live: do-not-track ones in raw, pre-DNAT ones in mangle, others in filter
    (nft: all in our one table, under the same names; iptables: that table)."""
    return TABLE_RAW if policy.do_not_track else TABLE_MANGLE if policy.pre_dnat else TABLE_FILTER
# Felix's FailsafeInboundHostPorts / FailsafeOutboundHostPorts defaults.
DEFAULT_FAILSAFE_IN = ("tcp:22", "udp:68", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473", "tcp:6443", "tcp:6666",
                       "tcp:6667")
DEFAULT_FAILSAFE_OUT = ("udp:53", "udp:67", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473", "tcp:6443", "tcp:6666",
                        "tcp:6667")

# nft allows 255 characters; longer ids are hashed well before that so names stay readable in listings.
MAX_CHAIN_NAME = 96
_HASH_CHARS = 20
_READABLE_RE = re.compile(r"^[A-Za-z0-9./-]+$")  # never "_": only a hashed name contains one
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,14}$")
_SET_ID_RE = re.compile(r"^[a-z]:[A-Za-z0-9_.-]{1,200}$")

# Room for a rule comment: the driver's 128-byte limit minus its "cali:<16>; " prefix, with slack.
MAX_COMMENT_BYTES = 100

_KIND_TEXT = {KIND_NP: "NetworkPolicy", KIND_GNP: "GlobalNetworkPolicy", KIND_KNP: "KubernetesNetworkPolicy"}
_PROTO_NAMES = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "sctp": "sctp", "udplite": "udplite",
                "icmpv6": "ipv6-icmp"}
_PORT_PROTOS = frozenset({"tcp", "udp", "sctp", "udplite", "6", "17", "132", "136"})
_ICMP4 = frozenset({"icmp", "1"})
_ICMP6 = frozenset({"ipv6-icmp", "58"})
_DIRECTIONS = (INGRESS, EGRESS)
_HOST_ACTIONS = {"ACCEPT": "accept", "DROP": "drop", "RETURN": "return"}
# ICMPv6 a workload needs to reach its host (router/neighbour discovery, MLD), as Felix's wl-to-host.
_ICMP6_TO_HOST = (130, 131, 132, 133, 135, 136)


class PolicyRenderError(ValueError):
    """A policy, profile, rule or endpoint that cannot be expressed (bad input; nothing is rendered)."""


@dataclass(frozen=True)
class Marks:
    """The mark bits policy uses (Felix's defaults under mask 0xffff0000)."""

    accept: int = 0x10000
    pass_: int = 0x20000
    drop: int = 0x40000  # Felix 3.30+: a Deny rule sets it and returns; the endpoint chain drops (and counts)

    def validate(self) -> None:
        for name, bit in (("accept", self.accept), ("pass", self.pass_), ("drop", self.drop)):
            if not isinstance(bit, int) or isinstance(bit, bool) or bit <= 0 or bit >= 2**32 or bit & (bit - 1):
                raise ValueError(f"{name} mark must be a single bit of 32, not {bit!r}")
        if len({self.accept, self.pass_, self.drop}) != 3:
            raise ValueError("accept, pass and drop marks must differ")

    @property
    def verdicts(self) -> int:
        """Every verdict bit (cleared when an endpoint chain starts)."""
        return self.accept | self.pass_ | self.drop


@dataclass(frozen=True)
class RenderOptions:
    """Felix settings that shape the rules (defaults are Felix's, except the host action: see below).

    - ``endpoint_to_host_action``: DefaultEndpointToHostAction, ACCEPT | DROP | RETURN, applied to
      workload -> host traffic after the workload's egress policy allowed it (Felix defaults to DROP; the
      Calico manifests set ACCEPT, which is what clusters run).
    - ``allow_vxlan_from_workloads`` / ``allow_ipip_from_workloads``: otherwise encapsulated packets sent
      by a workload are dropped first thing in its egress chain.
    - ``drop_invalid``: ``ct state invalid drop`` (DisableConntrackInvalidCheck=false).
    - ``vxlan_enabled`` / ``ipip_enabled``: this node runs the IPv4 VXLAN / IPIP overlay, so INPUT accepts
      it from the all-hosts set (and drops it from anywhere else) and OUTPUT accepts it to that set, before
      host endpoint policy (Felix's VXLANEnabled / IPIPEnabled; the policy manager turns them on from the
      pools too). Only rendered for IPv4.
    """

    ip_version: int = 4
    marks: Marks = field(default_factory=Marks)
    iface_prefix: str = "cali"
    endpoint_to_host_action: str = "ACCEPT"
    allow_vxlan_from_workloads: bool = False
    allow_ipip_from_workloads: bool = False
    vxlan_port: int = 4789
    log_prefix: str = "calico-packet: "
    drop_invalid: bool = True
    # FELIXPY_LOG_DROPS: every policy drop is also logged (rate-limited) with a prefix naming the pod and
    # the policy; read by the daemon into this field, off by default.
    log_drops: bool = False
    drop_log_rate: int = 10  # per second, per drop rule
    # Host ports no host-endpoint policy can close ("proto:port" or "proto:cidr:port"; the cidr is the
    # remote side: source inbound, destination outbound), from Config.failsafe_inbound/_outbound.
    failsafe_inbound: tuple[str, ...] = DEFAULT_FAILSAFE_IN
    failsafe_outbound: tuple[str, ...] = DEFAULT_FAILSAFE_OUT
    vxlan_enabled: bool = False
    ipip_enabled: bool = False

    def validate(self) -> None:
        if self.ip_version not in (4, 6):
            raise ValueError(f"ip_version must be 4 or 6, not {self.ip_version!r}")
        self.marks.validate()
        if not _PREFIX_RE.match(self.iface_prefix):
            raise ValueError(f"invalid interface prefix {self.iface_prefix!r}")
        if self.endpoint_to_host_action not in _HOST_ACTIONS:
            raise ValueError(f"endpoint to host action must be one of {sorted(_HOST_ACTIONS)}, "
                             f"not {self.endpoint_to_host_action!r}")
        if not isinstance(self.vxlan_port, int) or not 1 <= self.vxlan_port <= 65535:
            raise ValueError(f"invalid VXLAN port {self.vxlan_port!r}")
        if not isinstance(self.drop_log_rate, int) or not 1 <= self.drop_log_rate <= 10000:
            raise ValueError(f"invalid drop log rate {self.drop_log_rate!r} (1-10000 per second)")
        for item in (*self.failsafe_inbound, *self.failsafe_outbound):
            try:
                parse_failsafe(item)
            except PolicyRenderError as e:
                raise ValueError(str(e)) from None
        if '"' in self.log_prefix or "\\" in self.log_prefix or any(ord(c) < 32 for c in self.log_prefix) \
                or len(self.log_prefix.encode()) > 127:
            raise ValueError(f"invalid log prefix {self.log_prefix!r} (max 127 bytes, no quotes)")


def parse_failsafe(item: str) -> tuple[str, IPNet | None, int]:
    """A failsafe entry ``proto:port`` or ``proto:cidr:port`` -> (tcp|udp|sctp, net or None, port)."""
    parts = item.strip().lower().split(":") if isinstance(item, str) else []
    if len(parts) > 3:  # an IPv6 CIDR holds colons (optionally in brackets): proto:<cidr>:port
        parts = [parts[0], ":".join(parts[1:-1]).strip("[]"), parts[-1]]
    if len(parts) not in (2, 3) or parts[0] not in ("tcp", "udp", "sctp") or not parts[-1].isdigit() \
            or not 0 <= int(parts[-1]) <= 65535:
        raise PolicyRenderError(f"invalid failsafe entry {item!r} (want proto:port or proto:cidr:port)")
    net: IPNet | None = None
    if len(parts) == 3:
        try:
            net = ipaddress.ip_network(parts[1], strict=False)
        except ValueError:
            raise PolicyRenderError(f"invalid CIDR in failsafe entry {item!r}") from None
    return parts[0], net, int(parts[-1])


DEFAULT_OPTIONS = RenderOptions()


@dataclass(frozen=True)
class ChainSpec:
    """One chain to hand to the driver."""

    name: str
    rules: tuple[NftRule, ...]
    base: BaseChain | None = None
    table: str = TABLE_FILTER  # iptables: the table it goes in (nft: one table, the name says it)


def _limited(prefix: str, suffix: str) -> str:
    """``prefix + suffix`` if that is a plain, short enough name, else a readable start and a hash
    (Calico's GetLengthLimitedID idea, with nft's room instead of iptables' 28 characters)."""
    if not suffix:
        raise PolicyRenderError(f"empty name after {prefix!r}")
    if _READABLE_RE.match(suffix) and len(prefix) + len(suffix) <= MAX_CHAIN_NAME:
        return prefix + suffix
    digest = base64.urlsafe_b64encode(hashlib.sha256(suffix.encode()).digest()).decode()[:_HASH_CHARS]
    room = MAX_CHAIN_NAME - len(prefix) - _HASH_CHARS - 1
    readable = re.sub(r"[^A-Za-z0-9./-]", ".", suffix)[:room]
    return f"{prefix}{readable}_{digest}"


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise PolicyRenderError(f"direction must be {INGRESS} or {EGRESS}, not {direction!r}")


def policy_chain_name(key: PolicyKey, direction: str) -> str:
    _check_direction(direction)
    return _limited(PREFIX_POLICY_IN if direction == INGRESS else PREFIX_POLICY_OUT, key.id)


def profile_chain_name(name: str, direction: str) -> str:
    _check_direction(direction)
    return _limited(PREFIX_PROFILE_IN if direction == INGRESS else PREFIX_PROFILE_OUT, name)


def check_iface(iface: str) -> str:
    if not isinstance(iface, str) or not _IFACE_RE.match(iface):
        raise PolicyRenderError(f"invalid interface name {iface!r}")
    return iface


def endpoint_chain_name(iface: str, direction: str) -> str:
    """Ingress policy lives in the to-workload chain (``tw``), egress in the from-workload one (``fw``)."""
    _check_direction(direction)
    return _limited(PREFIX_TO_WL if direction == INGRESS else PREFIX_FROM_WL, check_iface(iface))


def host_endpoint_chain_name(iface: str, direction: str, forward: bool = False, table: str = TABLE_FILTER) -> str:
    """Ingress policy of a host endpoint lives in the from-host chain (``fh``, ``fhfw`` for forwarded
    traffic), egress in the to-host-endpoint one (``th`` / ``thfw``); ``*`` is the all-interfaces one.
    ``table`` raw / mangle: the untracked / pre-DNAT chain (``raw-cali-fh-<if>``, Felix's nft names)."""
    _check_direction(direction)
    if forward:
        prefix = PREFIX_FROM_HEP_FWD if direction == INGRESS else PREFIX_TO_HEP_FWD
    else:
        prefix = PREFIX_FROM_HEP if direction == INGRESS else PREFIX_TO_HEP
    if table != TABLE_FILTER:
        if forward or table not in (TABLE_RAW, TABLE_MANGLE) or (table == TABLE_MANGLE and direction != INGRESS):
            raise PolicyRenderError(f"no {table} host endpoint chain for {direction} (forward={forward})")
        prefix = table + prefix[len(TABLE_FILTER):]
    return _limited(prefix, HEP_ALL_SUFFIX if iface == HEP_ALL_INTERFACES else check_iface(iface))


def nft_set_name(set_id: str, ip_version: int) -> str:
    """Felix's IP set name (``cali`` + version + ``0`` + id) made legal for nft (``:`` -> ``-``).
    Only typed ids (``s:...`` selectors, ``n:...`` named ports) are accepted, so a dynamic set can never
    take the name of a static one such as the NAT manager's ``cali40masq-ipam-pools``."""
    if not isinstance(set_id, str) or not (_SET_ID_RE.match(set_id) or set_id == ALL_HOSTS_SET_ID):
        raise PolicyRenderError(f"invalid IP set id {set_id!r} (want '<type letter>:<id>')")
    if ip_version not in (4, 6):
        raise PolicyRenderError(f"invalid IP version {ip_version!r}")
    return legal_set_name(f"cali{ip_version}0{set_id}")


def static_set_ids(opts: RenderOptions) -> frozenset[str]:
    """The IP sets the static chains refer to (the all-hosts set while an IPv4 overlay is on)."""
    if opts.ip_version == 4 and (opts.vxlan_enabled or opts.ipip_enabled):
        return frozenset({ALL_HOSTS_SET_ID})
    return frozenset()


def overlay_rules(opts: RenderOptions, inbound: bool) -> list[NftRule]:
    """Felix's overlay allowances (felix/rules/static.go filterInputChain / filterOutputChain): inbound,
    IPIP / VXLAN from a Calico host to a local address is accepted and the rest of it dropped; outbound,
    the same from a local address to a Calico host is accepted. The protocol by number, as Felix does."""
    if opts.ip_version != 4:
        return []
    hosts = "@" + nft_set_name(ALL_HOSTS_SET_ID, 4)
    out: list[NftRule] = []
    vxlan = f"meta l4proto udp udp dport {opts.vxlan_port}"
    if inbound:
        if opts.ipip_enabled:
            out += [NftRule(f"meta l4proto 4 ip saddr {hosts} fib daddr type local accept",
                            "Allow IPIP packets from Calico hosts"),
                    NftRule("meta l4proto 4 drop", "Drop IPIP packets from non-Calico hosts")]
        if opts.vxlan_enabled:
            out += [NftRule(f"{vxlan} ip saddr {hosts} fib daddr type local accept",
                            "Allow IPv4 VXLAN packets from allowed hosts"),
                    NftRule(f"{vxlan} fib daddr type local drop", "Drop IPv4 VXLAN packets from non-allowed hosts")]
        return out
    if opts.ipip_enabled:
        out.append(NftRule(f"meta l4proto 4 ip daddr {hosts} fib saddr type local accept",
                           "Allow IPIP packets to other Calico hosts"))
    if opts.vxlan_enabled:
        out.append(NftRule(f"{vxlan} fib saddr type local ip daddr {hosts} accept",
                           "Allow IPv4 VXLAN packets to other allowed hosts"))
    return out


def set_id_for_selector(selector: str) -> str:
    """The set id of an effective selector: :func:`selector_set_id` of its canonical text."""
    try:
        canonical = parse_selector(selector).text
    except SelectorError as e:
        raise PolicyRenderError(f"invalid selector {selector!r}: {e}") from None
    return selector_set_id(canonical)


def rule_set_ids(rule: Rule) -> frozenset[str]:
    """The IP sets a rule refers to (whatever IP version it renders for): selector sets and named-port
    sets (``n:`` ids)."""
    out = set()
    for side in (rule.source, rule.destination):
        for sel in (side.selector, side.not_selector):
            if sel:
                out.add(set_id_for_selector(sel))
    out.update(s.set_id for s in _named_sets(rule))
    return frozenset(out)


def _named_sets(rule: Rule) -> list[NamedPortSet]:
    try:
        return rule_named_port_sets(rule)
    except SelectorError as e:
        raise PolicyRenderError(f"invalid selector: {e}") from None


def is_named_port_set(set_id: str) -> bool:
    return set_id.startswith("n:")


def rules_set_ids(rules: Iterable[Rule]) -> frozenset[str]:
    out: set[str] = set()
    for r in rules:
        out |= rule_set_ids(r)
    return frozenset(out)


def uses_named_ports(rule: Rule) -> bool:
    return any(isinstance(p, str) for side in (rule.source, rule.destination) for p in (*side.ports, *side.not_ports))


# -- one rule -----------------------------------------------------------------------------------------
def _mark(v: int) -> str:
    return f"0x{v:08x}"


def _proto(p: str | None, what: str) -> str | None:
    """A Calico protocol as an nft ``meta l4proto`` value."""
    if p is None:
        return None
    if not isinstance(p, str) or not p.strip():
        raise PolicyRenderError(f"invalid {what} {p!r}")
    low = p.strip().lower()
    if low in _PROTO_NAMES:
        return _PROTO_NAMES[low]
    if low.isdigit() and 0 <= int(low) <= 255:
        return str(int(low))
    raise PolicyRenderError(f"invalid {what} {p!r}")


def _nets_for(nets: Sequence[IPNet], version: int, what: str) -> list[IPNet]:
    out: list[IPNet] = []
    for n in nets:
        if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PolicyRenderError(f"{what}: {n!r} is not an IP network")
        if n.version == version:
            out.append(n)
    # Anonymous interval sets refuse overlaps; collapsing matches the same addresses.
    return list(ipaddress.collapse_addresses(out))  # type: ignore[type-var]


def _one_or_set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports_text(ports: Sequence[PortRange], what: str) -> str:
    spans: list[tuple[int, int]] = []
    for p in ports:
        if not isinstance(p, PortRange):
            raise PolicyRenderError(f"{what}: invalid port {p!r}")
        if not (isinstance(p.first, int) and isinstance(p.last, int) and 0 <= p.first <= p.last <= 65535):
            raise PolicyRenderError(f"{what}: invalid port range {p.first}-{p.last}")
        spans.append((p.first, p.last))
    merged: list[list[int]] = []
    for a, b in sorted(spans):  # the kernel refuses overlapping intervals
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return _one_or_set([str(a) if a == b else f"{a}-{b}" for a, b in merged])


def _action(rule: Rule, opts: RenderOptions) -> str:
    m = opts.marks
    if rule.action == ACTION_ALLOW:
        return f"meta mark set meta mark | {_mark(m.accept)} return"
    if rule.action == ACTION_PASS:
        return f"meta mark set meta mark | {_mark(m.pass_)} return"
    if rule.action == ACTION_DENY:
        # Felix 3.30+: the endpoint chain that jumped here drops it, so the drop can name the pod.
        return f"meta mark set meta mark | {_mark(m.drop)} return"
    return f'log prefix "{opts.log_prefix}" level notice'


def render_rule(rule: Rule, direction: str, opts: RenderOptions = DEFAULT_OPTIONS) -> list[str]:
    """nft rule texts (without comments) for one policy rule; ``[]`` when the rule cannot match in this
    IP version (its ``ip_version``, ICMP flavour or CIDRs belong to the other one). Raises
    :class:`PolicyRenderError` on a rule Calico's validation would refuse.

    Source and destination mean the packet's, in both directions. Fields are ANDed; the items of one
    list (nets, ports) are ORed; ``not_*`` fields exclude. Named ports are Calico's named-port sets
    (``addr . l4proto . port``, :func:`felixpy.model.policy.side_named_port_sets`), ORed with the numeric
    ports; since one nft rule cannot OR different matches, a side with numeric and named ports (or
    several named ones) becomes one rule per alternative (a packet takes the first that matches: every
    action but Log ends the chain walk for it)."""
    _check_direction(direction)
    if rule.action not in ACTIONS:
        raise PolicyRenderError(f"invalid rule action {rule.action!r}")
    v = opts.ip_version
    if rule.ip_version not in (None, 4, 6):
        raise PolicyRenderError(f"invalid rule ipVersion {rule.ip_version!r}")
    if rule.ip_version is not None and rule.ip_version != v:
        return []
    proto = _proto(rule.protocol, "protocol")
    not_proto = _proto(rule.not_protocol, "notProtocol")
    if (proto in _ICMP4 and v == 6) or (proto in _ICMP6 and v == 4):
        return []
    icmp_fields = (rule.icmp_type, rule.icmp_code, rule.not_icmp_type, rule.not_icmp_code)
    if any(f is not None for f in icmp_fields):
        if proto not in (_ICMP4 | _ICMP6):
            raise PolicyRenderError("ICMP type/code need protocol ICMP (IPv4) or ICMPv6")
        for f, lim in zip(icmp_fields, (255, 255, 255, 255), strict=True):
            if f is not None and (not isinstance(f, int) or isinstance(f, bool) or not 0 <= f <= lim):
                raise PolicyRenderError(f"invalid ICMP type/code {f!r}")
        if rule.icmp_code is not None and rule.icmp_type is None:
            raise PolicyRenderError("an ICMP code needs an ICMP type")
        if rule.not_icmp_code is not None and rule.not_icmp_type is None:
            raise PolicyRenderError("a negated ICMP code needs a negated ICMP type")

    ip = "ip" if v == 4 else "ip6"
    parts: list[str] = []
    negs: list[str] = []
    alternatives: list[list[str]] = []  # per side with several port alternatives: one of them must match
    if proto is not None:
        parts.append(f"meta l4proto {proto}")
    if not_proto is not None:
        negs.append(f"meta l4proto != {not_proto}")

    def side(e: EntityMatch, addr: str, port: str, what: str) -> bool:
        """Adds one side's matches; False when it cannot match in this IP version."""
        if e.nets:
            nets = _nets_for(e.nets, v, what + " nets")
            if not nets:
                return False
            parts.append(f"{ip} {addr} {_one_or_set([str(n) for n in nets])}")
        if e.selector:
            parts.append(f"{ip} {addr} @{nft_set_name(set_id_for_selector(e.selector), v)}")
        named = [p for p in e.ports if isinstance(p, str)]
        numeric = [p for p in e.ports if not isinstance(p, str)]
        not_named = [p for p in e.not_ports if isinstance(p, str)]
        not_numeric = [p for p in e.not_ports if not isinstance(p, str)]
        if (e.ports or e.not_ports) and proto not in _PORT_PROTOS:
            raise PolicyRenderError(f"{what} ports need protocol TCP, UDP, SCTP or UDPLite")
        for p in (*named, *not_named):
            if not p:
                raise PolicyRenderError(f"{what}: empty named port")
        try:
            pos_sets = side_named_port_sets(e, rule.protocol, negated=False)
            neg_sets = side_named_port_sets(e, rule.protocol, negated=True)
        except SelectorError as err:
            raise PolicyRenderError(f"{what}: invalid selector: {err}") from None
        key = f"{ip} {addr} . meta l4proto . th {port}"
        alts = [f"th {port} {_ports_text(numeric, what + ' ports')}"] if numeric else []
        alts += [f"{key} @{nft_set_name(s.set_id, v)}" for s in pos_sets]
        if len(alts) == 1:
            parts.append(alts[0])
        elif alts:
            alternatives.append(alts)
        not_nets = _nets_for(e.not_nets, v, what + " notNets")
        if not_nets:
            negs.append(f"{ip} {addr} != {_one_or_set([str(n) for n in not_nets])}")
        if e.not_selector:
            negs.append(f"{ip} {addr} != @{nft_set_name(set_id_for_selector(e.not_selector), v)}")
        if not_numeric:
            negs.append(f"th {port} != {_ports_text(not_numeric, what + ' notPorts')}")
        negs.extend(f"{key} != @{nft_set_name(s.set_id, v)}" for s in neg_sets)
        return True

    if not side(rule.source, "saddr", "sport", "source"):
        return []
    if not side(rule.destination, "daddr", "dport", "destination"):
        return []
    icmp = "icmp" if v == 4 else "icmpv6"
    if rule.icmp_type is not None:
        parts.append(f"{icmp} type {rule.icmp_type}")
        if rule.icmp_code is not None:
            parts.append(f"{icmp} code {rule.icmp_code}")
    if rule.not_icmp_type is not None:
        if rule.not_icmp_code is None:
            negs.append(f"{icmp} type != {rule.not_icmp_type}")
        else:  # Calico's "! --icmp-type t/c": not (this type and this code)
            negs.append(f"{icmp} type . {icmp} code != {{ {rule.not_icmp_type} . {rule.not_icmp_code} }}")
    rules = [[*parts]]
    for alts in alternatives:
        rules = [[*r, a] for r in rules for a in alts]
    return [" ".join([*r, *negs, _action(rule, opts)]) for r in rules]


# -- chains -------------------------------------------------------------------------------------------
def _clean_comment(text: str) -> str:
    text = "".join(c if c.isprintable() and c not in '"\\' else " " for c in text).strip()
    raw = text.encode()
    if len(raw) > MAX_COMMENT_BYTES:
        text = raw[:MAX_COMMENT_BYTES - 3].decode(errors="ignore") + "..."
    return text


def _rules_chain(header: str, rules: Sequence[Rule], direction: str, opts: RenderOptions) -> list[NftRule]:
    out: list[NftRule] = []
    for r in rules:
        notes = [f"{k}={v}" for k, v in r.metadata]
        for text in render_rule(r, direction, opts):
            comment = "; ".join(([header] if not out else []) + notes)
            out.append(NftRule(text, _clean_comment(comment)))
    return out


def policy_header(key: PolicyKey, direction: str) -> str:
    """Calico 3.32's first-rule comment: ``<Kind> <ns>/<name> ingress``."""
    name = f"{key.namespace}/{key.name}" if key.namespace else key.name
    return f"{_KIND_TEXT.get(key.kind, key.kind)} {name} {direction.lower()}"


def render_policy_chain(policy: Policy, direction: str, opts: RenderOptions = DEFAULT_OPTIONS) -> list[NftRule]:
    _check_direction(direction)
    rules = policy.ingress if direction == INGRESS else policy.egress
    return _rules_chain(policy_header(policy.key, direction), rules, direction, opts)


def render_profile_chain(profile: Profile, direction: str, opts: RenderOptions = DEFAULT_OPTIONS) -> list[NftRule]:
    _check_direction(direction)
    rules = profile.ingress if direction == INGRESS else profile.egress
    return _rules_chain(f"Profile {profile.name} {direction.lower()}", rules, direction, opts)


def policy_chains(policy: Policy, opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    """The chains of a policy: one per direction it has (``types``; a pre-DNAT policy: ingress only)."""
    table = policy_table(policy)
    return [ChainSpec(policy_chain_name(policy.key, d), tuple(render_policy_chain(policy, d, opts)), table=table)
            for d in _DIRECTIONS if d in policy.types and not (d == EGRESS and table == TABLE_MANGLE)]


def profile_chains(profile: Profile, opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    return [ChainSpec(profile_chain_name(profile.name, d), tuple(render_profile_chain(profile, d, opts)))
            for d in _DIRECTIONS]


# -- drops you can see --------------------------------------------------------------------------------
DropKey = tuple[str, str, str]  # (tier, policy, direction): the label set of the drop metrics
END_OF_TIER = "end-of-tier"  # the policy label of a tier's final drop
NO_PROFILE = "no-profile-matched"  # ... of the endpoint chain's last rule (tier "")
PROFILE_PREFIX = "profile/"  # a Deny in a profile: tier "", policy "profile/<name>"


def drop_counter_name(key: DropKey) -> str:
    """The named counter (nft) / rule comment tag (iptables) of one drop point."""
    digest = base64.b32encode(hashlib.sha256("\x00".join(key).encode()).digest()).decode().lower()
    return "cali-drop-" + digest[:16]


def drop_log_prefix(ep: EndpointPolicyUpdate, what: str, limit: int) -> str:
    """``calico-drop <ns>/<pod> <what>: `` cut to ``limit`` bytes (quotes and control characters blanked)."""
    text = f"calico-drop {ep.name or ep.endpoint} {what}: "
    text = "".join(c if c.isprintable() and c not in '"\\' else " " for c in text)
    raw = text.encode()
    return raw[:limit].decode(errors="ignore") if len(raw) > limit else text


def _drop_points(ep: EndpointPolicyUpdate, direction: str, has: Callable[[str], bool],
                 is_staged: Callable[[PolicyKey], bool], policy_chain: Callable[[PolicyKey, str], str],
                 profile_chain: Callable[[str, str], str],
                 chain: str = CHAIN_KIND_WORKLOAD) -> list[tuple[str, object, DropKey]]:
    """The endpoint chain's structure, renderer-neutral (the chain namers are the renderer's): ("tier",
    TierPolicies, key of its end drop), ("policy", PolicyKey, key), ("endtier", tier, key), ("profile",
    name, key), ("end", None, key). A forward chain (``chain`` "forward") uses the forward tiers and has
    neither profiles nor the final drop (Calico: forwarded traffic no applyOnForward policy decided on
    goes on); an untracked / pre-DNAT chain uses those tiers and has no end-of-tier drop either (Felix:
    the filter table's normal policy still applies to what they did not decide)."""
    if chain not in _CHAIN_KINDS:
        raise PolicyRenderError(f"invalid endpoint chain kind {chain!r}")
    d = direction.lower()
    out: list[tuple[str, object, DropKey]] = []
    tiers = {CHAIN_KIND_FORWARD: ep.forward_tiers, CHAIN_KIND_UNTRACKED: ep.untracked_tiers,
             CHAIN_KIND_PRE_DNAT: ep.pre_dnat_tiers}.get(chain, ep.tiers)
    early = chain in (CHAIN_KIND_UNTRACKED, CHAIN_KIND_PRE_DNAT)
    for tier in tiers:
        if tier.default_action not in (ACTION_DENY, ACTION_PASS):
            raise PolicyRenderError(f"tier {tier.name}: invalid default action {tier.default_action!r}")
        keys = [k for k in (tier.ingress if direction == INGRESS else tier.egress) if not is_staged(k)]
        if not keys:
            continue
        out.append(("tier", tier, (tier.name, END_OF_TIER, d)))
        for k in keys:
            if has(policy_chain(k, direction)):
                out.append(("policy", k, (tier.name, k.id, d)))
        if tier.default_action != ACTION_PASS and not early:
            out.append(("endtier", tier, (tier.name, END_OF_TIER, d)))
    if chain == CHAIN_KIND_FORWARD or early:
        return out
    for name in ep.profiles:
        if has(profile_chain(name, direction)):
            out.append(("profile", name, ("", PROFILE_PREFIX + name, d)))
    out.append(("end", None, ("", NO_PROFILE, d)))
    return out


def render_endpoint_chain(ep: EndpointPolicyUpdate, direction: str, opts: RenderOptions = DEFAULT_OPTIONS, *,
                          available: Callable[[str], bool] | None = None,
                          staged: Callable[[PolicyKey], bool] | None = None,
                          drops: dict[str, DropKey] | None = None,
                          chain: str = CHAIN_KIND_WORKLOAD) -> list[NftRule]:
    """Calico's endpoint chain for one direction (calico-compat 1.6): a workload's (``chain`` "workload"),
    a host endpoint's (``host``: the failsafe chain right after conntrack, no encapsulation drops) or a
    host endpoint's forward chain (``forward``: ``ep.forward_tiers`` only, no profiles, no final drop).

    ``staged(key)``: staged policies are never jumped to and do not make a tier end in a drop.
    ``available(chain)``: jumps to chains that do not exist (yet) are left out; a tier whose policies are
    all missing still ends in its drop, so a missing policy never opens traffic a later profile allows.

    Every policy drop happens here and is counted: after each policy/profile jump, a packet with the drop
    bit (a Deny rule matched) is dropped; then the end-of-tier and no-profile drops. Each drop rule counts
    into a named counter (:func:`drop_counter_name`, registered in ``drops``: name -> (tier, policy,
    direction)) and, with ``opts.log_drops``, is preceded by a rate-limited log rule whose prefix names
    the pod and the policy."""
    _check_direction(direction)
    m = opts.marks
    accept, pass_, drop = _mark(m.accept), _mark(m.pass_), _mark(m.drop)
    has = available or (lambda _c: True)
    is_staged = staged or (lambda _k: False)
    points = _drop_points(ep, direction, has, is_staged, policy_chain_name, profile_chain_name, chain)

    def counted_drop(match: str, key: DropKey, what: str, comment: str) -> list[NftRule]:
        name = drop_counter_name(key)
        if drops is not None:
            drops[name] = key
        rules = []
        if opts.log_drops:
            prefix = drop_log_prefix(ep, what, 127)
            rules.append(NftRule(f"{match} limit rate {opts.drop_log_rate}/second burst {opts.drop_log_rate * 2} "
                                 f'packets log prefix "{prefix}" level warn'.strip()))
        rules.append(NftRule(f'{match} counter name "{name}" drop'.strip(), _clean_comment(comment)))
        return rules

    out: list[NftRule] = []
    if chain != CHAIN_KIND_UNTRACKED:  # raw runs before conntrack: no state yet
        out.append(NftRule("ct state established,related accept"))
        if opts.drop_invalid:
            out.append(NftRule("ct state invalid drop"))
    if chain == CHAIN_KIND_UNTRACKED:
        out.append(NftRule(f"jump {CHAIN_RAW_FAILSAFE_IN if direction == INGRESS else CHAIN_RAW_FAILSAFE_OUT}"))
    elif chain in (CHAIN_KIND_HOST, CHAIN_KIND_PRE_DNAT):
        # Failsafe ports pass before pre-DNAT policy too (Felix's mangle failsafe chains are the filter ones;
        # in our one table the filter ones serve: an accept only ends the current base chain).
        out.append(NftRule(f"jump {CHAIN_FAILSAFE_IN if direction == INGRESS else CHAIN_FAILSAFE_OUT}"))
    out.append(NftRule(f"meta mark set meta mark & {_mark(~m.verdicts & 0xFFFFFFFF)}"))
    if direction == EGRESS and chain == CHAIN_KIND_WORKLOAD:
        if not opts.allow_vxlan_from_workloads:
            out.append(NftRule(f"udp dport {opts.vxlan_port} drop",
                               "Drop VXLAN encapped packets originating in workloads"))
        if not opts.allow_ipip_from_workloads:
            out.append(NftRule("meta l4proto 4 drop", "Drop IPinIP encapped packets originating in workloads"))
    on_drop = f"meta mark & {drop} == {drop}"
    for kind, item, key in points:
        if kind == "tier":
            assert isinstance(item, TierPolicies)
            out.append(NftRule(f"meta mark set meta mark & {_mark(~m.pass_ & 0xFFFFFFFF)}",
                               _clean_comment(f"Start of tier {item.name}")))
        elif kind == "policy":
            assert isinstance(item, PolicyKey)
            out.append(NftRule(f"meta mark & {pass_} == 0 jump {policy_chain_name(item, direction)}"))
            out += counted_drop(on_drop, key, f"{item.id} {direction.lower()}", f"Drop if policy {item.id} denied")
            if chain == CHAIN_KIND_UNTRACKED:
                out.append(NftRule(f"meta mark & {accept} == {accept} notrack", "Untracked policy accepted"))
            out.append(NftRule(f"meta mark & {accept} == {accept} return", "Return if policy accepted"))
        elif kind == "endtier":
            assert isinstance(item, TierPolicies)
            out += counted_drop(f"meta mark & {pass_} == 0", key, f"tier {item.name} end {direction.lower()}",
                                f"End of tier {item.name}. Drop if no policies passed packet")
        elif kind == "profile":
            assert isinstance(item, str)
            out.append(NftRule(f"jump {profile_chain_name(item, direction)}"))
            out += counted_drop(on_drop, key, f"profile {item} {direction.lower()}", f"Drop if profile {item} denied")
            out.append(NftRule(f"meta mark & {accept} == {accept} return", "Return if profile accepted"))
        else:
            out += counted_drop("", key, f"no profile {direction.lower()}", "Drop if no profiles matched")
    return out


def dispatch_elements(ifaces: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(from-workload map, to-workload map): interface -> ``goto`` its endpoint chain."""
    from_wl: dict[str, str] = {}
    to_wl: dict[str, str] = {}
    for iface in sorted(ifaces):
        from_wl[iface] = f"goto {endpoint_chain_name(iface, EGRESS)}"
        to_wl[iface] = f"goto {endpoint_chain_name(iface, INGRESS)}"
    return from_wl, to_wl


# Host endpoint iface -> which optional chains it has: (forward ingress, forward egress, untracked ingress,
# untracked egress, pre-DNAT ingress); a shorter tuple means False for the rest.
HepDispatch = dict[str, tuple[bool, ...]]
HEP_FWD_IN, HEP_FWD_OUT, HEP_RAW_IN, HEP_RAW_OUT, HEP_PRE_DNAT_IN = range(5)


def hep_has(flags: tuple[bool, ...], which: int | None) -> bool:
    return which is None or (len(flags) > which and flags[which])


def host_dispatch_chains(heps: HepDispatch, opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    """The host-endpoint dispatch chains: a goto per interface (sorted; the all-interfaces endpoint
    last, for interfaces without their own and never for workload ones). Forward, untracked and pre-DNAT
    dispatch only name endpoints with such a chain in that direction. No host endpoint: empty chains."""
    wild = f'"{opts.iface_prefix}*"'

    def rules(match: str, direction: str, forward: bool, which: int | None,
              table: str = TABLE_FILTER) -> tuple[NftRule, ...]:
        out = []
        for iface in sorted(i for i in heps if i != HEP_ALL_INTERFACES):
            if hep_has(heps[iface], which):
                out.append(NftRule(f'{match} "{check_iface(iface)}" goto '
                                   f"{host_endpoint_chain_name(iface, direction, forward, table)}"))
        if HEP_ALL_INTERFACES in heps and hep_has(heps[HEP_ALL_INTERFACES], which):
            target = host_endpoint_chain_name(HEP_ALL_INTERFACES, direction, forward, table)
            out.append(NftRule(f"{match} != {wild} goto {target}"))
        return tuple(out)

    return [ChainSpec(CHAIN_FROM_HEP, rules("iifname", INGRESS, False, None)),
            ChainSpec(CHAIN_TO_HEP, rules("oifname", EGRESS, False, None)),
            ChainSpec(CHAIN_FROM_HEP_FWD, rules("iifname", INGRESS, True, HEP_FWD_IN)),
            ChainSpec(CHAIN_TO_HEP_FWD, rules("oifname", EGRESS, True, HEP_FWD_OUT)),
            ChainSpec(CHAIN_RAW_FROM_HEP, rules("iifname", INGRESS, False, HEP_RAW_IN, TABLE_RAW)),
            ChainSpec(CHAIN_RAW_TO_HEP, rules("oifname", EGRESS, False, HEP_RAW_OUT, TABLE_RAW)),
            ChainSpec(CHAIN_MANGLE_FROM_HEP, rules("iifname", INGRESS, False, HEP_PRE_DNAT_IN, TABLE_MANGLE))]


def failsafe_rules(items: Sequence[str], inbound: bool, ip_version: int, reply: bool = False) -> list[str]:
    """Accept rules for failsafe entries (entries whose CIDR is of the other IP version are left out).
    ``reply``: the raw table's rules for replies of the other direction's entries (source port; Felix: raw
    runs before conntrack, so without them a reply could meet untracked policy)."""
    ip = "ip" if ip_version == 4 else "ip6"
    out = []
    for item in items:
        proto, net, port = parse_failsafe(item)
        if net is not None and net.version != ip_version:
            continue
        where = f"{ip} {'saddr' if inbound else 'daddr'} {net} " if net is not None else ""
        out.append(f"{where}{proto} {'sport' if reply else 'dport'} {port} accept")
    return out


def static_chains(opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    """Base chains, the FORWARD/INPUT/OUTPUT chains, the failsafe chains and the workload dispatch chains
    (which use the two dispatch maps, declared by the caller as ``ifname : verdict`` maps). The host
    endpoint dispatch chains come from :func:`host_dispatch_chains`."""
    m = opts.marks
    accept = _mark(m.accept)
    clear = NftRule(f"meta mark set meta mark & {_mark(~m.verdicts & 0xFFFFFFFF)}")
    wild = f'"{opts.iface_prefix}*"'
    to_host = [NftRule(f"jump {CHAIN_FROM_WL_DISPATCH}"),
               NftRule(_HOST_ACTIONS[opts.endpoint_to_host_action], "Configured DefaultEndpointToHostAction")]
    if opts.ip_version == 6:
        types = ", ".join(str(t) for t in _ICMP6_TO_HOST)
        to_host.insert(0, NftRule(f"meta l4proto ipv6-icmp icmpv6 type {{ {types} }} accept"))
    filt = BaseChain("filter", "forward", PRIO_FILTER)
    # Felix's acceptAlreadyAccepted: untracked / pre-DNAT policy allowed it (the raw and mangle chains
    # clear the bits first, so only they can have set it).
    already = NftRule(f"meta mark & {accept} == {accept} accept", "Accepted by untracked or pre-DNAT policy.")
    host_accepted = NftRule(f"meta mark & {accept} == {accept} accept", "Host endpoint policy accepted packet.")
    return [
        ChainSpec(CHAIN_BASE_FORWARD, (
            NftRule(f"jump {CHAIN_FORWARD}"),
            NftRule(f"meta mark & {accept} == {accept} accept", "Policy explicitly accepted packet."),
        ), filt),
        ChainSpec(CHAIN_FORWARD, (
            # Felix: the accept bit carries untracked / pre-DNAT policy's verdict; such a packet skips the
            # ingress host endpoint's forward policy, workload policy still decides.
            NftRule(f"meta mark set meta mark & {_mark(~(m.verdicts & ~m.accept) & 0xFFFFFFFF)}"),
            NftRule(f"meta mark & {accept} == 0 jump {CHAIN_FROM_HEP_FWD}"),
            NftRule(f"iifname {wild} jump {CHAIN_FROM_WL_DISPATCH}"),
            NftRule(f"oifname {wild} jump {CHAIN_TO_WL_DISPATCH}"),
            NftRule(f"jump {CHAIN_TO_HEP_FWD}"),
        )),
        ChainSpec(CHAIN_BASE_INPUT, (NftRule(f"jump {CHAIN_INPUT}"),), BaseChain("filter", "input", PRIO_FILTER)),
        ChainSpec(CHAIN_INPUT, (
            *overlay_rules(opts, True),
            NftRule(f"iifname {wild} goto {CHAIN_WL_TO_HOST}"),
            already,
            clear,
            NftRule(f"jump {CHAIN_FROM_HEP}"),
            NftRule(f"meta mark & {accept} == {accept} accept", "Host endpoint policy accepted packet."),
        )),
        ChainSpec(CHAIN_BASE_OUTPUT, (NftRule(f"jump {CHAIN_OUTPUT}"),),
                  BaseChain("filter", "output", PRIO_FILTER)),
        ChainSpec(CHAIN_OUTPUT, (
            # Host -> workload traffic is the workload's ingress policy's business (FORWARD never sees it).
            already,
            NftRule(f"oifname {wild} return"),
            *overlay_rules(opts, False),
            clear,
            NftRule(f"jump {CHAIN_TO_HEP}"),
            NftRule(f"meta mark & {accept} == {accept} accept", "Host endpoint policy accepted packet."),
        )),
        ChainSpec(CHAIN_FAILSAFE_IN, tuple(NftRule(r) for r in failsafe_rules(opts.failsafe_inbound, True,
                                                                                opts.ip_version))),
        ChainSpec(CHAIN_FAILSAFE_OUT, tuple(NftRule(r) for r in failsafe_rules(opts.failsafe_outbound, False,
                                                                                 opts.ip_version))),
        ChainSpec(CHAIN_RAW_FAILSAFE_IN, tuple(NftRule(r) for r in (
            *failsafe_rules(opts.failsafe_inbound, True, opts.ip_version),
            *failsafe_rules(opts.failsafe_outbound, True, opts.ip_version, reply=True)))),
        ChainSpec(CHAIN_RAW_FAILSAFE_OUT, tuple(NftRule(r) for r in (
            *failsafe_rules(opts.failsafe_outbound, False, opts.ip_version),
            *failsafe_rules(opts.failsafe_inbound, False, opts.ip_version, reply=True)))),
        ChainSpec(CHAIN_WL_TO_HOST, tuple(to_host)),
        ChainSpec(CHAIN_FROM_WL_DISPATCH, (NftRule(f"iifname vmap @{MAP_FROM_WL_DISPATCH}"),
                                           NftRule("drop", "Unknown interface"))),
        ChainSpec(CHAIN_TO_WL_DISPATCH, (NftRule(f"oifname vmap @{MAP_TO_WL_DISPATCH}"),
                                         NftRule("drop", "Unknown interface"))),
        *host_dispatch_chains({}, opts),
        # Untracked policy (raw priority, before conntrack) and pre-DNAT policy (mangle priority, before
        # DNAT), Felix's raw PREROUTING/OUTPUT and mangle PREROUTING; workload traffic never meets them.
        ChainSpec(CHAIN_BASE_RAW_PREROUTING, (NftRule(f"jump {CHAIN_RAW_PREROUTING}"),),
                  BaseChain("filter", "prerouting", PRIO_RAW)),
        ChainSpec(CHAIN_RAW_PREROUTING, (
            clear,
            NftRule(f"iifname {wild} return"),
            NftRule(f"jump {CHAIN_RAW_FROM_HEP}"),
            host_accepted,
        )),
        ChainSpec(CHAIN_BASE_RAW_OUTPUT, (NftRule(f"jump {CHAIN_RAW_OUTPUT}"),),
                  BaseChain("filter", "output", PRIO_RAW)),
        ChainSpec(CHAIN_RAW_OUTPUT, (
            clear,
            NftRule(f"oifname {wild} return"),
            NftRule(f"jump {CHAIN_RAW_TO_HEP}"),
            host_accepted,
        )),
        ChainSpec(CHAIN_BASE_MANGLE_PREROUTING, (NftRule(f"jump {CHAIN_MANGLE_PREROUTING}"),),
                  BaseChain("filter", "prerouting", PRIO_MANGLE)),
        ChainSpec(CHAIN_MANGLE_PREROUTING, (
            NftRule("ct state established,related accept"),
            NftRule(f"meta mark & {accept} == {accept} accept", "Accepted by untracked policy."),
            NftRule(f"iifname {wild} return"),
            clear,
            NftRule(f"jump {CHAIN_MANGLE_FROM_HEP}"),
            host_accepted,
        )),
    ]
