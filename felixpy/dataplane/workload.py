"""Pod wiring, as Calico's CNI plugin does it (calico-compat §4.4/§4.5), over raw netlink.

``setup_workload`` creates the veth in one netlink request from the host side, with the peer born
directly inside the pod netns (named, MAC'd and sized there): no rename or move step. Then:

- host end ``caliXXXXXXXXXXX``: MAC ``ee:ee:ee:ee:ee:ee``, no address, up, sysctls
  ``conf/<if>/{route_localnet,proxy_arp,forwarding}=1``, ``neigh/<if>/proxy_delay=0``,
  ``ipv6/conf/<if>/accept_ra=0`` (warn only);
- pod end (``eth0``): up, each address as ``/32``, ``169.254.1.1 dev eth0 scope link`` and
  ``default via 169.254.1.1 dev eth0`` (proxy ARP on the host end answers for 169.254.1.1),
  ``net.ipv4.ip_forward`` = ``allow_ip_forwarding``.

The host-side ``/32`` route is *not* added here: the agent's route-table driver owns it.

Everything runs in the calling thread (a worker thread of the agent); the thread enters the pod netns
once, briefly, to open a netlink socket there and write the pod sysctl, and always returns.
On any failure the veth is removed again and :class:`WorkloadError` says what went wrong.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from felixpy import names
from felixpy.dataplane.shims import netns as _netns
from felixpy.dataplane.shims.netlink import RT_SCOPE_LINK, Link, Netlink, NetlinkError, Route

log = logging.getLogger(__name__)

_GATEWAY = ipaddress.IPv4Address(names.POD_GATEWAY)
_GATEWAY_NET = ipaddress.IPv4Network(f"{names.POD_GATEWAY}/32")
_DEFAULT_ROUTES = (ipaddress.IPv4Network("0.0.0.0/0"),)
_ipv6_warned = False
# Names that would make the per-interface sysctl paths hit global entries (conf/all, conf/default).
_RESERVED_NAMES = frozenset({".", "..", "all", "default"})


class WorkloadError(Exception):
    """Pod wiring failed (or a CHECK found a mismatch); the message is meant for the CNI caller."""


@dataclass(frozen=True)
class WorkloadSpec:
    netns_path: str
    container_ifname: str
    host_ifname: str
    ipv4: Sequence[ipaddress.IPv4Address]
    mtu: int = 0  # 0: leave the kernel default (and do not check it)
    container_mac: str | None = None  # None: the kernel's random MAC
    allow_ip_forwarding: bool = False
    routes: Sequence[ipaddress.IPv4Network] = field(default=_DEFAULT_ROUTES)  # via 169.254.1.1
    host_netns_path: str | None = None  # None: the calling thread's netns (the agent runs on the host)


@dataclass(frozen=True)
class WorkloadResult:
    host_ifname: str
    container_ifname: str
    host_mac: str
    container_mac: str
    host_ifindex: int
    container_ifindex: int


def _validate_link(spec: WorkloadSpec) -> None:
    for what, name in (("container", spec.container_ifname), ("host", spec.host_ifname)):
        if not name or len(name.encode()) > 15 or "/" in name or " " in name or name in _RESERVED_NAMES:
            raise WorkloadError(f"invalid {what} interface name {name!r} (1-15 bytes, no '/' or spaces)")
    if spec.mtu and not 68 <= spec.mtu <= 65535:
        raise WorkloadError(f"invalid MTU {spec.mtu} (68-65535)")
    if spec.container_mac is not None:
        parts = spec.container_mac.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                      for p in parts):
            raise WorkloadError(f"invalid container MAC address {spec.container_mac!r}")
        if int(parts[0], 16) & 1:
            raise WorkloadError(f"container MAC {spec.container_mac} is a multicast address")


def _validate_ips(spec: WorkloadSpec) -> list[ipaddress.IPv4Address]:
    ips: list[ipaddress.IPv4Address] = []
    for ip in spec.ipv4:
        addr = ip.ip if isinstance(ip, ipaddress.IPv4Interface) else ip
        if not isinstance(addr, ipaddress.IPv4Address):
            raise WorkloadError(f"not an IPv4 address: {ip!r}")
        ips.append(addr)
    if not ips:
        raise WorkloadError("no IPv4 address to configure")
    return ips


def _validate(spec: WorkloadSpec) -> list[ipaddress.IPv4Address]:
    _validate_link(spec)
    return _validate_ips(spec)


def random_mac() -> str:
    """A random unicast, locally administered MAC (what the kernel picks for a veth without one). Choosing
    it up front lets the agent write the WorkloadEndpoint while the veth is still being created."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _open_pod_netns(path: str) -> int:
    try:
        return _netns.open_netns(path)
    except _netns.NetnsError as e:
        raise WorkloadError(str(e)) from None


