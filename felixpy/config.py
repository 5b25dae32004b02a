"""Agent settings from calico-node's environment variables (one place for every default).

Precedence follows Felix for the parameters we read: ``FELIX_<PARAM>`` (case-insensitive) over the
built-in default. FelixConfiguration resources from the datastore are layered on in a later issue.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from felixpy import names


class ConfigError(ValueError):
    pass


def _felix_env(env: Mapping[str, str]) -> dict[str, str]:
    """FELIX_* variables with the prefix stripped and the name lower-cased (Felix is case-insensitive)."""
    return {k[6:].lower(): v for k, v in env.items() if k.upper().startswith("FELIX_")}


def _bool(v: str, name: str) -> bool:
    lv = v.strip().lower()
    if lv in ("true", "1", "yes", "y", "t"):
        return True
    if lv in ("false", "0", "no", "n", "f", ""):
        return False
    raise ConfigError(f"{name}: expected a boolean, got {v!r}")


def _int(v: str, name: str, lo: int, hi: int) -> int:
    try:
        i = int(v)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {v!r}") from None
    if not lo <= i <= hi:
        raise ConfigError(f"{name}: {i} is outside {lo}..{hi}")
    return i


def _seconds(v: str, name: str) -> float:
    s = v.strip().lower()
    mult = 1.0
    for suffix, m in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if s.endswith(suffix):
            s, mult = s[: -len(suffix)], m
            break
    try:
        return float(s) * mult
    except ValueError:
        raise ConfigError(f"{name}: expected a duration, got {v!r}") from None


# FELIX_* parameters this agent reads (lower-case, prefix stripped). Any other FELIX_* variable is a Felix
# parameter we do not implement (e.g. FELIX_WIREGUARDMTU from Calico's manifest): accepted, kept in
# ``Config.extra`` so the agent can say it ignores it, never an error.
KNOWN_FELIX_PARAMS = frozenset({
    "felixhostname", "datastoretype", "healthenabled", "healthhost", "healthport", "prometheusmetricsenabled",
    "prometheusmetricshost", "prometheusmetricsport", "routerefreshinterval", "interfaceprefix",
    "logseverityscreen", "vxlanmtu", "ipinipmtu", "mtuifacepattern", "nftablesmode",
    "defaultendpointtohostaction", "failsafeinboundhostports", "failsafeoutboundhostports", "ipv6support",
})


def _check_failsafe(item: str, name: str) -> None:
    """Felix's failsafe entry: ``proto:port`` or ``proto:cidr:port`` (proto tcp|udp|sctp)."""
    parts = item.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("tcp", "udp", "sctp"):
        raise ConfigError(f"{name}: expected proto:port or proto:cidr:port, got {item!r}")
    _int(parts[-1], name, 0, 65535)
    if len(parts) == 3:
        import ipaddress

        try:
            ipaddress.ip_network(parts[1], strict=False)
        except ValueError:
            raise ConfigError(f"{name}: bad CIDR in {item!r}") from None


