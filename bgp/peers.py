"""Calico's BGP peering rules (pure): Nodes, BGPConfigurations and BGPPeers -> one node's sessions.

This is what confd computes before rendering ``bird.cfg`` (``confd/pkg/backends/calico/client.go
updatePeersV1`` and ``bgp_processor.go``), reduced to IPv4 and to values instead of BIRD text:

* **AS**: the Node's ``spec.bgp.asNumber``, else the ``default`` BGPConfiguration's ``asNumber``, else 64512.
* **Full mesh** (``nodeToNodeMeshEnabled`` unset or true), skipped on route reflectors: one ``Mesh_<ip>``
  session per other node that has an IPv4 address and no ``routeReflectorClusterID``. The side whose
  address is the greater *string* is passive, so exactly one side connects.
* **BGPPeer** resources, in Calico's three passes: global rules (no ``node``/``nodeSelector``) first, then
  node-scoped ones (a node-scoped peering is dropped when a global one to the same ip/port exists), then
  automatic reverse peerings (unless ``reversePeering: Manual``): the nodes a rule points at (its
  ``peerSelector``, or the Calico nodes owning ``peerIP`` with that AS) peer back with the rule's local
  nodes. The first peering emitted for a key wins, so an explicit one is never replaced by a reverse one.
  Names are ``Global_<ip>`` / ``Node_<ip>`` plus ``_port_<n>`` when a port is known.
* **Route reflection**: when this node has a cluster ID and the peer is iBGP with a different (or no)
  cluster ID, the peer is an RR client with this node's cluster ID.
* Passive for a global ``peerIP`` peering to another Calico node on the same string rule as the mesh.
* Graceful restart time: ``maxRestartTime`` per rule, ``nodeMeshMaxRestartTime`` for the mesh, else 120 s.

Deliberate differences (each noted where it happens): rules are processed in name order (Calico iterates
a Go map, so its choice between two conflicting rules is random); a mesh peer without its own AS uses the
global AS (confd at HEAD uses this node's AS, the older templates and the docs say global); a ``peerIP``
rule without ``asNumber`` is rejected as malformed (confd would render ``as 0``, which BIRD refuses);
``localWorkloadSelector`` peerings and IPv6 peerings are not computed (IPv4-only agent).

Every ``parse_*`` raises :class:`ValueError` with a clear message for a malformed resource; callers log
it and treat the resource as absent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bgp.model import BGP_PORT, DEFAULT_ASN, DEFAULT_GR_TIME, DEFAULT_HOLD_TIME, BgpNode, LocalBgpConfig, PeerSpec
from felixpy.datastore.api import KIND_BGP_CONFIG, KIND_BGP_PEER, KIND_NODE, Resource
from felixpy.model.resources import InvalidResource, parse_asn
from felixpy.model.selector import SelectorError, parse_selector

__all__ = [
    "GLOBAL_CONFIG_NAME",
    "NODE_CONFIG_PREFIX",
    "BgpGlobal",
    "BgpNode",
    "BgpPeerRule",
    "SecretRef",
    "compute_local_config",
    "parse_bgp_configuration",
    "parse_bgp_node",
    "parse_bgp_peer",
    "parse_duration",
    "router_id",
]

log = logging.getLogger(__name__)

GLOBAL_CONFIG_NAME = "default"
NODE_CONFIG_PREFIX = "node."

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SecretRef:
    """A ``secretKeyRef`` (Secret in calico-node's namespace); resolved by the caller, never here."""

    name: str
    key: str


SecretLookup = Callable[[SecretRef], "str | None"]


@dataclass(frozen=True)
class BgpGlobal:
    """One BGPConfiguration. ``default`` holds the cluster-wide values; ``node.<name>`` overrides, as in
    confd, only ``listenPort`` and ``logSeverityScreen`` (and prefix advertisements) for that node."""

    name: str = GLOBAL_CONFIG_NAME
    asn: int | None = None
    node_to_node_mesh: bool = True  # unset = enabled
    node_mesh_max_restart_time: int | None = None  # seconds
    node_mesh_password: SecretRef | None = None
    listen_port: int | None = None
    log_severity: str = ""  # "" (unset) | debug | info | none  (confd keeps debug/info, anything else = none)
    bind_mode: str = "None"  # None | NodeIP
    service_cluster_ips: tuple[IPNet, ...] = ()
    service_external_ips: tuple[IPNet, ...] = ()
    service_load_balancer_ips: tuple[IPNet, ...] = ()
    service_lb_aggregation: bool = True  # serviceLoadBalancerAggregation: Enabled (default) | Disabled
    ignored_interfaces: tuple[str, ...] = ()

    @property
    def node(self) -> str:
        """The node a ``node.<name>`` configuration applies to; "" for the global one."""
        return self.name[len(NODE_CONFIG_PREFIX):] if self.name.startswith(NODE_CONFIG_PREFIX) else ""


@dataclass(frozen=True)
class BgpPeerRule:
    """One BGPPeer resource, validated (spec field names in the comments)."""

    name: str
    node: str = ""  # node
    node_selector: str = ""  # nodeSelector
    peer_ip: IPAddr | None = None  # peerIP (its address part)
    peer_port: int = 0  # peerIP's ":port" part; 0 = not given
    asn: int | None = None  # asNumber
    peer_selector: str = ""  # peerSelector
    local_asn: int | None = None  # localASNumber
    source_address: str = "UseNodeIP"  # sourceAddress: UseNodeIP | None
    ttl_security: int = 0  # ttlSecurity
    max_restart_time: int | None = None  # maxRestartTime, seconds
    keepalive_time: int | None = None  # keepaliveTime, seconds
    keep_original_next_hop: bool = False  # keepOriginalNextHop
    next_hop_mode: str = ""  # nextHopMode: Auto | Self | Keep
    num_allowed_local_as: int = 0  # numAllowedLocalASNumbers
    password: SecretRef | None = None  # password.secretKeyRef
    reverse_peering: str = "Auto"  # reversePeering: Auto | Manual
    local_workload_selector: str = ""  # localWorkloadSelector (not computed here)
    reachable_by: IPAddr | None = None  # reachableBy (not computed here)
    filters: tuple[str, ...] = ()  # filters (BGPFilter names; not computed here)

    @property
    def is_global(self) -> bool:
        return not self.node and not self.node_selector


# ------------------------------------------------------------------------------------------- helpers

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """A Kubernetes ``metav1.Duration`` (Go ``time.Duration`` text such as ``"2m30s"``) in seconds.

    A bare number is taken as seconds (the API server would refuse it, but other backends store it)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"invalid duration {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"invalid duration {value!r} (expected e.g. 120s, 2m, 1h30m)")
        total += float(m.group(1)) * _DURATION_UNIT[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("empty duration")
    return total


def _seconds(value: Any, what: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        secs = parse_duration(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return math.floor(secs + 0.5)  # Go's math.Round: halves away from zero (all values are >= 0)


def _asn(value: Any, what: str) -> int | None:
    if value in (None, "", 0):
        return None
    try:
        return parse_asn(value)
    except InvalidResource as e:
        raise ValueError(f"{what}: {e}") from None


def _name(res: Resource, kind: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(res, dict):
        raise ValueError(f"{kind}: resource is not an object")
    got = res.get("kind")
    if got not in (None, "", kind):
        raise ValueError(f"resource is a {got}, not a {kind}")
    md = res.get("metadata") or {}
    if not isinstance(md, dict):
        raise ValueError(f"{kind}: metadata is not an object")
    name = md.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind}: metadata.name is missing")
    spec = res.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"{kind} {name}: spec is not an object")
    return name, spec


def _str(spec: Mapping[str, Any], field: str, where: str) -> str:
    v = spec.get(field)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{where}: {field} must be a string, got {v!r}")
    return v.strip()


def _selector(text: str, field: str, where: str) -> str:
    if text:
        try:
            parse_selector(text)
        except SelectorError as e:
            raise ValueError(f"{where}: invalid {field} {text!r}: {e}") from None
    return text


def _secret_ref(value: Any, field: str, where: str) -> SecretRef | None:
    if value in (None, {}):
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {field} must be an object")
    ref = value.get("secretKeyRef")
    if ref is None:
        return None
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not isinstance(ref.get("key"), str):
        raise ValueError(f"{where}: {field}.secretKeyRef needs string name and key")
    return SecretRef(ref["name"], ref["key"])


def _cidrs(value: Any, field: str, where: str) -> tuple[IPNet, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{where}: {field} must be a list of {{cidr: ...}}")
    out: list[IPNet] = []
    for item in value:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {field} entries must be objects with a cidr")
        cidr = item.get("cidr")
        if cidr in (None, ""):
            continue  # the CRD allows an empty entry; confd skips it
        try:
            out.append(ipaddress.ip_network(str(cidr), strict=False))
        except ValueError as e:
            raise ValueError(f"{where}: invalid {field} cidr {cidr!r}: {e}") from None
    return tuple(out)


def _int(spec: Mapping[str, Any], field: str, where: str, lo: int, hi: int) -> int:
    v = spec.get(field)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where}: {field} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _enum(spec: Mapping[str, Any], field: str, where: str, allowed: tuple[str, ...], default: str) -> str:
    v = spec.get(field)
    if v in (None, ""):
        return default
    if v not in allowed:
        raise ValueError(f"{where}: {field} must be one of {', '.join(allowed)}, got {v!r}")
    return str(v)


def _dotted(ip: ipaddress.IPv4Address | str) -> str:
    return str(ip).replace(".", "_")


# ------------------------------------------------------------------------------------------- parsing


def parse_bgp_node(res: Resource) -> BgpNode:
    """A Calico v3 Node's BGP view: ``spec.bgp.{ipv4Address, asNumber, routeReflectorClusterID}`` and labels."""
    name, spec = _name(res, KIND_NODE)
    where = f"Node {name}"
    bgp = spec.get("bgp") or {}
    if not isinstance(bgp, dict):
        raise ValueError(f"{where}: spec.bgp is not an object")
    ipv4: ipaddress.IPv4Interface | None = None
    raw_ip = bgp.get("ipv4Address")
    if raw_ip not in (None, ""):
        try:
            ipv4 = ipaddress.IPv4Interface(str(raw_ip).strip())
        except ValueError as e:
            raise ValueError(f"{where}: invalid spec.bgp.ipv4Address {raw_ip!r}: {e}") from None
    cluster_id = _str(bgp, "routeReflectorClusterID", where)
    if cluster_id:
        try:
            ipaddress.IPv4Address(cluster_id)
        except ValueError:
            raise ValueError(f"{where}: spec.bgp.routeReflectorClusterID must be an IPv4 address, "
                             f"got {cluster_id!r}") from None
    md = res.get("metadata") or {}
    labels = md.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{where}: metadata.labels is not an object")
    return BgpNode(name=name, ipv4=ipv4, asn=_asn(bgp.get("asNumber"), f"{where}: spec.bgp.asNumber"),
                   rr_cluster_id=cluster_id,
                   labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())))