def configure_host_iface(ifname: str, *, netns: str | None = None) -> None:
    """The host-end sysctls of a workload veth (Calico's set; also re-asserted by the agent).

    Raises ``OSError`` (FileNotFoundError) if the interface does not exist.
    """
    global _ipv6_warned
    if not ifname or "/" in ifname or ifname in _RESERVED_NAMES:
        raise ValueError(f"invalid interface name {ifname!r}")
    with _netns.in_netns(netns):
        try:
            _netns.write_sysctl(f"net/ipv4/conf/{ifname}/route_localnet", 1)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"interface {ifname} does not exist") from None
        _netns.write_sysctl(f"net/ipv4/conf/{ifname}/proxy_arp", 1)
        _netns.write_sysctl(f"net/ipv4/conf/{ifname}/forwarding", 1)
        try:
            # Without it the host answers ARP for 169.254.1.1 only after a random 0-800 ms delay.
            _netns.write_sysctl(f"net/ipv4/neigh/{ifname}/proxy_delay", 0)
        except OSError as e:
            log.warning("cannot set net.ipv4.neigh.%s.proxy_delay=0: %s", ifname, e)
        try:
            _netns.write_sysctl(f"net/ipv6/conf/{ifname}/accept_ra", 0)
        except OSError as e:
            if not _ipv6_warned:
                _ipv6_warned = True
                log.warning("cannot set net.ipv6.conf.%s.accept_ra=0 (IPv6 disabled?): %s", ifname, e)


def setup_workload(spec: WorkloadSpec) -> WorkloadResult:
    """Wire a pod (see the module docstring): :func:`create_veth` then :func:`configure_addresses`.
    Idempotent in effect: a stale host veth of the same name is replaced. Raises WorkloadError, leaving
    nothing behind."""
    ips = _validate(spec)
    res = create_veth(spec)
    try:
        configure_addresses(spec, res, ips)
    except BaseException:
        _remove_after_failure(spec)
        raise
    return res


