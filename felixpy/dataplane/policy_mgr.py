"""Network policy into the dataplane: Felix's policy, profile, IP set and endpoint managers in one.

Two backends, one behaviour: an :class:`NftTable` (family ip / ip6; rendering by
:mod:`felixpy.dataplane.policy_render`, dispatch through verdict maps) or an :class:`IptablesDataplane`
with a ``filter`` table and IP sets (rendering by :mod:`felixpy.dataplane.policy_render_ipt`: Calico's
iptables layout, ``hash:net`` ipsets, dispatch chains of gotos). The iptables driver applies set
additions, then the tables, then set deletions, so a rule never refers to a missing set.

Input (``felixpy.model.policy``): ``IPSetUpdate/DeltaUpdate/Remove``, ``ActivePolicyUpdate/Remove``,
``ActiveProfileUpdate/Remove``, ``EndpointPolicyUpdate/Remove``. ``on_update`` only records and marks
things dirty; ``complete_deferred_work`` renders what changed (:mod:`felixpy.dataplane.policy_render`)
and hands it to the :class:`NftTable`'s setters, which diff by hash, so only changed chains and set
elements reach the kernel and the whole batch is one transaction (sets are declared in it before the
rules that use them).

Robustness (a bad or early object must never break dispatch for every pod, since the driver refuses
a chain or verdict map that refers to something missing):

- a set a chain refers to but that has not arrived (or was removed while still used) is programmed
  empty: it matches nothing, as Felix's empty ipset would;
- an endpoint chain leaves out jumps to policy or profile chains that do not exist (yet) and is
  re-rendered when they appear; the tier still ends in its drop, so this fails closed;
- staged policies are never jumped to; pre-DNAT / do-not-track ones only from host endpoints' mangle /
  raw chains (their policy chains live in that table on iptables);
- a policy, profile, set or endpoint that cannot be rendered is logged and listed in ``errors``; what
  the manager last pushed for it stays (an endpoint that was never valid gets no chain, so its
  interface hits "Unknown interface" and is dropped);
- two endpoints claiming one interface: the latest update wins, the other takes over when it goes.

Host endpoints (``EndpointPolicyUpdate.host``) live in their own slots (``hep:<iface>``, so a host
endpoint never competes with a workload for an interface): chains ``fh``/``th`` (normal policy, failsafe
first) always, ``fhfw``/``thfw`` only in a direction that has applyOnForward policies; the four host
dispatch chains are rewritten when the set of host endpoints or their optional chains change. Untracked
(do-not-track) chains ``fh``/``th`` in the raw table (nft: ``raw-cali-fh-<if>``, hooks prerouting/output at
raw priority) and pre-DNAT chains ``fh`` in mangle (``mangle-cali-fh-<if>``, prerouting at mangle priority)
exist only in a direction that has such policies. On iptables they need the dataplane's raw and mangle
tables; without them such a policy is listed in ``errors`` and not enforced.

Overlay between nodes: the static INPUT/OUTPUT chains accept IPIP / VXLAN from/to the all-hosts set
(``ALL_HOSTS_SET_ID``, from the calculation layer) before host endpoint policy, as Felix does, while
``RenderOptions.ipip_enabled`` / ``vxlan_enabled`` say so, or while the pools use that encapsulation
(``HostTunnelUpdate``; the static chains are rewritten when that changes). A referenced all-hosts set
that has not arrived is programmed empty, like any other.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from felixpy import metrics
from felixpy.calc.messages import HostTunnelUpdate
from felixpy.dataplane import policy_render as nft_render
from felixpy.dataplane import policy_render_ipt as ipt_render
from felixpy.dataplane.drivers.iptables import IptablesDataplane, IptablesTable
from felixpy.dataplane.drivers.nftables import NftTable
from felixpy.dataplane.drivers.nftables import Rule as DriverRule
from felixpy.dataplane.policy_render import (
    CHAIN_KIND_FORWARD,
    CHAIN_KIND_HOST,
    CHAIN_KIND_PRE_DNAT,
    CHAIN_KIND_TABLE,
    CHAIN_KIND_UNTRACKED,
    CHAIN_KIND_WORKLOAD,
    HEP_FWD_IN,
    HEP_FWD_OUT,
    HEP_PRE_DNAT_IN,
    HEP_RAW_IN,
    HEP_RAW_OUT,
    MAP_FROM_WL_DISPATCH,
    MAP_TO_WL_DISPATCH,
    TABLE_FILTER,
    ChainSpec,
    DropKey,
    PolicyRenderError,
    RenderOptions,
    policy_table,
    rules_set_ids,
    static_set_ids,
)
from felixpy.model.policy import (
    EGRESS,
    INGRESS,
    ActivePolicyRemove,
    ActivePolicyUpdate,
    ActiveProfileRemove,
    ActiveProfileUpdate,
    EndpointPolicyRemove,
    EndpointPolicyUpdate,
    IPPort,
    IPSetDeltaUpdate,
    IPSetRemove,
    IPSetUpdate,
    Policy,
    PolicyKey,
    Profile,
    SetMember,
    TierPolicies,
)

log = logging.getLogger(__name__)

_HEP_SLOT = "hep:"  # slot of a host endpoint's interface (":" is in no interface name)


class _Renderer(Protocol):
    """What policy_render (nft) and policy_render_ipt (iptables) both provide, under the same names."""

    def policy_chain_name(self, key: PolicyKey, direction: str) -> str: ...

    def profile_chain_name(self, name: str, direction: str) -> str: ...

    def endpoint_chain_name(self, iface: str, direction: str) -> str: ...

    def host_endpoint_chain_name(self, iface: str, direction: str, forward: bool = False,
                                 table: str = ...) -> str: ...

    def host_dispatch_chains(self, heps: dict[str, tuple[bool, ...]], opts: RenderOptions = ...) -> list[ChainSpec]:
        ...

    def policy_chains(self, policy: Policy, opts: RenderOptions = ...) -> list[ChainSpec]: ...

    def profile_chains(self, profile: Profile, opts: RenderOptions = ...) -> list[ChainSpec]: ...

    def render_endpoint_chain(self, ep: EndpointPolicyUpdate, direction: str, opts: RenderOptions = ..., *,
                              available: Callable[[str], bool] | None = None,
                              staged: Callable[[PolicyKey], bool] | None = None,
                              drops: dict[str, DropKey] | None = None, chain: str = ...) -> list[Any]: ...


class _Table(Protocol):
    """The chain operations NftTable and IptablesTable share."""

    def set_chain(self, name: str, rules: Sequence[str | DriverRule]) -> None: ...

    def remove_chain(self, name: str) -> None: ...

    def has_chain(self, name: str) -> bool: ...


class _Backend:
    """One table backend: the renderer module gives names and chains, the subclass talks to its driver."""

    render: _Renderer
    t: _Table

    def policy_chain_name(self, key: PolicyKey, direction: str) -> str:
        return self.render.policy_chain_name(key, direction)

    def profile_chain_name(self, name: str, direction: str) -> str:
        return self.render.profile_chain_name(name, direction)

    def endpoint_chain_name(self, iface: str, direction: str) -> str:
        return self.render.endpoint_chain_name(iface, direction)

    def host_endpoint_chain_name(self, iface: str, direction: str, forward: bool = False,
                                 table: str = TABLE_FILTER) -> str:
        return self.render.host_endpoint_chain_name(iface, direction, forward, table)

    def write_hep_dispatch(self, heps: dict[str, tuple[bool, ...]], opts: RenderOptions) -> None:
        for spec in self.render.host_dispatch_chains(heps, opts):
            if self.has_table(spec.table):
                self.table(spec.table).set_chain(spec.name, spec.rules)

    def table(self, name: str) -> _Table:
        """The driver table a chain of Felix's table ``name`` goes in (nft: our one table)."""
        return self.t

    def has_table(self, name: str) -> bool:
        return True

    def policy_chains(self, policy: Policy, opts: RenderOptions) -> list[ChainSpec]:
        return self.render.policy_chains(policy, opts)

    def profile_chains(self, profile: Profile, opts: RenderOptions) -> list[ChainSpec]:
        return self.render.profile_chains(profile, opts)

    def endpoint_chain(self, ep: EndpointPolicyUpdate, direction: str, opts: RenderOptions,
                       available: Callable[[str], bool], staged: Callable[[PolicyKey], bool],
                       drops: dict[str, DropKey], chain: str = CHAIN_KIND_WORKLOAD) -> list[DriverRule]:
        return self.render.render_endpoint_chain(ep, direction, opts, available=available, staged=staged,
                                                 drops=drops, chain=chain)

    def set_counter(self, name: str) -> None:
        """A drop counter the endpoint chains use (nft: a named counter; iptables: rule comments)."""

    def remove_counter(self, name: str) -> None:
        pass

    def read_counters(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def set_chain(self, name: str, rules: Iterable[DriverRule], table: str = TABLE_FILTER) -> None:
        self.table(table).set_chain(name, list(rules))

    def remove_chain(self, name: str, table: str = TABLE_FILTER) -> None:
        if self.has_table(table):
            self.table(table).remove_chain(name)

    def has_chain(self, name: str, table: str = TABLE_FILTER) -> bool:
        return self.has_table(table) and self.table(table).has_chain(name)

    def set_name(self, set_id: str, ip_version: int) -> str:
        raise NotImplementedError

    def set_set(self, set_id: str, name: str, members: frozenset[SetMember] | None, ip_version: int) -> None:
        raise NotImplementedError

    def remove_set(self, name: str) -> None:
        raise NotImplementedError

    def write_static(self, opts: RenderOptions) -> None:
        raise NotImplementedError

    def write_dispatch(self, ifaces: Iterable[str]) -> None:
        raise NotImplementedError


class _NftBackend(_Backend):
    t: NftTable

    def __init__(self, table: NftTable) -> None:
        self.render = nft_render
        self.t = table

    def set_name(self, set_id: str, ip_version: int) -> str:
        return nft_render.nft_set_name(set_id, ip_version)

    def set_set(self, set_id: str, name: str, members: frozenset[SetMember] | None, ip_version: int) -> None:
        addr_type = "ipv4_addr" if ip_version == 4 else "ipv6_addr"
        if nft_render.is_named_port_set(set_id):
            ports = sorted(m for m in members or () if isinstance(m, IPPort) and m.addr.version == ip_version)
            self.t.set_set(name, f"{addr_type} . inet_proto . inet_service",
                           [(str(m.addr), m.protocol, m.port) for m in ports])
            return
        elems = sorted((n for n in members or () if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network)
                        and n.version == ip_version), key=lambda n: (int(n.network_address), n.prefixlen))
        self.t.set_set(name, addr_type, elems, flags=("interval",))

    def remove_set(self, name: str) -> None:
        self.t.remove_set(name)

    def set_counter(self, name: str) -> None:
        self.t.set_counter(name)

    def remove_counter(self, name: str) -> None:
        self.t.remove_counter(name)

    def read_counters(self) -> dict[str, tuple[int, int]]:
        return self.t.read_counters()

    def write_static(self, opts: RenderOptions) -> None:
        for spec in nft_render.static_chains(opts):
            self.t.set_chain(spec.name, spec.rules, base=spec.base)

    def write_dispatch(self, ifaces: Iterable[str]) -> None:
        from_wl, to_wl = nft_render.dispatch_elements(ifaces)
        fw: dict[object, object] = dict(from_wl.items())
        tw: dict[object, object] = dict(to_wl.items())
        self.t.set_map(MAP_FROM_WL_DISPATCH, "ifname", "verdict", fw)
        self.t.set_map(MAP_TO_WL_DISPATCH, "ifname", "verdict", tw)


