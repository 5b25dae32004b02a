"""The IPIP device driver: owns ``tunl0`` (its MTU, up-state and IPv4 addresses), like Calico's
``ipip_mgr.go``.

- ``set_device(IpipParams | None)`` records the desired state (no kernel access). With params the
  device is created if missing (on kernels with the ipip module it always exists: it is the module's
  catch-all device), its MTU is set, it is brought up and its IPv4 addresses become exactly
  ``<tunnel_addr>/32`` (link-local ones are left alone; no tunnel address means none). ``None`` means
  IPIP is disabled: once removals are allowed the tunnel addresses are removed (the device itself is
  the kernel's and stays).
- ``apply()`` does the work. Where the kernel has no IPIP support it changes nothing, logs the reason
  once, and ``supported`` / ``status()`` report it.

The state is a handful of values, so each apply that has something to do re-reads the link and its
addresses (no cache to go stale); applies with nothing to do touch nothing.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from felixpy import names
from felixpy.dataplane.drivers.vxlan import DeviceApplyStats, sync_tunnel_addr
from felixpy.dataplane.shims.netlink import AF_INET, Netlink, NetlinkError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class IpipParams:
    """How ``tunl0`` should look. ``mtu`` None: not managed."""

    tunnel_addr: IPv4Address | None
    mtu: int | None = None

    def __post_init__(self) -> None:
        if self.tunnel_addr is not None and not isinstance(self.tunnel_addr, IPv4Address):
            raise ValueError(f"IPIP tunnel address must be an IPv4 address, not {self.tunnel_addr!r}")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"invalid IPIP MTU {self.mtu} (68..65535)")


class IpipDevice:
    def __init__(self, nl: Netlink, *, name: str = names.IPIP_IFACE, removals_allowed: bool = False,
                 on_link_change: Callable[[str], None] | None = None) -> None:
        self._nl = nl
        self.name = name
        self.removals_allowed = removals_allowed
        self._on_link_change = on_link_change
        self._params_known = False
        self._params: IpipParams | None = None
        self._dirty = True
        self._supported: bool | None = None  # None: not probed yet
        self._reason = ""
        self._logged_reason = ""
        self._problems: dict[str, str] = {}
        self._ifindex: int | None = None

    # -- desired state (cheap: no kernel access) ----------------------------------------------------
    def set_device(self, params: IpipParams | None) -> None:
        if params is not None and not isinstance(params, IpipParams):
            raise ValueError(f"set_device takes IpipParams or None, not {params!r}")
        if self._params_known and params == self._params:
            return
        self._params_known = True
        self._params = params
        self._dirty = True

    def queue_resync(self) -> None:
        """Re-read the device on the next apply (and re-probe IPIP support if it was missing)."""
        self._dirty = True
        if self._supported is False:
            self._supported = None

    def allow_removals(self, allowed: bool = True) -> None:
        if allowed and not self.removals_allowed:
            self._dirty = True
        self.removals_allowed = allowed

    # -- status -------------------------------------------------------------------------------------
    @property
    def supported(self) -> bool | None:
        """Whether the kernel can do IPIP (None until an apply needed to find out)."""
        return self._supported

    @property
    def reason(self) -> str:
        """The probe's explanation (e.g. "kernel has no IPIP support (ipip module missing)")."""
        return self._reason

    def ifindex(self) -> int | None:
        return self._ifindex

    def status(self) -> str:
        """"" when the kernel holds the desired state (as far as we know), else what is wrong."""
        if not self._params_known or self._params is None:
            return "; ".join(self._problems.values())
        if self._supported is False:
            return f"IPIP is enabled but unavailable: {self._reason}"
        problems = list(self._problems.values())
        if not problems and self._dirty:
            problems.append(f"{self.name} not programmed yet")
        return "; ".join(problems)

    # -- reconciliation -----------------------------------------------------------------------------
    def apply(self) -> DeviceApplyStats:
        stats = DeviceApplyStats()
        if not self._params_known or not self._dirty:
            return stats
        stats.resynced = True
        problems: dict[str, str] = {}
        try:
            if self._params is None:
                self._disable(stats, problems)
            else:
                self._enable(self._params, stats, problems)
        except NetlinkError as e:
            problems["link"] = f"cannot program {self.name}: {e}"
            stats.errors.append(problems["link"])
        self._problems = problems
        self._dirty = bool(problems)
        if stats.errors:
            log.warning("%s: %d change(s) failed (will retry): %s", self.name, len(stats.errors), stats.errors[0])
        return stats

    def _disable(self, stats: DeviceApplyStats, problems: dict[str, str]) -> None:
        if not self.removals_allowed:
            return
        link = self._nl.link(self.name)
        self._ifindex = link.index if link is not None else None
        if link is None or link.kind != "ipip":
            return
        have = {a.address for a in self._nl.addrs(link.index, AF_INET) if isinstance(a.address, IPv4Interface)}
        sync_tunnel_addr(self._nl, link.index, None, have, stats, problems, self.name)

    def _probe(self) -> bool:
        if self._supported is None:
            self._supported, self._reason = self._nl.ipip_supported()
            if self._reason != self._logged_reason:
                self._logged_reason = self._reason
                if self._supported:
                    log.info("IPIP support: %s", self._reason)
                else:
                    log.warning("IPIP is enabled but cannot be used: %s; %s is not programmed",
                                self._reason, self.name)
        return bool(self._supported)

    def _enable(self, p: IpipParams, stats: DeviceApplyStats, problems: dict[str, str]) -> None:
        nl = self._nl
        if not self._probe():
            return  # nothing harmful to do; status() says why
        link = nl.link(self.name)
        if link is None:
            try:
                nl.add_ipip(self.name, mtu=p.mtu, up=True)
            except NetlinkError as e:
                if e.errno == errno.EOPNOTSUPP:
                    self._supported, self._reason = False, str(e)
                    return
                if e.errno != errno.EEXIST:  # EEXIST: the module's own tunl0 appeared meanwhile
                    raise
            else:
                stats.writes += 1
                stats.recreated = True
                log.info("%s: created (mtu %s)", self.name, p.mtu)
            link = nl.link(self.name)
            if link is None:
                problems["link"] = f"{self.name} does not exist after creating it"
                return
            if self._on_link_change is not None:
                try:
                    self._on_link_change(self.name)
                except Exception:
                    log.exception("%s: link-change callback failed", self.name)
        if link.kind != "ipip":
            problems["link"] = f"{self.name} exists but is a {link.kind or 'plain'} link, not ipip"
            return
        self._ifindex = link.index
        if p.mtu is not None and link.mtu != p.mtu:
            nl.set_link(link.index, mtu=p.mtu)
            stats.writes += 1
            log.info("%s: MTU %d -> %d", self.name, link.mtu, p.mtu)
        if not link.up:
            nl.set_link(link.index, up=True)
            stats.writes += 1
        have = {a.address for a in nl.addrs(link.index, AF_INET) if isinstance(a.address, IPv4Interface)}
        want = IPv4Interface((p.tunnel_addr, 32)) if p.tunnel_addr is not None else None
        sync_tunnel_addr(nl, link.index, want, have, stats, problems, self.name)