def create_veth(spec: WorkloadSpec) -> WorkloadResult:
    """First half of :func:`setup_workload`, which needs no address (so it can run while IPAM decides):
    the veth pair (peer born in the pod netns, named, MAC'd and sized there), the host-end sysctls, the pod
    end up and the pod's ``ip_forward``. ``spec.ipv4`` is not used. Raises WorkloadError, leaving nothing
    behind."""
    _validate_link(spec)
    pod_fd = _open_pod_netns(spec.netns_path)
    host: Netlink | None = None
    pod: Netlink | None = None
    created = False
    try:
        try:
            host = Netlink(spec.host_netns_path)
        except OSError as e:
            raise WorkloadError(f"cannot open the host netns {spec.host_netns_path}: {e}") from None
        with _netns.in_netns(pod_fd):
            pod = Netlink()
            try:
                _netns.write_sysctl("net/ipv4/ip_forward", 1 if spec.allow_ip_forwarding else 0)
            except OSError as e:
                raise WorkloadError(f"cannot set net.ipv4.ip_forward in netns {spec.netns_path}: "
                                    f"{e}") from None
        # Create first and look for a stale host link only if the name is taken (the rare case): saves a
        # round trip on every pod.
        for attempt in (1, 2):
            try:
                host.add_veth(spec.host_ifname, spec.container_ifname, peer_netns_fd=pod_fd,
                              mtu=spec.mtu or None, mac=names.HOST_VETH_MAC, peer_mac=spec.container_mac,
                              up=True)
                break
            except NetlinkError as e:
                if e.errno == errno.EEXIST and pod.link(spec.container_ifname) is not None:
                    raise WorkloadError(f"interface {spec.container_ifname} already exists in netns "
                                        f"{spec.netns_path}") from None
                if e.errno == errno.EEXIST and attempt == 1 and host.del_link(spec.host_ifname):
                    log.info("deleted stale host interface %s before wiring %s", spec.host_ifname,
                             spec.netns_path)
                    continue
                raise WorkloadError(f"cannot create veth {spec.host_ifname} <-> {spec.container_ifname}: "
                                    f"{e}") from None
        created = True
        host_link = host.link(spec.host_ifname)
        pod_link = pod.link(spec.container_ifname)
        if host_link is None or pod_link is None:
            raise WorkloadError(f"veth {spec.host_ifname} <-> {spec.container_ifname} vanished right after "
                                "creation")
        try:
            configure_host_iface(spec.host_ifname, netns=spec.host_netns_path)
        except OSError as e:
            raise WorkloadError(f"cannot configure host interface {spec.host_ifname}: {e}") from None
        try:
            pod.set_link(pod_link.index, up=True)
        except NetlinkError as e:
            raise WorkloadError(f"cannot configure {spec.container_ifname} in netns {spec.netns_path}: "
                                f"{e}") from None
        assert pod_link.mac is not None and host_link.mac is not None
        return WorkloadResult(host_ifname=spec.host_ifname, container_ifname=spec.container_ifname,
                              host_mac=host_link.mac, container_mac=pod_link.mac,
                              host_ifindex=host_link.index, container_ifindex=pod_link.index)
    except BaseException:
        if created and host is not None:
            try:
                host.del_link(spec.host_ifname)  # takes the pod end with it
            except OSError as e:
                log.error("cleanup after failed setup of %s: cannot delete %s: %s", spec.netns_path,
                          spec.host_ifname, e)
        raise
    finally:
        for sock in (host, pod):
            if sock is not None:
                sock.close()
        os.close(pod_fd)


def configure_addresses(spec: WorkloadSpec, res: WorkloadResult,
                        ips: Sequence[ipaddress.IPv4Address] | None = None) -> None:
    """Second half of :func:`setup_workload`: each address as /32 on the pod end, the link-scope route to
    169.254.1.1 and the routes via it. Raises WorkloadError; the veth is left for the caller to remove."""
    ips = _validate_ips(spec) if ips is None else ips
    pod_fd = _open_pod_netns(spec.netns_path)
    try:
        with Netlink(pod_fd) as pod:
            idx = res.container_ifindex
            for ip in ips:
                pod.add_addr(idx, ipaddress.IPv4Interface((ip, 32)))
            pod.add_route(Route(_GATEWAY_NET, scope=RT_SCOPE_LINK, oif=idx))
            for net in spec.routes:
                pod.add_route(Route(net, gateway=_GATEWAY, oif=idx))
    except OSError as e:
        raise WorkloadError(f"cannot configure {spec.container_ifname} in netns {spec.netns_path}: "
                            f"{e}") from None
    finally:
        os.close(pod_fd)


def _remove_after_failure(spec: WorkloadSpec) -> None:
    try:
        with Netlink(spec.host_netns_path) as host:
            host.del_link(spec.host_ifname)  # takes the pod end with it
    except OSError as e:
        log.error("cleanup after failed setup of %s: cannot delete %s: %s", spec.netns_path, spec.host_ifname, e)


