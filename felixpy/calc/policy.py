"""Policy calculator (pure): endpoints, network sets, policies, tiers and profiles in; the policy dataplane
messages of :mod:`felixpy.model.policy` out. No I/O, no asyncio.

What it derives (Calico's label index, active-rules calculator, IP-set member calculator, policy sorter and
policy resolver in one incremental calculator):

- **Active policies**: a non-staged policy in a valid tier whose selector matches at least one *local*
  endpoint. **Active profiles**: every profile a local endpoint names.
- **IP sets**: one per distinct effective ``selector`` / ``not_selector`` in the rules of the active
  policies and profiles (named by :func:`selector_set_id` of the canonical selector text); members are the
  addresses of every matching endpoint cluster-wide plus the nets of every matching network set.
- **Named-port IP sets** (Calico's): one per (side's positive selector or ``all()``, protocol, port name)
  of the named ``ports`` / ``notPorts`` in those rules (:func:`named_port_set_id`); members are
  (address, protocol, port) of every matching endpoint that has a port of that name and protocol. A label
  change re-evaluates only the selectors reading that label; a port change touches only the sets of that
  port name whose selector matches the endpoint.
- **Per local endpoint**: the tiers (ordered) with the policies that select it (ordered, per direction),
  then its profiles.

Setters only record the newest input (several updates of one key between flushes cost one evaluation).
:meth:`PolicyCalculator.flush` applies them through two label indexes (policy selectors against local
endpoints; IP-set selectors against all endpoints and network sets) that re-evaluate only the selectors a
change can affect, and returns messages only for what changed, in dependency order::

    IPSetUpdate / IPSetDeltaUpdate, ActiveProfileUpdate, ActivePolicyUpdate, EndpointPolicyUpdate,
    EndpointPolicyRemove, ActivePolicyRemove, ActiveProfileRemove, IPSetRemove

so a consumer applying them one by one never sees a policy that uses a missing set, nor an endpoint
that jumps to a missing policy or profile (removals come last, in reverse dependency order, as in Felix's
event sequencer).

Semantics chosen where Calico leaves room:

- Tiers sort by order (None = +inf) then name. ``default`` (order 1e6, default action Deny),
  ``kube-admin`` (1e3, Pass) and ``kube-baseline`` (1e7, Pass) are valid even without a Tier resource
  (a Tier resource with no order keeps that well-known order). A policy in any other tier that has no Tier
  resource is skipped (not active, not on any endpoint) until the tier appears, as Felix skips invalid
  tiers; :attr:`PolicyCalculator.missing_tiers` lists such tiers.
- Policies in a tier sort by order (None = +inf) then ``"<name>/<namespace>/<kind>"``.
- ``do_not_track`` / ``pre_dnat`` / ``apply_on_forward`` policies are selected like any other. A host
  endpoint's update (``host=True``) lists only the normal ones (neither pre-DNAT nor do-not-track) in
  ``tiers`` and the applyOnForward ones among them again in ``forward_tiers`` (Calico's splitTiers), the
  do-not-track ones in ``untracked_tiers`` and the pre-DNAT ones (ingress only) in ``pre_dnat_tiers``; a
  workload's lists them all and the dataplane never jumps to pre-DNAT / do-not-track policies from a
  workload chain.
- A profile an endpoint names but that has no Profile resource is sent as a fail-closed placeholder
  (one Deny rule per direction), so the endpoint never jumps to a missing chain and never gets traffic a
  missing profile might have denied.
- A policy or profile with a selector that does not parse is logged, counted in
  :attr:`PolicyCalculator.invalid_inputs` and treated as absent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from felixpy.model.policy import (
    ACTION_DENY,
    ACTION_PASS,
    DEFAULT_TIER,
    EGRESS,
    INGRESS,
    ActivePolicyRemove,
    ActivePolicyUpdate,
    ActiveProfileRemove,
    ActiveProfileUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    EndpointPort,
    IPNet,
    IPPort,
    IPSetDeltaUpdate,
    IPSetRemove,
    IPSetUpdate,
    NetworkSet,
    Policy,
    PolicyKey,
    Profile,
    Rule,
    SetMember,
    Tier,
    TierPolicies,
    named_port_set_id,
    rule_named_port_sets,
    selector_set_id,
)
from felixpy.model.selector import Selector, SelectorError, parse_selector

log = logging.getLogger(__name__)

__all__ = ["WELL_KNOWN_TIERS", "LabelIndex", "PolicyCalculator", "PolicyMessage", "missing_profile"]

PolicyMessage = (IPSetUpdate | IPSetDeltaUpdate | IPSetRemove | ActivePolicyUpdate | ActivePolicyRemove
                 | ActiveProfileUpdate | ActiveProfileRemove | EndpointPolicyUpdate | EndpointPolicyRemove)

# name -> (order, default action) of the tiers that exist without a Tier resource.
WELL_KNOWN_TIERS: Mapping[str, tuple[float, str]] = {
    "kube-admin": (1_000.0, ACTION_PASS),
    DEFAULT_TIER: (1_000_000.0, ACTION_DENY),
    "kube-baseline": (10_000_000.0, ACTION_PASS),
}


def missing_profile(name: str) -> Profile:
    """The fail-closed stand-in for a profile that an endpoint names but that does not exist."""
    return Profile(name=name, ingress=(Rule(ACTION_DENY),), egress=(Rule(ACTION_DENY),))


# ---------------------------------------------------------------------------------------------------------
# Label index

K = TypeVar("K", bound=Hashable)
_NEVER = 0
_BY_VALUE = 1
_BY_KEY = 2
_SCAN = 3


def _classify(sel: Selector) -> tuple[int, str, frozenset[str]]:
    """How to find the items a selector may match: by one label's values, by a label's presence, or not
    at all (scan everything). Picks the narrowest necessary condition."""
    best: tuple[int, str, frozenset[str]] | None = None
    for key, r in sorted(sel.label_restrictions().items()):
        if not r.possible_to_satisfy():
            return _NEVER, key, frozenset()
        if r.one_of is not None:
            if best is None or best[0] != _BY_VALUE or len(r.one_of) < len(best[2]):
                best = (_BY_VALUE, key, r.one_of)
        elif r.must_be_present and best is None:
            best = (_BY_KEY, key, frozenset())
    return best if best is not None else (_SCAN, "", frozenset())


class LabelIndex(Generic[K]):
    """Incrementally matches registered selectors against labelled items.

    ``on_change(selector, item, matched)`` is called for every match that starts (True) or stops (False),
    including those caused by registering or removing a selector or item. A new item is evaluated only
    against selectors whose necessary conditions its labels meet; a label change re-evaluates only the
    selectors that read a changed key; a new selector is evaluated only against items that carry its
    narrowest required label (value).
    """

    def __init__(self, on_change: Callable[[Selector, K, bool], None]) -> None:
        self._on_change = on_change
        self._labels: dict[K, dict[str, str]] = {}
        self._items_by_label: dict[str, dict[str, set[K]]] = {}
        self._matches: dict[Selector, set[K]] = {}
        self._item_matches: dict[K, set[Selector]] = {}
        self._sel_by_value: dict[tuple[str, str], set[Selector]] = {}
        self._sel_by_key: dict[str, set[Selector]] = {}
        self._sel_scan: set[Selector] = set()
        self._sel_by_dep: dict[str, set[Selector]] = {}  # every label key a selector reads
        self._class: dict[Selector, tuple[int, str, frozenset[str]]] = {}

    # -- queries ------------------------------------------------------------------------------------
    def matches(self, sel: Selector) -> frozenset[K]:
        return frozenset(self._matches.get(sel, ()))

    def item_matches(self, item: K) -> frozenset[Selector]:
        return frozenset(self._item_matches.get(item, ()))

    def __contains__(self, sel: object) -> bool:
        return sel in self._matches

    # -- selectors ----------------------------------------------------------------------------------
    def add_selector(self, sel: Selector) -> None:
        if sel in self._matches:
            return
        cls = self._class[sel] = _classify(sel)
        kind, key, values = cls
        if kind == _BY_VALUE:
            for v in values:
                self._sel_by_value.setdefault((key, v), set()).add(sel)
        elif kind == _BY_KEY:
            self._sel_by_key.setdefault(key, set()).add(sel)
        elif kind == _SCAN:
            self._sel_scan.add(sel)
        for k in sel.label_keys():
            self._sel_by_dep.setdefault(k, set()).add(sel)
        matched: set[K] = set()
        self._matches[sel] = matched
        for item in self._candidate_items(kind, key, values):
            if sel.matches(self._labels[item]):
                matched.add(item)
                self._item_matches.setdefault(item, set()).add(sel)
                self._on_change(sel, item, True)

    def remove_selector(self, sel: Selector) -> None:
        matched = self._matches.pop(sel, None)
        if matched is None:
            return
        kind, key, values = self._class.pop(sel)
        if kind == _BY_VALUE:
            for v in values:
                _discard(self._sel_by_value, (key, v), sel)
        elif kind == _BY_KEY:
            _discard(self._sel_by_key, key, sel)
        elif kind == _SCAN:
            self._sel_scan.discard(sel)
        for k in sel.label_keys():
            _discard(self._sel_by_dep, k, sel)
        for item in matched:
            _discard(self._item_matches, item, sel)
            self._on_change(sel, item, False)

    def _candidate_items(self, kind: int, key: str, values: frozenset[str]) -> Iterable[K]:
        if kind == _SCAN:
            return list(self._labels)
        if kind == _NEVER:
            return ()
        by_value = self._items_by_label.get(key)
        if not by_value:
            return ()
        if kind == _BY_KEY:
            return [i for items in by_value.values() for i in items]
        return [i for v in values for i in by_value.get(v, ())]

    # -- items --------------------------------------------------------------------------------------
    def set_item(self, item: K, labels: Mapping[str, str]) -> None:
        old = self._labels.get(item)
        new = dict(labels)
        if old == new:
            return
        self._labels[item] = new
        if old is None:
            self._index_labels(item, new)
            candidates: set[Selector] = set(self._sel_scan)
            for k, v in new.items():
                candidates.update(self._sel_by_key.get(k, ()))
                candidates.update(self._sel_by_value.get((k, v), ()))
            for sel in candidates:
                if sel.matches(new):
                    self._matches[sel].add(item)
                    self._item_matches.setdefault(item, set()).add(sel)
                    self._on_change(sel, item, True)
            return
        changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        self._unindex_labels(item, old)
        self._index_labels(item, new)
        affected: set[Selector] = set()
        for k in changed:
            affected.update(self._sel_by_dep.get(k, ()))
        current = self._item_matches.setdefault(item, set())
        for sel in affected:
            now = sel.matches(new)
            if now == (sel in current):
                continue
            if now:
                current.add(sel)
                self._matches[sel].add(item)
            else:
                current.discard(sel)
                self._matches[sel].discard(item)
            self._on_change(sel, item, now)
        if not current:
            del self._item_matches[item]

    def remove_item(self, item: K) -> None:
        old = self._labels.pop(item, None)
        if old is None:
            return
        self._unindex_labels(item, old)
        for sel in self._item_matches.pop(item, ()):
            self._matches[sel].discard(item)
            self._on_change(sel, item, False)

    def _index_labels(self, item: K, labels: Mapping[str, str]) -> None:
        for k, v in labels.items():
            self._items_by_label.setdefault(k, {}).setdefault(v, set()).add(item)

    def _unindex_labels(self, item: K, labels: Mapping[str, str]) -> None:
        for k, v in labels.items():
            by_value = self._items_by_label[k]
            _discard(by_value, v, item)
            if not by_value:
                del self._items_by_label[k]


_KK = TypeVar("_KK", bound=Hashable)
_VV = TypeVar("_VV", bound=Hashable)


def _discard(index: dict[_KK, set[_VV]], key: _KK, value: _VV) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(value)
        if not members:
            del index[key]


# ---------------------------------------------------------------------------------------------------------
# The calculator


@dataclass(frozen=True)
class _Endpoint:
    local: bool
    iface: str
    labels: tuple[tuple[str, str], ...]
    profiles: tuple[str, ...]
    addrs: frozenset[IPNet]
    ports: tuple[EndpointPort, ...] = ()
    name: str = ""
    host: bool = False


_Item = tuple[str, Hashable]  # ("ep", endpoint id) or ("net", network-set key) in the IP-set index
# An IP set: (selector, "", "") for a selector set, (selector, protocol, port name) for a named-port set.
_SetKey = tuple[Selector, str, str]
_INF = math.inf


def _rule_set_keys(rules: Iterable[Rule]) -> set[_SetKey]:
    out: set[_SetKey] = {(sel, "", "") for sel in _rule_selectors(rules)}
    for r in rules:
        for nps in rule_named_port_sets(r):
            out.add((parse_selector(nps.selector), nps.protocol, nps.name))
    return out


def _set_key_id(key: _SetKey) -> str:
    sel, proto, name = key
    return named_port_set_id(sel.text, proto, name) if name else selector_set_id(sel.text)


def _members(key: _SetKey, addrs: frozenset[IPNet], ports: tuple[EndpointPort, ...]) -> frozenset[SetMember]:
    """What an item with ``addrs`` and ``ports`` contributes to set ``key``."""
    _, proto, name = key
    if not name:
        return frozenset(addrs)
    nums = [p.port for p in ports if p.name == name and p.protocol == proto]
    if not nums:
        return frozenset()
    # Only host addresses: a named port belongs to an endpoint address, never to a network.
    return frozenset(IPPort(a.network_address, proto, n) for a in addrs if a.prefixlen == a.max_prefixlen
                     for n in nums)


def _rule_selectors(rules: Iterable[Rule]) -> set[Selector]:
    out: set[Selector] = set()
    for r in rules:
        for side in (r.source, r.destination):
            if side.selector:
                out.add(parse_selector(side.selector))
            if side.not_selector:
                out.add(parse_selector(side.not_selector))
    return out


def _policy_sort_key(p: Policy) -> tuple[float, str]:
    k = p.key
    return (_INF if p.order is None else p.order, f"{k.name}/{k.namespace}/{k.kind}")


class PolicyCalculator:
    """See the module docstring. Usage: call the setters, then :meth:`flush` for the messages."""

    def __init__(self, *, ip_set_deltas: bool = False) -> None:
        # When True, a set that was already sent is updated with IPSetDeltaUpdate instead of IPSetUpdate.
        self.ip_set_deltas = ip_set_deltas
        self.invalid_inputs = 0
        # Inputs recorded by the setters, applied by flush() (None = removed).
        self._pending_eps: dict[str, _Endpoint | None] = {}
        self._pending_nets: dict[Hashable, NetworkSet | None] = {}
        self._pending_policies: dict[PolicyKey, Policy | None] = {}
        self._pending_tiers: dict[str, Tier | None] = {}
        self._pending_profiles: dict[str, Profile | None] = {}
        # Applied state.
        self._eps: dict[str, _Endpoint] = {}
        self._nets: dict[Hashable, NetworkSet] = {}
        self._policies: dict[PolicyKey, Policy] = {}  # registered: non-staged, selectors valid
        self._policy_sel: dict[PolicyKey, Selector] = {}
        self._policies_by_tier: dict[str, set[PolicyKey]] = {}
        self._tiers: dict[str, Tier] = {}
        self._profiles: dict[str, Profile] = {}
        self._profile_refs: dict[str, int] = {}  # profile -> number of local endpoints naming it
        # Policy selectors vs local endpoints.
        self._policy_index: LabelIndex[str] = LabelIndex(self._on_policy_match)
        self._sel_policies: dict[Selector, set[PolicyKey]] = {}
        self._ep_policies: dict[str, set[PolicyKey]] = {}
        self._policy_eps: dict[PolicyKey, set[str]] = {}
        # IP-set selectors vs all endpoints and network sets.
        self._set_index: LabelIndex[_Item] = LabelIndex(self._on_set_match)
        self._item_addrs: dict[_Item, frozenset[IPNet]] = {}
        self._item_ports: dict[_Item, tuple[EndpointPort, ...]] = {}
        self._set_refs: dict[_SetKey, int] = {}
        self._set_members: dict[_SetKey, dict[SetMember, int]] = {}
        self._sel_sets: dict[Selector, set[_SetKey]] = {}  # selector in the IP-set index -> sets using it
        # What was sent.
        self._sent_sets: dict[str, frozenset[SetMember]] = {}
        self._sent_policies: dict[PolicyKey, Policy] = {}
        self._sent_profiles: dict[str, Profile] = {}
        self._sent_eps: dict[str, EndpointPolicyUpdate] = {}
        # Work for the current flush.
        self._dirty_eps: set[str] = set()
        self._dirty_policies: set[PolicyKey] = set()
        self._dirty_profiles: set[str] = set()
        self._dirty_sets: set[_SetKey] = set()

    # -- inputs (cheap) -----------------------------------------------------------------------------
    def set_endpoint(self, ep_id: str, *, local: bool, iface: str, labels: Mapping[str, str],
                     profiles: Sequence[str], addrs: Sequence[IPNet], ports: Sequence[EndpointPort] = (),
                     name: str = "", host: bool = False) -> None:
        """An endpoint anywhere in the cluster (labels already include profile labels; ``ports`` its named
        ports; ``name`` what drop logs call it, e.g. "<namespace>/<pod>"). ``host``: a HostEndpoint
        (``iface`` its interface or "*"); its update splits normal and applyOnForward policies."""
        self._pending_eps[ep_id] = _Endpoint(local=local, iface=iface, labels=tuple(sorted(labels.items())),
                                             profiles=tuple(profiles), addrs=frozenset(addrs),
                                             ports=tuple(sorted(set(ports), key=lambda p: (p.name, p.protocol,
                                                                                            p.port))),
                                             name=name, host=host)

    def remove_endpoint(self, ep_id: str) -> None:
        self._pending_eps[ep_id] = None

    def set_network_set(self, key: Hashable, netset: NetworkSet | None) -> None:
        self._pending_nets[key] = netset

    def set_policy(self, key: PolicyKey, policy: Policy | None) -> None:
        self._pending_policies[key] = policy

    def set_tier(self, name: str, tier: Tier | None) -> None:
        self._pending_tiers[name] = tier

    def set_profile(self, name: str, profile: Profile | None) -> None:
        self._pending_profiles[name] = profile

    # -- queries ------------------------------------------------------------------------------------
    @property
    def missing_tiers(self) -> frozenset[str]:
        """Tiers that registered policies name but that are neither well known nor defined."""
        return frozenset(t for t in self._policies_by_tier if self._tier_info(t) is None)

    def has_pending(self) -> bool:
        return bool(self._pending_eps or self._pending_nets or self._pending_policies or self._pending_tiers
                    or self._pending_profiles)

    # -- flush --------------------------------------------------------------------------------------
    def flush(self) -> list[PolicyMessage]:
        self._apply_tiers()
        self._apply_policies()
        self._apply_endpoints()
        self._apply_network_sets()
        self._apply_profiles()

        upd_profiles, rem_profiles = self._resolve_profiles()
        upd_policies, rem_policies = self._resolve_policies()
        upd_sets, rem_sets = self._resolve_sets()
        upd_eps, rem_eps = self._resolve_endpoints()
        out: list[PolicyMessage] = []
        out += upd_sets
        out += upd_profiles
        out += upd_policies
        out += upd_eps
        out += rem_eps
        out += rem_policies
        out += rem_profiles
        out += rem_sets
        return out

    # -- applying inputs ----------------------------------------------------------------------------
    def _tier_info(self, name: str) -> tuple[float, str] | None:
        tier = self._tiers.get(name)
        known = WELL_KNOWN_TIERS.get(name)
        if tier is not None:
            default_order = known[0] if known is not None else _INF
            return (tier.order if tier.order is not None else default_order), tier.default_action
        return known

    def _apply_tiers(self) -> None:
        pending, self._pending_tiers = self._pending_tiers, {}
        for name, tier in pending.items():
            if self._tiers.get(name) == tier:
                continue
            if tier is None:
                del self._tiers[name]
            else:
                self._tiers[name] = tier
            for pk in self._policies_by_tier.get(name, ()):
                self._dirty_policies.add(pk)
                self._dirty_eps.update(self._policy_eps.get(pk, ()))

    def _apply_policies(self) -> None:
        pending, self._pending_policies = self._pending_policies, {}
        for pk, pol in pending.items():
            sel: Selector | None = None
            if pol is not None and not pol.staged:
                try:
                    sel = parse_selector(pol.selector)
                    _rule_selectors(pol.ingress + pol.egress)
                except SelectorError as e:
                    self.invalid_inputs += 1
                    log.error("skipping policy %s: %s", pk.id, e)
                    sel = None
            new = pol if sel is not None else None
            old = self._policies.get(pk)
            if old == new:
                continue
            old_sel = self._policy_sel.get(pk)
            # Order, tier or types changes re-sort the endpoints already selected.
            self._dirty_eps.update(self._policy_eps.get(pk, ()))
            self._dirty_policies.add(pk)
            if old is not None:
                _discard(self._policies_by_tier, old.tier, pk)
                del self._policies[pk]
                if old_sel != sel:
                    assert old_sel is not None
                    self._unregister_policy_selector(pk, old_sel)
                    del self._policy_sel[pk]
            if new is not None:
                assert sel is not None
                self._policies[pk] = new
                self._policies_by_tier.setdefault(new.tier, set()).add(pk)
                if old_sel != sel:
                    self._policy_sel[pk] = sel
                    self._register_policy_selector(pk, sel)

    def _register_policy_selector(self, pk: PolicyKey, sel: Selector) -> None:
        users = self._sel_policies.get(sel)
        if users is None:
            self._sel_policies[sel] = {pk}
            self._policy_index.add_selector(sel)  # reports matches through _on_policy_match
        else:
            users.add(pk)
            for ep in self._policy_index.matches(sel):
                self._link(pk, ep)

    def _unregister_policy_selector(self, pk: PolicyKey, sel: Selector) -> None:
        users = self._sel_policies[sel]
        users.discard(pk)
        for ep in self._policy_index.matches(sel):
            self._unlink(pk, ep)
        if not users:
            del self._sel_policies[sel]
            self._policy_index.remove_selector(sel)

    def _on_policy_match(self, sel: Selector, ep: str, matched: bool) -> None:
        for pk in self._sel_policies.get(sel, ()):
            if matched:
                self._link(pk, ep)
            else:
                self._unlink(pk, ep)

    def _link(self, pk: PolicyKey, ep: str) -> None:
        self._ep_policies.setdefault(ep, set()).add(pk)
        self._policy_eps.setdefault(pk, set()).add(ep)
        self._dirty_eps.add(ep)
        self._dirty_policies.add(pk)

    def _unlink(self, pk: PolicyKey, ep: str) -> None:
        _discard(self._ep_policies, ep, pk)
        _discard(self._policy_eps, pk, ep)
        self._dirty_eps.add(ep)
        self._dirty_policies.add(pk)

    def _apply_endpoints(self) -> None:
        pending, self._pending_eps = self._pending_eps, {}
        for ep_id, ep in pending.items():
            old = self._eps.get(ep_id)
            if old == ep:
                continue
            if ep is None:
                del self._eps[ep_id]
            else:
                self._eps[ep_id] = ep
            if old is not None and old.local:
                self._dirty_eps.add(ep_id)
                for name in old.profiles:
                    self._ref_profile(name, -1)
            if ep is not None and ep.local:
                self._dirty_eps.add(ep_id)
                for name in ep.profiles:
                    self._ref_profile(name, +1)
                self._policy_index.set_item(ep_id, dict(ep.labels))
            elif old is not None and old.local:
                self._policy_index.remove_item(ep_id)
            if ep is None:
                self._set_item(("ep", ep_id), None, frozenset())
            else:
                self._set_item(("ep", ep_id), dict(ep.labels), ep.addrs, ep.ports)

    def _apply_network_sets(self) -> None:
        pending, self._pending_nets = self._pending_nets, {}
        for key, ns in pending.items():
            if self._nets.get(key) == ns:
                continue
            if ns is None:
                del self._nets[key]
                self._set_item(("net", key), None, frozenset())
            else:
                self._nets[key] = ns
                self._set_item(("net", key), dict(ns.labels), frozenset(ns.nets))

    def _set_item(self, item: _Item, labels: Mapping[str, str] | None, addrs: frozenset[IPNet],
                  ports: tuple[EndpointPort, ...] = ()) -> None:
        if labels is None:
            self._set_index.remove_item(item)  # withdraws its members through _on_set_match
            self._item_addrs.pop(item, None)
            self._item_ports.pop(item, None)
            return
        old = self._item_addrs.get(item)
        old_ports = self._item_ports.get(item, ())
        if old is not None and (old != addrs or old_ports != ports):
            # Move the members in the sets it already belongs to, then let the label change (if any)
            # add or remove whole memberships with the new ones. A set whose members do not change (a
            # selector set on a port change, a named-port set of another name) is not touched.
            for sel in self._set_index.item_matches(item):
                for key in self._sel_sets.get(sel, ()):
                    before, after = _members(key, old, old_ports), _members(key, addrs, ports)
                    if before != after:
                        self._member_delta(key, before - after, -1)
                        self._member_delta(key, after - before, +1)
        self._item_addrs[item] = addrs
        if ports:
            self._item_ports[item] = ports
        else:
            self._item_ports.pop(item, None)
        self._set_index.set_item(item, labels)

    def _on_set_match(self, sel: Selector, item: _Item, matched: bool) -> None:
        addrs = self._item_addrs.get(item, frozenset())
        ports = self._item_ports.get(item, ())
        for key in self._sel_sets.get(sel, ()):
            self._member_delta(key, _members(key, addrs, ports), +1 if matched else -1)

    def _member_delta(self, key: _SetKey, members: frozenset[SetMember], delta: int) -> None:
        counts = self._set_members.get(key)
        if counts is None or not members:
            return
        for a in members:
            n = counts.get(a, 0) + delta
            if n:
                counts[a] = n
            else:
                del counts[a]
        self._dirty_sets.add(key)

    def _ref_profile(self, name: str, delta: int) -> None:
        n = self._profile_refs.get(name, 0) + delta
        if n:
            self._profile_refs[name] = n
        else:
            del self._profile_refs[name]
        self._dirty_profiles.add(name)

    def _apply_profiles(self) -> None:
        pending, self._pending_profiles = self._pending_profiles, {}
        for name, prof in pending.items():
            if prof is not None:
                try:
                    _rule_selectors(prof.ingress + prof.egress)
                except SelectorError as e:
                    self.invalid_inputs += 1
                    log.error("skipping profile %s: %s", name, e)
                    prof = None
            if self._profiles.get(name) == prof:
                continue
            if prof is None:
                del self._profiles[name]
            else:
                self._profiles[name] = prof
            self._dirty_profiles.add(name)

    # -- resolving outputs --------------------------------------------------------------------------
    def _ref_sets(self, rules: Iterable[Rule], delta: int) -> None:
        for key in _rule_set_keys(rules):
            n = self._set_refs.get(key, 0) + delta
            self._dirty_sets.add(key)
            sel = key[0]
            if n:
                self._set_refs[key] = n
                if delta > 0 and n == 1:
                    self._set_members[key] = {}
                    users = self._sel_sets.get(sel)
                    if users is None:
                        self._sel_sets[sel] = {key}
                        self._set_index.add_selector(sel)  # fills the members through _on_set_match
                    else:
                        users.add(key)
                        for item in self._set_index.matches(sel):
                            self._member_delta(key, _members(key, self._item_addrs.get(item, frozenset()),
                                                             self._item_ports.get(item, ())), +1)
            else:
                del self._set_refs[key]
                del self._set_members[key]
                users = self._sel_sets[sel]
                users.discard(key)
                if not users:
                    del self._sel_sets[sel]
                    self._set_index.remove_selector(sel)

    def _resolve_profiles(self) -> tuple[list[PolicyMessage], list[PolicyMessage]]:
        updates: list[PolicyMessage] = []
        removes: list[PolicyMessage] = []
        dirty, self._dirty_profiles = self._dirty_profiles, set()
        for name in sorted(dirty):
            want: Profile | None = None
            if name in self._profile_refs:
                want = self._profiles.get(name) or missing_profile(name)
            have = self._sent_profiles.get(name)
            if want == have:
                continue
            if want is not None:
                self._ref_sets(want.ingress + want.egress, +1)
                self._sent_profiles[name] = want
                updates.append(ActiveProfileUpdate(want))
            if have is not None:
                self._ref_sets(have.ingress + have.egress, -1)
                if want is None:
                    del self._sent_profiles[name]
                    removes.append(ActiveProfileRemove(name))
        return updates, removes

    def _resolve_policies(self) -> tuple[list[PolicyMessage], list[PolicyMessage]]:
        updates: list[PolicyMessage] = []
        removes: list[PolicyMessage] = []
        dirty, self._dirty_policies = self._dirty_policies, set()
        for pk in sorted(dirty, key=lambda k: k.id):
            pol = self._policies.get(pk)
            want = pol if (pol is not None and pk in self._policy_eps
                           and self._tier_info(pol.tier) is not None) else None
            have = self._sent_policies.get(pk)
            if want == have:
                continue
            # Reference the new rules' sets before releasing the old ones so shared sets stay put.
            if want is not None:
                self._ref_sets(want.ingress + want.egress, +1)
                self._sent_policies[pk] = want
                updates.append(ActivePolicyUpdate(want))
            if have is not None:
                self._ref_sets(have.ingress + have.egress, -1)
                if want is None:
                    del self._sent_policies[pk]
                    removes.append(ActivePolicyRemove(pk))
        return updates, removes

    def _resolve_sets(self) -> tuple[list[PolicyMessage], list[PolicyMessage]]:
        updates: list[PolicyMessage] = []
        removes: list[PolicyMessage] = []
        dirty, self._dirty_sets = self._dirty_sets, set()
        for set_id, key in sorted(((_set_key_id(k), k) for k in dirty), key=lambda ik: ik[0]):
            counts = self._set_members.get(key)
            have = self._sent_sets.get(set_id)
            if counts is None:
                if have is not None:
                    del self._sent_sets[set_id]
                    removes.append(IPSetRemove(set_id))
                continue
            want = frozenset(counts)
            if want == have:
                continue
            self._sent_sets[set_id] = want
            if have is None or not self.ip_set_deltas:
                updates.append(IPSetUpdate(set_id, want))
            else:
                updates.append(IPSetDeltaUpdate(set_id, added=want - have, removed=have - want))
        return updates, removes

    def _endpoint_tiers(self, ep_id: str, keep: Callable[[Policy], bool] | None = None) -> tuple[TierPolicies, ...]:
        by_tier: dict[str, list[Policy]] = {}
        for pk in self._ep_policies.get(ep_id, ()):
            pol = self._policies[pk]
            if keep is None or keep(pol):
                by_tier.setdefault(pol.tier, []).append(pol)
        ordered: list[tuple[float, str, str]] = []
        for name in by_tier:
            info = self._tier_info(name)
            if info is not None:
                ordered.append((info[0], name, info[1]))
        ordered.sort()
        out: list[TierPolicies] = []
        for _, name, action in ordered:
            pols = sorted(by_tier[name], key=_policy_sort_key)
            out.append(TierPolicies(name=name, default_action=action,
                                    ingress=tuple(p.key for p in pols if INGRESS in p.types),
                                    egress=tuple(p.key for p in pols if EGRESS in p.types)))
        return tuple(out)

    def _resolve_endpoints(self) -> tuple[list[PolicyMessage], list[PolicyMessage]]:
        updates: list[PolicyMessage] = []
        removes: list[PolicyMessage] = []
        dirty, self._dirty_eps = self._dirty_eps, set()
        for ep_id in sorted(dirty):
            ep = self._eps.get(ep_id)
            have = self._sent_eps.get(ep_id)
            if ep is None or not ep.local:
                if have is not None:
                    del self._sent_eps[ep_id]
                    removes.append(EndpointPolicyRemove(ep_id))
                continue
            if ep.host:
                # Calico's splitTiers: pre-DNAT (mangle, ingress only) and do-not-track (raw) policies go to
                # their own tables; of the normal ones, applyOnForward also apply to forwarded traffic.
                pre = self._endpoint_tiers(ep_id, lambda p: p.pre_dnat and not p.do_not_track)
                want = EndpointPolicyUpdate(
                    endpoint=ep_id, iface=ep.iface, profiles=ep.profiles, name=ep.name, host=True,
                    tiers=self._endpoint_tiers(ep_id, lambda p: not (p.pre_dnat or p.do_not_track)),
                    forward_tiers=self._endpoint_tiers(
                        ep_id, lambda p: p.apply_on_forward and not (p.pre_dnat or p.do_not_track)),
                    untracked_tiers=self._endpoint_tiers(ep_id, lambda p: p.do_not_track),
                    pre_dnat_tiers=tuple(replace(t, egress=()) for t in pre))
            else:
                want = EndpointPolicyUpdate(endpoint=ep_id, iface=ep.iface, tiers=self._endpoint_tiers(ep_id),
                                            profiles=ep.profiles, name=ep.name)
            if want != have:
                self._sent_eps[ep_id] = want
                updates.append(want)
        return updates, removes