def parse_bgp_configuration(res: Resource) -> BgpGlobal:
    """A BGPConfiguration named ``default`` (global) or ``node.<nodename>`` (per node)."""
    name, spec = _name(res, KIND_BGP_CONFIG)
    where = f"BGPConfiguration {name}"
    if name != GLOBAL_CONFIG_NAME and not (name.startswith(NODE_CONFIG_PREFIX) and len(name) > len(NODE_CONFIG_PREFIX)):
        # confd logs "Bad value for BGPConfiguration resource name" and ignores it.
        raise ValueError(f"{where}: the name must be 'default' or 'node.<nodename>'")
    mesh = spec.get("nodeToNodeMeshEnabled")
    if mesh is not None and not isinstance(mesh, bool):
        raise ValueError(f"{where}: nodeToNodeMeshEnabled must be a boolean, got {mesh!r}")
    port = _int(spec, "listenPort", where, 1, 65535) or None
    sev = _str(spec, "logSeverityScreen", where).lower()
    if sev and sev not in ("debug", "info"):
        sev = "none"  # BIRD's granularity: confd maps everything but debug/info to none
    ignored = spec.get("ignoredInterfaces") or []
    if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
        raise ValueError(f"{where}: ignoredInterfaces must be a list of strings")
    return BgpGlobal(
        name=name,
        asn=_asn(spec.get("asNumber"), f"{where}: asNumber"),
        node_to_node_mesh=True if mesh is None else mesh,
        node_mesh_max_restart_time=_seconds(spec.get("nodeMeshMaxRestartTime"), f"{where}: nodeMeshMaxRestartTime"),
        node_mesh_password=_secret_ref(spec.get("nodeMeshPassword"), "nodeMeshPassword", where),
        listen_port=port,
        log_severity=sev,
        bind_mode=_enum(spec, "bindMode", where, ("None", "NodeIP"), "None"),
        service_cluster_ips=_cidrs(spec.get("serviceClusterIPs"), "serviceClusterIPs", where),
        service_external_ips=_cidrs(spec.get("serviceExternalIPs"), "serviceExternalIPs", where),
        service_load_balancer_ips=_cidrs(spec.get("serviceLoadBalancerIPs"), "serviceLoadBalancerIPs", where),
        service_lb_aggregation=_enum(spec, "serviceLoadBalancerAggregation", where, ("Enabled", "Disabled"),
                                     "Enabled") == "Enabled",
        ignored_interfaces=tuple(ignored),
    )


