"""CNI protocol: request parsing, version negotiation, result and error formatting (pure code).

Used by the agent, which receives the raw environment and stdin forwarded by the thin executable
(:mod:`cni_plugin.client`). Everything here is plain functions over plain data so it is unit-tested
without root.

Versions: we accept 0.1.0 - 1.0.0 like Calico (an empty cniVersion means 0.2.0) and answer in the version
the request asked for. 1.1.0 (STATUS/GC) is not offered: no client on Debian 12 speaks it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
CURRENT_VERSION = "1.0.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# Well-known CNI error codes (spec section "Error"); 100+ are plugin specific.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_LATER = 11
ERR_GENERIC = 999  # what Calico's plugin returns for any other failure


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@dataclass(frozen=True)
class IpamConf:
    type: str = ""
    ipv4_pools: tuple[str, ...] = ()
    assign_ipv4: bool = True
    assign_ipv6: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class NetConf:
    """The fields of Calico's plugin config that we act on (unknown fields are accepted and ignored)."""

    cni_version: str
    name: str
    type: str
    ipam: IpamConf
    nodename: str = ""
    mtu: int = 0
    datastore_type: str = ""
    kubeconfig: str = ""
    policy_type: str = ""
    prev_result: dict[str, Any] | None = None
    runtime_config: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class CniRequest:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str
    conf: NetConf
    # "calico" (the main plugin) or "calico-ipam" (invoked as an IPAM plugin by another plugin).
    plugin: str = "calico"

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def is_k8s(self) -> bool:
        return bool(self.pod_name)


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS is ``K=V;K=V``; order varies between runtimes. A pair without '=' is a decode error."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise CniError(ERR_INVALID_ENV, f"invalid CNI_ARGS pair {part!r}: expected KEY=VALUE")
        out[k] = v
    return out


def requested_version(stdin: bytes) -> str:
    """Best-effort cniVersion of a request, for formatting errors even when the body is broken."""
    try:
        doc = json.loads(stdin)
        v = doc.get("cniVersion", "") if isinstance(doc, dict) else ""
        return v if isinstance(v, str) and v in SUPPORTED_VERSIONS else CURRENT_VERSION
    except (ValueError, UnicodeDecodeError):
        return CURRENT_VERSION


