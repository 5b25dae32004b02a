"""Pure conversions between datastore storage forms and Calico v3 resources (no I/O).

Kubernetes (KDD) forms, following Calico's ``libcalico-go/lib/backend/k8s``:

* Calico CRs (``crd.projectcalico.org/v1``) <-> v3 resources: the v3 ObjectMeta (minus name, namespace,
  resourceVersion, uid; policies keep their name) is stored as JSON in the ``projectcalico.org/metadata``
  annotation; the CR's own labels/annotations keep only keys containing ``projectcalico.org/`` or
  ``operator.tigera.io/``. The v3 uid is the CR uid with every byte bit-reversed except bytes 6 and 8.
  BlockAffinity ``spec.deleted`` is a string in the CR and a bool in v3; its CR carries the hostname-hash,
  affinity-type and ip-version labels.
* Pod -> WorkloadEndpoint, and the WorkloadEndpoint write -> Pod status patch of the
  ``cni.projectcalico.org/podIP(s)``/``containerID`` annotations.
* k8s Node <-> Calico Node (``projectcalico.org/*`` annotations).
* Namespace -> Profile ``kns.<ns>``, ServiceAccount -> Profile ``ksa.<ns>.<sa>``, the static
  ``projectcalico-default-allow`` Profile.
* networking.k8s.io NetworkPolicy -> kind ``KubernetesNetworkPolicy`` (the k8s spec passed through).

etcd v3 forms (Calico's key layout, see :mod:`felixpy.datastore.etcd` for what was verified):

* ``/calico/resources/v3/projectcalico.org/<plural>/[<namespace>/]<name>`` holding the v3 JSON.
* IPAM under ``/calico/ipam/v2/...`` holding Calico's v1 IPAM JSON, converted to/from the CRD field names.

Every function that reads stored data raises :class:`ConversionError` on malformed input, naming what is
wrong, so a backend can report the one bad object and carry on with the rest.

For speed (a CNI ADD writes IPAM blocks of hundreds of entries) nothing is deep-copied: inputs are never
modified, but a result may share nested lists/maps with its input. Callers that keep mutating an input
after converting it should copy it first.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from felixpy import names
from felixpy.datastore.api import (
    API_VERSION_V3,
    KIND_BGP_CONFIG,
    KIND_BGP_PEER,
    KIND_BLOCK_AFFINITY,
    KIND_CLUSTER_INFO,
    KIND_FELIX_CONFIG,
    KIND_GLOBAL_NETWORK_POLICY,
    KIND_GLOBAL_NETWORK_SET,
    KIND_HOST_ENDPOINT,
    KIND_IPAM_BLOCK,
    KIND_IPAM_CONFIG,
    KIND_IPAM_HANDLE,
    KIND_IPPOOL,
    KIND_K8S_NETWORK_POLICY,
    KIND_NETWORK_POLICY,
    KIND_NETWORK_SET,
    KIND_NODE,
    KIND_PROFILE,
    KIND_TIER,
    KIND_WEP,
    NAMESPACED_KINDS,
    Key,
    Resource,
)


class ConversionError(ValueError):
    """A stored object cannot be converted (malformed JSON, bad IP, wrong shape...)."""


# ---------------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------------

CRD_GROUP = "crd.projectcalico.org"
CRD_VERSION = "v1"
CRD_API_VERSION = f"{CRD_GROUP}/{CRD_VERSION}"

KIND_STAGED_NETWORK_POLICY = "StagedNetworkPolicy"
KIND_STAGED_GLOBAL_NETWORK_POLICY = "StagedGlobalNetworkPolicy"
KIND_STAGED_K8S_NETWORK_POLICY = "StagedKubernetesNetworkPolicy"

# v3 kind -> CRD plural (crd.projectcalico.org/v1), from libcalico-go/config/crd/.
CRD_PLURALS: dict[str, str] = {
    KIND_BGP_CONFIG: "bgpconfigurations",
    "BGPFilter": "bgpfilters",
    KIND_BGP_PEER: "bgppeers",
    KIND_BLOCK_AFFINITY: "blockaffinities",
    "CalicoNodeStatus": "caliconodestatuses",
    KIND_CLUSTER_INFO: "clusterinformations",
    KIND_FELIX_CONFIG: "felixconfigurations",
    KIND_GLOBAL_NETWORK_POLICY: "globalnetworkpolicies",
    KIND_GLOBAL_NETWORK_SET: "globalnetworksets",
    KIND_HOST_ENDPOINT: "hostendpoints",
    KIND_IPAM_BLOCK: "ipamblocks",
    KIND_IPAM_CONFIG: "ipamconfigs",
    KIND_IPAM_HANDLE: "ipamhandles",
    KIND_IPPOOL: "ippools",
    "IPReservation": "ipreservations",
    "KubeControllersConfiguration": "kubecontrollersconfigurations",
    KIND_NETWORK_POLICY: "networkpolicies",
    KIND_NETWORK_SET: "networksets",
    KIND_STAGED_GLOBAL_NETWORK_POLICY: "stagedglobalnetworkpolicies",
    KIND_STAGED_K8S_NETWORK_POLICY: "stagedkubernetesnetworkpolicies",
    KIND_STAGED_NETWORK_POLICY: "stagednetworkpolicies",
    KIND_TIER: "tiers",
}
CRD_KINDS_BY_PLURAL: dict[str, str] = {v: k for k, v in CRD_PLURALS.items()}

# Kinds stored per namespace (Calico's namespace.IsNamespaced).
NAMESPACED: frozenset[str] = NAMESPACED_KINDS | {
    KIND_STAGED_NETWORK_POLICY, KIND_STAGED_K8S_NETWORK_POLICY, "LiveMigration",
}

POLICY_KINDS = frozenset({KIND_NETWORK_POLICY, KIND_GLOBAL_NETWORK_POLICY, KIND_STAGED_NETWORK_POLICY,
                          KIND_STAGED_GLOBAL_NETWORK_POLICY})

IPAM_KINDS = frozenset({KIND_IPAM_BLOCK, KIND_BLOCK_AFFINITY, KIND_IPAM_HANDLE, KIND_IPAM_CONFIG})


def is_namespaced(kind: str) -> bool:
    return kind in NAMESPACED


def crd_plural(kind: str) -> str:
    try:
        return CRD_PLURALS[kind]
    except KeyError:
        raise ValueError(f"{kind} is not a Calico CRD kind") from None


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------

METADATA_ANNOTATION = "projectcalico.org/metadata"
LABELS_ANNOTATION = "projectcalico.org/labels"
ANNOTATIONS_ANNOTATION = "projectcalico.org/annotations"

LABEL_NAMESPACE = "projectcalico.org/namespace"
LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"
LABEL_SERVICE_ACCOUNT = "projectcalico.org/serviceaccount"
LABEL_HOSTNAME_HASH = "projectcalico.org/hostname-hash"
LABEL_AFFINITY_TYPE = "projectcalico.org/affinity-type"
LABEL_IP_VERSION = "projectcalico.org/ip-version"
ORCHESTRATOR_K8S = "k8s"


def _is_ours(key: str) -> bool:
    return "projectcalico.org/" in key or "operator.tigera.io/" in key


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConversionError(f"{what} must be a map, got {type(value).__name__}")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConversionError(f"{what} must be an object, got {type(value).__name__}")
    return value


def go_json(value: Any) -> str:
    """Compact JSON with sorted map keys, as Go's encoding/json writes maps."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def convert_uid(uid: str) -> str:
    """Calico's ConvertUID: reverse the bits of every byte except 6 and 8 (version/variant). An involution."""
    try:
        raw = uuid.UUID(uid).bytes
    except (ValueError, AttributeError, TypeError) as e:
        raise ConversionError(f"bad UID {uid!r}: {e}") from None
    out = bytes(int(f"{b:08b}"[::-1], 2) for b in raw)
    out = out[:6] + raw[6:7] + out[7:8] + raw[8:9] + out[9:]
    return str(uuid.UUID(bytes=out))


