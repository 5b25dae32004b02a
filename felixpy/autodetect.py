"""Node address and MTU autodetection, as calico-node does it (``IP_AUTODETECTION_METHOD``; Felix's
host-MTU detection).

Methods (``parse_method`` is pure; anything else raises :class:`AutodetectError`, which must stop
startup like calico-node's "Invalid IP autodetection method")::

    first-found (or "")             first global address on an interface not in DEFAULT_SKIP_INTERFACES
    interface=<regex,...>           ... on an interface matching one of the regexes
    skip-interface=<regex,...>      ... on an interface matching neither the defaults nor the regexes
    can-reach=<ip or hostname>      the source address of a UDP "connect" to it (no packet is sent)
    cidr=<cidr,...>                 first global address (any interface) inside one of the CIDRs
    kubernetes-internal-ip          the Node's InternalIP, with the prefix length of the host address

Like Calico, interfaces are searched from the highest ifindex down; a regex matches anywhere in the
name (use ``^``/``$`` to anchor); "global" means not loopback, link-local, multicast, unspecified or
broadcast (private ranges count). The result keeps the host's prefix length (``10.0.0.5/24``).

Everything reads the kernel through the :class:`Netlink` passed in, so it works on any netns.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Network

from felixpy.dataplane.shims import netns as _netns
from felixpy.dataplane.shims.netlink import AF_INET, Netlink

log = logging.getLogger(__name__)

FIRST_FOUND = "first-found"
INTERFACE = "interface"
SKIP_INTERFACE = "skip-interface"
CAN_REACH = "can-reach"
CIDR = "cidr"
K8S_INTERNAL_IP = "kubernetes-internal-ip"

# calico-node's interfaces never used by first-found / skip-interface (autodetection_linux.go).
DEFAULT_SKIP_INTERFACES: tuple[str, ...] = (
    r"^docker.*", r"^cbr.*", r"^dummy.*", r"^podman.*", r"^virbr.*", r"^lxcbr.*", r"^veth.*", r"^lo",
    r"^br-.*", r"^cali.*", r"^tunl.*", r"^flannel.*", r"^kube-ipvs.*", r"^cni.*", r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*", r"^wireguard\.cali.*", r"^wg-v6\.cali.*", r"^nodelocaldns.*",
)

# Felix's MTUIfacePattern default and fallback (int_dataplane.go findHostMTU).
MTU_IFACE_PATTERN = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
DEFAULT_HOST_MTU = 1460
VXLAN_OVERHEAD = 50
IPIP_OVERHEAD = 20

_REACH_PORT = 80  # any port: a UDP connect only picks a route and source address
_LIST_SPLIT = re.compile(r"\s*,\s*")


class AutodetectError(Exception):
    """An invalid method, or no address found by a valid one."""


@dataclass(frozen=True, slots=True)
class Method:
    """A parsed IP_AUTODETECTION_METHOD."""

    kind: str  # one of FIRST_FOUND, INTERFACE, SKIP_INTERFACE, CAN_REACH, CIDR, K8S_INTERNAL_IP
    interfaces: tuple[str, ...] = ()  # regexes (interface= / skip-interface=)
    cidrs: tuple[IPv4Network | IPv6Network, ...] = ()
    destination: str = ""  # can-reach=

    def __str__(self) -> str:
        if self.kind in (INTERFACE, SKIP_INTERFACE):
            return f"{self.kind}={','.join(self.interfaces)}"
        if self.kind == CIDR:
            return f"{self.kind}={','.join(map(str, self.cidrs))}"
        if self.kind == CAN_REACH:
            return f"{self.kind}={self.destination}"
        return self.kind


def _split(value: str) -> list[str]:
    return [v for v in _LIST_SPLIT.split(value.strip()) if v]


def parse_method(text: str) -> Method:
    """Parse an IP_AUTODETECTION_METHOD value; AutodetectError if it is not a valid one."""
    if not isinstance(text, str):
        raise AutodetectError(f"invalid IP autodetection method {text!r}: expected a string")
    t = text.strip()
    if t in ("", FIRST_FOUND):
        return Method(FIRST_FOUND)
    if t == K8S_INTERNAL_IP:
        return Method(K8S_INTERNAL_IP)
    kind, sep, value = t.partition("=")
    kind = kind.strip()
    if not sep or kind not in (INTERFACE, SKIP_INTERFACE, CAN_REACH, CIDR):
        raise AutodetectError(
            f"invalid IP autodetection method {text!r}: expected first-found, interface=<regex,...>, "
            "skip-interface=<regex,...>, can-reach=<ip or hostname>, cidr=<cidr,...> or kubernetes-internal-ip")
    if kind in (INTERFACE, SKIP_INTERFACE):
        regexes = _split(value)
        if not regexes:
            raise AutodetectError(f"invalid IP autodetection method {text!r}: {kind}= needs at least one regex")
        for rx in regexes:
            try:
                re.compile(rx)
            except re.error as e:
                raise AutodetectError(f"invalid IP autodetection method {text!r}: bad regex {rx!r}: {e}") from None
        return Method(kind, interfaces=tuple(regexes))
    if kind == CIDR:
        items = _split(value)
        if not items:
            raise AutodetectError(f"invalid IP autodetection method {text!r}: cidr= needs at least one CIDR")
        cidrs: list[IPv4Network | IPv6Network] = []
        for item in items:
            try:
                cidrs.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise AutodetectError(f"invalid IP autodetection method {text!r}: {item!r} is not a CIDR") from None
        return Method(CIDR, cidrs=tuple(cidrs))
    dest = value.strip()
    if not dest or any(c.isspace() for c in dest):
        raise AutodetectError(f"invalid IP autodetection method {text!r}: can-reach= needs an IP or hostname")
    return Method(CAN_REACH, destination=dest.strip("[]"))


def is_global_unicast(ip: IPv4Address) -> bool:
    """Go's ``IP.IsGlobalUnicast`` for IPv4: private ranges count, special-purpose ones do not."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip == IPv4Address("255.255.255.255"))


