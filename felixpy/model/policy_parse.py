"""Parse stored v3 policy resources into the value types of :mod:`felixpy.model.policy` (pure, no I/O).

What this module does on top of field-by-field validation, following Calico's syncer update processors
(``libcalico-go/lib/backend/syncersv1/updateprocessors``) and the clientv3 defaulting:

* **Scoping.** A namespaced policy's endpoint selector gets ``projectcalico.org/namespace == "<ns>"``
  ANDed on. In a rule of a namespaced policy, a source/destination that has a ``selector``,
  ``notSelector``, ``namespaceSelector`` or ``serviceAccounts`` is restricted to the policy's namespace,
  unless a ``namespaceSelector`` says which namespaces (rewritten to the ``pcns.`` labels the ``kns.``
  profiles put on endpoints). A rule with only ``nets`` is not restricted, so it still matches any address.
* **namespaceSelector specials.** After prefixing, ``all()`` becomes ``has(projectcalico.org/namespace)``
  ("any namespace", so not host endpoints or global network sets) and ``global()`` becomes
  ``!has(projectcalico.org/namespace)`` ("only non-namespaced objects").
* **serviceAccounts.** ``names`` -> ``projectcalico.org/serviceaccount in {...}``; ``selector`` -> the
  same selector over the ``pcsa.`` labels of the ``ksa.`` profiles.
* **Kubernetes NetworkPolicy** (kind ``KubernetesNetworkPolicy`` carrying the k8s spec, as
  :func:`felixpy.datastore.conversion.k8s_network_policy_to_resource` stores it) is first converted the
  way Calico's ``K8sNetworkPolicyToCalico`` does (order 1000, tier default, one Allow rule per
  protocol x peer, types from ``policyTypes``; when that is missing, Kubernetes' default: Ingress, plus
  Egress if there are egress rules). A k8s rule that cannot be converted
  is dropped with a warning, as Calico does; since every k8s rule is an Allow, that fails closed.
* **Types default** (clientv3 ``defaultPolicyTypesField``): no egress rules -> Ingress; egress rules but
  no ingress rules -> Egress; both -> Ingress and Egress.

All selector text in the result is the canonical text of the parsed selector, so equal selectors give
equal strings (and equal IP sets). Errors are :class:`~felixpy.model.resources.InvalidResource` whose
message starts with the resource and names the field, e.g.
``NetworkPolicy shop/web: spec.ingress[0].protocol: unknown protocol 'tcpx'``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from felixpy.datastore.api import Resource
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_LOG,
    ACTION_PASS,
    DEFAULT_TIER,
    EGRESS,
    HEP_ALL_INTERFACES,
    INGRESS,
    KIND_GNP,
    KIND_KNP,
    KIND_NP,
    LABEL_NAMESPACE,
    LABEL_ORCHESTRATOR,
    LABEL_SERVICEACCOUNT,
    NAMED_PORT_PROTOCOLS,
    NS_LABEL_PREFIX,
    SA_LABEL_PREFIX,
    EndpointPort,
    EntityMatch,
    HostEndpoint,
    IPNet,
    NetworkSet,
    Policy,
    PolicyKey,
    Port,
    PortRange,
    Profile,
    Rule,
    Tier,
)
from felixpy.model.resources import InvalidResource
from felixpy.model.selector import SelectorError, parse_selector

__all__ = [
    "K8S_POLICY_ORDER",
    "KIND_STAGED_GNP",
    "KIND_STAGED_KNP",
    "KIND_STAGED_NP",
    "KNP_NAME_PREFIX",
    "STAGED_NAME_PREFIX",
    "TIER_DEFAULT_ORDERS",
    "endpoint_labels",
    "endpoint_ports",
    "parse_host_endpoint",
    "parse_network_set",
    "parse_policy",
    "parse_profile",
    "parse_tier",
]

KIND_STAGED_NP = "StagedNetworkPolicy"
KIND_STAGED_GNP = "StagedGlobalNetworkPolicy"
KIND_STAGED_KNP = "StagedKubernetesNetworkPolicy"

KNP_NAME_PREFIX = "knp.default."  # how Calico names a converted k8s NetworkPolicy
STAGED_NAME_PREFIX = "staged:"  # keeps a staged policy's key apart from the enforced policy of the same name
K8S_POLICY_ORDER = 1000.0

# Orders Calico gives its well-known tiers when the Tier resource has none (api/.../v3/tier.go).
TIER_DEFAULT_ORDERS: Mapping[str, float] = {
    "kube-admin": 1_000.0,
    DEFAULT_TIER: 1_000_000.0,
    "kube-baseline": 10_000_000.0,
}

# kind argument -> (key kind, staged, spec is a k8s NetworkPolicySpec)
_POLICY_KINDS: Mapping[str, tuple[str, bool, bool]] = {
    KIND_NP: (KIND_NP, False, False),
    KIND_GNP: (KIND_GNP, False, False),
    KIND_KNP: (KIND_KNP, False, True),
    KIND_STAGED_NP: (KIND_NP, True, False),
    KIND_STAGED_GNP: (KIND_GNP, True, False),
    KIND_STAGED_KNP: (KIND_KNP, True, True),
}

_ACTIONS = {a.lower(): a for a in (ACTION_ALLOW, ACTION_DENY, ACTION_PASS, ACTION_LOG)}
_ACTIONS["next-tier"] = ACTION_PASS  # the v1 spelling of Pass

_PROTOCOLS = {p.lower(): p for p in ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite")}
_PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPv6": 58, "SCTP": 132, "UDPLite": 136}
_PORT_PROTOCOLS = frozenset({6, 17, 132})  # Calico's Protocol.SupportsPorts()
_ICMP_PROTOCOLS = frozenset({1, 58})

_PORT_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
_TYPES = {INGRESS.lower(): INGRESS, EGRESS.lower(): EGRESS}


def _err(where: str, msg: str) -> InvalidResource:
    return InvalidResource(f"{where}: {msg}" if where else msg)


# ---------------------------------------------------------------------------------------------------
# Scalar helpers
# ---------------------------------------------------------------------------------------------------

def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(where, f"must be an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(where, f"must be a list, not {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _err(where, f"must be a string, not {type(value).__name__}")
    return value


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _err(where, f"must be a boolean, not {value!r}")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where, f"must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise _err(where, f"{value} is out of range {lo}-{hi}")
    return value


def _order(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise _err(where, f"must be a number, not {value!r}")
    try:
        order = float(value)
    except (TypeError, ValueError):
        raise _err(where, f"must be a number, not {value!r}") from None
    if not math.isfinite(order):
        raise _err(where, f"must be a finite number, not {value!r}")
    return order


def _str_map(value: Any, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _obj(value, where).items():
        if not isinstance(v, str):
            raise _err(f"{where}.{k}", f"must be a string, not {type(v).__name__}")
        out[str(k)] = v
    return out


def _nets(value: Any, where: str) -> tuple[IPNet, ...]:
    out: list[IPNet] = []
    for i, item in enumerate(_list(value, where)):
        if not isinstance(item, str):
            raise _err(f"{where}[{i}]", f"must be a CIDR string, not {item!r}")
        try:
            # Calico masks host bits (cnet.ParseCIDR) and accepts a bare address as a single host.
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise _err(f"{where}[{i}]", f"invalid CIDR {item!r}") from None
    return tuple(out)


def _quote(value: str, where: str) -> str:
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise _err(where, f"value {value!r} contains both quote characters")


# ---------------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------------

def _selector(text: str, where: str) -> str:
    """Canonical text of a selector (``text`` must be non-empty)."""
    try:
        return parse_selector(text).text
    except SelectorError as e:
        raise _err(where, f"invalid selector {text!r}: {e}") from None


def _and(*parts: str) -> str:
    """AND of selector texts (already validated; empty parts are skipped), canonicalised."""
    present = [p for p in parts if p]
    if not present:
        return ""
    if len(present) == 1:
        return present[0]
    return parse_selector(" && ".join(f"({p})" for p in present)).text


def _replace_calls(text: str, repl: Mapping[str, str]) -> str:
    """Replace ``all()``/``global()`` calls in canonical selector text, leaving quoted values alone."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            end = text.index(ch, i + 1)  # canonical text always closes its quotes
            out.append(text[i:end + 1])
            i = end + 1
            continue
        for call, new in repl.items():
            if text.startswith(call, i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "._/-")):
                out.append(new)
                i += len(call)
                break
        else:
            out.append(ch)
            i += 1
    return "".join(out)