def _split_ip_port(text: str, where: str) -> tuple[IPAddr, int]:
    """``ip``, ``ip:port`` or ``[v6]:port`` (Go's net.SplitHostPort, then a plain IP)."""
    host, port = text, 0
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if m:
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if port > 65535:
            raise ValueError(f"{where}: invalid port in peerIP {text!r}")
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        raise ValueError(f"{where}: peerIP {text!r} is not an IP address (or ip:port)") from None


def parse_bgp_peer(res: Resource) -> BgpPeerRule:
    """A BGPPeer, with the CRD's cross-field rules (and ``peerIP`` needing ``asNumber``) enforced."""
    name, spec = _name(res, KIND_BGP_PEER)
    where = f"BGPPeer {name}"
    node = _str(spec, "node", where)
    node_sel = _selector(_str(spec, "nodeSelector", where), "nodeSelector", where)
    peer_sel = _selector(_str(spec, "peerSelector", where), "peerSelector", where)
    lw_sel = _selector(_str(spec, "localWorkloadSelector", where), "localWorkloadSelector", where)
    peer_text = _str(spec, "peerIP", where)
    asn = _asn(spec.get("asNumber"), f"{where}: asNumber")
    if node and node_sel:
        raise ValueError(f"{where}: node and nodeSelector cannot both be set")
    if peer_text and peer_sel:
        raise ValueError(f"{where}: peerIP and peerSelector cannot both be set")
    if peer_sel and asn is not None:
        raise ValueError(f"{where}: asNumber must be empty when peerSelector is set (the peers' own AS is used)")
    if lw_sel and (peer_text or peer_sel):
        raise ValueError(f"{where}: localWorkloadSelector excludes peerIP and peerSelector")
    if not (peer_text or peer_sel or lw_sel):
        raise ValueError(f"{where}: needs peerIP or peerSelector")
    peer_ip: IPAddr | None = None
    port = 0
    if peer_text:
        peer_ip, port = _split_ip_port(peer_text, where)
        if asn is None:
            raise ValueError(f"{where}: peerIP needs asNumber")
    reachable: IPAddr | None = None
    rb = _str(spec, "reachableBy", where)
    if rb:
        try:
            reachable = ipaddress.ip_address(rb)
        except ValueError:
            raise ValueError(f"{where}: reachableBy {rb!r} is not an IP address") from None
        if peer_ip is None or reachable.version != peer_ip.version:
            raise ValueError(f"{where}: reachableBy needs a peerIP of the same address family")
    keep = spec.get("keepOriginalNextHop", False)
    if not isinstance(keep, bool):
        raise ValueError(f"{where}: keepOriginalNextHop must be a boolean")
    filters = spec.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise ValueError(f"{where}: filters must be a list of BGPFilter names")
    return BgpPeerRule(
        name=name, node=node, node_selector=node_sel, peer_ip=peer_ip, peer_port=port, asn=asn,
        peer_selector=peer_sel,
        local_asn=_asn(spec.get("localASNumber"), f"{where}: localASNumber"),
        source_address=_enum(spec, "sourceAddress", where, ("UseNodeIP", "None"), "UseNodeIP"),
        ttl_security=_int(spec, "ttlSecurity", where, 0, 255),
        max_restart_time=_seconds(spec.get("maxRestartTime"), f"{where}: maxRestartTime"),
        keepalive_time=_seconds(spec.get("keepaliveTime"), f"{where}: keepaliveTime"),
        keep_original_next_hop=keep,
        next_hop_mode=_enum(spec, "nextHopMode", where, ("Auto", "Self", "Keep"), ""),
        num_allowed_local_as=_int(spec, "numAllowedLocalASNumbers", where, 0, 255),
        password=_secret_ref(spec.get("password"), "password", where),
        reverse_peering=_enum(spec, "reversePeering", where, ("Auto", "Manual"), "Auto"),
        local_workload_selector=lw_sel, reachable_by=reachable, filters=tuple(filters),
    )