@dataclass
class Config:
    nodename: str
    datastore_type: str = "kubernetes"  # kubernetes | etcdv3
    kubeconfig: str = ""
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    # Default pool (calico-node startup), created only if no IPv4 pool exists.
    ipv4pool_cidr: str = "192.168.0.0/16"
    ipv4pool_block_size: int = 26
    ipv4pool_ipip: str = "Never"
    ipv4pool_vxlan: str = "Never"
    ipv4pool_nat_outgoing: bool = True
    ipv4pool_node_selector: str = "all()"
    ipv4pool_disable_bgp_export: bool = False
    no_default_pools: bool = False
    # Felix parameters.
    health_enabled: bool = True
    health_host: str = "localhost"
    health_port: int = 9099
    prometheus_enabled: bool = False
    prometheus_host: str = ""
    prometheus_port: int = 9091
    route_refresh_interval: float = 90.0
    interface_prefix: str = names.IFACE_PREFIX
    veth_mtu: int = 0  # 0 = auto-detect from host interfaces
    log_severity: str = "INFO"
    # Node identity and routing (calico-node startup).
    ip: str = "autodetect"  # IP: autodetect | <ip or cidr> | none
    ip_autodetection_method: str = "first-found"
    networking_backend: str = "bird"  # CALICO_NETWORKING_BACKEND: bird | vxlan | none
    as_number: int | None = None  # AS: this node's AS (else BGPConfiguration's, else 64512)
    router_id: str = ""  # CALICO_ROUTER_ID: "" (node IP) | hash | <ipv4>
    vxlan_mtu: int = 0  # FELIX_VXLANMTU (0 = host MTU - 50)
    ipip_mtu: int = 0  # FELIX_IPINIPMTU (0 = host MTU - 20)
    mtu_iface_pattern: str = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
    nat_backend: str = "nftables"  # nftables | iptables (FELIX_NFTABLESMODE=Disabled)
    # felixpy specific.
    # Network policy enforcement (Calico's default: on). FELIXPY_POLICY=disabled turns it off.
    policy_enabled: bool = True
    # FELIX_DEFAULTENDPOINTTOHOSTACTION: what happens to pod -> host traffic after the pod's egress policy.
    # Felix's built-in default is Drop, but Calico's manifests set Accept and that is what clusters run, so
    # it is ours too (decision recorded in docs/policy.md).
    default_endpoint_to_host_action: str = "Accept"
    # FELIX_FAILSAFEINBOUNDHOSTPORTS / FELIX_FAILSAFEOUTBOUNDHOSTPORTS: host ports no host endpoint policy
    # can close ("proto:port" or "proto:cidr:port", comma separated; "none" = empty). Felix's defaults.
    failsafe_inbound: tuple[str, ...] = ("tcp:22", "udp:68", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473",
                                         "tcp:6443", "tcp:6666", "tcp:6667")
    failsafe_outbound: tuple[str, ...] = ("udp:53", "udp:67", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473",
                                          "tcp:6443", "tcp:6666", "tcp:6667")
    # FELIXPY_LOG_DROPS: log every policy drop (rate-limited) with the pod's namespace/name and the policy.
    log_drops: bool = False
    ipv6_support: bool = False  # FELIX_IPV6SUPPORT: accepted; IPv6 is not implemented (logged when true)
    cluster_type: str = ""  # CLUSTER_TYPE: recorded on the Node (e.g. "k8s,bgp"), informational
    # FELIXPY_BGP_READY_GRACE: how long after start BGP sessions may all be down without failing readiness.
    bgp_ready_grace: float = 60.0
    bgp_hold_time: int = 90  # FELIXPY_BGP_HOLD_TIME: hold time of every session (keepalive = hold / 3)
    bgp_dir: str = "/var/run/calico/bgp"  # FELIXPY_BGP_DIR: ExaBGP config + the relay's socket
    cni_socket: str = names.DEFAULT_CNI_SOCKET
    state_dir: str = "/var/lib/calico"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def interface_prefixes(self) -> tuple[str, ...]:
        return tuple(p for p in self.interface_prefix.split(",") if p)


