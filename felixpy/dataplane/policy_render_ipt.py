"""Network policy as iptables rules for the filter table (pure: values in, rule specs out, no I/O).

The iptables twin of :mod:`felixpy.dataplane.policy_render`, with Calico's iptables layout
(calico-compat 1.1-1.7) and the same semantics, so one truth table holds on both backends:

- hooks (driver ``set_hooks``): ``FORWARD -j cali-FORWARD`` and ``INPUT -j cali-INPUT`` inserted at the
  top; appended at the very end of ``FORWARD``: ``-m mark --mark A/A -j ACCEPT`` ("Policy explicitly
  accepted packet."), so, as in Felix, one place gives the verdict for forwarded workload traffic;
- ``cali-FORWARD``: clears our mark bits, ``-i cali+ -j cali-from-wl-dispatch``, ``-o cali+ -j
  cali-to-wl-dispatch`` (pod to pod on one node runs the sender's egress chain, then the receiver's
  ingress chain, which starts by clearing the marks again);
- dispatch: ``cali-from-wl-dispatch`` holds ``-i <iface> -g cali-fw-<iface>`` per endpoint (sorted),
  ``cali-to-wl-dispatch`` ``-o <iface> -g cali-tw-<iface>``, both ending with "Unknown interface" DROP
  (a flat list: Calico's prefix tree only shortens the walk);
- ``cali-INPUT``: ``-i cali+ -g cali-wl-to-host``, which runs the from-workload dispatch (egress policy
  applies to pod -> host traffic), then DefaultEndpointToHostAction;
- endpoint chains ``cali-tw-<iface>`` (ingress policy) / ``cali-fw-<iface>`` (egress policy), policy
  chains ``cali-pi-<id>`` / ``cali-po-<id>`` (``PolicyKey.id``), profile chains ``cali-pri-<name>`` /
  ``cali-pro-<name>``; names longer than 28 characters are shortened as Calico's GetLengthLimitedID does;
- selector IP sets: ipset ``hash:net`` named ``cali40<set id>`` (``cali60`` for IPv6), at most 31 chars;
- host endpoints as in the nft renderer, with Calico's names: ``OUTPUT -j cali-OUTPUT``; ``cali-INPUT`` /
  ``cali-OUTPUT`` clear the marks, jump to ``cali-from-host-endpoint`` / ``cali-to-host-endpoint`` and
  ACCEPT on A ("Host endpoint policy accepted packet."); ``cali-FORWARD`` runs ``cali-from-hep-forward``
  first and ``cali-to-hep-forward`` last; endpoint chains ``cali-fh-`` / ``cali-th-`` (failsafe jump to
  ``cali-failsafe-in`` / ``-out`` after conntrack) and ``cali-fhfw-`` / ``cali-thfw-``;
- the overlay allowances of the nft renderer (:func:`overlay_rules`): IPIP (``-p 4``) / VXLAN from the
  ``cali40all-hosts-net`` ipset to a ``LOCAL`` address first in ``cali-INPUT`` (the rest dropped), and to
  it from a local address in ``cali-OUTPUT`` before host endpoint egress.

Verdicts and marks are the nft renderer's: a policy chain never accepts; Allow sets A and returns, Pass
sets P and returns, Deny sets the drop bit D and returns (Calico 3.30+; the endpoint chain drops and counts
it), Log logs and goes on. The endpoint chain is
Calico's (calico-compat 1.6).

One API rule may need more than one iptables rule: iptables has no "one of these CIDRs" match (``-s a,b``
is expanded by the iptables command into several kernel rules, which would break the driver's one rule
per hash) and multiport holds 15 ports. Such OR lists become Calico-style match blocks on two scratch
mark bits: S0 means "every block so far matched"; a positive block sets S1 on any alternative and clears
S0 when S1 stayed clear; a negative block (several excluded CIDRs or port groups) clears S0 on any
alternative; the final rule requires S0. A single CIDR or port group is matched inline.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from felixpy.dataplane.drivers.nftables import Rule as IptRule
from felixpy.dataplane.policy_render import (
    CHAIN_KIND_FORWARD,
    CHAIN_KIND_HOST,
    CHAIN_KIND_PRE_DNAT,
    CHAIN_KIND_UNTRACKED,
    CHAIN_KIND_WORKLOAD,
    DEFAULT_OPTIONS,
    HEP_ALL_SUFFIX,
    HEP_FWD_IN,
    HEP_FWD_OUT,
    HEP_PRE_DNAT_IN,
    HEP_RAW_IN,
    HEP_RAW_OUT,
    MAX_COMMENT_BYTES,
    TABLE_FILTER,
    TABLE_MANGLE,
    TABLE_RAW,
    ChainSpec,
    DropKey,
    HepDispatch,
    Marks,
    PolicyRenderError,
    RenderOptions,
    _drop_points,
    check_iface,
    drop_counter_name,
    drop_log_prefix,
    hep_has,
    parse_failsafe,
    policy_header,
    policy_table,
    rules_set_ids,
    set_id_for_selector,
)
from felixpy.model.policy import (
    ACTION_ALLOW,
    ACTION_DENY,
    ACTION_PASS,
    ACTIONS,
    ALL_HOSTS_SET_ID,
    EGRESS,
    HEP_ALL_INTERFACES,
    INGRESS,
    EndpointPolicyUpdate,
    EntityMatch,
    IPNet,
    IPPort,
    Policy,
    PolicyKey,
    PortRange,
    Profile,
    Rule,
    TierPolicies,
    side_named_port_sets,
)
from felixpy.model.selector import SelectorError

__all__ = [
    "CHAIN_FAILSAFE_IN",
    "CHAIN_FAILSAFE_OUT",
    "CHAIN_FORWARD",
    "CHAIN_FROM_HEP",
    "CHAIN_FROM_HEP_FWD",
    "CHAIN_FROM_WL_DISPATCH",
    "CHAIN_INPUT",
    "CHAIN_KIND_FORWARD",
    "CHAIN_KIND_HOST",
    "CHAIN_KIND_PRE_DNAT",
    "CHAIN_KIND_UNTRACKED",
    "CHAIN_KIND_WORKLOAD",
    "CHAIN_OUTPUT",
    "CHAIN_PREROUTING",
    "CHAIN_TO_HEP",
    "CHAIN_TO_HEP_FWD",
    "CHAIN_TO_WL_DISPATCH",
    "CHAIN_WL_TO_HOST",
    "MAX_CHAIN_NAME",
    "MAX_IPSET_NAME",
    "MAX_LOG_PREFIX",
    "TABLE_FILTER",
    "TABLE_MANGLE",
    "TABLE_RAW",
    "HookSpec",
    "dispatch_chains",
    "endpoint_chain_name",
    "failsafe_rules",
    "hooks",
    "host_dispatch_chains",
    "host_endpoint_chain_name",
    "ipset_members",
    "ipset_name",
    "ipset_port_members",
    "policy_chain_name",
    "policy_chains",
    "profile_chain_name",
    "profile_chains",
    "read_drop_counters",
    "render_endpoint_chain",
    "render_policy_chain",
    "render_profile_chain",
    "render_rule",
    "rules_set_ids",
    "scratch_marks",
    "static_chains",
]

# -- names ------------------------------------------------------------------------------------------
CHAIN_FORWARD = "cali-FORWARD"
CHAIN_INPUT = "cali-INPUT"
CHAIN_WL_TO_HOST = "cali-wl-to-host"
CHAIN_FROM_WL_DISPATCH = "cali-from-wl-dispatch"
CHAIN_TO_WL_DISPATCH = "cali-to-wl-dispatch"
CHAIN_OUTPUT = "cali-OUTPUT"
CHAIN_PREROUTING = "cali-PREROUTING"  # raw and mangle
CHAIN_FROM_HEP = "cali-from-host-endpoint"
CHAIN_TO_HEP = "cali-to-host-endpoint"
CHAIN_FROM_HEP_FWD = "cali-from-hep-forward"
CHAIN_TO_HEP_FWD = "cali-to-hep-forward"
CHAIN_FAILSAFE_IN = "cali-failsafe-in"
CHAIN_FAILSAFE_OUT = "cali-failsafe-out"
PREFIX_FROM_HEP = "cali-fh-"
PREFIX_TO_HEP = "cali-th-"
PREFIX_FROM_HEP_FWD = "cali-fhfw-"
PREFIX_TO_HEP_FWD = "cali-thfw-"
PREFIX_POLICY_IN = "cali-pi-"
PREFIX_POLICY_OUT = "cali-po-"
PREFIX_PROFILE_IN = "cali-pri-"
PREFIX_PROFILE_OUT = "cali-pro-"
PREFIX_TO_WL = "cali-tw-"
PREFIX_FROM_WL = "cali-fw-"

MAX_CHAIN_NAME = 28  # Felix's MaxChainNameLength
MAX_IPSET_NAME = 31  # the kernel's IPSET_MAXNAMELEN - 1
MAX_LOG_PREFIX = 29  # the LOG target's limit
MULTIPORT_SLOTS = 15  # a range costs two
_CHAIN_OK_RE = re.compile(r"^[A-Za-z0-9.:/-]+$")  # what the driver accepts, minus "_" (hash marker)
_SET_ID_RE = re.compile(r"^[a-z]:[A-Za-z0-9_.:-]{1,200}$")

_PROTO_NAMES = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "sctp": "sctp", "udplite": "udplite",
                "icmpv6": "ipv6-icmp"}
_PORT_PROTOS = frozenset({"tcp", "udp", "sctp", "udplite", "6", "17", "132", "136"})
_ICMP4 = frozenset({"icmp", "1"})
_ICMP6 = frozenset({"ipv6-icmp", "58"})
_DIRECTIONS = (INGRESS, EGRESS)
_HOST_ACTIONS = {"ACCEPT": "ACCEPT", "DROP": "DROP", "RETURN": "RETURN"}
_ICMP6_TO_HOST = (130, 131, 132, 133, 135, 136)


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise PolicyRenderError(f"direction must be {INGRESS} or {EGRESS}, not {direction!r}")


def limited_name(prefix: str, suffix: str) -> str:
    """Calico's GetLengthLimitedID: ``prefix + suffix`` if it fits in 28 characters, else ``prefix + "_" +``
    base64url(sha256(suffix)) cut to fit. Suffixes with characters the driver refuses, or starting with
    ``_`` (which could pass for a hash), are hashed too (never the case for Kubernetes names)."""
    if not suffix:
        raise PolicyRenderError(f"empty name after {prefix!r}")
    if _CHAIN_OK_RE.match(suffix) and len(prefix) + len(suffix) <= MAX_CHAIN_NAME:
        return prefix + suffix
    digest = base64.urlsafe_b64encode(hashlib.sha256(suffix.encode()).digest()).decode()
    return prefix + "_" + digest[:MAX_CHAIN_NAME - 1 - len(prefix)]


def policy_chain_name(key: PolicyKey, direction: str) -> str:
    _check_direction(direction)
    return limited_name(PREFIX_POLICY_IN if direction == INGRESS else PREFIX_POLICY_OUT, key.id)


def profile_chain_name(name: str, direction: str) -> str:
    _check_direction(direction)
    return limited_name(PREFIX_PROFILE_IN if direction == INGRESS else PREFIX_PROFILE_OUT, name)


def endpoint_chain_name(iface: str, direction: str) -> str:
    """``cali-tw-<iface>`` (ingress) / ``cali-fw-<iface>`` (egress); 8 + 15 characters always fit."""
    _check_direction(direction)
    return (PREFIX_TO_WL if direction == INGRESS else PREFIX_FROM_WL) + check_iface(iface)


def host_endpoint_chain_name(iface: str, direction: str, forward: bool = False, table: str = TABLE_FILTER) -> str:
    """``cali-fh-<iface>`` (ingress) / ``cali-th-<iface>`` (egress), ``cali-fhfw-`` / ``cali-thfw-`` for
    forwarded traffic; the all-interfaces endpoint (``*``) has the suffix ``all/``; 10 + 15 always fit.
    The untracked (``table`` raw) and pre-DNAT (mangle, ingress only) chains have the same names in their
    tables, as in Felix."""
    _check_direction(direction)
    if table != TABLE_FILTER and (forward or table not in (TABLE_RAW, TABLE_MANGLE)
                                  or (table == TABLE_MANGLE and direction != INGRESS)):
        raise PolicyRenderError(f"no {table} host endpoint chain for {direction} (forward={forward})")
    if forward:
        prefix = PREFIX_FROM_HEP_FWD if direction == INGRESS else PREFIX_TO_HEP_FWD
    else:
        prefix = PREFIX_FROM_HEP if direction == INGRESS else PREFIX_TO_HEP
    return prefix + (HEP_ALL_SUFFIX if iface == HEP_ALL_INTERFACES else check_iface(iface))


def ipset_name(set_id: str, ip_version: int) -> str:
    """Felix's IP set name: ``cali`` + version + ``0`` + id, cut to 31 characters. Only typed ids
    (``s:`` selectors, ``n:`` named ports) are accepted, so a dynamic set never takes a static name
    such as the NAT manager's ``cali40masq-ipam-pools``."""
    if not isinstance(set_id, str) or not (_SET_ID_RE.match(set_id) or set_id == ALL_HOSTS_SET_ID):
        raise PolicyRenderError(f"invalid IP set id {set_id!r} (want '<type letter>:<id>')")
    if ip_version not in (4, 6):
        raise PolicyRenderError(f"invalid IP version {ip_version!r}")
    return f"cali{ip_version}0{set_id}"[:MAX_IPSET_NAME]