def _parse_conf(stdin: bytes) -> NetConf:
    if not stdin.strip():
        raise CniError(ERR_DECODE, "no network configuration on stdin")
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(ERR_DECODE, f"network configuration is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CniError(ERR_DECODE, "network configuration must be a JSON object")
    version = doc.get("cniVersion", "")
    if version == "":
        version = "0.2.0"
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {json.dumps(version)}, plugin supports {list(SUPPORTED_VERSIONS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(ERR_INVALID_CONFIG, "network configuration is missing the 'name' field")
    ptype = doc.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise CniError(ERR_INVALID_CONFIG, "network configuration is missing the 'type' field")
    ipam_raw = doc.get("ipam") or {}
    if not isinstance(ipam_raw, dict):
        raise CniError(ERR_INVALID_CONFIG, "'ipam' must be an object")
    pools = ipam_raw.get("ipv4_pools") or []
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        raise CniError(ERR_INVALID_CONFIG, "'ipam.ipv4_pools' must be a list of strings")
    ipam = IpamConf(
        type=str(ipam_raw.get("type", "")),
        ipv4_pools=tuple(pools),
        assign_ipv4=str(ipam_raw.get("assign_ipv4", "true")).lower() != "false",
        assign_ipv6=str(ipam_raw.get("assign_ipv6", "false")).lower() == "true",
        raw=ipam_raw,
    )
    mtu = doc.get("mtu", 0)
    if isinstance(mtu, str) and mtu.isdigit():
        mtu = int(mtu)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or mtu < 0 or mtu > 65535:
        raise CniError(ERR_INVALID_CONFIG, f"invalid 'mtu' {mtu!r}: expected 0 (auto) or 68-65535")
    k8s = doc.get("kubernetes") or {}
    policy = doc.get("policy") or {}
    prev = doc.get("prevResult")
    rc = doc.get("runtimeConfig") or {}
    return NetConf(
        cni_version=version, name=name, type=ptype, ipam=ipam,
        nodename=str(doc.get("nodename", "") or ""), mtu=mtu,
        datastore_type=str(doc.get("datastore_type", "") or ""),
        kubeconfig=str(k8s.get("kubeconfig", "") if isinstance(k8s, dict) else ""),
        policy_type=str(policy.get("type", "") if isinstance(policy, dict) else ""),
        prev_result=prev if isinstance(prev, dict) else None,
        runtime_config=rc if isinstance(rc, dict) else {},
        raw=doc,
    )


def parse_request(env: dict[str, str], stdin: bytes, plugin: str = "calico") -> CniRequest:
    """Validate a CNI invocation; raise CniError with the spec's code on any problem."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}")
    if command == "VERSION":
        # VERSION needs no config; keep a placeholder so callers have a uniform object.
        conf = NetConf(cni_version=requested_version(stdin), name="", type="", ipam=IpamConf())
        return CniRequest("VERSION", "", "", "", {}, "", conf, plugin)
    required = ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]
    if command in ("ADD", "CHECK"):
        required.insert(1, "CNI_NETNS")
    missing = [k for k in required if not env.get(k)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    conf = _parse_conf(stdin)
    if command == "CHECK" and _version_tuple(conf.cni_version) < (0, 4, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"CHECK is not supported for cniVersion {conf.cni_version}")
    return CniRequest(
        command=command,
        container_id=env["CNI_CONTAINERID"],
        netns=env.get("CNI_NETNS", ""),
        ifname=env["CNI_IFNAME"],
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=env.get("CNI_PATH", ""),
        conf=conf,
        plugin=plugin,
    )


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    sandbox: str = ""
    mtu: int = 0


@dataclass(frozen=True)
class IPConfig:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    interface: int | None = None
    gateway: str = ""


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...]
    ips: tuple[IPConfig, ...]
    routes: tuple[dict[str, str], ...] = ()


def format_result(result: Result, version: str) -> dict[str, Any]:
    """Render a result in the wire format of ``version`` (0.1/0.2 legacy, 0.3/0.4, or 1.0)."""
    vt = _version_tuple(version)
    if vt < (0, 3, 0):
        out: dict[str, Any] = {"cniVersion": version, "dns": {}}
        v4 = [c for c in result.ips if c.address.version == 4]
        if v4:
            ip4: dict[str, Any] = {"ip": str(v4[0].address)}
            if v4[0].gateway:
                ip4["gateway"] = v4[0].gateway
            ip4["routes"] = [r for r in result.routes if ":" not in r.get("dst", "")]
            out["ip4"] = ip4
        return out
    ifaces = []
    for i in result.interfaces:
        d: dict[str, Any] = {"name": i.name, "mac": i.mac}
        if i.mtu and vt >= (1, 0, 0):
            d["mtu"] = i.mtu
        if i.sandbox:
            d["sandbox"] = i.sandbox
        ifaces.append(d)
    ips = []
    for c in result.ips:
        e: dict[str, Any] = {"address": str(c.address)}
        if vt < (1, 0, 0):
            e["version"] = str(c.address.version)
        if c.interface is not None:
            e["interface"] = c.interface
        if c.gateway:
            e["gateway"] = c.gateway
        ips.append(e)
    out = {"cniVersion": version, "ips": ips, "dns": {}}
    if ifaces:
        out["interfaces"] = ifaces
    if result.routes:
        out["routes"] = list(result.routes)
    return out


def parse_result_ips(result: dict[str, Any]) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """IPs of a (prev)Result in any version; used for CHECK and delegated IPAM results."""
    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for e in result.get("ips") or []:
        if isinstance(e, dict) and isinstance(e.get("address"), str):
            out.append(ipaddress.ip_interface(e["address"]))
    for legacy in ("ip4", "ip6"):
        blk = result.get(legacy)
        if isinstance(blk, dict) and isinstance(blk.get("ip"), str):
            out.append(ipaddress.ip_interface(blk["ip"]))
    return out


def format_error(err: CniError, version: str = CURRENT_VERSION) -> dict[str, Any]:
    out: dict[str, Any] = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        out["details"] = err.details
    return out


def version_response(version: str = CURRENT_VERSION) -> dict[str, Any]:
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