def load(env: Mapping[str, str] | None = None) -> Config:
    e = dict(os.environ if env is None else env)
    fx = _felix_env(e)
    nodename = e.get("NODENAME") or fx.get("felixhostname") or e.get("HOSTNAME") or socket.gethostname()
    dtype = (e.get("DATASTORE_TYPE") or fx.get("datastoretype") or "kubernetes").lower()
    if dtype not in ("kubernetes", "etcdv3"):
        raise ConfigError(f"DATASTORE_TYPE: expected kubernetes or etcdv3, got {dtype!r}")
    c = Config(nodename=nodename.strip().lower(), datastore_type=dtype)
    c.kubeconfig = e.get("KUBECONFIG", "")
    if e.get("ETCD_ENDPOINTS"):
        c.etcd_endpoints = tuple(x.strip() for x in e["ETCD_ENDPOINTS"].split(",") if x.strip())
    if e.get("CALICO_IPV4POOL_CIDR", "").strip():
        c.ipv4pool_cidr = e["CALICO_IPV4POOL_CIDR"].strip()
        if c.ipv4pool_cidr.lower() != "none":
            try:
                net = ipaddress.ip_network(c.ipv4pool_cidr, strict=False)
            except ValueError:
                raise ConfigError(f"CALICO_IPV4POOL_CIDR: expected an IPv4 CIDR or none, got {c.ipv4pool_cidr!r}") \
                    from None
            if net.version != 4:
                raise ConfigError(f"CALICO_IPV4POOL_CIDR: {c.ipv4pool_cidr!r} is not an IPv4 CIDR")
    if "CALICO_IPV4POOL_BLOCK_SIZE" in e:
        c.ipv4pool_block_size = _int(e["CALICO_IPV4POOL_BLOCK_SIZE"], "CALICO_IPV4POOL_BLOCK_SIZE", 20, 32)
    for var, attr in (("CALICO_IPV4POOL_IPIP", "ipv4pool_ipip"), ("CALICO_IPV4POOL_VXLAN", "ipv4pool_vxlan")):
        if var in e:
            mode = {"always": "Always", "crosssubnet": "CrossSubnet", "never": "Never", "off": "Never",
                    "": "Never"}.get(e[var].strip().lower())
            if mode is None:
                raise ConfigError(f"{var}: expected Always, CrossSubnet or Never, got {e[var]!r}")
            setattr(c, attr, mode)
    if "CALICO_IPV4POOL_NAT_OUTGOING" in e:
        c.ipv4pool_nat_outgoing = _bool(e["CALICO_IPV4POOL_NAT_OUTGOING"], "CALICO_IPV4POOL_NAT_OUTGOING")
    if "CALICO_IPV4POOL_NODE_SELECTOR" in e:
        c.ipv4pool_node_selector = e["CALICO_IPV4POOL_NODE_SELECTOR"]
    if "CALICO_IPV4POOL_DISABLE_BGP_EXPORT" in e:
        c.ipv4pool_disable_bgp_export = _bool(e["CALICO_IPV4POOL_DISABLE_BGP_EXPORT"],
                                              "CALICO_IPV4POOL_DISABLE_BGP_EXPORT")
    if "NO_DEFAULT_POOLS" in e:
        c.no_default_pools = _bool(e["NO_DEFAULT_POOLS"], "NO_DEFAULT_POOLS")
    if "healthenabled" in fx:
        c.health_enabled = _bool(fx["healthenabled"], "FELIX_HEALTHENABLED")
    c.health_host = fx.get("healthhost", c.health_host)
    if "healthport" in fx:
        c.health_port = _int(fx["healthport"], "FELIX_HEALTHPORT", 0, 65535)
    if "prometheusmetricsenabled" in fx:
        c.prometheus_enabled = _bool(fx["prometheusmetricsenabled"], "FELIX_PROMETHEUSMETRICSENABLED")
    c.prometheus_host = fx.get("prometheusmetricshost", c.prometheus_host)
    if "prometheusmetricsport" in fx:
        c.prometheus_port = _int(fx["prometheusmetricsport"], "FELIX_PROMETHEUSMETRICSPORT", 0, 65535)
    if "routerefreshinterval" in fx:
        c.route_refresh_interval = _seconds(fx["routerefreshinterval"], "FELIX_ROUTEREFRESHINTERVAL")
    if "interfaceprefix" in fx:
        c.interface_prefix = fx["interfaceprefix"]
    if e.get("FELIXPY_VETH_MTU", "0") not in ("", "0"):
        # An explicit pod MTU; otherwise it is derived from the host MTU and the tunnel MTUs.
        c.veth_mtu = _int(e["FELIXPY_VETH_MTU"], "FELIXPY_VETH_MTU", 68, 65535)
    c.log_severity = fx.get("logseverityscreen", c.log_severity).upper()
    if e.get("IP", "").strip():
        c.ip = e["IP"].strip()
        if c.ip.lower() in ("autodetect", "none"):
            c.ip = c.ip.lower()
        else:
            try:
                ipaddress.IPv4Interface(c.ip)
            except ValueError:
                raise ConfigError(f"IP: expected autodetect, none or an IPv4 address[/prefix], got {c.ip!r}") \
                    from None
    c.ip_autodetection_method = e.get("IP_AUTODETECTION_METHOD", "").strip() or c.ip_autodetection_method
    from felixpy.autodetect import AutodetectError, parse_method

    try:
        # calico-node exits on an invalid method; fail at load rather than retry forever.
        parse_method(c.ip_autodetection_method)
    except AutodetectError as err:
        raise ConfigError(f"IP_AUTODETECTION_METHOD: {err}") from None
    backend = e.get("CALICO_NETWORKING_BACKEND", "").strip().lower()
    if e.get("CALICO_NETWORKING", "").strip().lower() == "false":
        backend = "none"
    if backend:
        if backend not in ("bird", "vxlan", "none"):
            raise ConfigError(f"CALICO_NETWORKING_BACKEND: expected bird, vxlan or none, got {backend!r}")
        c.networking_backend = backend
    if e.get("AS", "").strip():
        from felixpy.model.resources import InvalidResource, parse_asn

        try:
            c.as_number = parse_asn(e["AS"])
        except InvalidResource as err:
            raise ConfigError(f"AS: {err}") from None
    c.router_id = e.get("CALICO_ROUTER_ID", "").strip()
    if "vxlanmtu" in fx and fx["vxlanmtu"] not in ("", "0"):
        c.vxlan_mtu = _int(fx["vxlanmtu"], "FELIX_VXLANMTU", 68, 65535)
    if "ipinipmtu" in fx and fx["ipinipmtu"] not in ("", "0"):
        c.ipip_mtu = _int(fx["ipinipmtu"], "FELIX_IPINIPMTU", 68, 65535)
    c.mtu_iface_pattern = fx.get("mtuifacepattern", c.mtu_iface_pattern)
    # Felix's NFTablesMode: Disabled selects the iptables backend; Enabled/Auto keep nftables (our default).
    nft_mode = fx.get("nftablesmode", "").strip().lower()
    if nft_mode not in ("", "enabled", "disabled", "auto"):
        raise ConfigError(f"FELIX_NFTABLESMODE: expected Enabled, Disabled or Auto, got {fx['nftablesmode']!r}")
    if nft_mode == "disabled":
        c.nat_backend = "iptables"
    c.bgp_dir = e.get("FELIXPY_BGP_DIR", c.bgp_dir)
    if e.get("FELIXPY_POLICY"):
        mode = e["FELIXPY_POLICY"].strip().lower()
        if mode not in ("enabled", "disabled"):
            raise ConfigError(f"FELIXPY_POLICY: expected enabled or disabled, got {e['FELIXPY_POLICY']!r}")
        c.policy_enabled = mode == "enabled"
    if e.get("FELIXPY_BGP_READY_GRACE"):
        c.bgp_ready_grace = _seconds(e["FELIXPY_BGP_READY_GRACE"], "FELIXPY_BGP_READY_GRACE")
    if e.get("FELIXPY_BGP_HOLD_TIME"):
        # BGP allows 0 (no keepalives) or at least 3 seconds.
        c.bgp_hold_time = _int(e["FELIXPY_BGP_HOLD_TIME"], "FELIXPY_BGP_HOLD_TIME", 3, 65535)
    c.cni_socket = e.get("FELIXPY_CNI_SOCKET", c.cni_socket)
    if "defaultendpointtohostaction" in fx:
        act = {"drop": "Drop", "accept": "Accept", "return": "Return"}.get(
            fx["defaultendpointtohostaction"].strip().lower())
        if act is None:
            raise ConfigError("FELIX_DEFAULTENDPOINTTOHOSTACTION: expected Drop, Accept or Return, "
                              f"got {fx['defaultendpointtohostaction']!r}")
        c.default_endpoint_to_host_action = act
    for key, attr in (("failsafeinboundhostports", "failsafe_inbound"),
                      ("failsafeoutboundhostports", "failsafe_outbound")):
        if key in fx:
            raw = fx[key].strip()
            items = () if raw.lower() == "none" else tuple(x.strip().lower() for x in raw.split(",") if x.strip())
            for item in items:
                _check_failsafe(item, f"FELIX_{key.upper()}")
            setattr(c, attr, items)
    if e.get("FELIXPY_LOG_DROPS"):
        c.log_drops = _bool(e["FELIXPY_LOG_DROPS"], "FELIXPY_LOG_DROPS")
    if "ipv6support" in fx:
        c.ipv6_support = _bool(fx["ipv6support"], "FELIX_IPV6SUPPORT")
    c.cluster_type = e.get("CLUSTER_TYPE", "").strip()
    c.extra = {f"FELIX_{k.upper()}": v for k, v in fx.items() if k not in KNOWN_FELIX_PARAMS}
    c.state_dir = e.get("FELIXPY_STATE_DIR", c.state_dir)
    return c