def teardown_workload(host_ifname: str | None, netns_path: str | None = None, container_ifname: str = "eth0", *,
                      host_netns_path: str | None = None) -> bool:
    """Remove a pod's veth. Idempotent: a missing link or netns is fine. Works from the host name
    alone (containerd's second DEL has no netns). ``host_ifname`` None: only the pod end inside
    ``netns_path`` (the host name may belong to a newer sandbox of the same pod). True if something was
    deleted."""
    if host_ifname is not None:
        try:
            with Netlink(host_netns_path) as host:
                if host.del_link(host_ifname):
                    return True
        except (OSError, ValueError) as e:
            raise WorkloadError(f"cannot delete host interface {host_ifname}: {e}") from None
    if not netns_path:
        return False
    # No host end: if the pod end survived on its own (e.g. the host end was renamed), remove it.
    try:
        pod_fd = _netns.open_netns(netns_path)
    except _netns.NetnsError:
        return False  # netns already gone: so is everything in it
    try:
        with Netlink(pod_fd) as pod:
            return pod.del_link(container_ifname)
    except (OSError, ValueError) as e:
        raise WorkloadError(f"cannot delete {container_ifname} in netns {netns_path}: {e}") from None
    finally:
        os.close(pod_fd)


def check_workload(spec: WorkloadSpec) -> None:
    """CNI CHECK: raise WorkloadError describing the first mismatch with ``spec``."""
    ips = _validate(spec)
    pod_fd = _open_pod_netns(spec.netns_path)
    try:
        with Netlink(spec.host_netns_path) as host, Netlink(pod_fd) as pod:
            host_link = host.link(spec.host_ifname)
            if host_link is None:
                raise WorkloadError(f"host interface {spec.host_ifname} does not exist")
            pod_link = pod.link(spec.container_ifname)
            if pod_link is None:
                raise WorkloadError(f"interface {spec.container_ifname} does not exist in netns "
                                    f"{spec.netns_path}")
            _check_pair(spec, host_link, pod_link)
            have = {a.address for a in pod.addrs(pod_link.index)}
            for ip in ips:
                want = ipaddress.IPv4Interface((ip, 32))
                if want not in have:
                    raise WorkloadError(f"address {want} missing on {spec.container_ifname} in netns "
                                        f"{spec.netns_path}")
            routes = set(pod.routes())
            gw_route = Route(_GATEWAY_NET, scope=RT_SCOPE_LINK, oif=pod_link.index)
            if not any(_same_route(r, gw_route) for r in routes):
                raise WorkloadError(f"route {names.POD_GATEWAY} dev {spec.container_ifname} scope link "
                                    f"missing in netns {spec.netns_path}")
            for net in spec.routes:
                want_r = Route(net, gateway=_GATEWAY, oif=pod_link.index)
                if not any(_same_route(r, want_r) for r in routes):
                    raise WorkloadError(f"route {net} via {names.POD_GATEWAY} dev {spec.container_ifname} "
                                        f"missing in netns {spec.netns_path}")
    except OSError as e:
        raise WorkloadError(f"cannot inspect workload {spec.host_ifname}: {e}") from None
    finally:
        os.close(pod_fd)


def _check_pair(spec: WorkloadSpec, host_link: Link, pod_link: Link) -> None:
    if host_link.kind != "veth":
        raise WorkloadError(f"host interface {spec.host_ifname} is a {host_link.kind or 'non-veth'} device")
    if host_link.link is not None and host_link.link != pod_link.index:
        raise WorkloadError(f"host interface {spec.host_ifname} is not the peer of {spec.container_ifname} "
                            f"in netns {spec.netns_path}")
    if (host_link.mac or "").lower() != names.HOST_VETH_MAC:
        raise WorkloadError(f"host interface {spec.host_ifname} has MAC {host_link.mac}, expected "
                            f"{names.HOST_VETH_MAC}")
    if spec.mtu and pod_link.mtu != spec.mtu:
        raise WorkloadError(f"{spec.container_ifname} has MTU {pod_link.mtu}, expected {spec.mtu}")
    if spec.container_mac and (pod_link.mac or "").lower() != spec.container_mac.lower():
        raise WorkloadError(f"{spec.container_ifname} has MAC {pod_link.mac}, expected {spec.container_mac}")


def _same_route(have: Route, want: Route) -> bool:
    # The protocol differs by creator (boot from us, something else if re-added by hand): ignore it.
    return have._replace(protocol=want.protocol) == want