def overlay_rules(opts: RenderOptions, inbound: bool) -> list[IptRule]:
    """Felix's overlay allowances (felix/rules/static.go): see the nft renderer's ``overlay_rules``."""
    if opts.ip_version != 4:
        return []
    hosts = ipset_name(ALL_HOSTS_SET_ID, 4)
    out: list[IptRule] = []
    vxlan = f"-p udp -m udp --dport {opts.vxlan_port}"
    if inbound:
        if opts.ipip_enabled:
            out += [IptRule(f"-p 4 -m set --match-set {hosts} src -m addrtype --dst-type LOCAL -j ACCEPT",
                            "Allow IPIP packets from Calico hosts"),
                    IptRule("-p 4 -j DROP", "Drop IPIP packets from non-Calico hosts")]
        if opts.vxlan_enabled:
            out += [IptRule(f"{vxlan} -m set --match-set {hosts} src -m addrtype --dst-type LOCAL -j ACCEPT",
                            "Allow IPv4 VXLAN packets from allowed hosts"),
                    IptRule(f"{vxlan} -m addrtype --dst-type LOCAL -j DROP",
                            "Drop IPv4 VXLAN packets from non-allowed hosts")]
        return out
    if opts.ipip_enabled:
        out.append(IptRule(f"-p 4 -m set --match-set {hosts} dst -m addrtype --src-type LOCAL -j ACCEPT",
                           "Allow IPIP packets to other Calico hosts"))
    if opts.vxlan_enabled:
        out.append(IptRule(f"{vxlan} -m addrtype --src-type LOCAL -m set --match-set {hosts} dst -j ACCEPT",
                           "Allow IPv4 VXLAN packets to other allowed hosts"))
    return out


