"""Network policy value types (pure): the contract between the policy parser (``felixpy.model.policy_parse``),
the policy calculator (``felixpy.calc.policy``) and the renderers (``felixpy.dataplane.policy_render``).

Everything is frozen and hashable so the calculation layer can compare old and new values cheaply. Selectors
are stored as text *after* Calico's scoping rules were applied by the parser (a namespaced policy's
``selector`` already contains ``projectcalico.org/namespace == "<ns>"``; a rule's ``selector`` already
contains its namespace restriction), so the calculator and renderers never need to know about namespaces.

IP sets are named by :func:`selector_set_id`: one set per distinct effective selector, whose members are
the addresses of every endpoint and network set (cluster-wide) the selector matches.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass, field

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

ACTION_ALLOW = "Allow"
ACTION_DENY = "Deny"
ACTION_PASS = "Pass"
ACTION_LOG = "Log"
ACTIONS = (ACTION_ALLOW, ACTION_DENY, ACTION_PASS, ACTION_LOG)

INGRESS = "Ingress"
EGRESS = "Egress"

KIND_NP = "NetworkPolicy"
KIND_GNP = "GlobalNetworkPolicy"
KIND_KNP = "KubernetesNetworkPolicy"  # v3 NetworkPolicy named knp.default.<name>, converted from k8s

DEFAULT_TIER = "default"

# Label keys Calico puts on endpoints (and applies from profiles).
LABEL_NAMESPACE = "projectcalico.org/namespace"
LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"
LABEL_SERVICEACCOUNT = "projectcalico.org/serviceaccount"
NS_LABEL_PREFIX = "pcns."  # namespace labels, applied to endpoints through the kns.<ns> profile
SA_LABEL_PREFIX = "pcsa."  # service account labels, through ksa.<ns>.<sa>


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int  # == first for a single port


Port = PortRange | str  # a str is a named port (resolved per endpoint by the calculator)


@dataclass(frozen=True)
class EntityMatch:
    """One side (source or destination) of a rule; empty fields match everything."""

    nets: tuple[IPNet, ...] = ()
    not_nets: tuple[IPNet, ...] = ()
    selector: str = ""  # effective selector text ("" = no selector match)
    not_selector: str = ""
    ports: tuple[Port, ...] = ()
    not_ports: tuple[Port, ...] = ()


@dataclass(frozen=True)
class Rule:
    action: str  # one of ACTIONS
    ip_version: int | None = None  # 4, 6 or None (both)
    protocol: str | None = None  # "TCP", "UDP", "ICMP", "SCTP", "UDPLite", "ICMPv6" or a number as text
    not_protocol: str | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    not_icmp_type: int | None = None
    not_icmp_code: int | None = None
    source: EntityMatch = field(default_factory=EntityMatch)
    destination: EntityMatch = field(default_factory=EntityMatch)
    metadata: tuple[tuple[str, str], ...] = ()  # rule annotations (rendered as comments)


@dataclass(frozen=True)
class PolicyKey:
    kind: str  # KIND_NP | KIND_GNP | KIND_KNP
    namespace: str  # "" for global kinds
    name: str

    @property
    def id(self) -> str:
        """Stable identifier used for chain names: "np/<ns>/<name>", "gnp/<name>", "knp/<ns>/<name>"."""
        short = {KIND_NP: "np", KIND_GNP: "gnp", KIND_KNP: "knp"}[self.kind]
        return f"{short}/{self.namespace}/{self.name}" if self.namespace else f"{short}/{self.name}"


@dataclass(frozen=True)
class Policy:
    key: PolicyKey
    tier: str
    order: float | None  # None sorts last
    selector: str  # effective endpoint selector
    types: tuple[str, ...]  # subset of (INGRESS, EGRESS); never empty after parsing
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    do_not_track: bool = False
    pre_dnat: bool = False
    apply_on_forward: bool = False
    staged: bool = False


@dataclass(frozen=True)
class Tier:
    name: str
    order: float | None
    default_action: str = ACTION_DENY  # Deny | Pass


@dataclass(frozen=True)
class Profile:
    name: str  # kns.<ns>, ksa.<ns>.<sa>, or any Calico Profile
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    labels_to_apply: tuple[tuple[str, str], ...] = ()


HEP_ALL_INTERFACES = "*"  # a HostEndpoint's interfaceName for "every host interface" (Calico's all-interfaces HEP)
HEP_ID_PREFIX = "hep:"  # calculator endpoint ids of host endpoints ("hep:<name>"; a WEP id is "<ns>/<name>")


@dataclass(frozen=True)
class HostEndpoint:
    """A parsed HostEndpoint (cluster-scoped): the host's own interface(s) as a policy endpoint."""

    name: str
    node: str
    iface: str  # an interface name, HEP_ALL_INTERFACES, or "" (expectedIPs only)
    expected_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    profiles: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    ports: tuple[EndpointPort, ...] = ()


@dataclass(frozen=True)
class NetworkSet:
    namespace: str  # "" for GlobalNetworkSet
    name: str
    labels: tuple[tuple[str, str], ...]
    nets: tuple[IPNet, ...]


# The IP set of every node's address (Felix's IPSetIDAllHostNets, ``cali40all-hosts-net``): the sources
# allowed to send VXLAN / IPIP to this host whatever the host endpoint policy. A fixed id, untyped on
# purpose: no selector or named-port set can take its name.
ALL_HOSTS_SET_ID = "all-hosts-net"


def selector_set_id(selector: str) -> str:
    """The IP set for an effective selector: 's:' + 22 base32 chars of sha256 of the normalised text.
    (The calculator normalises through felixpy.model.selector before calling this.)"""
    return "s:" + _hash22(selector)