def host_interfaces(nl: Netlink) -> list[tuple[str, list[IPv4Interface]]]:
    """(name, IPv4 addresses) of every link, highest ifindex first (calico-node's search order);
    each link's addresses in kernel order."""
    by_index: dict[int, list[IPv4Interface]] = {}
    for a in nl.addrs(family=AF_INET):
        if isinstance(a.address, IPv4Interface):
            by_index.setdefault(a.index, []).append(a.address)
    links = sorted(nl.links(), key=lambda ln: ln.index, reverse=True)
    return [(ln.name, by_index.get(ln.index, [])) for ln in links]


def _matches(name: str, regexes: Sequence[str]) -> bool:
    return any(re.search(rx, name) for rx in regexes)


def _filtered_first(ifaces: list[tuple[str, list[IPv4Interface]]], *, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), cidrs: Sequence[IPv4Network | IPv6Network] = (),
                    method: Method) -> IPv4Interface:
    chosen = [(n, addrs) for n, addrs in ifaces
              if (not include or _matches(n, include)) and not (exclude and _matches(n, exclude))]
    if not chosen:
        raise AutodetectError(f"IP autodetection ({method}): no valid host interfaces found "
                              f"(interfaces: {', '.join(n for n, _ in ifaces) or 'none'})")
    for name, addrs in chosen:
        for a in addrs:
            if is_global_unicast(a.ip) and (not cidrs or any(a.ip in c for c in cidrs if c.version == 4)):
                log.info("IP autodetection (%s): using %s on interface %s", method, a, name)
                return a
    seen = "; ".join(f"{n}: {', '.join(map(str, a)) or 'no IPv4 address'}" for n, a in chosen)
    raise AutodetectError(f"IP autodetection ({method}): no valid IPv4 addresses found on the host "
                          f"interfaces ({seen})")


def _local_cidr(ifaces: list[tuple[str, list[IPv4Interface]]], ip: IPv4Address) -> IPv4Interface | None:
    for _name, addrs in ifaces:
        for a in addrs:
            if a.ip == ip:
                return a
    return None


