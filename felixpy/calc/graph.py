"""The calculation layer: datastore state in, dataplane messages out. Pure: no asyncio, no I/O.

It keeps the synced view of the kinds it cares about plus the :class:`LocalOverlay` of this agent's own
writes, derives this node's local state (its WorkloadEndpoints, its affine IPAM blocks), and emits a
message only when the derived state of a key changes. ``flush()`` returns messages in dependency order:
removals first (so an address moving between endpoints is released before it is claimed again).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from felixpy.calc.bgp_calc import BgpCalculator
from felixpy.calc.messages import (
    InSync,
    LocalBlockRemove,
    LocalBlockUpdate,
    Message,
    WorkloadEndpointRemove,
    WorkloadEndpointUpdate,
)
from felixpy.calc.overlay import LocalOverlay, rev_int
from felixpy.calc.policy import PolicyCalculator
from felixpy.calc.routes import RouteResolver
from felixpy.datastore.api import (
    KIND_BGP_CONFIG,
    KIND_BGP_PEER,
    KIND_GLOBAL_NETWORK_POLICY,
    KIND_GLOBAL_NETWORK_SET,
    KIND_HOST_ENDPOINT,
    KIND_IPAM_BLOCK,
    KIND_IPPOOL,
    KIND_K8S_NETWORK_POLICY,
    KIND_NETWORK_POLICY,
    KIND_NETWORK_SET,
    KIND_NODE,
    KIND_PROFILE,
    KIND_TIER,
    KIND_WEP,
    Key,
    Resource,
)
from felixpy.datastore.syncer import Update
from felixpy.ipam.pools import InvalidPoolError, parse_pool
from felixpy.model import policy_parse
from felixpy.model.policy import (
    ALL_HOSTS_SET_ID,
    HEP_ID_PREFIX,
    HostEndpoint,
    IPSetDeltaUpdate,
    IPSetUpdate,
    PolicyKey,
    Profile,
)
from felixpy.model.resources import InvalidResource, parse_block, parse_node, parse_wep

log = logging.getLogger(__name__)

_Derived = WorkloadEndpointUpdate | LocalBlockUpdate

_POLICY_KINDS = frozenset({KIND_WEP, KIND_PROFILE, KIND_NETWORK_POLICY, KIND_GLOBAL_NETWORK_POLICY,
                           KIND_K8S_NETWORK_POLICY, KIND_NETWORK_SET, KIND_GLOBAL_NETWORK_SET, KIND_TIER,
                           KIND_HOST_ENDPOINT})


class CalcGraph:
    def __init__(self, node: str, *, overlay_ttl: float = 60.0, router_id_setting: str = "",
                 bgp_enabled: bool = False, bgp_hold_time: int = 90, policy_enabled: bool = False) -> None:
        self.node = node
        self._synced: dict[Key, Resource] = {}
        self._synced_rev: dict[Key, int] = {}
        self.overlay = LocalOverlay(overlay_ttl)
        self._emitted: dict[Key, _Derived] = {}
        self._dirty: set[Key] = set()
        self._in_sync_pending = False
        self.invalid_resources = 0
        self.routes = RouteResolver(node)
        # Policy (issue 4): every endpoint cluster-wide feeds IP sets; local ones get chains.
        self.policy_enabled = policy_enabled
        self.policy = PolicyCalculator()
        self._profiles: dict[str, Profile] = {}
        self._eps_by_profile: dict[str, set[Key]] = {}
        self._ep_profiles: dict[Key, tuple[str, ...]] = {}
        self._policy_keys: dict[Key, PolicyKey] = {}
        self._policy_dirty: set[Key] = set()
        self._heps: dict[Key, HostEndpoint] = {}  # valid HostEndpoints, every node (their IPs feed IP sets)
        # Every node's IPv4 address (ALL_HOSTS_SET_ID: the sources allowed to send this host VXLAN/IPIP
        # whatever the host endpoint policy); recomputed only when a Node changed.
        self._hosts_dirty = True
        self._hosts_sent: frozenset[ipaddress.IPv4Network] | None = None
        self.bgp = BgpCalculator(node, router_id_setting=router_id_setting, enabled=bgp_enabled,
                                 hold_time=bgp_hold_time)

    # -- inputs -------------------------------------------------------------------------------------
    def on_updates(self, updates: Iterable[Update]) -> None:
        for u in updates:
            kind = u.key.kind
            if kind in (KIND_NODE, KIND_IPPOOL, KIND_IPAM_BLOCK):
                self._route_input(u)
            if kind in (KIND_NODE, KIND_IPPOOL, KIND_BGP_CONFIG, KIND_BGP_PEER):
                self._bgp_input(u)
            if self.policy_enabled and kind in _POLICY_KINDS:
                self._policy_input(u)
            if kind not in (KIND_WEP, KIND_IPAM_BLOCK):
                continue
            if u.value is None:
                self._synced.pop(u.key, None)
                self._synced_rev.pop(u.key, None)
            else:
                self._synced[u.key] = u.value
                self._synced_rev[u.key] = rev_int(u.revision)
            if not self.overlay.shadows(u.key, u.value, u.revision):
                self._dirty.add(u.key)

    def _route_input(self, u: Update) -> None:
        key, value = u.key, u.value
        if key.kind == KIND_NODE:
            self._hosts_dirty = True
        try:
            if key.kind == KIND_NODE:
                self.routes.set_node(key.name, parse_node(value) if value is not None else None)
            elif key.kind == KIND_IPPOOL:
                self.routes.set_pool(key.name, parse_pool(value) if value is not None else None)
            else:
                self.routes.set_block(key, parse_block(value) if value is not None else None)
        except (InvalidResource, InvalidPoolError) as e:
            self.invalid_resources += 1
            log.error("skipping malformed %s: %s", key, e)
            if key.kind == KIND_NODE:
                self.routes.set_node(key.name, None)
            elif key.kind == KIND_IPPOOL:
                self.routes.set_pool(key.name, None)
            else:
                self.routes.set_block(key, None)

    def _policy_input(self, u: Update) -> None:
        key, value = u.key, u.value
        pc = self.policy
        if key.kind == KIND_WEP:
            self._policy_dirty.add(key)
            return
        try:
            if key.kind == KIND_HOST_ENDPOINT:
                self._policy_dirty.add(key)
                if value is None:
                    self._heps.pop(key, None)
                else:
                    self._heps[key] = policy_parse.parse_host_endpoint(value)
            elif key.kind == KIND_PROFILE:
                prof = policy_parse.parse_profile(value) if value is not None else None
                if prof is None:
                    self._profiles.pop(key.name, None)
                else:
                    self._profiles[key.name] = prof
                pc.set_profile(key.name, prof)
                # Profile labels are inherited by its endpoints: re-evaluate them.
                self._policy_dirty.update(self._eps_by_profile.get(key.name, ()))
            elif key.kind in (KIND_NETWORK_POLICY, KIND_GLOBAL_NETWORK_POLICY, KIND_K8S_NETWORK_POLICY):
                old = self._policy_keys.pop(key, None)
                if value is None:
                    if old is not None:
                        pc.set_policy(old, None)
                    return
                warnings: list[str] = []
                pol = policy_parse.parse_policy(value, key.kind, warnings=warnings)
                for w in warnings:
                    log.warning("%s: %s", key, w)
                if old is not None and old != pol.key:
                    pc.set_policy(old, None)
                self._policy_keys[key] = pol.key
                pc.set_policy(pol.key, pol)
            elif key.kind in (KIND_NETWORK_SET, KIND_GLOBAL_NETWORK_SET):
                pc.set_network_set(key, policy_parse.parse_network_set(
                    value, key.kind == KIND_GLOBAL_NETWORK_SET) if value is not None else None)
            elif key.kind == KIND_TIER:
                pc.set_tier(key.name, policy_parse.parse_tier(value) if value is not None else None)
        except (InvalidResource, ValueError) as e:
            self.invalid_resources += 1
            log.error("skipping malformed %s: %s (treated as absent)", key, e)
            if key.kind == KIND_HOST_ENDPOINT:
                self._heps.pop(key, None)
            elif key.kind == KIND_PROFILE:
                self._profiles.pop(key.name, None)
                pc.set_profile(key.name, None)
            elif key in self._policy_keys:
                pc.set_policy(self._policy_keys.pop(key), None)
            elif key.kind in (KIND_NETWORK_SET, KIND_GLOBAL_NETWORK_SET):
                pc.set_network_set(key, None)
            elif key.kind == KIND_TIER:
                pc.set_tier(key.name, None)

    def _policy_endpoints(self) -> None:
        """Feed the dirty endpoints (datastore or our own writes) to the policy calculator."""
        for key in sorted(self._policy_dirty):
            for prof in self._ep_profiles.pop(key, ()):
                self._eps_by_profile.get(prof, set()).discard(key)
            if key.kind == KIND_HOST_ENDPOINT:
                self._policy_host_endpoint(key)
                continue
            ep_id = f"{key.namespace}/{key.name}"
            res = self._effective(key)
            wep = None
            if res is not None:
                try:
                    wep = parse_wep(res)
                except InvalidResource:
                    wep = None  # already counted and logged by the endpoint derivation
            if wep is None:
                self.policy.remove_endpoint(ep_id)
                continue
            self._ep_profiles[key] = wep.profiles
            for prof in wep.profiles:
                self._eps_by_profile.setdefault(prof, set()).add(key)
            labels = policy_parse.endpoint_labels(
                dict(wep.labels), [self._profiles[p] for p in wep.profiles if p in self._profiles])
            self.policy.set_endpoint(ep_id, local=not wep.node or wep.node == self.node, iface=wep.iface,
                                     labels=labels, profiles=wep.profiles,
                                     addrs=[*wep.ipv4_nets, *wep.ipv6_nets],
                                     ports=policy_parse.endpoint_ports(res) if res is not None else (),
                                     name=f"{wep.namespace}/{wep.pod}" if wep.pod else ep_id)
        self._policy_dirty.clear()

    def _policy_host_endpoint(self, key: Key) -> None:
        """A HostEndpoint into the policy calculator: every node's feed IP sets (expectedIPs); this node's
        with an interfaceName (or "*") get chains. One that has only expectedIPs is not enforced: Felix
        would find its interface by address, which needs an interface watch (docs/policy.md)."""
        ep_id = HEP_ID_PREFIX + key.name
        hep = self._heps.get(key)
        if hep is None:
            self.policy.remove_endpoint(ep_id)
            return
        self._ep_profiles[key] = hep.profiles
        for prof in hep.profiles:
            self._eps_by_profile.setdefault(prof, set()).add(key)
        local = hep.node == self.node
        if local and not hep.iface:
            log.warning("HostEndpoint %s has no interfaceName: its policy is not enforced (expectedIPs-only "
                        "host endpoints are not supported)", key.name)
        labels = policy_parse.endpoint_labels(
            dict(hep.labels), [self._profiles[p] for p in hep.profiles if p in self._profiles])
        self.policy.set_endpoint(ep_id, local=local and bool(hep.iface), iface=hep.iface, labels=labels,
                                 profiles=hep.profiles,
                                 addrs=[ipaddress.ip_network(a) for a in hep.expected_ips],
                                 ports=hep.ports, name=HEP_ID_PREFIX + key.name, host=True)

    def _all_hosts(self) -> list[Message]:
        """The all-hosts IP set when a Node changed: the full set first, then deltas if the policy
        calculator sends deltas (an unchanged membership sends nothing)."""
        if not self._hosts_dirty:
            return []
        self._hosts_dirty = False
        want = frozenset(ipaddress.IPv4Network(n.ipv4.ip) for n in self.routes.nodes.values() if n.ipv4 is not None)
        have = self._hosts_sent
        if want == (have or frozenset()):  # never sent and empty: nothing to say (a missing set is empty)
            return []
        self._hosts_sent = want
        if have is None or not self.policy.ip_set_deltas:
            return [IPSetUpdate(ALL_HOSTS_SET_ID, frozenset(want))]
        return [IPSetDeltaUpdate(ALL_HOSTS_SET_ID, added=frozenset(want - have), removed=frozenset(have - want))]

    def _bgp_input(self, u: Update) -> None:
        from bgp import peers as bgp_peers

        key, value = u.key, u.value
        b = self.bgp
        b.mark_dirty()
        try:
            if key.kind == KIND_NODE:
                if value is None:
                    b.nodes.pop(key.name, None)
                else:
                    b.nodes[key.name] = bgp_peers.parse_bgp_node(value)
            elif key.kind == KIND_IPPOOL:
                if value is None:
                    b.pools.pop(key.name, None)
                else:
                    b.pools[key.name] = parse_pool(value)
            elif key.kind == KIND_BGP_CONFIG:
                if value is None:
                    b.configs.pop(key.name, None)
                else:
                    b.configs[key.name] = bgp_peers.parse_bgp_configuration(value)
            elif value is None:
                b.peer_rules.pop(key.name, None)
            else:
                b.peer_rules[key.name] = bgp_peers.parse_bgp_peer(value)
        except (ValueError, InvalidResource, InvalidPoolError) as e:
            if key.kind in (KIND_BGP_CONFIG, KIND_BGP_PEER):  # Nodes and pools are counted once, above
                self.invalid_resources += 1
            log.error("skipping malformed %s for BGP: %s", key, e)
            # Treat it as absent: a node or peer we cannot read must not keep a stale session.
            if key.kind == KIND_NODE:
                b.nodes.pop(key.name, None)
            elif key.kind == KIND_IPPOOL:
                b.pools.pop(key.name, None)
            elif key.kind == KIND_BGP_CONFIG:
                b.configs.pop(key.name, None)
            else:
                b.peer_rules.pop(key.name, None)

    def on_in_sync(self) -> None:
        self._in_sync_pending = True

    def on_local_write(self, key: Key, value: Resource | None, revision: str, now: float) -> None:
        """This agent wrote ``key`` (value None = deleted; revision = the write's, or last known for deletes)."""
        if value is None:
            self.overlay.record_delete(key, revision, now)
        else:
            self.overlay.record_put(key, value, revision, now, synced_revision=self._synced_rev.get(key, -1))
        self._dirty.add(key)
        if self.policy_enabled and key.kind == KIND_WEP:
            self._policy_dirty.add(key)

    def expire(self, now: float) -> None:
        expired = self.overlay.expire(now)
        self._dirty.update(expired)
        if self.policy_enabled:
            self._policy_dirty.update(k for k in expired if k.kind == KIND_WEP)

    # -- derivation ---------------------------------------------------------------------------------
    def _effective(self, key: Key) -> Resource | None:
        present, value = self.overlay.get(key)
        return value if present else self._synced.get(key)

    def _derive(self, key: Key) -> _Derived | None:
        res = self._effective(key)
        if res is None:
            return None
        try:
            if key.kind == KIND_WEP:
                wep = parse_wep(res)
                if wep.node and wep.node != self.node:
                    return None
                return WorkloadEndpointUpdate(key=key, iface=wep.iface, ipv4_nets=wep.ipv4_nets,
                                              mac=wep.mac, container_id=wep.container_id)
            if key.kind == KIND_IPAM_BLOCK:
                blk = parse_block(res)
                if blk.affinity_node != self.node or blk.deleted:
                    return None
                return LocalBlockUpdate(blk.cidr)
        except InvalidResource as e:
            self.invalid_resources += 1
            log.error("skipping malformed %s: %s", key, e)
        return None

    def flush(self) -> list[Message]:
        removes: list[Message] = []
        updates: list[Message] = []
        for key in sorted(self._dirty):
            new = self._derive(key)
            old = self._emitted.get(key)
            if new == old:
                continue
            if old is not None:
                if isinstance(old, WorkloadEndpointUpdate):
                    if new is None:
                        removes.append(WorkloadEndpointRemove(key))
                elif isinstance(old, LocalBlockUpdate) and (
                        not isinstance(new, LocalBlockUpdate) or new.cidr != old.cidr):
                    removes.append(LocalBlockRemove(old.cidr))
            if new is None:
                self._emitted.pop(key, None)
            else:
                self._emitted[key] = new
                updates.append(new)
        self._dirty.clear()
        r_removes, r_updates = self.routes.flush()
        for m in removes + updates:
            if isinstance(m, LocalBlockUpdate) and isinstance(m.cidr, ipaddress.IPv4Network):
                self.bgp.local_blocks.add(m.cidr)
                self.bgp.mark_dirty()
            elif isinstance(m, LocalBlockRemove) and isinstance(m.cidr, ipaddress.IPv4Network):
                self.bgp.local_blocks.discard(m.cidr)
                self.bgp.mark_dirty()
        bgp_msgs = self.bgp.flush()
        policy_msgs: list[Message] = []
        if self.policy_enabled:
            self._policy_endpoints()
            policy_msgs = [*self._all_hosts(), *self.policy.flush()]
        # Route removals go before endpoint/block removals' counterpart updates; route updates last, so
        # pools and tunnel devices are known before the routes that use them.
        # Policy before the endpoints' routes: a pod is never reachable before its chains exist.
        out = r_removes + removes + r_updates + policy_msgs + updates + bgp_msgs
        if self._in_sync_pending:
            out.append(InSync())
            self._in_sync_pending = False
        return out

    # -- introspection (metrics, status) ------------------------------------------------------------
    def local_endpoints(self) -> list[WorkloadEndpointUpdate]:
        return [m for m in self._emitted.values() if isinstance(m, WorkloadEndpointUpdate)]

    def local_blocks(self) -> list[LocalBlockUpdate]:
        return [m for m in self._emitted.values() if isinstance(m, LocalBlockUpdate)]