def ipset_members(nets: Iterable[object], ip_version: int) -> list[IPNet]:
    """The ``hash:net`` members for ``nets``: this IP version only, sorted; ``/0`` becomes two ``/1``
    (hash:net refuses a zero prefix, as Felix works around too)."""
    out: set[IPNet] = set()
    for n in nets:
        if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) or n.version != ip_version:
            continue
        if n.prefixlen == 0:
            out.update(n.subnets(prefixlen_diff=1))
        else:
            out.add(n)
    return sorted(out, key=lambda n: (int(n.network_address), n.prefixlen))


def ipset_port_members(members: Iterable[object], ip_version: int) -> list[str]:
    """The ``hash:ip,port`` members (``10.0.0.1,tcp:8080``) of a named-port set: this IP version only."""
    ports = sorted(m for m in members if isinstance(m, IPPort) and m.addr.version == ip_version)
    return [f"{m.addr},{m.protocol}:{m.port}" for m in ports]


# -- marks ------------------------------------------------------------------------------------------
def scratch_marks(marks: Marks) -> tuple[int, int]:
    """The two scratch bits for match blocks: the next two bits above accept, pass and drop (Felix 3.30+:
    0x80000 and 0x100000 for the default marks)."""
    marks.validate()
    top = max(marks.accept, marks.pass_, marks.drop)
    s0, s1 = top << 1, top << 2
    if s1 >= 2**32:
        raise PolicyRenderError("no room for the scratch mark bits above the accept and pass bits")
    return s0, s1