def _reach(dest: str, nl: Netlink) -> IPv4Address:
    try:
        infos = socket.getaddrinfo(dest, _REACH_PORT, socket.AF_INET, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise AutodetectError(f"IP autodetection (can-reach={dest}): cannot resolve {dest!r}: {e}") from None
    if not infos:
        raise AutodetectError(f"IP autodetection (can-reach={dest}): {dest!r} has no IPv4 address")
    target = infos[0][4]
    # The socket belongs to the netns it is created in; connect() only does the route lookup.
    with _netns.in_netns(nl.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(target)
        src = IPv4Address(sock.getsockname()[0])
    except OSError as e:
        raise AutodetectError(f"IP autodetection (can-reach={dest}): cannot reach {target[0]}: "
                              f"{e.strerror or e}") from None
    finally:
        sock.close()
    return src


def detect_ipv4(method: str | Method, nl: Netlink, k8s_internal_ips: Sequence[str] = ()) -> IPv4Interface:
    """The node's IPv4 address with its host prefix length, found by ``method`` in ``nl``'s netns.

    ``k8s_internal_ips``: the Node's ``status.addresses`` of type InternalIP (for
    kubernetes-internal-ip). Raises AutodetectError with the reason.
    """
    m = method if isinstance(method, Method) else parse_method(method)
    ifaces = host_interfaces(nl)
    if m.kind == FIRST_FOUND:
        return _filtered_first(ifaces, exclude=DEFAULT_SKIP_INTERFACES, method=m)
    if m.kind == INTERFACE:
        return _filtered_first(ifaces, include=m.interfaces, method=m)
    if m.kind == SKIP_INTERFACE:
        return _filtered_first(ifaces, exclude=(*DEFAULT_SKIP_INTERFACES, *m.interfaces), method=m)
    if m.kind == CIDR:
        return _filtered_first(ifaces, cidrs=m.cidrs, method=m)
    if m.kind == CAN_REACH:
        src = _reach(m.destination, nl)
        found = _local_cidr(ifaces, src)
        if found is None:
            raise AutodetectError(f"IP autodetection ({m}): the source address {src} does not match any "
                                  "address on the host interfaces")
        log.info("IP autodetection (%s): using %s", m, found)
        return found
    if m.kind == K8S_INTERNAL_IP:
        return _from_internal_ips(k8s_internal_ips, ifaces, m)
    raise AutodetectError(f"invalid IP autodetection method {m}")


def _from_internal_ips(internal_ips: Sequence[str], ifaces: list[tuple[str, list[IPv4Interface]]],
                       m: Method) -> IPv4Interface:
    for text in internal_ips:
        text = text.strip()
        if "/" in text:
            # Already a CIDR: taken as it is, like calico-node.
            try:
                return IPv4Interface(text)
            except ValueError:
                continue
        try:
            ip = IPv4Address(text)
        except ValueError:
            continue  # an IPv6 (or garbage) InternalIP
        found = _local_cidr(ifaces, ip)
        if found is None:
            raise AutodetectError(f"IP autodetection ({m}): the Node's InternalIP {ip} is not on any host interface")
        log.info("IP autodetection (%s): using %s", m, found)
        return found
    raise AutodetectError(f"IP autodetection ({m}): the Node has no IPv4 InternalIP "
                          f"(addresses: {', '.join(internal_ips) or 'none'})")


def parse_ip_setting(value: str, nl: Netlink) -> IPv4Interface:
    """calico-node's ``IP`` when it is an address: a CIDR is taken as it is; a bare IP gets the prefix
    length of the host address that equals it (a /32 with a warning if no interface has it).
    "autodetect" and "none" are the caller's business and rejected here."""
    text = value.strip() if isinstance(value, str) else ""
    try:
        if "/" in text:
            return IPv4Interface(text)
        ip = IPv4Address(text)
    except ValueError:
        raise AutodetectError(f"invalid IP setting {value!r}: expected an IPv4 address or CIDR, "
                              "'autodetect' or 'none'") from None
    found = _local_cidr(host_interfaces(nl), ip)
    if found is None:
        log.warning("IP %s is not on any host interface; using %s/32", ip, ip)
        return IPv4Interface((ip, 32))
    return found


# -- MTU ---------------------------------------------------------------------------------------------
def detect_host_mtu(nl: Netlink, pattern: str | re.Pattern[str] = MTU_IFACE_PATTERN) -> int:
    """The smallest MTU among oper-up links whose name matches ``pattern`` (Felix's MTUIfacePattern),
    or DEFAULT_HOST_MTU (1460) if none does."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    mtus = [ln.mtu for ln in nl.links() if ln.oper_up and rx.match(ln.name)]
    return min(mtus) if mtus else DEFAULT_HOST_MTU


def pod_mtu(host_mtu: int, *, vxlan: bool, ipip: bool) -> int:
    """The pod MTU: the smallest over the enabled encapsulations (VXLAN -50, IPIP -20), else the
    host MTU."""
    candidates = [host_mtu]
    if vxlan:
        candidates.append(host_mtu - VXLAN_OVERHEAD)
    if ipip:
        candidates.append(host_mtu - IPIP_OVERHEAD)
    return min(candidates)