def _convert_owner_refs(refs: Any, *, to_v3: bool) -> list[dict[str, Any]]:
    out = []
    if not isinstance(refs, list):
        raise ConversionError("ownerReferences must be a list")
    for ref in refs:
        if not isinstance(ref, dict):
            raise ConversionError("ownerReferences entries must be objects")
        ref = dict(ref)
        api_version = ref.get("apiVersion")
        if to_v3 and api_version in (CRD_API_VERSION, API_VERSION_V3):
            ref["apiVersion"] = API_VERSION_V3
            ref["uid"] = convert_uid(str(ref.get("uid", "")))
        elif not to_v3 and api_version == API_VERSION_V3:
            ref["apiVersion"] = CRD_API_VERSION
            ref["uid"] = convert_uid(str(ref.get("uid", "")))
        out.append(ref)
    return out


def _policy_name(name: str, spec: Mapping[str, Any]) -> str:
    # Calico <= 3.31 stored default-tier policies as "default.<name>"; 3.32+ without. Accept both.
    tier = spec.get("tier") or "default"
    if tier == "default" and name.startswith("default."):
        return name[len("default."):]
    return name


def _parse_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None or value == "":
        return False
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "t", "f"):
        return value.lower() in ("true", "1", "t")
    raise ConversionError(f"{what}: not a boolean: {value!r}")


# ---------------------------------------------------------------------------------------------------
# Calico CRs <-> v3 resources
# ---------------------------------------------------------------------------------------------------

def cr_to_resource(cr: Mapping[str, Any], kind: str | None = None) -> Resource:
    """A ``crd.projectcalico.org/v1`` object (as decoded JSON) -> v3 resource (Calico's
    ``ConvertK8sResourceToCalicoResource``). Raises :class:`ConversionError` on malformed input."""
    kind = kind or str(cr.get("kind") or "")
    md = _dict(cr.get("metadata"), "metadata")
    cr_name = str(md.get("name") or "")
    if not cr_name:
        raise ConversionError("CR has no metadata.name")
    annotations = _str_map(md.get("annotations"), "metadata.annotations")
    labels = _str_map(md.get("labels"), "metadata.labels")
    spec = dict(_dict(cr.get("spec"), "spec"))

    meta: dict[str, Any] = {}
    raw = annotations.pop(METADATA_ANNOTATION, None)
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise ConversionError(f"annotation {METADATA_ANNOTATION} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ConversionError(f"annotation {METADATA_ANNOTATION} is not a JSON object")
        labels.update(_str_map(meta.get("labels"), f"{METADATA_ANNOTATION} labels"))
        annotations.update(_str_map(meta.get("annotations"), f"{METADATA_ANNOTATION} annotations"))
        if meta.get("ownerReferences"):
            meta["ownerReferences"] = _convert_owner_refs(meta["ownerReferences"], to_v3=True)

    handled = ("name", "namespace", "resourceVersion", "uid", "labels", "annotations", "creationTimestamp")
    out_md: dict[str, Any] = {k: v for k, v in meta.items()
                              if k not in handled and v not in (None, "", [], {})}
    name = str(meta.get("name") or "") if kind in POLICY_KINDS else ""
    name = name or cr_name
    if kind in POLICY_KINDS:
        name = _policy_name(name, spec)
    out_md["name"] = name
    if md.get("namespace"):
        out_md["namespace"] = str(md["namespace"])
    if md.get("resourceVersion"):
        out_md["resourceVersion"] = str(md["resourceVersion"])
    if md.get("uid"):
        out_md["uid"] = convert_uid(str(md["uid"]))
    created = meta.get("creationTimestamp") or md.get("creationTimestamp")
    if created:
        out_md["creationTimestamp"] = created
    if labels:
        out_md["labels"] = labels
    if annotations:
        out_md["annotations"] = annotations

    if kind == KIND_BLOCK_AFFINITY and "deleted" in spec:
        spec["deleted"] = _parse_bool(spec["deleted"], "BlockAffinity spec.deleted")

    res: Resource = {"apiVersion": API_VERSION_V3, "kind": kind, "metadata": out_md, "spec": spec}
    if isinstance(cr.get("status"), dict):
        res["status"] = cr["status"]
    return res


def resource_to_cr(res: Mapping[str, Any], *, resource_version: str = "") -> dict[str, Any]:
    """v3 resource -> ``crd.projectcalico.org/v1`` object body for POST/PUT (Calico's
    ``ConvertCalicoResourceToK8sResource``). ``resource_version`` becomes the CAS precondition."""
    kind = str(res.get("kind") or "")
    crd_plural(kind)  # validates the kind early
    md = _dict(res.get("metadata"), "metadata")
    name = str(md.get("name") or "")
    if not name:
        raise ValueError(f"{kind}: metadata.name is required")
    spec = dict(_dict(res.get("spec"), "spec"))

    stored = {k: v for k, v in md.items()
              if k not in ("namespace", "resourceVersion", "uid") and v not in (None, "", [], {})}
    if kind not in POLICY_KINDS:
        stored.pop("name", None)
    if stored.get("ownerReferences"):
        stored["ownerReferences"] = _convert_owner_refs(stored["ownerReferences"], to_v3=False)
    stored.setdefault("creationTimestamp", None)  # Go always writes this field

    annotations = {METADATA_ANNOTATION: json.dumps(stored, separators=(",", ":"))}
    own_annotations = _str_map(md.get("annotations"), "annotations")
    annotations.update({k: v for k, v in own_annotations.items() if _is_ours(k)})
    labels = {k: v for k, v in _str_map(md.get("labels"), "labels").items() if _is_ours(k)}

    if kind == KIND_IPAM_BLOCK:
        spec.setdefault("strictAffinity", False)  # deprecated but required by the CRD; Calico writes false
    if kind == KIND_BLOCK_AFFINITY:
        labels.update(block_affinity_labels(spec))
        spec["deleted"] = "true" if _parse_bool(spec.get("deleted"), "spec.deleted") else "false"

    cr_md: dict[str, Any] = {"name": name, "annotations": annotations}
    if is_namespaced(kind):
        ns = str(md.get("namespace") or "")
        if not ns:
            raise ValueError(f"{kind} {name}: metadata.namespace is required")
        cr_md["namespace"] = ns
    if labels:
        cr_md["labels"] = labels
    if resource_version:
        cr_md["resourceVersion"] = resource_version
    if md.get("uid"):
        cr_md["uid"] = convert_uid(str(md["uid"]))
    body: dict[str, Any] = {"apiVersion": CRD_API_VERSION, "kind": kind, "metadata": cr_md, "spec": spec}
    if isinstance(res.get("status"), dict):
        body["status"] = res["status"]
    return body


# ---------------------------------------------------------------------------------------------------
# CIDR names and BlockAffinity naming/labels (shared by both backends)
# ---------------------------------------------------------------------------------------------------

def cidr_to_name(cidr: str) -> str:
    """Calico's CIDRToName: ``10.244.1.0/26`` -> ``10-244-1-0-26``."""
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net).replace(".", "-").replace(":", "-").replace("/", "-")


def name_to_cidr(name: str) -> str | None:
    """Inverse of :func:`cidr_to_name` (``None`` if ``name`` is not a CIDR name)."""
    parts = name.split("-")
    if len(parts) == 5 and all(p.isdigit() for p in parts):
        text = ".".join(parts[:4]) + "/" + parts[4]
    elif "-" in name:
        head, _, prefix = name.rpartition("-")
        text = head.replace("-", ":") + "/" + prefix
    else:
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return str(net) if cidr_to_name(str(net)) == name else None


def block_affinity_name(host: str, cidr: str) -> str:
    """``<host>-<cidrname>``, hashed down when it would reach 253 characters (Calico's parseKey)."""
    cidrname = cidr_to_name(cidr)
    name = f"{host}-{cidrname}"
    if len(name) >= 253:
        digest = hashlib.sha256(f"{host}+{cidrname}".encode()).hexdigest()[:11]
        name = f"{host[:252 - len(cidrname) - 13]}-{cidrname}-{digest}"
    return name