def _hex(v: int) -> str:
    return f"{v:#x}"


def _set_mark(bit: int) -> str:
    return f"-j MARK --set-mark {_hex(bit)}/{_hex(bit)}"


def _clear_mark(bits: int) -> str:
    return f"-j MARK --set-mark 0/{_hex(bits)}"


def _has_mark(bit: int) -> str:
    return f"-m mark --mark {_hex(bit)}/{_hex(bit)}"


def _no_mark(bit: int) -> str:
    return f"-m mark --mark 0/{_hex(bit)}"


def _all_bits(opts: RenderOptions) -> int:
    s0, s1 = scratch_marks(opts.marks)
    return opts.marks.verdicts | s0 | s1


# -- one rule -----------------------------------------------------------------------------------------
def _proto(p: str | None, what: str) -> str | None:
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


_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "udplite": 136, "ipv6-icmp": 58}


def _proto_num(p: str) -> int:
    return _PROTO_NUMBERS[p] if p in _PROTO_NUMBERS else int(p)


def _nets_for(nets: Sequence[IPNet], version: int, what: str) -> list[IPNet]:
    out: list[IPNet] = []
    for n in nets:
        if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PolicyRenderError(f"{what}: {n!r} is not an IP network")
        if n.version == version:
            out.append(n)
    return list(ipaddress.collapse_addresses(out))  # type: ignore[type-var]


def _port_groups(ports: Sequence[PortRange], what: str) -> list[str]:
    """Merged port spans as multiport lists of at most 15 slots each (``80,8000:8080``)."""
    spans: list[tuple[int, int]] = []
    for p in ports:
        if not isinstance(p, PortRange):
            raise PolicyRenderError(f"{what}: invalid port {p!r}")
        if not (isinstance(p.first, int) and isinstance(p.last, int) and 0 <= p.first <= p.last <= 65535):
            raise PolicyRenderError(f"{what}: invalid port range {p.first}-{p.last}")
        spans.append((p.first, p.last))
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    groups: list[list[str]] = [[]]
    used = 0
    for a, b in merged:
        cost = 1 if a == b else 2
        if used + cost > MULTIPORT_SLOTS:
            groups.append([])
            used = 0
        groups[-1].append(str(a) if a == b else f"{a}:{b}")
        used += cost
    return [",".join(g) for g in groups if g]


def _action(rule: Rule, opts: RenderOptions) -> list[str]:
    """The final rule's target, and the rule that follows it (the return on the verdict mark)."""
    m = opts.marks
    if rule.action == ACTION_ALLOW:
        return [_set_mark(m.accept), f"{_has_mark(m.accept)} -j RETURN"]
    if rule.action == ACTION_PASS:
        return [_set_mark(m.pass_), f"{_has_mark(m.pass_)} -j RETURN"]
    if rule.action == ACTION_DENY:
        # Felix 3.30+: the endpoint chain that jumped here drops it, so the drop can name the pod.
        return [_set_mark(m.drop), f"{_has_mark(m.drop)} -j RETURN"]
    prefix = opts.log_prefix.encode()[:MAX_LOG_PREFIX].decode(errors="ignore")
    return [f'-j LOG --log-prefix "{prefix}" --log-level 5']


@dataclass
class _Block:
    negative: bool
    alternatives: list[str]


