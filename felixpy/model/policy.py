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


@dataclass(frozen=True)
class NetworkSet:
    namespace: str  # "" for GlobalNetworkSet
    name: str
    labels: tuple[tuple[str, str], ...]
    nets: tuple[IPNet, ...]


def selector_set_id(selector: str) -> str:
    """The IP set for an effective selector: 's:' + 22 base32 chars of sha256 of the normalised text.
    (The calculator normalises through felixpy.model.selector before calling this.)"""
    digest = hashlib.sha256(selector.encode()).digest()
    import base64

    return "s:" + base64.b32encode(digest).decode().lower().rstrip("=")[:22]


# --- calculation-layer output for policy (dataplane messages; wired into felixpy.calc.messages later) ---
@dataclass(frozen=True)
class IPSetUpdate:
    set_id: str  # selector_set_id(...) or a named-port set id chosen by the calculator
    members: frozenset[IPNet]  # full membership (addresses as /32 or /128, network-set CIDRs as given)


@dataclass(frozen=True)
class IPSetRemove:
    set_id: str


@dataclass(frozen=True)
class IPSetDeltaUpdate:
    """Membership change of a set already sent with IPSetUpdate (only when the calculator is asked for
    deltas): apply ``removed`` and ``added`` to the previous membership."""

    set_id: str
    added: frozenset[IPNet]
    removed: frozenset[IPNet]


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


@dataclass(frozen=True)
class EndpointPolicyRemove:
    endpoint: str
