"""The VXLAN device driver: owns the ``vxlan.calico`` link and the ARP and FDB entries on it.

Desired state comes from cheap setters that only record it (no kernel access):

- ``set_device(VxlanParams | None)``: the device as it should be; ``None`` means VXLAN is disabled and
  the device is deleted (once removals are allowed).
- ``set_vteps({node: Vtep})``: the *remote* VTEPs. Each becomes a permanent ARP entry
  ``<tunnel_ip> lladdr <mac>`` and an FDB entry ``<mac> dst <node_ip> self permanent`` on the device.

``apply()`` (dataplane thread) reconciles, like Calico's ``vxlan_mgr.go`` / ``vxlanfdb``:

- the link is created if missing and deleted + re-created if it is not a vxlan link or its VNI, port,
  parent, local address or MAC differ, or it has learning on; MTU and up-state are fixed in place;
- its IPv4 addresses become exactly ``<tunnel_addr>/32`` (link-local ones are left alone);
- ARP / FDB entries are added or corrected; entries of VTEPs we do not want are deleted only after
  ``allow_removals()`` (before the datastore is in sync an empty VTEP set means "not loaded yet").

Only differences are written: the first apply (and any after ``queue_resync()``) reads the link, its
addresses, ARP and FDB entries back; later applies trust that cache and look only at what changed.
So a restart with the kernel already right writes nothing. An error on one entry does not stop the
others; failed work stays dirty and is retried by the next apply. ``status()`` says what is wrong.

The route table driver programs the routes via this device; ``ifindex()`` gives its index, and the
optional ``on_link_change(name)`` callback (e.g. ``RouteTable.iface_changed``) fires when the link is
created, re-created or deleted, because the kernel drops the routes of a deleted link.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface

from felixpy import names
from felixpy.dataplane.shims.netlink import (
    AF_INET,
    NUD_PERMANENT,
    FdbEntry,
    IPAddress,
    Link,
    Neighbour,
    Netlink,
    NetlinkError,
)

log = logging.getLogger(__name__)

_LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")


def normalise_mac(mac: str) -> str:
    """``aa:bb:..`` in lower case; ValueError if ``mac`` is not a 6-byte colon-separated MAC."""
    parts = mac.split(":") if isinstance(mac, str) else []
    if len(parts) != 6 or not all(len(p) in (1, 2) and all(c in string.hexdigits for c in p) for p in parts):
        raise ValueError(f"invalid MAC address {mac!r}")
    return ":".join(f"{int(p, 16):02x}" for p in parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class VxlanParams:
    """How ``vxlan.calico`` should look. ``mac``/``mtu`` None: not managed (kernel's choice kept)."""

    tunnel_addr: IPv4Address
    local_ip: IPv4Address | None
    parent_iface: str | None
    mac: str | None = None
    mtu: int | None = None
    vni: int = names.VXLAN_VNI
    port: int = names.VXLAN_PORT

    def __post_init__(self) -> None:
        if not isinstance(self.tunnel_addr, IPv4Address):
            raise ValueError(f"VXLAN tunnel address must be an IPv4 address, not {self.tunnel_addr!r}")
        if self.local_ip is not None and not isinstance(self.local_ip, IPv4Address):
            raise ValueError(f"VXLAN local IP must be an IPv4 address, not {self.local_ip!r}")
        if not 0 < self.vni < (1 << 24):
            raise ValueError(f"invalid VXLAN VNI {self.vni} (1..16777215)")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid VXLAN port {self.port}")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"invalid VXLAN MTU {self.mtu} (68..65535)")
        n = self.parent_iface
        if n is not None and (not n or len(n.encode()) > 15 or "/" in n or " " in n):
            raise ValueError(f"invalid parent interface name {n!r}")
        if self.mac is not None:
            mac = normalise_mac(self.mac)
            if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
                raise ValueError(f"VXLAN device MAC {mac} must be a unicast address")
            object.__setattr__(self, "mac", mac)


@dataclass(frozen=True, slots=True)
class Vtep:
    """A remote VXLAN tunnel endpoint: its tunnel address, its device MAC, its node IP."""

    tunnel_ip: IPv4Address
    mac: str
    node_ip: IPv4Address

    def __post_init__(self) -> None:
        if not isinstance(self.tunnel_ip, IPv4Address) or not isinstance(self.node_ip, IPv4Address):
            raise ValueError(f"VTEP addresses must be IPv4 addresses: {self.tunnel_ip!r}, {self.node_ip!r}")
        mac = normalise_mac(self.mac)
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise ValueError(f"VTEP MAC {mac} must be a unicast address")
        object.__setattr__(self, "mac", mac)


@dataclass
class DeviceApplyStats:
    """What one apply of a tunnel-device driver did."""

    writes: int = 0  # kernel changes made (creates, deletes, sets)
    resynced: bool = False  # this apply re-read the kernel
    recreated: bool = False  # the link was (re)created or deleted
    errors: list[str] = field(default_factory=list)


def is_link_local_v4(addr: IPv4Interface) -> bool:
    return addr.ip in _LINK_LOCAL_V4


def sync_tunnel_addr(nl: Netlink, index: int, want: IPv4Interface | None, have: set[IPv4Interface],
                     stats: DeviceApplyStats, problems: dict[str, str], ifname: str) -> set[IPv4Interface]:
    """Make the link's IPv4 addresses exactly ``want`` (plus link-local ones); return what it holds
    now. Failures are recorded in ``problems`` (keyed by ``addr <x>``) and left for a retry."""
    now = set(have)
    for a in sorted(have, key=str):
        if a == want or is_link_local_v4(a):
            continue
        key = f"addr {a}"
        try:
            nl.del_addr(index, a)
            log.info("%s: removed unexpected address %s", ifname, a)
            stats.writes += 1
            now.discard(a)
            problems.pop(key, None)
        except NetlinkError as e:
            problems[key] = f"cannot remove address {a} from {ifname}: {e}"
            stats.errors.append(problems[key])
    if want is not None and want not in have:
        key = f"addr {want}"
        try:
            nl.add_addr(index, want)
            stats.writes += 1
            now.add(want)
            problems.pop(key, None)
        except NetlinkError as e:
            problems[key] = f"cannot add address {want} to {ifname}: {e}"
            stats.errors.append(problems[key])
    return now


def _incompatible(link: Link, p: VxlanParams, parent_index: int | None) -> str:
    """Why ``link`` cannot be fixed in place to match ``p`` ("" if it can)."""
    v = link.vxlan
    if link.kind != "vxlan" or v is None:
        return f"it is a {link.kind or 'plain'} link, not vxlan"
    if v.vni != p.vni:
        return f"VNI {v.vni} != {p.vni}"
    if v.port != p.port:
        return f"port {v.port} != {p.port}"
    if v.local != p.local_ip:
        return f"local address {v.local} != {p.local_ip}"
    if v.link != parent_index:
        return f"parent ifindex {v.link} != {parent_index} ({p.parent_iface})"
    if p.mac is not None and link.mac != p.mac:
        return f"MAC {link.mac} != {p.mac}"
    if v.learning:
        return "learning is on"
    return ""


class VxlanDevice:
    def __init__(self, nl: Netlink, *, name: str = names.VXLAN_IFACE, removals_allowed: bool = False,
                 on_link_change: Callable[[str], None] | None = None) -> None:
        self._nl = nl
        self.name = name
        self.removals_allowed = removals_allowed
        self._on_link_change = on_link_change

        # Desired state (replaced, never mutated, so other threads read a consistent value).
        self._params_known = False
        self._params: VxlanParams | None = None
        self._want_arp: dict[IPv4Address, str] = {}
        self._want_fdb: dict[str, IPv4Address] = {}
        self._vtep_problems: tuple[str, ...] = ()

        # What we believe the kernel holds.
        self._link: Link | None = None
        self._addrs: set[IPv4Interface] = set()
        self._arp: dict[IPAddress, Neighbour] = {}
        self._fdb: dict[tuple[str, IPAddress | None], FdbEntry] = {}

        self._resync = True
        self._device_dirty = True
        self._vteps_dirty = True
        self._device_problems: dict[str, str] = {}
        self._entry_problems: dict[str, str] = {}

    # -- desired state (cheap: no kernel access) ----------------------------------------------------
    def set_device(self, params: VxlanParams | None) -> None:
        """The device as it should be, or None: VXLAN disabled (device deleted once removals are
        allowed). Bad values are refused when the VxlanParams is built."""
        if params is not None and not isinstance(params, VxlanParams):
            raise ValueError(f"set_device takes VxlanParams or None, not {params!r}")
        if self._params_known and params == self._params:
            return
        self._params_known = True
        self._params = params
        self._device_dirty = True
        self._vteps_dirty = True

    def set_vteps(self, vteps: Mapping[str, Vtep]) -> None:
        """The remote VTEPs by node name (replaces the previous set). When two nodes claim the same
        tunnel IP or MAC, the lowest node name wins and ``status()`` reports the conflict."""
        arp: dict[IPv4Address, str] = {}
        fdb: dict[str, IPv4Address] = {}
        owner_ip: dict[IPv4Address, str] = {}
        owner_mac: dict[str, str] = {}
        problems: list[str] = []
        for node in sorted(vteps):
            v = vteps[node]
            if not isinstance(v, Vtep):
                raise ValueError(f"VTEP of node {node!r} must be a Vtep, not {v!r}")
            if v.tunnel_ip in owner_ip:
                problems.append(f"nodes {owner_ip[v.tunnel_ip]} and {node} both claim tunnel IP {v.tunnel_ip}")
                continue
            if v.mac in owner_mac:
                problems.append(f"nodes {owner_mac[v.mac]} and {node} both claim VTEP MAC {v.mac}")
                continue
            owner_ip[v.tunnel_ip] = owner_mac[v.mac] = node
            arp[v.tunnel_ip] = v.mac
            fdb[v.mac] = v.node_ip
        for text in problems:
            if text not in self._vtep_problems:
                log.warning("VXLAN: %s (using the first)", text)
        self._vtep_problems = tuple(problems)
        if arp != self._want_arp or fdb != self._want_fdb:
            self._want_arp = arp
            self._want_fdb = fdb
            self._vteps_dirty = True

    def queue_resync(self) -> None:
        """The next apply re-reads the device and its entries instead of trusting the cache."""
        self._resync = True

    def allow_removals(self, allowed: bool = True) -> None:
        """Permit deleting stale ARP/FDB entries and (when disabled) the device."""
        if allowed and not self.removals_allowed:
            self._resync = True  # sweep everything stale on the next apply
        self.removals_allowed = allowed

    # -- status (readable from other threads) ------------------------------------------------------
    def ifindex(self) -> int | None:
        """The device's ifindex as of the last apply (None if it does not exist)."""
        link = self._link
        return link.index if link is not None else None

    def status(self) -> str:
        """"" when the kernel holds the desired state (as far as we know), else what is wrong."""
        problems = [*self._device_problems.values(), *self._entry_problems.values(), *self._vtep_problems]
        if not problems and self._params_known and self._params is not None and (
                self._link is None or self._device_dirty or self._vteps_dirty):
            problems.append(f"{self.name} not programmed yet")
        return "; ".join(problems)

    # -- reconciliation -----------------------------------------------------------------------------
    def apply(self) -> DeviceApplyStats:
        stats = DeviceApplyStats()
        try:
            self._apply(stats)
        except BaseException:
            self._resync = True  # we no longer know what the kernel holds
            raise
        if stats.errors:
            log.warning("%s: %d change(s) failed (will retry): %s", self.name, len(stats.errors), stats.errors[0])
        return stats

    def _apply(self, stats: DeviceApplyStats) -> None:
        if self._resync:
            self._read_kernel()
            stats.resynced = True
        if not self._params_known:
            return  # nothing decided yet: touch nothing
        p = self._params
        if p is None:
            self._entry_problems = {}
            self._device_problems = {}
            self._device_dirty = self._vteps_dirty = False
            if self._link is not None and self.removals_allowed:
                text = self._delete_link(stats, "VXLAN is disabled")
                self._device_problems = {"link": text} if text else {}
            return
        if self._device_dirty:
            self._ensure_device(p, stats)
        if self._link is not None and self._vteps_dirty:
            self._sync_entries(self._link.index, stats)

    def _read_kernel(self) -> None:
        self._resync = False
        self._device_dirty = self._vteps_dirty = True
        self._link = link = self._nl.link(self.name)
        if link is None:
            self._addrs, self._arp, self._fdb = set(), {}, {}
            return
        self._addrs = self._read_addrs(link.index)
        self._arp = {nb.ip: nb for nb in self._nl.neighs(link.index)}
        self._fdb = {(f.mac, f.dst): f for f in self._nl.fdbs(link.index)}

    def _forget_link(self) -> None:
        self._link = None
        self._addrs, self._arp, self._fdb = set(), {}, {}  # the kernel drops them with the link

    def _link_changed(self) -> None:
        if self._on_link_change is not None:
            try:
                self._on_link_change(self.name)
            except Exception:
                log.exception("%s: link-change callback failed", self.name)

    def _delete_link(self, stats: DeviceApplyStats, why: str) -> str:
        """Delete the device; "" on success, else the problem text."""
        try:
            self._nl.del_link(self.name)
        except NetlinkError as e:
            text = f"cannot delete {self.name}: {e}"
            stats.errors.append(text)
            self._device_dirty = True
            return text
        log.info("%s: deleted (%s)", self.name, why)
        stats.writes += 1
        stats.recreated = True
        self._forget_link()
        self._link_changed()
        return ""

    def _read_addrs(self, index: int) -> set[IPv4Interface]:
        return {a.address for a in self._nl.addrs(index, AF_INET) if isinstance(a.address, IPv4Interface)}

    def _ensure_device(self, p: VxlanParams, stats: DeviceApplyStats) -> None:
        problems: dict[str, str] = {}
        try:
            self._program_device(p, stats, problems)
        except NetlinkError as e:
            problems["link"] = f"cannot program {self.name}: {e}"
            stats.errors.append(problems["link"])
            if e.errno == errno.ENODEV:
                self._resync = True
        # Assigned once, complete: status() may read it from another thread.
        self._device_problems = problems
        self._device_dirty = bool(problems)

    def _program_device(self, p: VxlanParams, stats: DeviceApplyStats, problems: dict[str, str]) -> None:
        nl, name = self._nl, self.name
        parent_index: int | None = None
        if p.parent_iface is not None:
            parent = nl.link(p.parent_iface)
            if parent is None:
                problems["parent"] = f"parent interface {p.parent_iface} of {name} does not exist"
                return
            parent_index = parent.index
        link = nl.link(name)
        if link is not None and (self._link is None or link.index != self._link.index):
            # First sight, or replaced behind our back: read what it holds.
            self._forget_link()
            self._arp = {nb.ip: nb for nb in nl.neighs(link.index)}
            self._fdb = {(f.mac, f.dst): f for f in nl.fdbs(link.index)}
            self._vteps_dirty = True
        if link is not None:
            why = _incompatible(link, p, parent_index)
            if why:
                log.info("%s: recreating it, the existing link does not match (%s)", name, why)
                text = self._delete_link(stats, why)
                if text:
                    problems["link"] = text
                    return
                link = None
        if link is None:
            self._forget_link()
            nl.add_vxlan(name, vni=p.vni, port=p.port, local=p.local_ip, parent_index=parent_index,
                         mtu=p.mtu, mac=p.mac, learning=False, up=True)
            stats.writes += 1
            stats.recreated = True
            self._vteps_dirty = True
            log.info("%s: created (vni %d, port %d, local %s, parent %s, mtu %s, mac %s)", name, p.vni,
                     p.port, p.local_ip, p.parent_iface, p.mtu, p.mac)
            link = nl.link(name)
            if link is None:
                problems["link"] = f"{name} vanished right after it was created"
                return
            self._link = link
            self._link_changed()
        self._link = link
        # Addresses are few and cheap to re-read, and someone may have added one.
        self._addrs = self._read_addrs(link.index)
        changed = False
        if p.mtu is not None and link.mtu != p.mtu:
            nl.set_link(link.index, mtu=p.mtu)
            stats.writes += 1
            changed = True
            log.info("%s: MTU %d -> %d", name, link.mtu, p.mtu)
        if not link.up:
            nl.set_link(link.index, up=True)
            stats.writes += 1
            changed = True
        self._addrs = sync_tunnel_addr(nl, link.index, IPv4Interface((p.tunnel_addr, 32)), self._addrs,
                                       stats, problems, name)
        if changed:
            self._link = nl.link(link.index) or link

    def _sync_entries(self, index: int, stats: DeviceApplyStats) -> None:
        nl = self._nl
        problems: dict[str, str] = {}
        want_arp, want_fdb = self._want_arp, self._want_fdb

        def failed(key: str, text: str, e: NetlinkError) -> None:
            problems[key] = f"{text}: {e}"
            stats.errors.append(problems[key])
            if e.errno == errno.ENODEV:
                self._resync = True  # the device is gone

        # Permanent ARP entries: <tunnel IP> lladdr <VTEP MAC>.
        for ip, mac in want_arp.items():
            have = self._arp.get(ip)
            if have is not None and have.mac == mac and have.permanent:
                continue
            try:
                nl.add_neigh(index, ip, mac)
            except NetlinkError as e:
                failed(f"arp {ip}", f"cannot add ARP entry {ip} lladdr {mac} on {self.name}", e)
                continue
            stats.writes += 1
            self._arp[ip] = Neighbour(index, ip, mac, NUD_PERMANENT)

        # FDB entries: <VTEP MAC> dst <node IP>. A unicast MAC has one destination, so "add" with
        # replace semantics also moves a MAC whose node IP changed.
        fdb = self._fdb
        for mac, dst in want_fdb.items():
            have_f = fdb.get((mac, dst))
            if have_f is not None and have_f.permanent:
                continue
            try:
                nl.add_fdb(index, mac, dst)
            except NetlinkError as e:
                failed(f"fdb {mac}", f"cannot add FDB entry {mac} dst {dst} on {self.name}", e)
                continue
            stats.writes += 1
            for key in [k for k in fdb if k[0] == mac and k[1] != dst]:
                del fdb[key]  # replaced by the kernel (a leftover would be found by the next resync)
            fdb[(mac, dst)] = FdbEntry(index, mac, dst, NUD_PERMANENT, 0)

        if self.removals_allowed:
            for old_ip, nb in list(self._arp.items()):
                # Entries without a MAC (INCOMPLETE/FAILED) are the kernel's own cache and harmless.
                if old_ip in want_arp or nb.mac is None:
                    continue
                try:
                    nl.del_neigh(index, old_ip)
                except NetlinkError as e:
                    failed(f"arp {old_ip}", f"cannot remove stale ARP entry {old_ip} from {self.name}", e)
                    continue
                stats.writes += 1
                log.info("%s: removed stale ARP entry %s lladdr %s", self.name, old_ip, nb.mac)
                del self._arp[old_ip]
            for old_mac, old_dst in list(fdb):
                if old_dst is not None and want_fdb.get(old_mac) == old_dst:
                    continue
                try:
                    nl.del_fdb(index, old_mac, old_dst)
                except NetlinkError as e:
                    failed(f"fdb {old_mac} {old_dst}",
                           f"cannot remove stale FDB entry {old_mac} dst {old_dst} from {self.name}", e)
                    continue
                stats.writes += 1
                log.info("%s: removed stale FDB entry %s dst %s", self.name, old_mac, old_dst)
                del fdb[(old_mac, old_dst)]

        self._entry_problems = problems
        self._vteps_dirty = bool(problems)