def render_rule(rule: Rule, direction: str, opts: RenderOptions = DEFAULT_OPTIONS) -> list[str]:
    """iptables rule specs for one policy rule; ``[]`` when it cannot match in this IP version. Same
    acceptance and semantics as :func:`policy_render.render_rule` (named ports: ``hash:ip,port`` sets,
    ORed with the numeric ports through a match block). Matches follow Calico's order: protocol, source
    net, source set, source ports, destination net, set, ports, ICMP, then the negations."""
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
        for f in icmp_fields:
            if f is not None and (not isinstance(f, int) or isinstance(f, bool) or not 0 <= f <= 255):
                raise PolicyRenderError(f"invalid ICMP type/code {f!r}")
        if rule.icmp_code is not None and rule.icmp_type is None:
            raise PolicyRenderError("an ICMP code needs an ICMP type")
        if rule.not_icmp_code is not None and rule.not_icmp_type is None:
            raise PolicyRenderError("a negated ICMP code needs a negated ICMP type")

    # iptables takes one -p per rule: a protocol makes a different negated one redundant, the same one
    # unmatchable.
    proto_match = f"-p {proto}" if proto is not None else ""
    negs: list[str] = []
    if not_proto is not None:
        if proto is not None:
            if _proto_num(proto) == _proto_num(not_proto):
                return []
        else:
            negs.append(f"! -p {not_proto}")
    parts: list[str] = []
    blocks: list[_Block] = []

    def side(e: EntityMatch, flag: str, set_dir: str, ports_opt: str, what: str) -> bool:
        if e.nets:
            nets = _nets_for(e.nets, v, what + " nets")
            if not nets:
                return False
            if len(nets) == 1:
                parts.append(f"{flag} {nets[0]}")
            else:
                blocks.append(_Block(False, [f"{flag} {n}" for n in nets]))
        if e.selector:
            parts.append(f"-m set --match-set {ipset_name(set_id_for_selector(e.selector), v)} {set_dir}")
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
        # Numeric port groups and named-port sets (hash:ip,port matched on "dst,dst") are alternatives.
        groups = _port_groups(numeric, what + " ports") if numeric else []
        alts = [f"-m multiport {ports_opt} {g}" for g in groups]
        alts += [f"-m set --match-set {ipset_name(s.set_id, v)} {set_dir},{set_dir}" for s in pos_sets]
        if len(alts) == 1:
            parts.append(alts[0])
        elif alts:
            blocks.append(_Block(False, [f"{proto_match} {a}" for a in alts]))
        not_nets = _nets_for(e.not_nets, v, what + " notNets")
        if len(not_nets) == 1:
            negs.append(f"! {flag} {not_nets[0]}")
        elif not_nets:
            blocks.append(_Block(True, [f"{flag} {n}" for n in not_nets]))
        if e.not_selector:
            negs.append(f"-m set ! --match-set {ipset_name(set_id_for_selector(e.not_selector), v)} {set_dir}")
        if not_numeric:
            groups = _port_groups(not_numeric, what + " notPorts")
            if len(groups) == 1:
                negs.append(f"-m multiport ! {ports_opt} {groups[0]}")
            else:
                blocks.append(_Block(True, [f"{proto_match} -m multiport {ports_opt} {g}" for g in groups]))
        negs.extend(f"-m set ! --match-set {ipset_name(s.set_id, v)} {set_dir},{set_dir}" for s in neg_sets)
        return True

    if not side(rule.source, "--source", "src", "--source-ports", "source"):
        return []
    if not side(rule.destination, "--destination", "dst", "--destination-ports", "destination"):
        return []
    icmp_m, icmp_o = ("-m icmp", "--icmp-type") if v == 4 else ("-m icmp6", "--icmpv6-type")
    if rule.icmp_type is not None:
        code = f"/{rule.icmp_code}" if rule.icmp_code is not None else ""
        parts.append(f"{icmp_m} {icmp_o} {rule.icmp_type}{code}")
    if rule.not_icmp_type is not None:
        code = f"/{rule.not_icmp_code}" if rule.not_icmp_code is not None else ""
        negs.append(f"{icmp_m} ! {icmp_o} {rule.not_icmp_type}{code}")

    out: list[str] = []
    final = [proto_match] if proto_match else []
    if blocks:
        s0, s1 = scratch_marks(opts.marks)
        out.append(_set_mark(s0))
        for b in blocks:
            if b.negative:
                out.extend(f"{_has_mark(s0)} {alt} {_clear_mark(s0)}" for alt in b.alternatives)
            else:
                out.append(_clear_mark(s1))
                out.extend(f"{_has_mark(s0)} {alt} {_set_mark(s1)}" for alt in b.alternatives)
                out.append(f"{_no_mark(s1)} {_clear_mark(s0)}")
        final.append(_has_mark(s0))
    target, *after = _action(rule, opts)
    out.append(" ".join([*final, *parts, *negs, target]))
    out.extend(after)
    return [" ".join(r.split()) if '"' not in r else r for r in out]


# -- chains -------------------------------------------------------------------------------------------
def _clean_comment(text: str) -> str:
    text = "".join(c if c.isprintable() and c not in '"\\' else " " for c in text).strip()
    raw = text.encode()
    if len(raw) > MAX_COMMENT_BYTES:
        text = raw[:MAX_COMMENT_BYTES - 3].decode(errors="ignore") + "..."
    return text


def _rules_chain(header: str, rules: Sequence[Rule], direction: str, opts: RenderOptions) -> list[IptRule]:
    out: list[IptRule] = []
    for r in rules:
        notes = [f"{k}={v}" for k, v in r.metadata]
        for text in render_rule(r, direction, opts):
            comment = "; ".join(([header] if not out else []) + notes)
            out.append(IptRule(text, _clean_comment(comment)))
    # Falling off the end of a chain is a return: Felix trims a trailing return on the verdict mark.
    m = opts.marks
    if out and out[-1].text in (f"{_has_mark(m.accept)} -j RETURN", f"{_has_mark(m.pass_)} -j RETURN",
                                f"{_has_mark(m.drop)} -j RETURN") \
            and len(out) > 1:
        out.pop()
    return out


def render_policy_chain(policy: Policy, direction: str, opts: RenderOptions = DEFAULT_OPTIONS) -> list[IptRule]:
    _check_direction(direction)
    rules = policy.ingress if direction == INGRESS else policy.egress
    return _rules_chain(policy_header(policy.key, direction), rules, direction, opts)