class _IptBackend(_Backend):
    t: IptablesTable

    def __init__(self, dp: IptablesDataplane) -> None:
        if "filter" not in dp.tables or dp.ipsets is None:
            raise ValueError("the iptables policy backend needs a filter table and IP sets "
                             "(e.g. make_nat_backend('iptables', with_filter=True))")
        self.render = ipt_render
        self.t = dp.table("filter")
        self.ipsets = dp.ipsets
        # Untracked / pre-DNAT policy need the raw / mangle tables (optional: without them it is not enforced).
        self._tables: dict[str, IptablesTable] = {n: dp.table(n) for n in ("filter", "raw", "mangle")
                                                  if n in dp.tables}

    def table(self, name: str) -> IptablesTable:
        return self._tables[name]

    def has_table(self, name: str) -> bool:
        return name in self._tables

    def set_name(self, set_id: str, ip_version: int) -> str:
        return ipt_render.ipset_name(set_id, ip_version)

    def set_set(self, set_id: str, name: str, members: frozenset[SetMember] | None, ip_version: int) -> None:
        if nft_render.is_named_port_set(set_id):
            self.ipsets.set_ipset(name, "hash:ip,port", ipt_render.ipset_port_members(members or (), ip_version))
            return
        self.ipsets.set_ipset(name, "hash:net", ipt_render.ipset_members(members or (), ip_version))

    def remove_set(self, name: str) -> None:
        self.ipsets.remove_ipset(name)

    def read_counters(self) -> dict[str, tuple[int, int]]:
        return ipt_render.read_drop_counters(self.t.save_with_counters())

    def write_static(self, opts: RenderOptions) -> None:
        for spec in ipt_render.static_chains(opts):
            if self.has_table(spec.table):
                self.table(spec.table).set_chain(spec.name, spec.rules)
        # The dispatch chains exist from the start (cali-FORWARD jumps to them): no endpoint, all DROP.
        self.write_dispatch(())
        for h in ipt_render.hooks(opts):
            if self.has_table(h.table):
                self.table(h.table).set_hooks(h.chain, insert=h.insert, append=h.append)

    def write_dispatch(self, ifaces: Iterable[str]) -> None:
        for spec in ipt_render.dispatch_chains(ifaces):
            self.t.set_chain(spec.name, spec.rules)