# ------------------------------------------------------------------------------------------- router id


def router_id(me: str, node_ip: ipaddress.IPv4Address | ipaddress.IPv4Interface | None,
              setting: str = "") -> ipaddress.IPv4Address:
    """``CALICO_ROUTER_ID``: "" = the node's IPv4 address, ``hash`` = an address derived from the node name
    (first 4 bytes of its SHA-256, the first byte moved out of multicast/reserved space), else an IPv4."""
    s = setting.strip()
    if s == "hash":
        d = hashlib.sha256(me.encode()).digest()
        first = d[0] - 32 if d[0] > 223 else d[0]
        return ipaddress.IPv4Address(bytes([first, d[1], d[2], d[3]]))
    if s:
        try:
            return ipaddress.IPv4Address(s)
        except ValueError:
            raise ValueError(f"CALICO_ROUTER_ID: {setting!r} is neither 'hash' nor an IPv4 address") from None
    if node_ip is None:
        raise ValueError("no router id: the node has no IPv4 address and CALICO_ROUTER_ID is not set")
    return node_ip.ip if isinstance(node_ip, ipaddress.IPv4Interface) else node_ip


# ------------------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class _Candidate:
    """One peering before it becomes a PeerSpec (confd's v1 ``BGPPeer`` value)."""

    ip: ipaddress.IPv4Address
    port: int  # 0 = unknown (name gets no _port_ suffix, session uses 179)
    asn: int
    rr_cluster_id: str
    calico_node: bool  # a peerIP that is some Calico node's address (only set for peerIP rules, as confd)
    rule: BgpPeerRule
    from_node: bool  # expanded from a node (peerSelector / reverse): confd ignores localASNumber etc. there