def block_affinity_name_candidates(name: str) -> list[tuple[str, str]]:
    """Every (host, cidr) that :func:`block_affinity_name` maps to ``name`` (usually exactly one).

    Hashed (>= 253 character) names cannot be inverted and give no candidates.
    """
    out = []
    for i, ch in enumerate(name):
        if ch != "-" or i == 0:
            continue
        host, rest = name[:i], name[i + 1:]
        cidr = name_to_cidr(rest)
        if cidr is not None and block_affinity_name(host, cidr) == name:
            out.append((host, cidr))
    return out


def hostname_hash(host: str) -> str:
    """base32(sha3-256(host)) without padding: the BlockAffinity hostname-hash label value."""
    return base64.b32encode(hashlib.sha3_256(host.encode()).digest()).decode().rstrip("=")


def block_affinity_labels(spec: Mapping[str, Any]) -> dict[str, str]:
    cidr = str(spec.get("cidr") or "")
    return {
        LABEL_HOSTNAME_HASH: hostname_hash(str(spec.get("node") or "")),
        LABEL_AFFINITY_TYPE: str(spec.get("type") or "host"),
        LABEL_IP_VERSION: "6" if ":" in cidr else "4",
    }


# ---------------------------------------------------------------------------------------------------
# WorkloadEndpoint names and Pods
# ---------------------------------------------------------------------------------------------------

ANNOTATION_POD_IP = "cni.projectcalico.org/podIP"
ANNOTATION_POD_IPS = "cni.projectcalico.org/podIPs"
ANNOTATION_CONTAINER_ID = "cni.projectcalico.org/containerID"
ANNOTATION_AWS_POD_IPS = "vpc.amazonaws.com/pod-ips"
ANNOTATION_FLOATING_IPS = "cni.projectcalico.org/floatingIPs"
ANNOTATION_ALLOWED_SOURCE_PREFIXES = "cni.projectcalico.org/allowedSourcePrefixes"
ANNOTATION_NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"


@dataclass(frozen=True)
class WepIdentifiers:
    node: str = ""
    orchestrator: str = ""
    pod: str = ""
    workload: str = ""
    container_id: str = ""
    endpoint: str = ""


def _wep_parts(name: str) -> list[str]:
    parts = []
    last = -1
    i = 1
    while i < len(name):
        if name[i] == "-":
            if i < len(name) - 1 and name[i + 1] == "-":
                i += 2  # an escaped dash inside a segment
                continue
            parts.append(name[last + 1:i].replace("--", "-"))
            last = i
        i += 1
    parts.append(name[last + 1:].replace("--", "-"))
    return parts


def parse_wep_name(name: str) -> WepIdentifiers:
    """Calico's ParseWorkloadEndpointName (``node--1-k8s-web--0-eth0`` -> node-1 / k8s / web-0 / eth0)."""
    if not name:
        raise ValueError("cannot parse an empty WorkloadEndpoint name")
    parts = _wep_parts(name)
    if len(parts) == 1:
        return WepIdentifiers(node=parts[0])
    orch = parts[1]
    rest = parts[2:]
    if len(rest) > 2:
        raise ValueError(f"cannot parse WorkloadEndpoint name {name!r}: too many segments")
    first = rest[0] if rest else ""
    endpoint = rest[1] if len(rest) > 1 else ""
    if orch == ORCHESTRATOR_K8S:
        return WepIdentifiers(node=parts[0], orchestrator=orch, pod=first, endpoint=endpoint)
    if orch == "cni":
        return WepIdentifiers(node=parts[0], orchestrator=orch, container_id=first, endpoint=endpoint)
    if orch == "libnetwork":
        return WepIdentifiers(node=parts[0], orchestrator=first or orch, endpoint=endpoint)
    return WepIdentifiers(node=parts[0], orchestrator=orch, workload=first, endpoint=endpoint)


def pod_is_valid_wep(pod: Mapping[str, Any]) -> bool:
    """A Pod is shown as a WorkloadEndpoint when it is scheduled and not host-networked."""
    spec = pod.get("spec") or {}
    return not spec.get("hostNetwork") and bool(spec.get("nodeName"))


def pod_is_finished(pod: Mapping[str, Any]) -> bool:
    md = pod.get("metadata") or {}
    ann = md.get("annotations") or {}
    if md.get("deletionTimestamp") and "" in (ann.get(ANNOTATION_POD_IP), ann.get(ANNOTATION_AWS_POD_IPS)):
        return True  # the CNI plugin blanked the IP annotation at teardown
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded", "Completed")


def _ip_net(text: str) -> str:
    """An IP or CIDR as ``<ip>/<len>`` keeping the host address (Calico's ParseCIDROrIP)."""
    try:
        return ipaddress.ip_interface(text.strip()).with_prefixlen
    except ValueError:
        raise ConversionError(f"bad pod IP {text!r}") from None


def pod_ip_networks(pod: Mapping[str, Any]) -> list[str]:
    """Pod IPs as CIDRs, from status.podIPs, status.podIP, then the Calico and AWS annotations."""
    status = pod.get("status") or {}
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    ips: list[str]
    if status.get("podIPs"):
        ips = [str(p.get("ip", "")) for p in status["podIPs"]]
    elif status.get("podIP"):
        ips = [str(status["podIP"])]
    elif ann.get(ANNOTATION_POD_IPS):
        ips = str(ann[ANNOTATION_POD_IPS]).split(",")
    elif ann.get(ANNOTATION_POD_IP):
        ips = [str(ann[ANNOTATION_POD_IP])]
    elif ann.get(ANNOTATION_AWS_POD_IPS):
        ips = str(ann[ANNOTATION_AWS_POD_IPS]).split(",")
    else:
        return []
    return [_ip_net(ip) for ip in ips]


def _container_ports(containers: Any) -> list[dict[str, Any]]:
    out = []
    for c in containers or []:
        for p in c.get("ports") or []:
            port = int(p.get("containerPort") or 0)
            host_port = int(p.get("hostPort") or 0)
            name = str(p.get("name") or "")
            if not port or not (host_port or name):
                continue
            proto = {"UDP": "udp", "SCTP": "sctp", "TCP": "tcp", "": "tcp"}.get(str(p.get("protocol") or ""))
            if proto is None:
                continue  # Calico ignores named ports with other protocols
            out.append({"name": name, "protocol": proto, "port": port, "hostPort": host_port,
                        "hostIP": str(p.get("hostIP") or "")})
    return out