class PolicyManager:
    # Drop counters are read (one nft/iptables-save call) at most this often from complete_deferred_work.
    DROP_METRICS_INTERVAL = 5.0

    def __init__(self, table: NftTable | IptablesDataplane, *, options: RenderOptions | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._b: _Backend
        fam: int
        if isinstance(table, IptablesDataplane):
            ipt = _IptBackend(table)
            self._b, fam = ipt, ipt.ipsets.ip_version
        elif isinstance(table, NftTable):
            nft_fam = {"ip": 4, "ip6": 6}.get(table.family)
            if nft_fam is None:
                raise ValueError(f"the policy manager needs an nft table of family ip or ip6, not {table.family}")
            self._b, fam = _NftBackend(table), nft_fam
        else:
            raise ValueError(f"unsupported policy dataplane {table!r} (want an NftTable or an IptablesDataplane)")
        opts = options if options is not None else RenderOptions(ip_version=fam)
        if options is not None and options.ip_version != fam:
            opts = replace(options, ip_version=fam)
        opts.validate()
        if isinstance(self._b, _IptBackend):
            ipt_render.scratch_marks(opts.marks)  # the match blocks need two more bits
        self.options = opts
        self._base_options = opts  # the configured flags; HostTunnelUpdate can only add encapsulations
        self.ip_version = fam
        # Desired input.
        self._sets: dict[str, frozenset[SetMember]] = {}
        self._policies: dict[PolicyKey, Policy] = {}
        self._profiles: dict[str, Profile] = {}
        self._endpoints: dict[str, EndpointPolicyUpdate] = {}
        self._ep_seq: dict[str, int] = {}
        self._by_iface: dict[str, set[str]] = {}  # iface -> endpoints claiming it
        self._seq = 0
        # Dirty marks.
        self._dirty_sets: set[str] = set()
        self._dirty_policies: set[PolicyKey] = set()
        self._dirty_profiles: set[str] = set()
        self._dirty_ifaces: set[str] = set()
        self._static_done = False
        self._static_ever = False
        self._dispatch_dirty = True
        self._hep_dispatch_dirty = False  # the static chains start with empty host dispatch chains
        # Pushed host endpoint iface -> which optional chains it has (policy_render.HEP_FWD_IN ... indices).
        self._hep_fwd: dict[str, tuple[bool, ...]] = {}
        # What was pushed into the table.
        self._obj_chains: dict[str, tuple[tuple[str, str], ...]] = {}  # "policy <id>" / "profile <n>" -> (table, chain)
        self._chain_sets: dict[str, frozenset[str]] = {}  # policy/profile chain -> set ids it uses
        self._referenced: frozenset[str] = frozenset()
        self._pushed_sets: set[str] = set()
        self._hidden: set[PolicyKey] = set()  # staged: never jumped to
        # Non-filter policies (raw: do-not-track, mangle: pre-DNAT): jumped to only from chains of that table
        # (a workload's tiers list them too; Calico applies them to host endpoints only).
        self._policy_table: dict[PolicyKey, str] = {}
        self._iface_ep: dict[str, str] = {}  # slot (iface, or "hep:<iface>") -> endpoint whose chains are pushed
        self._iface_wants: dict[str, frozenset[str]] = {}  # iface -> policy/profile chains it refers to
        self._wanted_by: dict[str, set[str]] = {}  # policy/profile chain -> ifaces referring to it
        self.errors: dict[str, str] = {}  # "policy <id>" / "profile <n>" / "set <id>" / "endpoint <k>" -> why
        # Drop counters: iface -> the counters its chains use; counter -> (tier, policy, direction), users.
        self._iface_drops: dict[str, dict[str, DropKey]] = {}
        self._drop_keys: dict[str, DropKey] = {}
        self._drop_users: dict[str, int] = {}
        self._clock = clock
        self._next_drop_read = 0.0

    # -- messages (cheap) ---------------------------------------------------------------------------
    def on_update(self, msg: object) -> None:
        if isinstance(msg, HostTunnelUpdate):
            base = self._base_options
            opts = replace(self.options, vxlan_enabled=base.vxlan_enabled or msg.vxlan_enabled,
                           ipip_enabled=base.ipip_enabled or msg.ipip_enabled)
            if opts != self.options:
                self.options = opts
                self._static_done = False
        elif isinstance(msg, IPSetUpdate):
            if self._sets.get(msg.set_id) != msg.members:
                self._sets[msg.set_id] = msg.members
                self._dirty_sets.add(msg.set_id)
        elif isinstance(msg, IPSetDeltaUpdate):
            prev = self._sets.get(msg.set_id)
            if prev is None:
                log.warning("IP set %s: membership delta for a set never sent, taking the additions", msg.set_id)
            new = ((prev or frozenset()) - msg.removed) | msg.added
            if new != prev:
                self._sets[msg.set_id] = new
                self._dirty_sets.add(msg.set_id)
        elif isinstance(msg, IPSetRemove):
            if self._sets.pop(msg.set_id, None) is not None:
                self._dirty_sets.add(msg.set_id)
        elif isinstance(msg, ActivePolicyUpdate):
            if self._policies.get(msg.policy.key) != msg.policy:
                self._policies[msg.policy.key] = msg.policy
                self._dirty_policies.add(msg.policy.key)
        elif isinstance(msg, ActivePolicyRemove):
            if self._policies.pop(msg.key, None) is not None:
                self._dirty_policies.add(msg.key)
        elif isinstance(msg, ActiveProfileUpdate):
            if self._profiles.get(msg.profile.name) != msg.profile:
                self._profiles[msg.profile.name] = msg.profile
                self._dirty_profiles.add(msg.profile.name)
        elif isinstance(msg, ActiveProfileRemove):
            if self._profiles.pop(msg.name, None) is not None:
                self._dirty_profiles.add(msg.name)
        elif isinstance(msg, EndpointPolicyUpdate):
            old = self._endpoints.get(msg.endpoint)
            if old == msg:
                return
            if old is not None:
                self._unclaim(msg.endpoint, _slot(old))
            self._endpoints[msg.endpoint] = msg
            self._by_iface.setdefault(_slot(msg), set()).add(msg.endpoint)
            self._seq += 1
            self._ep_seq[msg.endpoint] = self._seq
            self._dirty_ifaces.add(_slot(msg))
        elif isinstance(msg, EndpointPolicyRemove):
            old = self._endpoints.pop(msg.endpoint, None)
            if old is not None:
                self._ep_seq.pop(msg.endpoint, None)
                self._unclaim(msg.endpoint, _slot(old))

    def _unclaim(self, endpoint: str, iface: str) -> None:
        eps = self._by_iface.get(iface)
        if eps is not None:
            eps.discard(endpoint)
            if not eps:
                del self._by_iface[iface]
        self._dirty_ifaces.add(iface)

    # -- dataplane thread ---------------------------------------------------------------------------
    def complete_deferred_work(self) -> None:
        if not self._static_done:
            self._b.write_static(self.options)
            if self._static_ever:  # a rewrite resets the dispatch chains it declares: rewrite them too
                self._dispatch_dirty = self._hep_dispatch_dirty = True
            self._static_done = self._static_ever = True
        changed_chains: set[str] = set()  # policy/profile chains that appeared, went or changed visibility
        for key in sorted(self._dirty_policies, key=lambda k: k.id):
            changed_chains |= self._sync_policy(key)
        for name in sorted(self._dirty_profiles):
            changed_chains |= self._sync_profile(name)
        self._dirty_policies.clear()
        self._dirty_profiles.clear()
        self._sync_sets()
        for chain in changed_chains:
            self._dirty_ifaces |= self._wanted_by.get(chain, set())
        if self._dirty_ifaces:
            for iface in sorted(self._dirty_ifaces):
                self._sync_iface(iface)
            self._dirty_ifaces.clear()
        if self._dispatch_dirty:
            self._b.write_dispatch(s for s in self._iface_ep if not s.startswith(_HEP_SLOT))
            self._dispatch_dirty = False
        if self._hep_dispatch_dirty:
            self._b.write_hep_dispatch(self._hep_fwd, self.options)
            self._hep_dispatch_dirty = False
        now = self._clock()
        if now >= self._next_drop_read:
            self._next_drop_read = now + self.DROP_METRICS_INTERVAL
            self.publish_drop_metrics()

    # -- drops ----------------------------------------------------------------------------------------
    def _set_drops(self, iface: str, drops: dict[str, DropKey]) -> None:
        old = self._iface_drops.get(iface, {})
        for name in drops.keys() - old.keys():
            n = self._drop_users.get(name, 0)
            if n == 0:
                self._drop_keys[name] = drops[name]
                self._b.set_counter(name)
            self._drop_users[name] = n + 1
        for name in old.keys() - drops.keys():
            n = self._drop_users[name] - 1
            if n:
                self._drop_users[name] = n
            else:
                del self._drop_users[name]
                del self._drop_keys[name]
                self._b.remove_counter(name)
        if drops:
            self._iface_drops[iface] = drops
        else:
            self._iface_drops.pop(iface, None)

    def drop_counters(self) -> dict[DropKey, tuple[int, int]]:
        """(tier, policy, direction) -> (packets, bytes) dropped, from the kernel in one call. ``policy``
        is the policy id (``knp/ns/name``), ``profile/<name>``, ``end-of-tier`` or ``no-profile-matched``
        (tier ""); direction ``ingress``/``egress``. Summed over every local endpoint."""
        counts = self._b.read_counters()
        out: dict[DropKey, tuple[int, int]] = {}
        for name, key in self._drop_keys.items():
            p, b = counts.get(name, (0, 0))
            op, ob = out.get(key, (0, 0))
            out[key] = (op + p, ob + b)
        return out

    def publish_drop_metrics(self) -> None:
        """Export :meth:`drop_counters` as the policy drop metrics (never raises: metrics are best effort)."""
        if not self._drop_keys:
            return
        try:
            rows = self.drop_counters()
        except Exception as e:  # a read failing must never fail the dataplane apply
            log.warning("policy drop counters not read: %s", e)
            return
        metrics.set_policy_drops(rows)

    # -- policies and profiles ----------------------------------------------------------------------
    def _push_chains(self, obj: str, specs: list[ChainSpec], sets: frozenset[str]) -> set[str]:
        """Push an object's chains, remove those it no longer has; returns chain names added or removed
        (a chain moving between tables counts as changed)."""
        old = set(self._obj_chains.get(obj, ()))
        new = {(s.table, s.name) for s in specs}
        for s in specs:
            self._b.set_chain(s.name, s.rules, s.table)
            self._chain_sets[s.name] = sets
        for table, name in old - new:
            self._b.remove_chain(name, table)
            if name not in {n for _, n in new}:
                self._chain_sets.pop(name, None)
        if new:
            self._obj_chains[obj] = tuple(sorted(new))
        else:
            self._obj_chains.pop(obj, None)
        return {name for _, name in old ^ new}

    def _sync_policy(self, key: PolicyKey) -> set[str]:
        obj = f"policy {key.id}"
        pol = self._policies.get(key)
        was_hidden = key in self._hidden
        hidden = pol is not None and pol.staged
        if hidden:
            self._hidden.add(key)
        else:
            self._hidden.discard(key)
        names = {self._b.policy_chain_name(key, d) for d in (INGRESS, EGRESS)}
        table = policy_table(pol) if pol is not None else TABLE_FILTER
        was_table = self._policy_table.pop(key, TABLE_FILTER)
        if table != TABLE_FILTER:
            self._policy_table[key] = table
        visibility = names if was_hidden != hidden or was_table != table else set()
        if pol is None or hidden:
            self.errors.pop(obj, None)
            return self._push_chains(obj, [], frozenset()) | visibility
        try:
            if not self._b.has_table(policy_table(pol)):
                raise ValueError(f"{'do-not-track' if pol.do_not_track else 'pre-DNAT'} policy needs the "
                                 f"{policy_table(pol)} table, which this iptables dataplane does not manage")
            specs = self._b.policy_chains(pol, self.options)
            sets = rules_set_ids((*pol.ingress, *pol.egress))
            for s in sets:
                self._b.set_name(s, self.ip_version)
            changed = self._push_chains(obj, specs, sets)
        except ValueError as e:  # PolicyRenderError or the driver refusing a rule
            self._error(obj, e)
            return visibility
        self.errors.pop(obj, None)
        return changed | visibility

    def _sync_profile(self, name: str) -> set[str]:
        obj = f"profile {name}"
        prof = self._profiles.get(name)
        if prof is None:
            self.errors.pop(obj, None)
            return self._push_chains(obj, [], frozenset())
        try:
            specs = self._b.profile_chains(prof, self.options)
            sets = rules_set_ids((*prof.ingress, *prof.egress))
            for s in sets:
                self._b.set_name(s, self.ip_version)
            changed = self._push_chains(obj, specs, sets)
        except ValueError as e:
            self._error(obj, e)
            return set()
        self.errors.pop(obj, None)
        return changed

    # -- IP sets ------------------------------------------------------------------------------------
    def _sync_sets(self) -> None:
        referenced = frozenset(s for ids in self._chain_sets.values() for s in ids) | static_set_ids(self.options)
        todo = self._dirty_sets | (referenced ^ self._referenced)
        self._referenced = referenced
        self._dirty_sets = set()
        for set_id in sorted(todo):
            obj = f"set {set_id}"
            try:
                name = self._b.set_name(set_id, self.ip_version)
            except PolicyRenderError as e:
                self._error(obj, e)
                continue
            members = self._sets.get(set_id)
            if members is None and set_id not in referenced:
                self._b.remove_set(name)
                self._pushed_sets.discard(set_id)
                self.errors.pop(obj, None)
                continue
            # A referenced set that has not arrived is programmed empty (matches nothing).
            try:
                self._b.set_set(set_id, name, members, self.ip_version)
            except ValueError as e:
                self._error(obj, e)
                continue
            self._pushed_sets.add(set_id)
            self.errors.pop(obj, None)

    # -- endpoints ----------------------------------------------------------------------------------
    def _owner(self, iface: str) -> EndpointPolicyUpdate | None:
        eps = self._by_iface.get(iface)
        if not eps:
            return None
        return self._endpoints[max(eps, key=lambda k: self._ep_seq.get(k, 0))]

    def _slot_chains(self, slot: str) -> list[tuple[str, str, str, int | None]]:
        """(chain name, direction, chain kind, optional-chain flag index or None) of every chain a slot may
        have; the chain's table is ``CHAIN_KIND_TABLE[kind]``."""
        if slot.startswith(_HEP_SLOT):
            iface = slot[len(_HEP_SLOT):]
            name = self._b.host_endpoint_chain_name
            return [(name(iface, INGRESS), INGRESS, CHAIN_KIND_HOST, None),
                    (name(iface, EGRESS), EGRESS, CHAIN_KIND_HOST, None),
                    (name(iface, INGRESS, True), INGRESS, CHAIN_KIND_FORWARD, HEP_FWD_IN),
                    (name(iface, EGRESS, True), EGRESS, CHAIN_KIND_FORWARD, HEP_FWD_OUT),
                    (name(iface, INGRESS, False, "raw"), INGRESS, CHAIN_KIND_UNTRACKED, HEP_RAW_IN),
                    (name(iface, EGRESS, False, "raw"), EGRESS, CHAIN_KIND_UNTRACKED, HEP_RAW_OUT),
                    (name(iface, INGRESS, False, "mangle"), INGRESS, CHAIN_KIND_PRE_DNAT, HEP_PRE_DNAT_IN)]
        return [(self._b.endpoint_chain_name(slot, d), d, CHAIN_KIND_WORKLOAD, None) for d in (INGRESS, EGRESS)]

    def _sync_iface(self, iface: str) -> None:
        """Push the chains of one slot: a workload interface, or ``hep:<iface>`` for a host endpoint."""
        host = iface.startswith(_HEP_SLOT)
        hep_iface = iface[len(_HEP_SLOT):]
        ep = self._owner(iface)
        pushed = self._iface_ep.get(iface)
        if ep is None:
            if pushed is not None:
                for name, _, kind, _ in self._slot_chains(iface):
                    self._b.remove_chain(name, CHAIN_KIND_TABLE[kind])
                del self._iface_ep[iface]
                self._set_drops(iface, {})
                if host:
                    self._hep_fwd.pop(hep_iface, None)
                    self._hep_dispatch_dirty = True
                else:
                    self._dispatch_dirty = True
                self.errors.pop(f"endpoint {pushed}", None)
            self._set_wants(iface, frozenset())
            return
        obj = f"endpoint {ep.endpoint}"
        has = self._b.has_chain
        wants: set[str] = set()
        for tier in (*ep.tiers, *ep.forward_tiers, *ep.untracked_tiers, *ep.pre_dnat_tiers):
            wants |= {self._b.policy_chain_name(k, INGRESS) for k in tier.ingress}
            wants |= {self._b.policy_chain_name(k, EGRESS) for k in tier.egress}
        for p in ep.profiles:
            wants |= {self._b.profile_chain_name(p, d) for d in (INGRESS, EGRESS)}
        self._set_wants(iface, frozenset(wants))
        drops: dict[str, DropKey] = {}
        fwd: tuple[bool, ...] = ()
        try:
            chains: list[tuple[str, str, list[DriverRule]]] = []
            gone: list[tuple[str, str]] = []
            if host:
                # A forward / untracked / pre-DNAT chain only where such policies apply (otherwise that
                # traffic through this interface is not host endpoint policy's business).
                def some(tiers: tuple[TierPolicies, ...], d: str) -> bool:
                    return any(k not in self._hidden for t in tiers
                               for k in (t.ingress if d == INGRESS else t.egress))

                fwd = (some(ep.forward_tiers, INGRESS), some(ep.forward_tiers, EGRESS),
                       some(ep.untracked_tiers, INGRESS), some(ep.untracked_tiers, EGRESS),
                       some(ep.pre_dnat_tiers, INGRESS))
            for name, d, kind, flag in self._slot_chains(iface):
                table = CHAIN_KIND_TABLE[kind]
                if flag is not None and not fwd[flag]:
                    gone.append((name, table))
                    continue
                if not self._b.has_table(table):
                    raise ValueError(f"{kind} policy needs the {table} table, which this iptables dataplane "
                                     f"does not manage")

                def avail(c: str, table: str = table) -> bool:
                    return has(c, table)

                def skip(k: PolicyKey, table: str = table) -> bool:
                    return k in self._hidden or self._policy_table.get(k, TABLE_FILTER) != table

                chains.append((name, table, self._b.endpoint_chain(ep, d, self.options, avail, skip, drops, kind)))
            # The counters first: a chain referring to a counter that is not desired is not programmed.
            self._set_drops(iface, drops)
            for name, table, rules in chains:
                self._b.set_chain(name, rules, table)
            for name, table in gone:
                self._b.remove_chain(name, table)
        except ValueError as e:
            self._error(obj, e)
            return
        missing = sorted(w for w in wants if not any(has(w, t) for t in ("filter", "raw", "mangle")))
        if missing:
            log.info("endpoint %s: chains %s not there yet, left out", ep.endpoint, ", ".join(missing))
        self.errors.pop(obj, None)
        if host and self._hep_fwd.get(hep_iface) != fwd:
            self._hep_fwd[hep_iface] = fwd
            self._hep_dispatch_dirty = True
        if pushed != ep.endpoint:
            if pushed is None and not host:
                self._dispatch_dirty = True
            self._iface_ep[iface] = ep.endpoint

    def _set_wants(self, iface: str, wants: frozenset[str]) -> None:
        old = self._iface_wants.get(iface, frozenset())
        for c in old - wants:
            s = self._wanted_by.get(c)
            if s is not None:
                s.discard(iface)
                if not s:
                    del self._wanted_by[c]
        for c in wants - old:
            self._wanted_by.setdefault(c, set()).add(iface)
        if wants:
            self._iface_wants[iface] = wants
        else:
            self._iface_wants.pop(iface, None)

    def _error(self, obj: str, e: Exception) -> None:
        why = str(e)
        if self.errors.get(obj) != why:
            log.error("policy dataplane: %s not programmed (what was there stays): %s", obj, why)
        self.errors[obj] = why

    # -- status -------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """What the manager holds (active policies, profiles, endpoints, IP sets), for the gauges and
        /status; len() of each dict is safe to read from another thread."""
        return {"policies": len(self._policies), "profiles": len(self._profiles),
                "endpoints": len(self._endpoints), "ipsets": len(self._sets)}

    @property
    def endpoint_ifaces(self) -> frozenset[str]:
        """Workload interfaces whose endpoint chains are in the desired state."""
        return frozenset(s for s in self._iface_ep if not s.startswith(_HEP_SLOT))

    @property
    def host_endpoint_ifaces(self) -> frozenset[str]:
        """Host endpoint interfaces (``*`` for the all-interfaces one) whose chains are in the desired state."""
        return frozenset(s[len(_HEP_SLOT):] for s in self._iface_ep if s.startswith(_HEP_SLOT))


def _slot(ep: EndpointPolicyUpdate) -> str:
    return _HEP_SLOT + ep.iface if ep.host else ep.iface