class _View:
    """Lookups over the inputs shared by the three passes."""

    def __init__(self, nodes: Mapping[str, BgpNode], global_cfg: BgpGlobal, ports: Mapping[str, int]) -> None:
        self.nodes = nodes
        self.names = sorted(nodes)
        self.global_asn = global_cfg.asn or DEFAULT_ASN
        self.global_port = global_cfg.listen_port or 0
        self.ports = ports
        self._sel: dict[str, list[str]] = {}

    def port_of(self, name: str) -> int:
        return self.ports.get(name) or self.global_port

    def asn_of(self, n: BgpNode) -> int:
        return n.asn or self.global_asn

    def matching(self, selector: str) -> list[str]:
        if selector not in self._sel:
            try:
                sel = parse_selector(selector)
            except SelectorError as e:  # parse_bgp_peer validated it; a hand-made rule may not be
                log.error("BGP: invalid selector %r: %s; it matches no node", selector, e)
                self._sel[selector] = []
            else:
                self._sel[selector] = [n for n in self.names if sel.matches(dict(self.nodes[n].labels))]
        return self._sel[selector]

    def with_ip_port_as(self, ip: IPAddr, asn: int | None, port: int) -> list[str]:
        """confd's nodesWithIPPortAndAS: nodes owning ``ip`` in AS ``asn`` (unset = global) whose listen
        port is ``port`` (0 = any). confd's own port test has an else-if slip that can reject a node whose
        per-node port matches when a different global port is set; this one compares the effective port."""
        want = asn or self.global_asn
        out = []
        for name in self.names:
            n = self.nodes[name]
            if n.ipv4 is None or n.ipv4.ip != ip or self.asn_of(n) != want:
                continue
            if port and self.port_of(name) and self.port_of(name) != port:
                continue
            out.append(name)
        return out

    def as_peer(self, name: str, rule: BgpPeerRule) -> _Candidate | None:
        n = self.nodes.get(name)
        if n is None or n.ipv4 is None:
            return None
        return _Candidate(n.ipv4.ip, self.port_of(name), self.asn_of(n), n.rr_cluster_id, False, rule, True)