def render_profile_chain(profile: Profile, direction: str, opts: RenderOptions = DEFAULT_OPTIONS) -> list[IptRule]:
    _check_direction(direction)
    rules = profile.ingress if direction == INGRESS else profile.egress
    return _rules_chain(f"Profile {profile.name} {direction.lower()}", rules, direction, opts)


def policy_chains(policy: Policy, opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    """One chain per direction, in the policy's table (raw: do-not-track, mangle: pre-DNAT, ingress only)."""
    table = policy_table(policy)
    return [ChainSpec(policy_chain_name(policy.key, d), tuple(render_policy_chain(policy, d, opts)), table=table)
            for d in _DIRECTIONS if d in policy.types and not (d == EGRESS and table == TABLE_MANGLE)]


def profile_chains(profile: Profile, opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    return [ChainSpec(profile_chain_name(profile.name, d), tuple(render_profile_chain(profile, d, opts)))
            for d in _DIRECTIONS]


def render_endpoint_chain(ep: EndpointPolicyUpdate, direction: str, opts: RenderOptions = DEFAULT_OPTIONS, *,
                          available: Callable[[str], bool] | None = None,
                          staged: Callable[[PolicyKey], bool] | None = None,
                          drops: dict[str, DropKey] | None = None,
                          chain: str = CHAIN_KIND_WORKLOAD) -> list[IptRule]:
    """Calico's ``cali-tw-``/``cali-fw-`` chain (calico-compat 1.6), or a host endpoint's ``cali-fh-`` /
    ``cali-th-`` (``chain`` "host") or ``cali-fhfw-`` / ``cali-thfw-`` ("forward");
    ``available``/``staged``/``drops``/``chain`` as in the nft renderer (missing chains are left out, the
    tier still ends in its drop). A drop rule's
    comment starts with ``drop:<counter name>``, which is how :func:`read_drop_counters` finds its packet
    counts in ``iptables-save -c``; the optional log rule's prefix is cut to the LOG target's 29 bytes
    (the pod's namespace/name first), the comment of the drop rule below it names the policy."""
    _check_direction(direction)
    m = opts.marks
    has = available or (lambda _c: True)
    is_staged = staged or (lambda _k: False)
    points = _drop_points(ep, direction, has, is_staged, policy_chain_name, profile_chain_name, chain)

    def counted_drop(match: str, key: DropKey, what: str, comment: str) -> list[IptRule]:
        name = drop_counter_name(key)
        if drops is not None:
            drops[name] = key
        rules = []
        if opts.log_drops:
            prefix = drop_log_prefix(ep, what, MAX_LOG_PREFIX)
            rules.append(IptRule(f"{match} -m limit --limit {opts.drop_log_rate}/sec --limit-burst "
                                 f'{opts.drop_log_rate * 2} -j LOG --log-prefix "{prefix}" --log-level 4'.strip()))
        rules.append(IptRule(f"{match} -j DROP".strip(), _clean_comment(f"drop:{name}; {comment}")))
        return rules

    out: list[IptRule] = []
    if chain != CHAIN_KIND_UNTRACKED:  # raw runs before conntrack: no state yet
        out.append(IptRule("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"))
        if opts.drop_invalid:
            out.append(IptRule("-m conntrack --ctstate INVALID -j DROP"))
    if chain in (CHAIN_KIND_HOST, CHAIN_KIND_UNTRACKED, CHAIN_KIND_PRE_DNAT):  # the failsafe chain of its table
        out.append(IptRule(f"-j {CHAIN_FAILSAFE_IN if direction == INGRESS else CHAIN_FAILSAFE_OUT}"))
    out.append(IptRule(_clear_mark(m.verdicts)))
    if direction == EGRESS and chain == CHAIN_KIND_WORKLOAD:
        if not opts.allow_vxlan_from_workloads:
            out.append(IptRule(f"-p udp -m multiport --destination-ports {opts.vxlan_port} -j DROP",
                               "Drop VXLAN encapped packets originating in workloads"))
        if not opts.allow_ipip_from_workloads:
            out.append(IptRule("-p 4 -j DROP", "Drop IPinIP encapped packets originating in workloads"))
    for kind, item, key in points:
        if kind == "tier":
            assert isinstance(item, TierPolicies)
            out.append(IptRule(_clear_mark(m.pass_), _clean_comment(f"Start of tier {item.name}")))
        elif kind == "policy":
            assert isinstance(item, PolicyKey)
            out.append(IptRule(f"{_no_mark(m.pass_)} -j {policy_chain_name(item, direction)}"))
            out += counted_drop(_has_mark(m.drop), key, item.id, f"Drop if policy {item.id} denied")
            if chain == CHAIN_KIND_UNTRACKED:
                out.append(IptRule(f"{_has_mark(m.accept)} -j CT --notrack", "Untracked policy accepted"))
            out.append(IptRule(f"{_has_mark(m.accept)} -j RETURN", "Return if policy accepted"))
        elif kind == "endtier":
            assert isinstance(item, TierPolicies)
            out += counted_drop(_no_mark(m.pass_), key, f"tier {item.name} end",
                                f"End of tier {item.name}. Drop if no policies passed packet")
        elif kind == "profile":
            assert isinstance(item, str)
            out.append(IptRule(f"-j {profile_chain_name(item, direction)}"))
            out += counted_drop(_has_mark(m.drop), key, f"profile {item}", f"Drop if profile {item} denied")
            out.append(IptRule(f"{_has_mark(m.accept)} -j RETURN", "Return if profile accepted"))
        else:
            out += counted_drop("", key, "no profile", "Drop if no profiles matched")
    return out


_DROP_COMMENT_RE = re.compile(r'^\[(\d+):(\d+)\] -A \S+ .*--comment "?drop:(cali-drop-[a-z0-9]+)')


def read_drop_counters(save_output: str) -> dict[str, tuple[int, int]]:
    """Per drop counter name, the (packets, bytes) of its rules summed over every endpoint chain, from
    ``iptables-save -c`` output."""
    out: dict[str, tuple[int, int]] = {}
    for line in save_output.splitlines():
        if "drop:cali-drop-" not in line:
            continue
        mt = _DROP_COMMENT_RE.match(line)
        if mt is None:
            continue
        p, b = out.get(mt.group(3), (0, 0))
        out[mt.group(3)] = (p + int(mt.group(1)), b + int(mt.group(2)))
    return out


def dispatch_chains(ifaces: Iterable[str]) -> list[ChainSpec]:
    """``cali-from-wl-dispatch`` / ``cali-to-wl-dispatch``: a goto per endpoint interface (sorted),
    then "Unknown interface" DROP."""
    names = sorted(set(ifaces))
    fw = [IptRule(f"-i {i} -g {endpoint_chain_name(i, EGRESS)}") for i in names]
    tw = [IptRule(f"-o {i} -g {endpoint_chain_name(i, INGRESS)}") for i in names]
    unknown = IptRule("-j DROP", "Unknown interface")
    return [ChainSpec(CHAIN_FROM_WL_DISPATCH, (*fw, unknown)), ChainSpec(CHAIN_TO_WL_DISPATCH, (*tw, unknown))]


@dataclass(frozen=True)
class HookSpec:
    """Our rules in a kernel chain (the driver's ``set_hooks``)."""

    chain: str
    insert: tuple[IptRule, ...] = ()
    append: tuple[IptRule, ...] = ()
    table: str = TABLE_FILTER


def hooks(opts: RenderOptions = DEFAULT_OPTIONS) -> list[HookSpec]:
    a = opts.marks.accept
    return [
        HookSpec("FORWARD", insert=(IptRule(f"-j {CHAIN_FORWARD}"),),
                 append=(IptRule(f"{_has_mark(a)} -j ACCEPT", "Policy explicitly accepted packet."),)),
        HookSpec("INPUT", insert=(IptRule(f"-j {CHAIN_INPUT}"),)),
        HookSpec("OUTPUT", insert=(IptRule(f"-j {CHAIN_OUTPUT}"),)),
        HookSpec("PREROUTING", insert=(IptRule(f"-j {CHAIN_PREROUTING}"),), table=TABLE_RAW),
        HookSpec("OUTPUT", insert=(IptRule(f"-j {CHAIN_OUTPUT}"),), table=TABLE_RAW),
        HookSpec("PREROUTING", insert=(IptRule(f"-j {CHAIN_PREROUTING}"),), table=TABLE_MANGLE),
    ]


def host_dispatch_chains(heps: HepDispatch, opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    """The nft renderer's host-endpoint dispatch chains: ``-i <iface> -g cali-fh-<iface>`` etc., the
    all-interfaces endpoint last (``! -i cali+``); the raw and mangle ones in their tables."""
    wild = f"{opts.iface_prefix}+"

    def rules(flag: str, direction: str, forward: bool, which: int | None) -> tuple[IptRule, ...]:
        out = []
        for iface in sorted(i for i in heps if i != HEP_ALL_INTERFACES):
            if hep_has(heps[iface], which):
                out.append(IptRule(f"{flag} {check_iface(iface)} -g "
                                   f"{host_endpoint_chain_name(iface, direction, forward)}"))
        if HEP_ALL_INTERFACES in heps and hep_has(heps[HEP_ALL_INTERFACES], which):
            target = host_endpoint_chain_name(HEP_ALL_INTERFACES, direction, forward)
            out.append(IptRule(f"! {flag} {wild} -g {target}"))
        return tuple(out)

    return [ChainSpec(CHAIN_FROM_HEP, rules("-i", INGRESS, False, None)),
            ChainSpec(CHAIN_TO_HEP, rules("-o", EGRESS, False, None)),
            ChainSpec(CHAIN_FROM_HEP_FWD, rules("-i", INGRESS, True, HEP_FWD_IN)),
            ChainSpec(CHAIN_TO_HEP_FWD, rules("-o", EGRESS, True, HEP_FWD_OUT)),
            ChainSpec(CHAIN_FROM_HEP, rules("-i", INGRESS, False, HEP_RAW_IN), table=TABLE_RAW),
            ChainSpec(CHAIN_TO_HEP, rules("-o", EGRESS, False, HEP_RAW_OUT), table=TABLE_RAW),
            ChainSpec(CHAIN_FROM_HEP, rules("-i", INGRESS, False, HEP_PRE_DNAT_IN), table=TABLE_MANGLE)]


def failsafe_rules(items: Sequence[str], inbound: bool, ip_version: int, reply: bool = False) -> list[str]:
    """``-p <proto> -m <proto> --dport <port> -j ACCEPT`` per entry (``-s``/``-d`` its CIDR; entries of the
    other IP version left out); ``reply``: ``--sport`` (the raw table's reply rules, as the nft renderer)."""
    out = []
    for item in items:
        proto, net, port = parse_failsafe(item)
        if net is not None and net.version != ip_version:
            continue
        where = f"{'-s' if inbound else '-d'} {net} " if net is not None else ""
        out.append(f"{where}-p {proto} -m {proto} --{'sport' if reply else 'dport'} {port} -j ACCEPT")
    return out


def static_chains(opts: RenderOptions = DEFAULT_OPTIONS) -> list[ChainSpec]:
    """``cali-FORWARD``, ``cali-INPUT`` and ``cali-wl-to-host`` (the dispatch chains come from
    :func:`dispatch_chains`, the kernel-chain rules from :func:`hooks`)."""
    opts.validate()
    wild = f"{opts.iface_prefix}+"
    to_host: list[IptRule] = []
    if opts.ip_version == 6:
        to_host += [IptRule(f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT") for t in _ICMP6_TO_HOST]
    to_host += [IptRule(f"-j {CHAIN_FROM_WL_DISPATCH}"),
                IptRule(f"-j {_HOST_ACTIONS[opts.endpoint_to_host_action]}", "Configured DefaultEndpointToHostAction")]
    clear = IptRule(_clear_mark(_all_bits(opts)))
    accepted = IptRule(f"{_has_mark(opts.marks.accept)} -j ACCEPT", "Host endpoint policy accepted packet.")
    # Felix's acceptAlreadyAccepted (raw and mangle clear the bits first, so only they can have set it).
    already = IptRule(f"{_has_mark(opts.marks.accept)} -j ACCEPT", "Accepted by untracked or pre-DNAT policy.")
    v = opts.ip_version
    fs_in = tuple(IptRule(r) for r in failsafe_rules(opts.failsafe_inbound, True, v))
    fs_out = tuple(IptRule(r) for r in failsafe_rules(opts.failsafe_outbound, False, v))
    return [
        ChainSpec(CHAIN_FORWARD, (
            # Felix: the accept bit carries untracked / pre-DNAT policy's verdict; such a packet skips the
            # ingress host endpoint's forward policy, workload policy still decides.
            IptRule(_clear_mark(_all_bits(opts) & ~opts.marks.accept)),
            IptRule(f"{_no_mark(opts.marks.accept)} -j {CHAIN_FROM_HEP_FWD}"),
            IptRule(f"-i {wild} -j {CHAIN_FROM_WL_DISPATCH}"),
            IptRule(f"-o {wild} -j {CHAIN_TO_WL_DISPATCH}"),
            IptRule(f"-j {CHAIN_TO_HEP_FWD}"),
        )),
        ChainSpec(CHAIN_INPUT, (*overlay_rules(opts, True), IptRule(f"-i {wild} -g {CHAIN_WL_TO_HOST}"), already, clear,
                                IptRule(f"-j {CHAIN_FROM_HEP}"), accepted)),
        # Host -> workload traffic is the workload's ingress policy's business.
        ChainSpec(CHAIN_OUTPUT, (already, IptRule(f"-o {wild} -j RETURN"), *overlay_rules(opts, False), clear,
                                 IptRule(f"-j {CHAIN_TO_HEP}"), accepted)),
        ChainSpec(CHAIN_FAILSAFE_IN, fs_in),
        ChainSpec(CHAIN_FAILSAFE_OUT, fs_out),
        ChainSpec(CHAIN_WL_TO_HOST, tuple(to_host)),
        *host_dispatch_chains({}, opts),
        # Untracked policy (raw, before conntrack) and pre-DNAT policy (mangle PREROUTING), Felix's layout;
        # workload traffic never meets them; failsafe ports pass first (each table has its failsafe chains).
        ChainSpec(CHAIN_PREROUTING, (clear, IptRule(f"-i {wild} -j RETURN"), IptRule(f"-j {CHAIN_FROM_HEP}"),
                                     accepted), table=TABLE_RAW),
        ChainSpec(CHAIN_OUTPUT, (clear, IptRule(f"-o {wild} -j RETURN"), IptRule(f"-j {CHAIN_TO_HEP}"),
                                 accepted), table=TABLE_RAW),
        ChainSpec(CHAIN_FAILSAFE_IN, (*fs_in, *(IptRule(r) for r in failsafe_rules(opts.failsafe_outbound, True, v,
                                                                                   reply=True))), table=TABLE_RAW),
        ChainSpec(CHAIN_FAILSAFE_OUT, (*fs_out, *(IptRule(r) for r in failsafe_rules(opts.failsafe_inbound, False, v,
                                                                                     reply=True))), table=TABLE_RAW),
        ChainSpec(CHAIN_PREROUTING, (IptRule("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
                                     IptRule(f"{_has_mark(opts.marks.accept)} -j ACCEPT",
                                             "Accepted by untracked policy."),
                                     IptRule(f"-i {wild} -j RETURN"), clear, IptRule(f"-j {CHAIN_FROM_HEP}"),
                                     accepted), table=TABLE_MANGLE),
        ChainSpec(CHAIN_FAILSAFE_IN, fs_in, table=TABLE_MANGLE),
    ]