_NS_CALLS = {"all()": f"has({LABEL_NAMESPACE})", "global()": f"!has({LABEL_NAMESPACE})"}


def _namespace_selector(text: str, where: str) -> str:
    """A namespaceSelector as a selector over endpoint labels (``pcns.`` prefix, all()/global() specials)."""
    try:
        prefixed = parse_selector(text).with_label_prefix(NS_LABEL_PREFIX).text
    except SelectorError as e:
        raise _err(where, f"invalid selector {text!r}: {e}") from None
    return parse_selector(_replace_calls(prefixed, _NS_CALLS)).text


def _sa_label_selector(text: str, where: str) -> str:
    try:
        return parse_selector(text).with_label_prefix(SA_LABEL_PREFIX).text
    except SelectorError as e:
        raise _err(where, f"invalid selector {text!r}: {e}") from None


def _service_accounts(value: Any, where: str) -> str:
    """serviceAccounts {names, selector} as one selector text ("" when it restricts nothing)."""
    sam = _obj(value, where)
    unknown = set(sam) - {"names", "selector"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    parts: list[str] = []
    sel = _str(sam.get("selector"), f"{where}.selector")
    if sel.strip():
        parts.append(_sa_label_selector(sel, f"{where}.selector"))
    names = _list(sam.get("names"), f"{where}.names")
    if names:
        quoted = []
        for i, n in enumerate(names):
            if not isinstance(n, str) or not n:
                raise _err(f"{where}.names[{i}]", f"must be a non-empty string, not {n!r}")
            quoted.append(_quote(n, f"{where}.names[{i}]"))
        parts.append(_selector(f"{LABEL_SERVICEACCOUNT} in {{{', '.join(quoted)}}}", f"{where}.names"))
    return _and(*parts)


def _ns_equals(namespace: str) -> str:
    return _selector(f"{LABEL_NAMESPACE} == {_quote(namespace, 'metadata.namespace')}", "metadata.namespace")


# ---------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------

def _protocol(value: Any, where: str) -> tuple[str, int] | None:
    """(canonical text, number) for a protocol name or number; None when unset."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _err(where, f"invalid protocol {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        if not 1 <= n <= 255:
            raise _err(where, f"protocol number {n} is out of range 1-255")
        return str(n), n
    if isinstance(value, str):
        name = _PROTOCOLS.get(value.strip().lower())
        if name is None:
            raise _err(where, f"unknown protocol {value!r} (expected TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255)")
        return name, _PROTOCOL_NUMBERS[name]
    raise _err(where, f"invalid protocol {value!r}")


def _port(value: Any, where: str) -> Port:
    if isinstance(value, bool):
        raise _err(where, f"invalid port {value!r}")
    if isinstance(value, int):
        return PortRange(_int(value, where, 0, 65535), value)
    if not isinstance(value, str) or not value.strip():
        raise _err(where, f"invalid port {value!r}")
    text = value.strip()
    if text.isdigit():
        n = _int(int(text), where, 0, 65535)
        return PortRange(n, n)
    first, sep, last = text.partition(":")
    if sep:
        if not (first.isdigit() and last.isdigit()):
            raise _err(where, f"invalid port range {value!r} (expected <first>:<last>)")
        lo, hi = _int(int(first), where, 0, 65535), _int(int(last), where, 0, 65535)
        if lo > hi:
            raise _err(where, f"port range {value!r} has its first port above its last")
        return PortRange(lo, hi)
    if not _PORT_NAME_RE.match(text):
        raise _err(where, f"invalid port name {value!r}")
    return text


def _ports(value: Any, where: str) -> tuple[Port, ...]:
    return tuple(_port(p, f"{where}[{i}]") for i, p in enumerate(_list(value, where)))


_ENTITY_FIELDS = frozenset({"nets", "notNets", "selector", "notSelector", "namespaceSelector",
                            "serviceAccounts", "ports", "notPorts"})


def _entity(value: Any, where: str, namespace: str) -> EntityMatch:
    raw = _obj(value, where)
    if raw.get("services"):
        raise _err(f"{where}.services", "service matches are not supported")
    unknown = set(raw) - _ENTITY_FIELDS - {"services"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    sel_text = _str(raw.get("selector"), f"{where}.selector")
    not_text = _str(raw.get("notSelector"), f"{where}.notSelector")
    ns_text = _str(raw.get("namespaceSelector"), f"{where}.namespaceSelector")
    # An empty selector means "no selector match", which differs from all() ("any known endpoint").
    sel = _selector(sel_text, f"{where}.selector") if sel_text.strip() else ""
    not_sel = _selector(not_text, f"{where}.notSelector") if not_text.strip() else ""
    sa = _service_accounts(raw.get("serviceAccounts"), f"{where}.serviceAccounts")
    ns_scope = ""
    if ns_text.strip():
        ns_scope = _namespace_selector(ns_text, f"{where}.namespaceSelector")
    elif namespace:
        ns_scope = _ns_equals(namespace)
    if ns_scope and (sel or not_sel or ns_text.strip() or sa):
        sel = _and(ns_scope, sel)
    sel = _and(sel, sa)
    return EntityMatch(
        nets=_nets(raw.get("nets"), f"{where}.nets"),
        not_nets=_nets(raw.get("notNets"), f"{where}.notNets"),
        selector=sel, not_selector=not_sel,
        ports=_ports(raw.get("ports"), f"{where}.ports"),
        not_ports=_ports(raw.get("notPorts"), f"{where}.notPorts"),
    )


def _icmp(value: Any, where: str) -> tuple[int | None, int | None]:
    raw = _obj(value, where)
    unknown = set(raw) - {"type", "code"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    typ = None if raw.get("type") is None else _int(raw["type"], f"{where}.type", 0, 254)
    code = None if raw.get("code") is None else _int(raw["code"], f"{where}.code", 0, 255)
    if code is not None and typ is None:
        raise _err(f"{where}.code", "an ICMP code needs an ICMP type")
    return typ, code


_RULE_FIELDS = frozenset({"action", "ipVersion", "protocol", "notProtocol", "icmp", "notICMP", "source",
                          "destination", "metadata", "http"})


def _rule(value: Any, where: str, namespace: str) -> Rule:
    raw = _obj(value, where)
    unknown = set(raw) - _RULE_FIELDS
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    if raw.get("http"):
        # Felix leaves HTTP matches to an application-layer proxy that felixpy does not have.
        raise _err(f"{where}.http", "HTTP matches are not supported")
    action_raw = raw.get("action")
    action = _ACTIONS.get(action_raw.lower()) if isinstance(action_raw, str) else None
    if action is None:
        raise _err(f"{where}.action", f"unknown action {action_raw!r} (expected Allow, Deny, Pass or Log)")
    ip_version = None
    if raw.get("ipVersion") is not None:
        ip_version = raw["ipVersion"]
        if isinstance(ip_version, bool) or ip_version not in (4, 6):
            raise _err(f"{where}.ipVersion", f"must be 4 or 6, not {ip_version!r}")
    proto = _protocol(raw.get("protocol"), f"{where}.protocol")
    not_proto = _protocol(raw.get("notProtocol"), f"{where}.notProtocol")
    source = _entity(raw.get("source"), f"{where}.source", namespace)
    dest = _entity(raw.get("destination"), f"{where}.destination", namespace)

    for side, ent in (("source", source), ("destination", dest)):
        if (ent.ports or ent.not_ports) and (proto is None or proto[1] not in _PORT_PROTOCOLS):
            raise _err(f"{where}.{side}", "ports can only be used with protocol TCP, UDP or SCTP")
    icmp_type, icmp_code = _icmp(raw.get("icmp"), f"{where}.icmp")
    not_icmp_type, not_icmp_code = _icmp(raw.get("notICMP"), f"{where}.notICMP")
    if (icmp_type is not None or not_icmp_type is not None) and (proto is None or proto[1] not in _ICMP_PROTOCOLS):
        raise _err(where, "icmp/notICMP can only be used with protocol ICMP or ICMPv6")
    if proto is not None and (proto[1], ip_version) in ((1, 6), (58, 4)):
        raise _err(f"{where}.ipVersion", f"protocol {proto[0]} does not match ipVersion {ip_version}")
    # A rule's CIDRs must all be of one family, and that of ipVersion if given (Calico's validator).
    versions = {n.version for ent in (source, dest) for n in (*ent.nets, *ent.not_nets)}
    if len(versions) > 1:
        raise _err(where, "rule mixes IPv4 and IPv6 CIDRs")
    if ip_version is not None and versions and versions != {ip_version}:
        raise _err(f"{where}.ipVersion", f"ipVersion {ip_version} does not match the rule's CIDRs")

    md = _obj(raw.get("metadata"), f"{where}.metadata")
    annotations = _str_map(md.get("annotations"), f"{where}.metadata.annotations")
    return Rule(
        action=action, ip_version=ip_version,
        protocol=proto[0] if proto else None, not_protocol=not_proto[0] if not_proto else None,
        icmp_type=icmp_type, icmp_code=icmp_code, not_icmp_type=not_icmp_type, not_icmp_code=not_icmp_code,
        source=source, destination=dest, metadata=tuple(sorted(annotations.items())),
    )


def _rules(value: Any, where: str, namespace: str) -> tuple[Rule, ...]:
    return tuple(_rule(r, f"{where}[{i}]", namespace) for i, r in enumerate(_list(value, where)))


def _types(value: Any, where: str, ingress: Sequence[Any], egress: Sequence[Any]) -> tuple[str, ...]:
    given: set[str] = set()
    for i, t in enumerate(_list(value, where)):
        norm = _TYPES.get(t.lower()) if isinstance(t, str) else None
        if norm is None:
            raise _err(f"{where}[{i}]", f"unknown policy type {t!r} (expected Ingress or Egress)")
        given.add(norm)
    if not given:
        # clientv3 defaultPolicyTypesField.
        if not egress:
            given = {INGRESS}
        elif not ingress:
            given = {EGRESS}
        else:
            given = {INGRESS, EGRESS}
    return tuple(t for t in (INGRESS, EGRESS) if t in given)


# ---------------------------------------------------------------------------------------------------
# Kubernetes NetworkPolicy -> v3 spec (Calico's K8sNetworkPolicyToCalico)
# ---------------------------------------------------------------------------------------------------

def _k8s_selector(value: Any, where: str, *, pod: bool) -> str:
    """A k8s LabelSelector as Calico selector text ("" = no selector; ``None`` namespace selector)."""
    parts = [f"{LABEL_ORCHESTRATOR} == 'k8s'"] if pod else []
    if value is None:
        return " && ".join(parts)
    sel = _obj(value, where)
    labels = _str_map(sel.get("matchLabels"), f"{where}.matchLabels")
    exprs = _list(sel.get("matchExpressions"), f"{where}.matchExpressions")
    if not pod and not labels and not exprs:
        return "all()"  # an empty namespaceSelector means every namespace
    for k in sorted(labels):
        parts.append(f"{k} == {_quote(labels[k], f'{where}.matchLabels.{k}')}")
    for i, e in enumerate(exprs):
        ew = f"{where}.matchExpressions[{i}]"
        expr = _obj(e, ew)
        key = _str(expr.get("key"), f"{ew}.key")
        op = _str(expr.get("operator"), f"{ew}.operator")
        values = [_quote(_str(v, f"{ew}.values[{j}]"), f"{ew}.values[{j}]")
                  for j, v in enumerate(_list(expr.get("values"), f"{ew}.values"))]
        if op == "In":
            parts.append(f"{key} in {{{', '.join(values)}}}")
        elif op == "NotIn":
            parts.append(f"{key} not in {{{', '.join(values)}}}")
        elif op == "Exists":
            parts.append(f"has({key})")
        elif op == "DoesNotExist":
            parts.append(f"! has({key})")
        else:
            raise _err(f"{ew}.operator", f"unknown operator {op!r} (expected In, NotIn, Exists or DoesNotExist)")
    text = " && ".join(parts)
    if text:
        _selector(text, where)  # report a bad label key against the k8s field, not the generated one
    return text


def _k8s_port(value: Any, where: str) -> tuple[str, Any] | None:
    """(protocol, v3 port or None for all ports), or None for an empty port entry (all protocols)."""
    p = _obj(value, where)
    port, end, proto = p.get("port"), p.get("endPort"), p.get("protocol")
    if port is None and end is None and proto is None:
        return None
    protocol = _str(proto, f"{where}.protocol") or "TCP"
    if port is None:
        if end is not None:
            raise _err(f"{where}.endPort", "endPort needs port")
        return protocol, None
    if end is not None:
        return protocol, f"{port}:{end}"
    return protocol, port


def _simplify_ports(ports: list[Any], where: str) -> list[Any]:
    """Calico's SimplifyPorts: named ports as given, numeric ports merged into the fewest ranges."""
    named: list[Any] = []
    ranges: list[PortRange] = []
    for i, p in enumerate(ports):
        parsed = _port(p, f"{where}[{i}]")
        if isinstance(parsed, str):
            if parsed not in named:
                named.append(parsed)
        else:
            ranges.append(parsed)
    ranges.sort(key=lambda r: (r.first, r.last))
    merged: list[PortRange] = []
    for r in ranges:
        if merged and r.first <= merged[-1].last + 1:
            merged[-1] = PortRange(merged[-1].first, max(merged[-1].last, r.last))
        else:
            merged.append(r)
    return named + [r.first if r.first == r.last else f"{r.first}:{r.last}" for r in merged]


def _k8s_rule(value: Any, where: str, *, ingress: bool) -> list[dict[str, Any]]:
    raw = _obj(value, where)
    peer_field = "from" if ingress else "to"
    peers: list[dict[str, Any] | None] = [
        _obj(p, f"{where}.{peer_field}[{i}]") for i, p in enumerate(_list(raw.get(peer_field), f"{where}.{peer_field}"))
    ] or [None]
    by_proto: dict[str, list[Any] | None] = {}
    for i, p in enumerate(_list(raw.get("ports"), f"{where}.ports")):
        conv = _k8s_port(p, f"{where}.ports[{i}]")
        if conv is None:
            by_proto = {"": None}  # an empty port entry allows everything
            break
        proto, port = conv
        if port is None:
            by_proto[proto] = None  # all ports of this protocol; later ports add nothing
        elif proto not in by_proto:
            by_proto[proto] = [port]
        else:
            have = by_proto[proto]
            if have is not None:
                have.append(port)
    if not by_proto:
        by_proto = {"": None}

    rules: list[dict[str, Any]] = []
    for proto in sorted(by_proto):
        ports = by_proto[proto]
        for j, peer in enumerate(peers):
            entity: dict[str, Any] = {}
            if peer is not None:
                pw = f"{where}.{peer_field}[{j}]"
                block = peer.get("ipBlock")
                if block is not None:
                    b = _obj(block, f"{pw}.ipBlock")
                    entity["nets"] = [_str(b.get("cidr"), f"{pw}.ipBlock.cidr")]
                    entity["notNets"] = _list(b.get("except"), f"{pw}.ipBlock.except")
                else:
                    entity["selector"] = _k8s_selector(peer.get("podSelector"), f"{pw}.podSelector", pod=True)
                    ns_sel = _k8s_selector(peer.get("namespaceSelector"), f"{pw}.namespaceSelector", pod=False)
                    if ns_sel:
                        entity["namespaceSelector"] = ns_sel
            rule: dict[str, Any] = {"action": ACTION_ALLOW}
            if proto:
                rule["protocol"] = proto
            dest: dict[str, Any] = {}
            if ports:
                dest["ports"] = _simplify_ports(ports, f"{where}.ports")
            if ingress:
                rule["source"] = entity
                rule["destination"] = dest
            else:
                dest.update(entity)
                rule["destination"] = dest
            rules.append(rule)
    return rules


def _k8s_spec_to_v3(spec: dict[str, Any], namespace: str, warnings: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "order": K8S_POLICY_ORDER, "tier": DEFAULT_TIER,
        "selector": _k8s_selector(_obj(spec.get("podSelector"), "spec.podSelector"), "spec.podSelector", pod=True),
    }
    for direction, ingress in (("ingress", True), ("egress", False)):
        rules: list[dict[str, Any]] = []
        for i, r in enumerate(_list(spec.get(direction), f"spec.{direction}")):
            where = f"spec.{direction}[{i}]"
            try:
                converted = _k8s_rule(r, where, ingress=ingress)
                for c in converted:  # validate now so a bad rule is dropped, not the whole policy
                    _rule(c, where, namespace)
            except InvalidResource as e:
                if warnings is not None:
                    warnings.append(f"dropped rule that cannot be converted: {e}")
                continue
            rules.extend(converted)
        out[direction] = rules
    types: list[str] = []
    for i, t in enumerate(_list(spec.get("policyTypes"), "spec.policyTypes")):
        if t in (INGRESS, EGRESS) and t not in types:
            types.append(t)
        elif t not in (INGRESS, EGRESS) and warnings is not None:
            warnings.append(f"spec.policyTypes[{i}]: ignored unknown policy type {t!r}")
    if not _list(spec.get("policyTypes"), "spec.policyTypes"):
        # Kubernetes' defaulting (the API server fills it in, but a policy stored without it, e.g. in
        # etcd or by an old client, must mean the same): Ingress always, Egress if it has egress rules.
        types = [INGRESS, EGRESS] if _list(spec.get("egress"), "spec.egress") else [INGRESS]
    # Calico's K8sNetworkPolicyToCalico: only unknown types given means Ingress.
    out["types"] = [t for t in (INGRESS, EGRESS) if t in types] or [INGRESS]
    return out


# ---------------------------------------------------------------------------------------------------
# Public parsers
# ---------------------------------------------------------------------------------------------------

def _metadata(res: Resource) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(res, dict):
        raise InvalidResource(f"resource must be an object, not {type(res).__name__}")
    md = _obj(res.get("metadata"), "metadata")
    name = _str(md.get("name"), "metadata.name")
    namespace = _str(md.get("namespace"), "metadata.namespace")
    spec = _obj(res.get("spec"), "spec")
    return name, namespace, spec


def parse_policy(res: Resource, kind: str, *, warnings: list[str] | None = None) -> Policy:
    """A stored policy of ``kind`` (NetworkPolicy, GlobalNetworkPolicy, KubernetesNetworkPolicy or a
    Staged* kind) as a :class:`Policy` with scoped, canonical selectors.

    Non-fatal problems (k8s rules Calico would drop, ignored policyTypes) are appended to ``warnings``.
    Raises :class:`InvalidResource` for anything else.
    """
    if kind not in _POLICY_KINDS:
        raise InvalidResource(f"not a policy kind: {kind!r}")
    key_kind, staged, k8s_spec = _POLICY_KINDS[kind]
    md_name = ""
    md_ns = ""
    if isinstance(res, dict) and isinstance(res.get("metadata"), dict):
        md_name = str(res["metadata"].get("name") or "")
        md_ns = str(res["metadata"].get("namespace") or "")
    label = f"{kind} {md_ns}/{md_name}" if md_ns else f"{kind} {md_name}"
    local_warnings: list[str] = []
    try:
        policy = _parse_policy(res, key_kind, staged, k8s_spec, local_warnings)
    except InvalidResource as e:
        raise InvalidResource(f"{label}: {e}") from None
    if warnings is not None:
        warnings.extend(f"{label}: {w}" for w in local_warnings)
    return policy


def _parse_policy(res: Resource, key_kind: str, staged: bool, k8s_spec: bool, warnings: list[str]) -> Policy:
    name, namespace, spec = _metadata(res)
    if not name:
        raise _err("metadata.name", "missing")
    namespaced = key_kind != KIND_GNP
    if namespaced and not namespace:
        raise _err("metadata.namespace", "missing for a namespaced policy")
    if not namespaced:
        namespace = ""
    if key_kind == KIND_NP and name.startswith(KNP_NAME_PREFIX):
        key_kind = KIND_KNP  # a k8s NetworkPolicy already in Calico's v3 form
    if key_kind == KIND_KNP and name.startswith(KNP_NAME_PREFIX):
        name = name[len(KNP_NAME_PREFIX):]
        if not name:
            raise _err("metadata.name", f"nothing after {KNP_NAME_PREFIX!r}")
    if k8s_spec:
        spec = _k8s_spec_to_v3(spec, namespace, warnings)

    tier = _str(spec.get("tier"), "spec.tier") or DEFAULT_TIER
    order = _order(spec.get("order"), "spec.order")

    sel_text = _str(spec.get("selector"), "spec.selector")
    selector = _selector(sel_text, "spec.selector") if sel_text.strip() else ""
    if namespaced:
        selector = _and(selector, _ns_equals(namespace))
    else:
        ns_text = _str(spec.get("namespaceSelector"), "spec.namespaceSelector")
        if ns_text.strip():
            selector = _and(selector, _namespace_selector(ns_text, "spec.namespaceSelector"))
    sa_text = _str(spec.get("serviceAccountSelector"), "spec.serviceAccountSelector")
    if sa_text.strip():
        selector = _and(selector, _sa_label_selector(sa_text, "spec.serviceAccountSelector"))
    selector = selector or "all()"

    ingress_raw = _list(spec.get("ingress"), "spec.ingress")
    egress_raw = _list(spec.get("egress"), "spec.egress")
    ingress = _rules(ingress_raw, "spec.ingress", namespace)
    egress = _rules(egress_raw, "spec.egress", namespace)
    types = _types(spec.get("types"), "spec.types", ingress_raw, egress_raw)

    do_not_track = pre_dnat = apply_on_forward = False
    if not namespaced:
        do_not_track = _bool(spec.get("doNotTrack"), "spec.doNotTrack")
        pre_dnat = _bool(spec.get("preDNAT"), "spec.preDNAT")
        apply_on_forward = _bool(spec.get("applyOnForward"), "spec.applyOnForward")
        # Calico's GlobalNetworkPolicy validation.
        if do_not_track and pre_dnat:
            raise _err("spec", "preDNAT and doNotTrack cannot both be true")
        if (do_not_track or pre_dnat) and not apply_on_forward:
            raise _err("spec.applyOnForward", "must be true when preDNAT or doNotTrack is true")
        if pre_dnat and (egress or EGRESS in types):
            raise _err("spec", "a preDNAT policy cannot have egress rules or the Egress type")

    if staged:
        name = STAGED_NAME_PREFIX + name
    return Policy(
        key=PolicyKey(kind=key_kind, namespace=namespace, name=name), tier=tier, order=order,
        selector=selector, types=types, ingress=ingress, egress=egress,
        do_not_track=do_not_track, pre_dnat=pre_dnat, apply_on_forward=apply_on_forward, staged=staged,
    )


def parse_tier(res: Resource) -> Tier:
    """A Tier; a missing order falls back to Calico's order for the well-known tiers, else None (last)."""
    name, _, spec = _metadata(res)
    try:
        if not name:
            raise _err("metadata.name", "missing")
        order = _order(spec.get("order"), "spec.order")
        if order is None:
            order = TIER_DEFAULT_ORDERS.get(name)
        action_raw = spec.get("defaultAction")
        action = ACTION_DENY
        if action_raw not in (None, ""):
            norm = _ACTIONS.get(action_raw.lower()) if isinstance(action_raw, str) else None
            if norm not in (ACTION_DENY, ACTION_PASS):
                raise _err("spec.defaultAction", f"must be Deny or Pass, not {action_raw!r}")
            action = norm
    except InvalidResource as e:
        raise InvalidResource(f"Tier {name}: {e}") from None
    return Tier(name=name, order=order, default_action=action)


def parse_profile(res: Resource) -> Profile:
    """A Profile: its rules (not namespace-scoped) and labelsToApply (sorted)."""
    name, _, spec = _metadata(res)
    try:
        if not name:
            raise _err("metadata.name", "missing")
        labels = _str_map(spec.get("labelsToApply"), "spec.labelsToApply")
        ingress = _rules(spec.get("ingress"), "spec.ingress", "")
        egress = _rules(spec.get("egress"), "spec.egress", "")
    except InvalidResource as e:
        raise InvalidResource(f"Profile {name}: {e}") from None
    return Profile(name=name, ingress=ingress, egress=egress, labels_to_apply=tuple(sorted(labels.items())))


def parse_network_set(res: Resource, global_: bool) -> NetworkSet:
    """A NetworkSet (``global_=False``) or GlobalNetworkSet. A namespaced set also carries the
    ``projectcalico.org/namespace`` label, so namespace-scoped rule selectors can match it."""
    name, namespace, spec = _metadata(res)
    kind = "GlobalNetworkSet" if global_ else "NetworkSet"
    label = f"{kind} {namespace}/{name}" if namespace and not global_ else f"{kind} {name}"
    try:
        if not name:
            raise _err("metadata.name", "missing")
        if global_:
            namespace = ""
        elif not namespace:
            raise _err("metadata.namespace", "missing for a NetworkSet")
        md = _obj(res.get("metadata"), "metadata")
        labels = _str_map(md.get("labels"), "metadata.labels")
        if namespace:
            labels[LABEL_NAMESPACE] = namespace
        nets = _nets(spec.get("nets"), "spec.nets")
    except InvalidResource as e:
        raise InvalidResource(f"{label}: {e}") from None
    return NetworkSet(namespace=namespace, name=name, labels=tuple(sorted(labels.items())), nets=nets)


# Calico's interface name validation (and what the renderers accept): no "/", ":" or whitespace.
_HEP_IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def parse_host_endpoint(res: Resource) -> HostEndpoint:
    """A HostEndpoint (cluster-scoped): ``spec.node`` (required), ``spec.interfaceName`` (a name or ``*``)
    and/or ``spec.expectedIPs`` (at least one of them), ``spec.profiles``, ``spec.ports`` (named ports,
    strictly validated: a bad entry rejects the resource, as Calico's validator does) and the labels of
    ``metadata.labels``."""
    name, _, spec = _metadata(res)
    try:
        if not name:
            raise _err("metadata.name", "missing")
        md = _obj(res.get("metadata"), "metadata")
        labels = _str_map(md.get("labels"), "metadata.labels")
        node = _str(spec.get("node"), "spec.node").strip()
        if not node:
            raise _err("spec.node", "missing")
        iface = _str(spec.get("interfaceName"), "spec.interfaceName").strip()
        if iface and iface != HEP_ALL_INTERFACES and not _HEP_IFACE_RE.match(iface):
            raise _err("spec.interfaceName", f"invalid interface name {iface!r} (1-15 of A-Z a-z 0-9 _ . -, or '*')")
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for i, item in enumerate(_list(spec.get("expectedIPs"), "spec.expectedIPs")):
            if not isinstance(item, str):
                raise _err(f"spec.expectedIPs[{i}]", f"must be an IP address string, not {item!r}")
            try:
                ips.append(ipaddress.ip_address(item.strip()))
            except ValueError:
                raise _err(f"spec.expectedIPs[{i}]", f"invalid IP address {item!r}") from None
        if not iface and not ips:
            raise _err("spec", "give interfaceName or expectedIPs")
        profiles: list[str] = []
        for i, item in enumerate(_list(spec.get("profiles"), "spec.profiles")):
            if not isinstance(item, str) or not item.strip():
                raise _err(f"spec.profiles[{i}]", f"must be a profile name, not {item!r}")
            profiles.append(item.strip())
        ports: dict[EndpointPort, None] = {}
        for i, p in enumerate(_list(spec.get("ports"), "spec.ports")):
            where = f"spec.ports[{i}]"
            p = _obj(p, where)
            pname = _str(p.get("name"), where + ".name")
            if not _PORT_NAME_RE.match(pname):
                raise _err(where + ".name", f"invalid port name {pname!r}")
            proto = str(p.get("protocol") or "TCP").strip().lower()
            proto = {"6": "tcp", "17": "udp", "132": "sctp"}.get(proto, proto)
            if proto not in NAMED_PORT_PROTOCOLS:
                raise _err(where + ".protocol", f"must be TCP, UDP or SCTP, not {p.get('protocol')!r}")
            ports[EndpointPort(pname, proto, _int(p.get("port"), where + ".port", 1, 65535))] = None
    except InvalidResource as e:
        raise InvalidResource(f"HostEndpoint {name}: {e}") from None
    return HostEndpoint(name=name, node=node, iface=iface, expected_ips=tuple(dict.fromkeys(ips)),
                        profiles=tuple(dict.fromkeys(profiles)), labels=tuple(sorted(labels.items())),
                        ports=tuple(ports))


def endpoint_ports(res: Resource) -> tuple[EndpointPort, ...]:
    """The named ports of a WorkloadEndpoint or HostEndpoint (``spec.ports``: name, protocol, port).
    Entries without a name (hostPort-only ones), with another protocol or malformed are skipped: they can
    never be named in a rule, and one bad entry must not cost the endpoint its other ports."""
    spec = res.get("spec") if isinstance(res, dict) else None
    raw = spec.get("ports") if isinstance(spec, dict) else None
    if not isinstance(raw, list):
        return ()
    out: dict[EndpointPort, None] = {}
    for p in raw:
        if not isinstance(p, dict):
            continue
        name, proto, port = p.get("name"), p.get("protocol"), p.get("port")
        proto_text = str(proto or "TCP").strip().lower()
        proto_text = {"6": "tcp", "17": "udp", "132": "sctp"}.get(proto_text, proto_text)
        if not isinstance(name, str) or not _PORT_NAME_RE.match(name) or proto_text not in NAMED_PORT_PROTOCOLS:
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            continue
        out[EndpointPort(name, proto_text, port)] = None  # two containers may share a name: both count
    return tuple(out)


def endpoint_labels(wep_labels: Mapping[str, str], profiles: Sequence[Profile]) -> dict[str, str]:
    """The labels selectors see on an endpoint: its own labels, then each profile's labelsToApply for keys
    still missing, in profile order (Felix's label inheritance: own labels win, then the first profile)."""
    out: dict[str, str] = {}
    for profile in reversed(profiles):
        out.update(profile.labels_to_apply)
    out.update(wep_labels)
    return out