def compute_local_config(
    me: str,
    nodes: Mapping[str, BgpNode],
    global_cfg: BgpGlobal | None,
    node_cfg: BgpGlobal | None,
    peers: Sequence[BgpPeerRule],
    *,
    router_id_setting: str = "",
    node_cfgs: Iterable[BgpGlobal] = (),
    secrets: SecretLookup | None = None,
    hold_time: int = DEFAULT_HOLD_TIME,
) -> LocalBgpConfig | None:
    """This node's BGP identity and sessions under Calico's rules; None when it has no IPv4 address.

    ``nodes`` maps node name to :class:`BgpNode` (this node included). ``global_cfg`` is the ``default``
    BGPConfiguration, ``node_cfg`` this node's ``node.<me>`` one. ``node_cfgs`` may carry every
    BGPConfiguration (other nodes' ``listenPort`` decides the port used to reach them; ``default`` entries
    are ignored). ``secrets`` resolves password secret references (unresolved = no password).
    """
    my = nodes.get(me)
    if my is None or my.ipv4 is None:
        return None
    g = global_cfg or BgpGlobal()
    ports = {c.node: c.listen_port for c in node_cfgs if c.node and c.listen_port}
    if node_cfg is not None and node_cfg.listen_port:
        ports[me] = node_cfg.listen_port
    view = _View(nodes, g, ports)
    my_ip = my.ipv4.ip
    my_ip_s = str(my_ip)
    my_asn = view.asn_of(my)
    cluster_id = my.rr_cluster_id
    try:
        rid = router_id(me, my_ip, router_id_setting)
    except ValueError as e:
        log.error("BGP: %s; using the node address %s", e, my_ip)
        rid = my_ip

    def secret(ref: SecretRef | None, what: str) -> str:
        if ref is None:
            return ""
        pw = secrets(ref) if secrets is not None else None
        if pw is None:
            log.warning("BGP: cannot read the password for %s (secret %s key %s); no password used",
                        what, ref.name, ref.key)
            return ""
        return pw

    specs: dict[str, PeerSpec] = {}

    def add(spec: PeerSpec) -> None:
        if spec.name in specs:
            # Two nodes claiming one address: BIRD would refuse the whole config; keep the first (by name).
            log.warning("BGP: duplicate peering %s (%s) left out", spec.name, spec.address)
            return
        specs[spec.name] = spec

    # -- full mesh (not on reflectors) --------------------------------------------------------------
    mesh_gr = g.node_mesh_max_restart_time if g.node_mesh_max_restart_time is not None else DEFAULT_GR_TIME
    if g.node_to_node_mesh and not cluster_id:
        mesh_pw = secret(g.node_mesh_password, "the node-to-node mesh") if g.node_mesh_password else ""
        for name in view.names:
            n = nodes[name]
            if n.ipv4 is None or str(n.ipv4.ip) == my_ip_s or n.rr_cluster_id:
                continue
            ip_s = str(n.ipv4.ip)
            add(PeerSpec(
                name=f"Mesh_{_dotted(ip_s)}", address=n.ipv4.ip, asn=view.asn_of(n), local_asn=my_asn,
                port=view.port_of(name) or BGP_PORT, passive=ip_s > my_ip_s,  # string order, as confd
                graceful_restart_time=mesh_gr, hold_time=hold_time, password=mesh_pw, kind="mesh",
            ))

    # -- BGPPeer rules: global pass, node pass, reverse pass -----------------------------------------
    rules = sorted((r for r in peers if not r.local_workload_selector), key=lambda r: r.name)
    # key: (scope "g"/"n", peer ip text, port); only this node's node-scoped keys are kept.
    emitted: dict[tuple[str, str, int], _Candidate] = {}

    def emit(scope: str, c: _Candidate) -> None:
        key = (scope, str(c.ip), c.port)
        if key in emitted:
            return  # the first peering for a key wins (an explicit one over a reverse one)
        if scope == "n" and ("g", key[1], key[2]) in emitted:
            return  # a global peering to the same ip/port covers it
        emitted[key] = c

    calico_ips = {n.ipv4.ip for n in nodes.values() if n.ipv4 is not None}
    for global_pass in (True, False):
        for rule in rules:
            if rule.is_global != global_pass:
                continue
            if not global_pass:
                local = view.matching(rule.node_selector) if rule.node_selector else [rule.node]
                if me not in local:
                    continue
            cands: list[_Candidate] = []
            if rule.peer_selector:
                cands = [c for c in (view.as_peer(n, rule) for n in view.matching(rule.peer_selector)) if c]
            elif isinstance(rule.peer_ip, ipaddress.IPv4Address):
                port = rule.peer_port
                if port == 0:
                    owners = view.with_ip_port_as(rule.peer_ip, rule.asn, 0)
                    if owners:
                        port = view.port_of(owners[0])
                cands = [_Candidate(rule.peer_ip, port, rule.asn or view.global_asn, "",
                                    rule.peer_ip in calico_ips, rule, False)]
            for c in cands:
                emit("g" if global_pass else "n", c)

    for rule in rules:
        if rule.reverse_peering == "Manual":
            continue
        if rule.peer_selector:
            targets = view.matching(rule.peer_selector)
        elif isinstance(rule.peer_ip, ipaddress.IPv4Address):
            targets = view.with_ip_port_as(rule.peer_ip, rule.asn, rule.peer_port)
        else:
            continue
        if me not in targets:
            continue
        if rule.node_selector:
            back = view.matching(rule.node_selector)
        elif rule.node:
            back = [rule.node]
        else:
            back = view.names
        for name in back:
            back_peer = view.as_peer(name, rule)
            if back_peer is not None:
                emit("n", back_peer)

    for (scope, ip_s, port), c in emitted.items():
        if ip_s == my_ip_s:
            continue  # never peer with myself
        rule = c.rule
        local_asn = rule.local_asn if (rule.local_asn and not c.from_node) else my_asn
        if rule.next_hop_mode:
            nh_keep, nh_self = rule.next_hop_mode == "Keep", rule.next_hop_mode == "Self"
        else:
            nh_keep, nh_self = rule.keep_original_next_hop and c.asn != local_asn, False
        rr = bool(cluster_id) and c.asn == local_asn and c.rr_cluster_id != cluster_id
        prefix = "Global" if scope == "g" else "Node"
        add(PeerSpec(
            name=f"{prefix}_{_dotted(ip_s)}" + (f"_port_{port}" if port > 0 else ""),
            address=c.ip, asn=c.asn, local_asn=local_asn, port=port or BGP_PORT,
            passive=scope == "g" and c.calico_node and ip_s > my_ip_s,
            rr_client=rr, rr_cluster_id=cluster_id if rr else "",
            graceful_restart_time=rule.max_restart_time if rule.max_restart_time is not None else DEFAULT_GR_TIME,
            hold_time=hold_time, keepalive_time=rule.keepalive_time, next_hop_keep=nh_keep,
            password=secret(rule.password, f"BGPPeer {rule.name}") if rule.password else "",
            kind="global" if scope == "g" else "node", next_hop_self=nh_self, ttl_security=rule.ttl_security,
            num_allow_local_as=0 if c.from_node else rule.num_allowed_local_as,
        ))

    log_level = (node_cfg.log_severity if node_cfg is not None and node_cfg.log_severity else g.log_severity)
    return LocalBgpConfig(
        node=me, router_id=rid, local_ip=my_ip, asn=my_asn,
        peers=tuple(specs[k] for k in sorted(specs)),
        listen_port=view.port_of(me) or BGP_PORT, hold_time=hold_time, graceful_restart_time=mesh_gr,
        log_level=log_level or "info",
        listen_address=my_ip if g.bind_mode == "NodeIP" else None,
    )
