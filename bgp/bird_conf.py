"""Render BIRD 2 configuration (pure) from a :class:`~bgp.model.LocalBgpConfig`.

Two shapes:

* :func:`render_route_reflector` - what ``felixpy route-reflector`` runs. ExaBGP cannot reflect routes, so
  reflector nodes run BIRD. It reflects and does nothing else: no kernel export (the agent owns every kernel
  route on felixpy nodes; a reflector installs none), and it exports only routes learned over BGP, never its
  connected or kernel routes (ExaBGP lab pitfall P9: a reflector with ``export all`` announced its own
  subnet and a client's kernel route replace clobbered the connected route). Connected and kernel routes
  are imported into BIRD's table only to resolve the clients' next hops (iBGP next hops are recursive).
* :func:`render_calico_node` - BIRD set up the way Calico's confd sets it up on a normal node (bgp template,
  peers, static blackholes for the node's blocks, ``calico_aggr`` / ``calico_export_to_bgp_peers`` export
  filter, kernel protocol learning and programming through ``calico_kernel_programming``), in BIRD 2 syntax
  (Calico ships a BIRD 1 fork; ``krt_tunnel`` does not exist in stock BIRD, so IPIP pools get plain routes).
  Interop tests use it to stand in for a Calico node next to felixpy nodes.

A peer whose values BIRD would refuse is left out with an error log (one bad peer never breaks the rest);
a keepalive longer than the hold time is lowered to a third of it, as BIRD's default.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence

from bgp.model import BGP_PORT, LocalBgpConfig, PeerSpec
from bgp.routes import ENCAP_NEVER, PoolLike

__all__ = ["MAX_GR_TIME", "render_calico_node", "render_route_reflector"]

log = logging.getLogger(__name__)

MAX_GR_TIME = 4095  # the graceful restart capability carries 12 bits
DEFAULT_INTERFACES = ('-"cali*"', '-"kube-ipvs*"', '"*"')  # confd's protocol direct interface list
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_BAD_IN_STRING = re.compile(r'["\\\n\r\x00]')


def _debug_line(level: str) -> str | None:
    # confd: debug -> "debug all", none -> nothing, anything else (info) -> state changes only.
    if level == "debug":
        return "debug all;"
    if level == "none":
        return None
    return "debug { states };"


def _problem(peer: PeerSpec, cfg: LocalBgpConfig) -> str | None:
    if not _SYMBOL.fullmatch(peer.name):
        return f"name {peer.name!r} is not a BIRD symbol"
    if not 1 <= peer.asn <= 0xFFFFFFFF or not 1 <= peer.local_asn <= 0xFFFFFFFF:
        return f"invalid AS number (peer {peer.asn}, local {peer.local_asn})"
    if not 1 <= peer.port <= 65535:
        return f"invalid port {peer.port}"
    if peer.hold_time != 0 and not 3 <= peer.hold_time <= 65535:
        return f"invalid hold time {peer.hold_time} (0 or 3..65535)"
    if peer.password and _BAD_IN_STRING.search(peer.password):
        return "the password has characters BIRD strings cannot hold"
    if peer.address.is_unspecified or peer.address.is_multicast or peer.address == cfg.local_ip:
        return f"invalid peer address {peer.address}"
    if peer.rr_client and peer.rr_cluster_id:
        try:
            ipaddress.IPv4Address(peer.rr_cluster_id)
        except ValueError:
            return f"route reflector cluster id {peer.rr_cluster_id!r} is not an IPv4 address"
    return None


def _usable(cfg: LocalBgpConfig) -> list[PeerSpec]:
    out: list[PeerSpec] = []
    seen: set[str] = set()
    for peer in sorted(cfg.peers, key=lambda p: p.name):
        problem = _problem(peer, cfg)
        if problem is None and peer.name in seen:
            problem = "another peer has the same name"
        if problem is not None:
            log.error("BGP peer %s (%s) left out of the BIRD config: %s", peer.name, peer.address, problem)
            continue
        seen.add(peer.name)
        out.append(peer)
    return out


def _keepalive(peer: PeerSpec) -> int | None:
    ka = peer.keepalive_time
    if ka is None:
        return None
    if peer.hold_time and ka > peer.hold_time:
        lowered = max(1, peer.hold_time // 3)
        log.warning("BGP peer %s: keepalive %ds is longer than the hold time %ds; using %ds", peer.name, ka,
                    peer.hold_time, lowered)
        return lowered
    return max(1, ka)


def _session_lines(peer: PeerSpec, cfg: LocalBgpConfig) -> list[str]:
    """The protocol-level options shared by both shapes (one line each, without indentation)."""
    lines = [f'description "felixpy {peer.kind or "peer"} {peer.name}";']
    # BIRD 2's "local <address> port <n> as <asn>": source address, listening port (BIRD 1's "listen bgp").
    port = f" port {cfg.listen_port}" if cfg.listen_port != BGP_PORT else ""
    lines.append(f"local {peer.source_address or cfg.local_ip}{port} as {peer.local_asn};")
    nport = f" port {peer.port}" if peer.port != BGP_PORT else ""
    lines.append(f"neighbor {peer.address}{nport} as {peer.asn};")
    if peer.ttl_security:
        lines += ["ttl security on;", f"multihop {peer.ttl_security};"]
    else:
        lines += ["ttl security off;", "multihop;"]
    if peer.passive:
        lines.append("passive on;")
    lines.append(f"graceful restart time {min(peer.graceful_restart_time, MAX_GR_TIME)};")
    lines.append(f"hold time {peer.hold_time};")
    ka = _keepalive(peer)
    if ka is not None:
        lines.append(f"keepalive time {ka};")
    if peer.rr_client and peer.rr_cluster_id:
        lines += ["rr client;", f"rr cluster id {peer.rr_cluster_id};"]
    if peer.password:
        lines.append(f'password "{peer.password}";')
    if peer.num_allow_local_as:
        lines.append(f"allow local as {peer.num_allow_local_as};")
    return lines


def _channel_next_hop(peer: PeerSpec) -> list[str]:
    out = []
    if peer.next_hop_keep:
        out.append("next hop keep;")
    if peer.next_hop_self:
        out.append("next hop self;")
    return out


def _head(cfg: LocalBgpConfig, role: str) -> list[str]:
    return [
        f"# BIRD 2 configuration generated by felixpy ({role}) for node {re.sub(r'[^A-Za-z0-9_.-]', '_', cfg.node)}.",
        "# Do not edit: it is rewritten whenever the datastore changes.",
        "log stderr all;",
        f"router id {cfg.router_id};",
        "",
    ]


def render_route_reflector(cfg: LocalBgpConfig, *, interfaces: Sequence[str] = DEFAULT_INTERFACES,
                           connect_retry: int = 5, error_wait: tuple[int, int] = (5, 30),
                           gr_wait: int | None = 60) -> str:
    """A reflector: one ``protocol bgp`` per peer (RR client + cluster id from the PeerSpec), graceful
    restart, passive/connect, hold/keepalive; import all, export only BGP-learned routes; no kernel export.

    ``gr_wait`` bounds graceful-restart recovery after ``bird -R`` (BIRD's default is 240 s): while it
    lasts, BIRD defers route selection until every peer has sent End-of-RIB, so one node that is gone but
    still in the datastore would otherwise hold back reflection for four minutes. None = BIRD's default."""
    dbg = _debug_line(cfg.log_level)
    out = _head(cfg, "route reflector")
    if gr_wait is not None:
        out += [f"graceful restart wait {gr_wait};", ""]
    out += [
        "protocol device {",
        "  scan time 2;",
        "}",
        "",
        "# Connected and kernel routes only resolve iBGP next hops; they are never exported (see below)",
        "# and nothing is written to the kernel.",
        "protocol direct {",
        "  ipv4;",
        f"  interface {', '.join(interfaces)};",
        "}",
        "",
        "protocol kernel {",
        "  ipv4 { import all; export none; };",
        "  learn;",
        "  scan time 10;",
        "}",
        "",
    ]
    peers = _usable(cfg)
    if not peers:
        out.append("# No BGP peers configured for this node.")
    for peer in peers:
        lines = _session_lines(peer, cfg)
        lines.insert(1, "graceful restart on;")
        if cfg.listen_address is not None:
            lines.append("strict bind on;")
        if dbg:
            lines.append(dbg)
        lines += [
            "connect delay time 2;",
            f"connect retry time {connect_retry};",
            f"error wait time {error_wait[0]}, {error_wait[1]};",
            "ipv4 {",
            "  import all;",
            "  export where source = RTS_BGP;  # reflect BGP routes only, never direct/kernel ones",
            *(f"  {x}" for x in _channel_next_hop(peer)),
            "};",
        ]
        out.append(f"protocol bgp {peer.name} {{")
        out += [f"  {x}" for x in lines]
        out += ["}", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def render_calico_node(
    cfg: LocalBgpConfig,
    *,
    local_blocks: Iterable[ipaddress.IPv4Network] = (),
    pools: Sequence[PoolLike] = (),
    reject_cidrs: Iterable[ipaddress.IPv4Network] = (),
    static_routes: Iterable[ipaddress.IPv4Network] = (),
    kernel_table: int = 254,
    interfaces: Sequence[str] = DEFAULT_INTERFACES,
) -> str:
    """BIRD as Calico configures it on a normal node (see the module docstring).

    ``local_blocks`` are the node's confirmed affine blocks (static blackholes + ``calico_aggr``),
    ``static_routes`` the service ranges it advertises (static blackholes, exported), ``reject_cidrs`` what
    is never programmed into the kernel, ``kernel_table`` where learned routes are installed (254 = main).
    """
    blocks = sorted({b for b in local_blocks if b.version == 4}, key=lambda n: (int(n.network_address), n.prefixlen))
    statics = sorted({s for s in static_routes if s.version == 4}, key=lambda n: (int(n.network_address), n.prefixlen))
    rejects = sorted({r for r in reject_cidrs if r.version == 4}, key=lambda n: (int(n.network_address), n.prefixlen))
    v4_pools = sorted((p for p in pools if isinstance(p.cidr, ipaddress.IPv4Network)), key=lambda p: str(p.cidr))
    dbg = _debug_line(cfg.log_level)
    out = _head(cfg, "Calico-style node")

    out.append("# Aggregation of routes on this host; export the block, nothing beneath it.")
    out.append("function calico_aggr() {")
    for b in blocks:
        out += [f"  if ( net = {b} ) then {{ accept; }}", f"  if ( net ~ {b} ) then {{ reject; }}"]
    out += ["}", ""]

    out.append("function calico_export_to_bgp_peers(bool internal_peer) {")
    for p in v4_pools:
        if p.disable_bgp_export:
            out.append(f"  if ( net ~ {p.cidr} ) then {{ reject; }}  # BGP export is disabled.")
    out += [
        "  if (internal_peer) then {",
        "    if (defined(ifname)) then {",
        '      if ((ifname ~ "*.cali") || (ifname ~ "*.calico")) then { reject; }  # Felix tunnel routes',
        "    }",
        "  }",
        "  calico_aggr();",
    ]
    for s in statics:
        out.append(f"  if ( net ~ {s} ) then {{ accept; }}")
    for p in v4_pools:
        if not p.disable_bgp_export:
            out.append(f"  if ( net ~ {p.cidr} ) then {{ accept; }}")
    out += ["}", ""]

    out.append("filter calico_kernel_programming {")
    # BIRD 2's direct protocol feeds connected routes into the table; BIRD 1 (Calico's) never re-exports them.
    out.append("  if ( source = RTS_DEVICE ) then { reject; }")
    for r in rejects:
        out.append(f"  if ( net ~ {r} ) then {{ reject; }}")
    for p in v4_pools:
        if p.vxlan_mode != ENCAP_NEVER:
            out.append(f"  if ( net ~ {p.cidr} ) then {{ reject; }}  # VXLAN routes are handled by Felix.")
        else:
            out.append(f"  if ( net ~ {p.cidr} ) then {{ accept; }}")
    out += ["  accept;", "}", ""]

    out += [
        "protocol kernel {",
        "  learn;             # learn alien routes from the kernel",
        "  persist;           # leave routes in place when BIRD exits",
        "  scan time 2;",
        "  graceful restart;",
        "  merge paths on;",
        f"  kernel table {kernel_table};",
        "  ipv4 { import all; export filter calico_kernel_programming; };",
        "}",
        "",
        "protocol device {",
    ]
    if dbg:
        out.append(f"  {dbg}")
    out += [
        "  scan time 2;",
        "}",
        "",
        "protocol direct {",
        "  ipv4;",
        f"  interface {', '.join(interfaces)};",
        "}",
        "",
    ]
    if blocks or statics:
        out += ["protocol static {", "  ipv4;"]
        out += [f"  route {b} blackhole;" for b in blocks if b.prefixlen < 32]
        out += [f"  route {s} blackhole;" for s in statics]
        out += ["}", ""]
    else:
        out += ["# No IP blocks or static routes for this host.", ""]

    out += ["template bgp bgp_template {"]
    if dbg:
        out.append(f"  {dbg}")
    out += [
        '  description "Connection to BGP peer";',
        f"  local as {cfg.asn};",
        "  graceful restart;",
        "  connect delay time 2;",
        "  connect retry time 5;",
        "  error wait time 5, 30;",
        "  ipv4 { gateway recursive; add paths on; };",
        "}",
        "",
    ]
    peers = _usable(cfg)
    if not peers:
        out.append("# No BGP peers configured for this node.")
    for peer in peers:
        internal = "true" if peer.asn == peer.local_asn else "false"
        lines = _session_lines(peer, cfg)
        lines += [
            "ipv4 {",
            "  import all;",
            f"  export filter {{ calico_export_to_bgp_peers({internal}); reject; }};",
            *(f"  {x}" for x in _channel_next_hop(peer)),
            "};",
        ]
        out.append(f"protocol bgp {peer.name} from bgp_template {{")
        out += [f"  {x}" for x in lines]
        out += ["}", ""]
    return "\n".join(out).rstrip("\n") + "\n"