def _json_list(ann: Mapping[str, str], key: str) -> list[str]:
    try:
        value = json.loads(ann[key])
    except ValueError as e:
        raise ConversionError(f"failed to parse annotation {key}={ann[key]!r} as JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConversionError(f"annotation {key} must be a JSON list of strings")
    return value


def pod_owner_record(pod: Mapping[str, Any]) -> Resource:
    """The least a Pod that fails :func:`pod_to_wep` still says about the addresses it holds: namespace,
    pod, node, container ID and whichever IPs parse. Only for IPAM's "is this address in use?" (a malformed
    annotation must never make a running pod's address look leaked); the agent never sees it."""
    md = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    raw_ann = md.get("annotations")
    ann: dict[str, Any] = raw_ann if isinstance(raw_ann, dict) else {}
    ns, pod_name = str(md.get("namespace") or ""), str(md.get("name") or "")
    ips: list[str] = []
    try:
        ips = [] if pod_is_finished(pod) else pod_ip_networks(pod)
    except (ConversionError, ValueError):
        ips = []
    wep_spec: dict[str, Any] = {"orchestrator": ORCHESTRATOR_K8S, "node": str(spec.get("nodeName") or ""),
                                "pod": pod_name, "endpoint": "eth0", "ipNetworks": ips}
    if isinstance(ann.get(ANNOTATION_CONTAINER_ID), str) and ann[ANNOTATION_CONTAINER_ID]:
        wep_spec["containerID"] = ann[ANNOTATION_CONTAINER_ID]
    name = names.wep_name(wep_spec["node"], ORCHESTRATOR_K8S, pod_name, "eth0")
    return {"apiVersion": API_VERSION_V3, "kind": KIND_WEP,
            "metadata": {"name": name, "namespace": ns, "uid": str(md.get("uid") or ""),
                         "resourceVersion": str(md.get("resourceVersion") or "")},
            "spec": wep_spec}


def pod_to_wep(pod: Mapping[str, Any], *, interface_prefix: str = names.IFACE_PREFIX) -> Resource:
    """A valid Pod -> its WorkloadEndpoint (Calico's podToDefaultWorkloadEndpoint, minus QoS controls).

    ``interface_prefix`` is the first FELIX_INTERFACEPREFIX entry. Raises :class:`ConversionError` for a
    Pod whose IP or annotations are malformed.
    """
    md = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    ns = str(md.get("namespace") or "")
    pod_name = str(md.get("name") or "")
    node = str(spec.get("nodeName") or "")
    if not (ns and pod_name and node):
        raise ConversionError("Pod needs metadata.name, metadata.namespace and spec.nodeName")
    ann = _str_map(md.get("annotations"), "Pod annotations")
    sa = str(spec.get("serviceAccountName") or "")

    profiles = [f"kns.{ns}"]
    if sa:
        profiles.append(f"ksa.{ns}.{sa}")

    ip_nets = pod_ip_networks(pod)
    if pod_is_finished(pod):
        ip_nets = []  # a finished pod no longer owns its IPs

    labels = _str_map(md.get("labels"), "Pod labels")
    labels[LABEL_NAMESPACE] = ns
    labels[LABEL_ORCHESTRATOR] = ORCHESTRATOR_K8S
    if sa and len(sa) < 63:
        labels[LABEL_SERVICE_ACCOUNT] = sa

    wep_spec: dict[str, Any] = {
        "orchestrator": ORCHESTRATOR_K8S,
        "node": node,
        "pod": pod_name,
        "endpoint": "eth0",
        "interfaceName": names.veth_name_for_workload(ns, pod_name, interface_prefix),
        "profiles": profiles,
        "ipNetworks": ip_nets,
    }
    if ann.get(ANNOTATION_CONTAINER_ID):
        wep_spec["containerID"] = ann[ANNOTATION_CONTAINER_ID]
    if sa:
        wep_spec["serviceAccountName"] = sa
    ports = _container_ports(spec.get("containers")) + _container_ports(spec.get("initContainers"))
    if ports:
        wep_spec["ports"] = ports

    if ANNOTATION_FLOATING_IPS in ann and ip_nets:
        v4 = v6 = None
        for net in ip_nets:
            iface = ipaddress.ip_interface(net)
            if iface.network.prefixlen != iface.max_prefixlen:
                raise ConversionError(f"pod IP {net} must be a /{iface.max_prefixlen} to use floating IPs")
            if iface.version == 4:
                v4 = str(iface.ip)
            else:
                v6 = str(iface.ip)
        nats = []
        for ext in _json_list(ann, ANNOTATION_FLOATING_IPS):
            internal = v6 if ":" in ext else v4
            if internal:
                nats.append({"internalIP": internal, "externalIP": ext})
        if nats:
            wep_spec["ipNATs"] = nats

    if ann.get(ANNOTATION_ALLOWED_SOURCE_PREFIXES):
        prefixes = []
        for p in _json_list(ann, ANNOTATION_ALLOWED_SOURCE_PREFIXES):
            try:
                prefixes.append(str(ipaddress.ip_network(p, strict=False)))
            except ValueError:
                raise ConversionError(f"failed to parse {p!r} as a CIDR") from None
        if prefixes:
            wep_spec["allowSpoofedSourcePrefixes"] = prefixes

    wep_md: dict[str, Any] = {
        "name": names.wep_name(node, ORCHESTRATOR_K8S, pod_name, "eth0"),
        "namespace": ns,
        "labels": labels,
    }
    for src, dst in (("resourceVersion", "resourceVersion"), ("uid", "uid"),
                     ("creationTimestamp", "creationTimestamp"), ("generateName", "generateName")):
        if md.get(src):
            wep_md[dst] = md[src]
    if ANNOTATION_NETWORK_STATUS in ann:
        wep_md["annotations"] = {ANNOTATION_NETWORK_STATUS: ann[ANNOTATION_NETWORK_STATUS]}
    return {"apiVersion": API_VERSION_V3, "kind": KIND_WEP, "metadata": wep_md, "spec": wep_spec}


def wep_pod_patch(wep: Mapping[str, Any], *, resource_version: str = "", uid: str = "") -> dict[str, Any]:
    """The Pod status strategic-merge patch that a WorkloadEndpoint create/update becomes in KDD.

    Sets ``cni.projectcalico.org/podIP`` (first CIDR), ``podIPs`` (all, comma-joined) and ``containerID``;
    ``resource_version``/``uid`` make it conditional on that pod instance/version.
    """
    spec = wep.get("spec") or {}
    ips = [str(x) for x in spec.get("ipNetworks") or []]
    annotations: dict[str, str] = {}
    if ips:
        annotations[ANNOTATION_POD_IP] = ips[0]
        annotations[ANNOTATION_POD_IPS] = ",".join(ips)
        if spec.get("containerID"):
            annotations[ANNOTATION_CONTAINER_ID] = str(spec["containerID"])
    return _pod_patch(annotations, resource_version, uid)


def wep_delete_pod_patch(*, resource_version: str = "", uid: str = "") -> dict[str, Any]:
    """The Pod status patch for a WorkloadEndpoint delete: podIP/podIPs set to "" (containerID kept, so a
    repeated CNI DEL can still tell which sandbox it is looking at)."""
    return _pod_patch({ANNOTATION_POD_IP: "", ANNOTATION_POD_IPS: ""}, resource_version, uid)


def _pod_patch(annotations: dict[str, str], resource_version: str, uid: str) -> dict[str, Any]:
    md: dict[str, Any] = {}
    if annotations:
        md["annotations"] = annotations
    if resource_version:
        md["resourceVersion"] = resource_version
    if uid:
        md["uid"] = uid
    return {"metadata": md}


# ---------------------------------------------------------------------------------------------------
# Kubernetes Node <-> Calico Node
# ---------------------------------------------------------------------------------------------------

NODE_IPV4_ADDR = "projectcalico.org/IPv4Address"
NODE_IPV6_ADDR = "projectcalico.org/IPv6Address"
NODE_IPV4_IPIP_TUNNEL_ADDR = "projectcalico.org/IPv4IPIPTunnelAddr"
NODE_IPV4_VXLAN_TUNNEL_ADDR = "projectcalico.org/IPv4VXLANTunnelAddr"
NODE_VXLAN_TUNNEL_MAC = "projectcalico.org/VXLANTunnelMACAddr"
NODE_IPV6_VXLAN_TUNNEL_ADDR = "projectcalico.org/IPv6VXLANTunnelAddr"
NODE_VXLAN_TUNNEL_MAC_V6 = "projectcalico.org/VXLANTunnelMACAddrV6"
NODE_AS_NUMBER = "projectcalico.org/ASNumber"
NODE_RR_CLUSTER_ID = "projectcalico.org/RouteReflectorClusterID"
NODE_KUBE_LABELS = "projectcalico.org/kube-labels"
NODE_WG_IPV4_IFACE_ADDR = "projectcalico.org/IPv4WireguardInterfaceAddr"
NODE_WG_IPV6_IFACE_ADDR = "projectcalico.org/IPv6WireguardInterfaceAddr"
NODE_WG_PUBLIC_KEY = "projectcalico.org/WireguardPublicKey"
NODE_WG_PUBLIC_KEY_V6 = "projectcalico.org/WireguardPublicKeyV6"
NODE_INTERFACES = "projectcalico.org/Interfaces"

_MAC_RE = re.compile(r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$")


def _valid_cidr(version: int) -> Any:
    def check(v: str) -> bool:
        try:
            return ipaddress.ip_interface(v).version == version
        except ValueError:
            return False
    return check


def _valid_network(version: int) -> Any:
    # Calico's ValidateIPv4Network: an address, or a CIDR whose address is the network address.
    def check(v: str) -> bool:
        try:
            iface = ipaddress.ip_interface(v)
        except ValueError:
            return False
        return iface.version == version and iface.ip == iface.network.network_address
    return check


def _valid_mac(v: str) -> bool:
    return bool(_MAC_RE.match(v))


def parse_as_number(text: str) -> int | None:
    """``64512`` or dotted ``1.10`` (= 1*65536+10); None if invalid."""
    text = text.strip()
    if text.isdigit():
        n = int(text)
        return n if n < 2**32 else None
    a, dot, b = text.partition(".")
    if dot and a.isdigit() and b.isdigit() and int(a) < 2**16 and int(b) < 2**16:
        return (int(a) << 16) + int(b)
    return None


def k8s_node_to_calico(node: Mapping[str, Any], *, use_pod_cidr: bool = False) -> Resource:
    """A Kubernetes Node (decoded JSON) -> Calico Node (Calico's K8sNodeToCalico).

    Invalid annotation values are ignored, as Calico does. ``use_pod_cidr`` (host-local IPAM) derives the
    IPIP tunnel address from spec.podCIDR.
    """
    md = node.get("metadata") or {}
    name = str(md.get("name") or "")
    if not name:
        raise ConversionError("Node has no metadata.name")
    ann = _str_map(md.get("annotations"), "Node annotations")
    k8s_labels = _str_map(md.get("labels"), "Node labels")

    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    if ann.get(LABELS_ANNOTATION):
        try:
            labels = _str_map(json.loads(ann[LABELS_ANNOTATION]), LABELS_ANNOTATION)
        except (ValueError, ConversionError):
            labels = {}  # Calico logs and ignores a bad labels annotation
    if ann.get(ANNOTATIONS_ANNOTATION):
        try:
            annotations = _str_map(json.loads(ann[ANNOTATIONS_ANNOTATION]), ANNOTATIONS_ANNOTATION)
        except (ValueError, ConversionError):
            annotations = {}
    labels.update(k8s_labels)
    annotations[NODE_KUBE_LABELS] = go_json(k8s_labels) if md.get("labels") is not None else "null"

    def get(key: str, check: Any) -> str:
        v = ann.get(key, "")
        return v if v and check(v) else ""

    spec: dict[str, Any] = {}
    bgp: dict[str, Any] = {}
    for field_name, key, check in (("ipv4Address", NODE_IPV4_ADDR, _valid_cidr(4)),
                                   ("ipv6Address", NODE_IPV6_ADDR, _valid_cidr(6)),
                                   ("routeReflectorClusterID", NODE_RR_CLUSTER_ID, _valid_network(4))):
        if v := get(key, check):
            bgp[field_name] = v
    if NODE_AS_NUMBER in ann and (asn := parse_as_number(ann[NODE_AS_NUMBER])) is not None:
        bgp["asNumber"] = asn
    wireguard: dict[str, Any] = {}
    node_spec = node.get("spec") or {}
    if use_pod_cidr and node_spec.get("podCIDR"):
        tunnel = _static_tunnel_address(str(node_spec["podCIDR"]))
        if tunnel:
            bgp["ipv4IPIPTunnelAddr"] = tunnel
            if ann.get(NODE_WG_PUBLIC_KEY):
                wireguard["interfaceIPv4Address"] = tunnel
    else:
        if v := get(NODE_IPV4_IPIP_TUNNEL_ADDR, _valid_network(4)):
            bgp["ipv4IPIPTunnelAddr"] = v
        if v := get(NODE_WG_IPV4_IFACE_ADDR, _valid_network(4)):
            wireguard["interfaceIPv4Address"] = v
        if v := get(NODE_WG_IPV6_IFACE_ADDR, _valid_network(6)):
            wireguard["interfaceIPv6Address"] = v
    if bgp:
        spec["bgp"] = bgp
    if wireguard:
        spec["wireguard"] = wireguard
    for field_name, key, check in (("ipv4VXLANTunnelAddr", NODE_IPV4_VXLAN_TUNNEL_ADDR, _valid_network(4)),
                                   ("vxlanTunnelMACAddr", NODE_VXLAN_TUNNEL_MAC, _valid_mac),
                                   ("ipv6VXLANTunnelAddr", NODE_IPV6_VXLAN_TUNNEL_ADDR, _valid_network(6)),
                                   ("vxlanTunnelMACAddrV6", NODE_VXLAN_TUNNEL_MAC_V6, _valid_mac)):
        if v := get(key, check):
            spec[field_name] = v
    spec["orchRefs"] = [{"nodeName": name, "orchestrator": ORCHESTRATOR_K8S}]

    addresses = []
    for field_name in ("ipv4Address", "ipv6Address"):
        if bgp.get(field_name):
            addresses.append({"address": bgp[field_name], "type": "CalicoNodeIP"})
    for addr in (node.get("status") or {}).get("addresses") or []:
        kind = {"InternalIP": "InternalIP", "ExternalIP": "ExternalIP"}.get(str(addr.get("type")))
        if kind:
            addresses.append({"address": str(addr.get("address", "")), "type": kind})
    if addresses:
        spec["addresses"] = addresses
    if NODE_INTERFACES in ann:
        try:
            ifaces = json.loads(ann[NODE_INTERFACES])
            if isinstance(ifaces, list):
                spec["interfaces"] = [_clean_iface(i) for i in ifaces if isinstance(i, dict)]
        except ValueError:
            pass  # Calico logs and ignores it

    status: dict[str, Any] = {}
    if ann.get(NODE_WG_PUBLIC_KEY):
        status["wireguardPublicKey"] = ann[NODE_WG_PUBLIC_KEY]
    if ann.get(NODE_WG_PUBLIC_KEY_V6):
        status["wireguardPublicKeyV6"] = ann[NODE_WG_PUBLIC_KEY_V6]
    if node_spec.get("podCIDRs"):
        status["podCIDRs"] = [str(c) for c in node_spec["podCIDRs"]]

    out_md: dict[str, Any] = {"name": name}
    for k in ("resourceVersion", "uid", "creationTimestamp"):
        if md.get(k):
            out_md[k] = md[k]
    if labels:
        out_md["labels"] = labels
    out_md["annotations"] = annotations
    res: Resource = {"apiVersion": API_VERSION_V3, "kind": KIND_NODE, "metadata": out_md, "spec": spec}
    if status:
        res["status"] = status
    return res


def _clean_iface(iface: dict[str, Any]) -> dict[str, Any]:
    out = dict(iface)
    addrs = []
    for a in iface.get("addresses") or []:
        try:
            ipaddress.ip_address(str(a))
            addrs.append(str(a))
        except ValueError:
            continue
    if "addresses" in iface:
        out["addresses"] = addrs
    return out


def _static_tunnel_address(pod_cidr: str) -> str:
    try:
        net = ipaddress.ip_network(pod_cidr, strict=False)
    except ValueError:
        return ""
    if net.version != 4:
        return ""
    return str(ipaddress.ip_interface(pod_cidr).ip + 1)


def calico_node_patch(calico_node: Mapping[str, Any], *, resource_version: str = "") -> dict[str, Any]:
    """A Calico Node -> strategic-merge patch of the k8s Node's annotations (Calico's
    mergeCalicoNodeIntoK8sNode). ``None`` values delete an annotation. Kubernetes labels are never
    touched: the Calico-only labels go into ``projectcalico.org/labels``.
    """
    md = calico_node.get("metadata") or {}
    spec = calico_node.get("spec") or {}
    status = calico_node.get("status") or {}
    labels = _str_map(md.get("labels"), "labels")
    annotations = _str_map(md.get("annotations"), "annotations")
    kube_labels_raw = annotations.pop(NODE_KUBE_LABELS, "")
    if kube_labels_raw:
        try:
            kube_labels = json.loads(kube_labels_raw) or {}
        except ValueError:
            raise ValueError(f"annotation {NODE_KUBE_LABELS} is not valid JSON") from None
        for k in kube_labels:
            labels.pop(k, None)  # inherited from the k8s Node: not ours to store

    out: dict[str, str | None] = {
        LABELS_ANNOTATION: go_json(labels) if labels else None,
        ANNOTATIONS_ANNOTATION: go_json(annotations) if annotations else None,
    }

    def put(key: str, value: Any) -> None:
        out[key] = str(value) if value not in (None, "") else None

    put(NODE_IPV4_VXLAN_TUNNEL_ADDR, spec.get("ipv4VXLANTunnelAddr"))
    put(NODE_VXLAN_TUNNEL_MAC, spec.get("vxlanTunnelMACAddr"))
    put(NODE_IPV6_VXLAN_TUNNEL_ADDR, spec.get("ipv6VXLANTunnelAddr"))
    put(NODE_VXLAN_TUNNEL_MAC_V6, spec.get("vxlanTunnelMACAddrV6"))
    bgp = spec.get("bgp") or {}
    put(NODE_IPV4_ADDR, bgp.get("ipv4Address"))
    put(NODE_IPV4_IPIP_TUNNEL_ADDR, bgp.get("ipv4IPIPTunnelAddr"))
    put(NODE_IPV6_ADDR, bgp.get("ipv6Address"))
    put(NODE_AS_NUMBER, bgp.get("asNumber"))
    put(NODE_RR_CLUSTER_ID, bgp.get("routeReflectorClusterID"))
    wg = spec.get("wireguard") or {}
    put(NODE_WG_IPV4_IFACE_ADDR, wg.get("interfaceIPv4Address"))
    put(NODE_WG_IPV6_IFACE_ADDR, wg.get("interfaceIPv6Address"))
    put(NODE_WG_PUBLIC_KEY, status.get("wireguardPublicKey"))
    put(NODE_WG_PUBLIC_KEY_V6, status.get("wireguardPublicKeyV6"))
    ifaces = spec.get("interfaces")
    out[NODE_INTERFACES] = json.dumps(ifaces, separators=(",", ":")) if ifaces is not None else None

    patch_md: dict[str, Any] = {"annotations": out}
    if resource_version:
        patch_md["resourceVersion"] = resource_version
    return {"metadata": patch_md}


# ---------------------------------------------------------------------------------------------------
# Profiles from Namespaces and ServiceAccounts
# ---------------------------------------------------------------------------------------------------

NAMESPACE_PROFILE_PREFIX = "kns."
SERVICE_ACCOUNT_PROFILE_PREFIX = "ksa."
NAMESPACE_LABEL_PREFIX = "pcns."
SERVICE_ACCOUNT_LABEL_PREFIX = "pcsa."
NAME_LABEL = "projectcalico.org/name"
DEFAULT_ALLOW_PROFILE_NAME = "projectcalico-default-allow"
DEFAULT_ALLOW_PROFILE_REVISION = "1"


def default_allow_profile() -> Resource:
    """The static profile every Calico datastore reports (used by host endpoints)."""
    return {"apiVersion": API_VERSION_V3, "kind": KIND_PROFILE,
            "metadata": {"name": DEFAULT_ALLOW_PROFILE_NAME,
                         "resourceVersion": DEFAULT_ALLOW_PROFILE_REVISION},
            "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}


def join_profile_revisions(ns_rev: str, sa_rev: str) -> str:
    return f"{ns_rev}/{sa_rev}"


def split_profile_revision(rev: str) -> tuple[str, str]:
    """``"<nsRev>/<saRev>"`` -> the two parts ("" and "0" give empty parts)."""
    if rev in ("", "0"):
        return "", ""
    ns_rev, sep, sa_rev = rev.partition("/")
    if not sep or "/" in sa_rev:
        raise ValueError(f"profile revision {rev!r} is not <namespaceRev>/<serviceAccountRev>")
    return ns_rev, sa_rev


def _profile_md(name: str, src_md: Mapping[str, Any], revision: str) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "resourceVersion": revision}
    if src_md.get("creationTimestamp"):
        md["creationTimestamp"] = src_md["creationTimestamp"]
    if src_md.get("uid"):
        md["uid"] = convert_uid(str(src_md["uid"]))
    return md


def namespace_to_profile(ns: Mapping[str, Any]) -> Resource:
    md = ns.get("metadata") or {}
    name = str(md.get("name") or "")
    if not name:
        raise ConversionError("Namespace has no metadata.name")
    labels = {NAMESPACE_LABEL_PREFIX + k: v for k, v in _str_map(md.get("labels"), "labels").items()}
    labels[NAMESPACE_LABEL_PREFIX + NAME_LABEL] = name
    rev = join_profile_revisions(str(md.get("resourceVersion") or ""), "")
    return {"apiVersion": API_VERSION_V3, "kind": KIND_PROFILE,
            "metadata": _profile_md(NAMESPACE_PROFILE_PREFIX + name, md, rev),
            "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                     "labelsToApply": labels}}


def service_account_profile_name(namespace: str, sa: str) -> str:
    return f"{SERVICE_ACCOUNT_PROFILE_PREFIX}{namespace or 'default'}.{sa}"


def service_account_to_profile(sa: Mapping[str, Any]) -> Resource:
    md = sa.get("metadata") or {}
    name = str(md.get("name") or "")
    if not name:
        raise ConversionError("ServiceAccount has no metadata.name")
    labels = {SERVICE_ACCOUNT_LABEL_PREFIX + k: v for k, v in _str_map(md.get("labels"), "labels").items()}
    labels[SERVICE_ACCOUNT_LABEL_PREFIX + NAME_LABEL] = name
    rev = join_profile_revisions("", str(md.get("resourceVersion") or ""))
    profile_name = service_account_profile_name(str(md.get("namespace") or ""), name)
    return {"apiVersion": API_VERSION_V3, "kind": KIND_PROFILE,
            "metadata": _profile_md(profile_name, md, rev),
            "spec": {"labelsToApply": labels}}


def profile_name_to_namespace(name: str) -> str | None:
    return name[len(NAMESPACE_PROFILE_PREFIX):] if name.startswith(NAMESPACE_PROFILE_PREFIX) else None


def profile_name_to_service_account(name: str) -> tuple[str, str] | None:
    if not name.startswith(SERVICE_ACCOUNT_PROFILE_PREFIX):
        return None
    parts = name.split(".", 2)
    return (parts[1], parts[2]) if len(parts) == 3 and parts[1] and parts[2] else None


# ---------------------------------------------------------------------------------------------------
# Kubernetes NetworkPolicy
# ---------------------------------------------------------------------------------------------------

def k8s_network_policy_to_resource(np: Mapping[str, Any]) -> Resource:
    """networking.k8s.io/v1 NetworkPolicy -> kind KubernetesNetworkPolicy with the k8s spec unchanged
    (the policy layer converts it to Calico rules)."""
    md = np.get("metadata") or {}
    if not md.get("name") or not md.get("namespace"):
        raise ConversionError("NetworkPolicy needs metadata.name and metadata.namespace")
    out_md: dict[str, Any] = {"name": md["name"], "namespace": md["namespace"]}
    for k in ("resourceVersion", "uid", "creationTimestamp", "labels", "annotations"):
        if md.get(k):
            out_md[k] = md[k]
    return {"apiVersion": API_VERSION_V3, "kind": KIND_K8S_NETWORK_POLICY, "metadata": out_md,
            "spec": _dict(np.get("spec"), "spec")}


# ---------------------------------------------------------------------------------------------------
# etcd v3 layout
# ---------------------------------------------------------------------------------------------------

ETCD_V3_ROOT = "/calico/resources/v3/projectcalico.org/"
ETCD_IPAM_ROOT = "/calico/ipam/v2/"
ETCD_BLOCK_ROOT = "/calico/ipam/v2/assignment/"
ETCD_HANDLE_ROOT = "/calico/ipam/v2/handle/"
ETCD_IPAM_CONFIG_KEY = "/calico/ipam/v2/config"
# Affinities live under /calico/ipam/v2/<type>/<host>/ipv<N>/block/<cidr> for type host or virtual.
ETCD_AFFINITY_TYPES = ("host", "virtual")

# Plurals for kinds stored under ETCD_V3_ROOT that are not CRDs.
_ETCD_EXTRA_PLURALS = {
    KIND_NODE: "nodes",
    KIND_WEP: "workloadendpoints",
    KIND_PROFILE: "profiles",
    KIND_K8S_NETWORK_POLICY: "kubernetesnetworkpolicies",
}

_BLOCK_RE = re.compile(r"^/calico/ipam/v2/assignment/ipv[46]/block/([^/]+)$")
_AFFINITY_RE = re.compile(r"^/calico/ipam/v2/(host|virtual)/([^/]+)/ipv[46]/block/([^/]+)$")
_HANDLE_RE = re.compile(r"^/calico/ipam/v2/handle/([^/]+)$")


def etcd_plural(kind: str) -> str:
    if kind in _ETCD_EXTRA_PLURALS:
        return _ETCD_EXTRA_PLURALS[kind]
    if kind in CRD_PLURALS and kind not in IPAM_KINDS:
        return CRD_PLURALS[kind]
    raise ValueError(f"{kind} has no etcd v3 resource path")


def etcd_v3_path(key: Key) -> str:
    plural = etcd_plural(key.kind)
    if is_namespaced(key.kind):
        if not key.namespace:
            raise ValueError(f"{key}: namespace is required")
        return f"{ETCD_V3_ROOT}{plural}/{key.namespace}/{key.name}"
    return f"{ETCD_V3_ROOT}{plural}/{key.name}"


def etcd_v3_prefix(kind: str, namespace: str | None = None) -> str:
    prefix = f"{ETCD_V3_ROOT}{etcd_plural(kind)}/"
    if namespace and is_namespaced(kind):
        prefix += namespace + "/"
    return prefix


def etcd_v3_path_to_key(kind: str, path: str) -> Key | None:
    prefix = f"{ETCD_V3_ROOT}{etcd_plural(kind)}/"
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix):].split("/")
    if is_namespaced(kind):
        return Key(kind, rest[1], rest[0]) if len(rest) == 2 and all(rest) else None
    return Key(kind, rest[0]) if len(rest) == 1 and rest[0] else None


def etcd_v3_decode(key: Key, raw: bytes, mod_revision: int) -> Resource:
    """Stored v3 JSON -> v3 resource with ``resourceVersion`` = the key's mod_revision."""
    try:
        res = json.loads(raw)
    except ValueError as e:
        raise ConversionError(f"value is not valid JSON: {e}") from None
    if not isinstance(res, dict):
        raise ConversionError("value is not a JSON object")
    md = _dict(res.get("metadata"), "metadata")
    if "spec" in res and not isinstance(res["spec"], dict | type(None)):
        raise ConversionError("spec must be an object")
    md["name"] = key.name
    if key.namespace:
        md["namespace"] = key.namespace
    md["resourceVersion"] = str(mod_revision)
    res["metadata"] = md
    res["kind"] = key.kind
    res.setdefault("apiVersion", API_VERSION_V3)
    if res.get("spec") is None:
        res["spec"] = {}
    if key.kind in POLICY_KINDS:
        md["name"] = _policy_name(key.name, res["spec"])
    return res


def etcd_v3_encode(key: Key, res: Mapping[str, Any]) -> bytes:
    """v3 resource -> stored JSON (Calico's clientv3 clears resourceVersion before writing)."""
    out = dict(res)
    md = dict(_dict(out.get("metadata"), "metadata"))
    md.pop("resourceVersion", None)
    md["name"] = key.name
    if key.namespace:
        md["namespace"] = key.namespace
    else:
        md.pop("namespace", None)
    out["metadata"] = md
    out["kind"] = key.kind
    out["apiVersion"] = API_VERSION_V3
    out.setdefault("spec", {})
    return json.dumps(out, separators=(",", ":")).encode()


# --- IPAM keys -------------------------------------------------------------------------------------

def _ip_version(cidr: str) -> int:
    return ipaddress.ip_network(cidr, strict=False).version


def etcd_block_path(cidr: str) -> str:
    net = ipaddress.ip_network(cidr, strict=False)
    return f"{ETCD_BLOCK_ROOT}ipv{net.version}/block/{str(net).replace('/', '-', 1)}"


def etcd_affinity_path(host: str, cidr: str, affinity_type: str = "host") -> str:
    if affinity_type not in ETCD_AFFINITY_TYPES:
        raise ValueError(f"unknown affinity type {affinity_type!r}")
    if not host or "/" in host:
        raise ValueError(f"bad affinity host {host!r}")
    net = ipaddress.ip_network(cidr, strict=False)
    return f"{ETCD_IPAM_ROOT}{affinity_type}/{host}/ipv{net.version}/block/{str(net).replace('/', '-', 1)}"


def etcd_handle_path(handle_id: str) -> str:
    if not handle_id or "/" in handle_id:
        raise ValueError(f"bad IPAM handle id {handle_id!r}")
    return ETCD_HANDLE_ROOT + handle_id


def _path_cidr(segment: str) -> str:
    try:
        return str(ipaddress.ip_network(segment.replace("-", "/", 1), strict=False))
    except ValueError:
        raise ConversionError(f"bad CIDR in key: {segment!r}") from None


def etcd_ipam_path_to_key(kind: str, path: str) -> Key | None:
    """An IPAM etcd key -> the v3 Key it stores (``None`` if the path is not of that kind)."""
    if kind == KIND_IPAM_BLOCK:
        m = _BLOCK_RE.match(path)
        return Key(kind, cidr_to_name(_path_cidr(m.group(1)))) if m else None
    if kind == KIND_BLOCK_AFFINITY:
        m = _AFFINITY_RE.match(path)
        return Key(kind, block_affinity_name(m.group(2), _path_cidr(m.group(3)))) if m else None
    if kind == KIND_IPAM_HANDLE:
        m = _HANDLE_RE.match(path)
        return Key(kind, m.group(1)) if m else None
    if kind == KIND_IPAM_CONFIG:
        return Key(kind, "default") if path == ETCD_IPAM_CONFIG_KEY else None
    raise ValueError(f"{kind} is not an IPAM kind")


def _load_object(raw: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    if empty_ok and not raw:
        return {}
    try:
        v = json.loads(raw)
    except ValueError as e:
        raise ConversionError(f"value is not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise ConversionError("value is not a JSON object")
    return v


def _ipam_resource(kind: str, name: str, mod_revision: int, spec: dict[str, Any],
                   labels: dict[str, str] | None = None) -> Resource:
    md: dict[str, Any] = {"name": name, "resourceVersion": str(mod_revision)}
    if labels:
        md["labels"] = labels
    return {"apiVersion": API_VERSION_V3, "kind": kind, "metadata": md, "spec": spec}


def etcd_ipam_decode(kind: str, path: str, raw: bytes, mod_revision: int) -> Resource:
    """A v1 IPAM value at ``path`` -> v3 resource with CRD spec field names."""
    if kind == KIND_IPAM_BLOCK:
        m = _BLOCK_RE.match(path)
        if not m:
            raise ConversionError(f"not a block key: {path}")
        v = _load_object(raw)
        cidr = str(v.get("cidr") or _path_cidr(m.group(1)))
        affinity = v.get("affinity")
        if affinity is None and v.get("hostAffinity"):
            affinity = f"host:{v['hostAffinity']}"
        spec: dict[str, Any] = {
            "cidr": cidr,
            "affinity": affinity,
            "allocations": v.get("allocations") or [],
            "unallocated": v.get("unallocated") or [],
            "attributes": v.get("attributes") or [],
            "strictAffinity": False,
            "sequenceNumber": int(v.get("sequenceNumber") or 0),
            "sequenceNumberForAllocation": v.get("sequenceNumberForAllocation") or {},
            "deleted": bool(v.get("deleted", False)),
        }
        if v.get("affinity_claim_time"):
            spec["affinityClaimTime"] = v["affinity_claim_time"]
        return _ipam_resource(kind, cidr_to_name(cidr), mod_revision, spec)
    if kind == KIND_BLOCK_AFFINITY:
        m = _AFFINITY_RE.match(path)
        if not m:
            raise ConversionError(f"not a block affinity key: {path}")
        affinity_type, host, cidr = m.group(1), m.group(2), _path_cidr(m.group(3))
        v = _load_object(raw, empty_ok=True)  # old Calico stored affinities with no value
        spec = {"state": str(v.get("state") or ""), "node": host, "cidr": cidr, "type": affinity_type,
                "deleted": _parse_bool(v.get("deleted", False), "deleted")}
        return _ipam_resource(kind, block_affinity_name(host, cidr), mod_revision, spec,
                              block_affinity_labels(spec))
    if kind == KIND_IPAM_HANDLE:
        m = _HANDLE_RE.match(path)
        if not m:
            raise ConversionError(f"not a handle key: {path}")
        v = _load_object(raw)
        block = v.get("block") or {}
        if not isinstance(block, dict):
            raise ConversionError("handle block must be a map")
        spec = {"handleID": m.group(1), "block": {str(k): int(n) for k, n in block.items()},
                "deleted": bool(v.get("deleted", False))}
        return _ipam_resource(kind, m.group(1), mod_revision, spec)
    if kind == KIND_IPAM_CONFIG:
        v = _load_object(raw)
        spec = {"strictAffinity": bool(v.get("strict_affinity", False)),
                "autoAllocateBlocks": bool(v.get("auto_allocate_blocks", False)),
                "maxBlocksPerHost": int(v.get("maxBlocksPerHost") or 0)}
        if v.get("kubeVirtVMAddressPersistence"):
            spec["kubeVirtVMAddressPersistence"] = v["kubeVirtVMAddressPersistence"]
        if v.get("ipCooldownSeconds"):
            spec["ipCooldownSeconds"] = int(v["ipCooldownSeconds"])
        return _ipam_resource(kind, "default", mod_revision, spec)
    raise ValueError(f"{kind} is not an IPAM kind")


def etcd_ipam_encode(kind: str, key: Key, res: Mapping[str, Any]) -> tuple[str, bytes]:
    """v3 IPAM resource -> (etcd key, v1 JSON). Validates that the name matches the spec."""
    spec = _dict(res.get("spec"), "spec")
    if kind == KIND_IPAM_BLOCK:
        cidr = str(spec.get("cidr") or "")
        if not cidr:
            raise ValueError("IPAMBlock spec.cidr is required")
        if cidr_to_name(cidr) != key.name:
            raise ValueError(f"IPAMBlock name {key.name!r} does not match spec.cidr {cidr}")
        v: dict[str, Any] = {
            "cidr": str(ipaddress.ip_network(cidr, strict=False)),
            "affinity": spec.get("affinity"),
            "allocations": spec.get("allocations") or [],
            "unallocated": spec.get("unallocated") or [],
            "attributes": spec.get("attributes") or [],
            "sequenceNumber": int(spec.get("sequenceNumber") or 0),
            "sequenceNumberForAllocation": spec.get("sequenceNumberForAllocation") or None,
            "deleted": bool(spec.get("deleted", False)),
        }
        if spec.get("affinityClaimTime"):
            v["affinity_claim_time"] = spec["affinityClaimTime"]
        return etcd_block_path(cidr), _dump(v)
    if kind == KIND_BLOCK_AFFINITY:
        host, cidr = str(spec.get("node") or ""), str(spec.get("cidr") or "")
        if not host or not cidr:
            raise ValueError("BlockAffinity spec.node and spec.cidr are required")
        if block_affinity_name(host, cidr) != key.name:
            raise ValueError(f"BlockAffinity name {key.name!r} does not match {host}/{cidr}")
        v = {"state": str(spec.get("state") or ""), "deleted": _parse_bool(spec.get("deleted"), "deleted")}
        return etcd_affinity_path(host, cidr, str(spec.get("type") or "host")), _dump(v)
    if kind == KIND_IPAM_HANDLE:
        handle_id = str(spec.get("handleID") or key.name)
        if handle_id != key.name:
            raise ValueError(f"IPAMHandle name {key.name!r} does not match spec.handleID {handle_id!r} "
                             "(etcd keys handles by their exact ID)")
        block = spec.get("block") or {}
        v = {"block": {str(k): int(n) for k, n in block.items()}, "deleted": bool(spec.get("deleted", False))}
        return etcd_handle_path(handle_id), _dump(v)
    if kind == KIND_IPAM_CONFIG:
        if key.name != "default":
            raise ValueError("IPAMConfig is a singleton named 'default'")
        v = {}
        if spec.get("strictAffinity"):
            v["strict_affinity"] = True
        if spec.get("autoAllocateBlocks"):
            v["auto_allocate_blocks"] = True
        if spec.get("maxBlocksPerHost"):
            v["maxBlocksPerHost"] = int(spec["maxBlocksPerHost"])
        if spec.get("kubeVirtVMAddressPersistence"):
            v["kubeVirtVMAddressPersistence"] = spec["kubeVirtVMAddressPersistence"]
        if spec.get("ipCooldownSeconds"):
            v["ipCooldownSeconds"] = int(spec["ipCooldownSeconds"])
        return ETCD_IPAM_CONFIG_KEY, _dump(v)
    raise ValueError(f"{kind} is not an IPAM kind")


def _dump(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


def etcd_ipam_candidate_paths(key: Key) -> list[str]:
    """The etcd key(s) that may hold the IPAM object ``key`` names (several only for an ambiguous
    BlockAffinity name: ``<host>-<cidrname>`` can split more than one way, and the type is not in it)."""
    if key.kind == KIND_IPAM_BLOCK:
        cidr = name_to_cidr(key.name)
        if cidr is None:
            raise ValueError(f"IPAMBlock name {key.name!r} is not a CIDR name")
        return [etcd_block_path(cidr)]
    if key.kind == KIND_BLOCK_AFFINITY:
        return [etcd_affinity_path(host, cidr, t)
                for host, cidr in block_affinity_name_candidates(key.name) for t in ETCD_AFFINITY_TYPES]
    if key.kind == KIND_IPAM_HANDLE:
        return [etcd_handle_path(key.name)]
    if key.kind == KIND_IPAM_CONFIG:
        if key.name != "default":
            raise ValueError("IPAMConfig is a singleton named 'default'")
        return [ETCD_IPAM_CONFIG_KEY]
    raise ValueError(f"{key.kind} is not an IPAM kind")


def etcd_ipam_range(kind: str, opts_host: str | None = None) -> tuple[str, str]:
    """[start, end) etcd key range holding every object of an IPAM kind (optionally one host's affinities)."""
    if kind == KIND_IPAM_BLOCK:
        return ETCD_BLOCK_ROOT, prefix_end(ETCD_BLOCK_ROOT)
    if kind == KIND_BLOCK_AFFINITY:
        if opts_host:
            p = f"{ETCD_IPAM_ROOT}host/{opts_host}/"
            return p, prefix_end(p)
        # "host/" .. "virtual/" are adjacent in Calico's layout (handle/ sorts before host/): one range.
        return f"{ETCD_IPAM_ROOT}host/", prefix_end(f"{ETCD_IPAM_ROOT}virtual/")
    if kind == KIND_IPAM_HANDLE:
        return ETCD_HANDLE_ROOT, prefix_end(ETCD_HANDLE_ROOT)
    if kind == KIND_IPAM_CONFIG:
        return ETCD_IPAM_CONFIG_KEY, ETCD_IPAM_CONFIG_KEY + "\0"
    raise ValueError(f"{kind} is not an IPAM kind")


def prefix_end(prefix: str) -> str:
    # Keys here are ASCII; bumping the last character gives the first key after the prefix.
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