def _hash22(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode().lower().rstrip("=")[:22]


# -- named ports (Calico's named-port IP sets, felix/calc/rule_scanner.go) ---------------------------------
NAMED_PORT_PROTOCOLS = ("tcp", "udp", "sctp")


@dataclass(frozen=True)
class EndpointPort:
    """A named port of an endpoint (a pod's containerPort with a name, or a HostEndpoint's ``ports``)."""

    name: str
    protocol: str  # "tcp" | "udp" | "sctp"
    port: int


@dataclass(frozen=True, order=True)
class IPPort:
    """A member of a named-port IP set: (address, protocol, port), as ipset hash:ip,port holds it."""

    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    protocol: str  # "tcp" | "udp" | "sctp"
    port: int


SetMember = IPNet | IPPort


def named_port_protocol(rule_protocol: str | None) -> str:
    """The protocol a rule's named ports are looked up with: the rule's if UDP or SCTP, else TCP (Calico:
    a named port rule needs a port protocol anyway, and TCP is its fallback)."""
    p = (rule_protocol or "").strip().lower()
    if p in ("udp", "17"):
        return "udp"
    if p in ("sctp", "132"):
        return "sctp"
    return "tcp"


def named_port_set_id(selector: str, protocol: str, name: str) -> str:
    """The IP set of the endpoints matching canonical ``selector`` ("all()" when the rule side has none)
    that have a port ``name`` of ``protocol``: 'n:' + 22 base32 chars."""
    return "n:" + _hash22(f"{selector}\x00{protocol}\x00{name}")


@dataclass(frozen=True)
class NamedPortSet:
    """What a named-port IP set holds: endpoints matching ``selector`` with port ``name``/``protocol``."""

    set_id: str
    selector: str  # canonical
    protocol: str
    name: str


def side_named_port_sets(side: EntityMatch, rule_protocol: str | None, *, negated: bool) -> list[NamedPortSet]:
    """The named-port sets of one rule side: of its ``ports`` (negated=False) or ``not_ports``. As in
    Calico, both are filtered by the side's positive selector (the rule can only match when it matches),
    or by ``all()`` when it has none. Raises SelectorError on a bad selector."""
    from felixpy.model.selector import parse_selector  # the selector module does not import this one

    names = [p for p in (side.not_ports if negated else side.ports) if isinstance(p, str)]
    if not names:
        return []
    sel = parse_selector(side.selector or "all()").text
    proto = named_port_protocol(rule_protocol)
    out: list[NamedPortSet] = []
    for n in dict.fromkeys(names):
        out.append(NamedPortSet(named_port_set_id(sel, proto, n), sel, proto, n))
    return out


def rule_named_port_sets(rule: Rule) -> list[NamedPortSet]:
    return [s for side in (rule.source, rule.destination) for neg in (False, True)
            for s in side_named_port_sets(side, rule.protocol, negated=neg)]


# --- calculation-layer output for policy (dataplane messages; wired into felixpy.calc.messages later) ---
@dataclass(frozen=True)
class IPSetUpdate:
    set_id: str  # selector_set_id(...) or named_port_set_id(...)
    # Full membership: selector sets hold networks (addresses as /32 or /128, network-set CIDRs as given),
    # named-port sets hold IPPort members.
    members: frozenset[SetMember]


@dataclass(frozen=True)
class IPSetRemove:
    set_id: str


@dataclass(frozen=True)
class IPSetDeltaUpdate:
    """Membership change of a set already sent with IPSetUpdate (only when the calculator is asked for
    deltas): apply ``removed`` and ``added`` to the previous membership."""

    set_id: str
    added: frozenset[SetMember]
    removed: frozenset[SetMember]


@dataclass(frozen=True)
class ActivePolicyUpdate:
    """A policy that applies to at least one local endpoint, with its rules; sets it needs come first."""

    policy: Policy


@dataclass(frozen=True)
class ActivePolicyRemove:
    key: PolicyKey


@dataclass(frozen=True)
class ActiveProfileUpdate:
    profile: Profile


@dataclass(frozen=True)
class ActiveProfileRemove:
    name: str


@dataclass(frozen=True)
class TierPolicies:
    """The policies of one tier that select an endpoint, in order, per direction."""

    name: str
    default_action: str
    ingress: tuple[PolicyKey, ...]
    egress: tuple[PolicyKey, ...]


@dataclass(frozen=True)
class EndpointPolicyUpdate:
    """What a local endpoint's chains must jump to: tiers (in order) then profiles."""

    endpoint: str  # the WorkloadEndpoint key text (namespace/name)
    iface: str
    tiers: tuple[TierPolicies, ...]
    profiles: tuple[str, ...]
    name: str = ""  # what logs call it: "<namespace>/<pod>" ("" = use ``endpoint``)
    # Host endpoints (``host``): ``iface`` is an interface or HEP_ALL_INTERFACES; ``tiers`` hold the normal
    # policies (neither pre-DNAT nor do-not-track), ``forward_tiers`` those of them with applyOnForward.
    host: bool = False
    forward_tiers: tuple[TierPolicies, ...] = ()
    # Host endpoints only: do-not-track policies (raw table, before conntrack) and pre-DNAT ones (mangle
    # PREROUTING, ingress only), each in tier order as ``tiers``.
    untracked_tiers: tuple[TierPolicies, ...] = ()
    pre_dnat_tiers: tuple[TierPolicies, ...] = ()


@dataclass(frozen=True)
class EndpointPolicyRemove:
    endpoint: str
