"""The datastore contract every backend implements (Kubernetes API, etcd v3, in-memory).

Everything above this layer (IPAM, syncer, CNI handler, agent) speaks Calico **v3 resources** as plain
dicts, whichever backend stores them:

    {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
     "metadata": {"name": ..., "namespace": ... (namespaced kinds only), "labels": {...},
                  "annotations": {...}, "resourceVersion": "...", "uid": "...", "creationTimestamp": "..."},
     "spec": {...}}

Backends translate to and from their storage form:
- Kubernetes: Calico kinds are CRDs in ``crd.projectcalico.org/v1`` (v3 metadata in the
  ``projectcalico.org/metadata`` annotation); ``WorkloadEndpoint`` is derived from Pods, ``Node`` from
  k8s Nodes + ``projectcalico.org/*`` annotations, ``Profile`` from Namespaces/ServiceAccounts,
  ``KubernetesNetworkPolicy`` from networking.k8s.io NetworkPolicies.
- etcd v3: Calico's key layout (``/calico/resources/v3/projectcalico.org/<plural>/[<ns>/]<name>``
  holding the v3 JSON; IPAM kinds under ``/calico/ipam/v2/...`` holding Calico's v1 IPAM JSON).

IPAM kinds (IPAMBlock, BlockAffinity, IPAMHandle, IPAMConfig) use the *CRD spec* field names in
``spec`` in every backend (e.g. IPAMBlock spec: cidr, affinity, allocations, unallocated, attributes,
strictAffinity, sequenceNumber, sequenceNumberForAllocation, deleted).

Revisions are strings (k8s resourceVersion / etcd mod_revision). Every write is compare-and-swap:
``update`` and ``delete`` with a revision fail with :class:`Conflict` if the stored revision differs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Resource = dict[str, Any]

# Calico v3 kinds known to the agent. Namespaced kinds are listed in NAMESPACED_KINDS.
KIND_IPPOOL = "IPPool"
KIND_IPAM_BLOCK = "IPAMBlock"
KIND_BLOCK_AFFINITY = "BlockAffinity"
KIND_IPAM_HANDLE = "IPAMHandle"
KIND_IPAM_CONFIG = "IPAMConfig"
KIND_CLUSTER_INFO = "ClusterInformation"
KIND_FELIX_CONFIG = "FelixConfiguration"
KIND_BGP_CONFIG = "BGPConfiguration"
KIND_BGP_PEER = "BGPPeer"
KIND_NODE = "Node"
KIND_WEP = "WorkloadEndpoint"
KIND_PROFILE = "Profile"
KIND_NETWORK_POLICY = "NetworkPolicy"
KIND_GLOBAL_NETWORK_POLICY = "GlobalNetworkPolicy"
KIND_K8S_NETWORK_POLICY = "KubernetesNetworkPolicy"
KIND_NETWORK_SET = "NetworkSet"
KIND_GLOBAL_NETWORK_SET = "GlobalNetworkSet"
KIND_HOST_ENDPOINT = "HostEndpoint"
KIND_TIER = "Tier"

NAMESPACED_KINDS = frozenset({KIND_WEP, KIND_NETWORK_POLICY, KIND_NETWORK_SET, KIND_K8S_NETWORK_POLICY})

API_VERSION_V3 = "projectcalico.org/v3"


@dataclass(frozen=True, order=True)
class Key:
    kind: str
    name: str
    namespace: str = ""

    def __str__(self) -> str:
        return f"{self.kind}({self.namespace + '/' if self.namespace else ''}{self.name})"


@dataclass
class KVPair:
    key: Key
    value: Resource
    revision: str = ""
    # Storage UID (k8s metadata.uid); used as a delete precondition. Empty for etcd.
    uid: str = ""


@dataclass
class ListResult:
    items: list[KVPair]
    # Revision to start a watch from so that no change after the list is missed.
    revision: str


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    key: Key
    # The new value for "put"; for "delete" the last known value if the backend has it, else None.
    kv: KVPair | None
    revision: str = ""


@dataclass(frozen=True)
class ListOptions:
    """Server-side filters a backend may apply (a backend that cannot filter filters client-side)."""

    namespace: str | None = None
    # WorkloadEndpoints: only those on this node (k8s: Pod fieldSelector spec.nodeName).
    node: str | None = None
    # IPAM: BlockAffinities of one host only.
    host: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class DatastoreError(Exception):
    """Base class of every datastore failure surfaced to callers."""


class NotFound(DatastoreError):
    pass


class AlreadyExists(DatastoreError):
    pass


class Conflict(DatastoreError):
    """CAS failure: the stored revision (or uid) differs from the one the caller supplied."""


class Expired(DatastoreError):
    """The watch revision is too old (k8s 410 Gone / etcd compacted): relist."""


class Unavailable(DatastoreError):
    """The datastore could not be reached (connection refused, timeout, 5xx)."""


class Invalid(DatastoreError):
    """The datastore refused a value (validation failure, 422)."""


class Backend(Protocol):
    """One datastore. All methods are coroutines safe to call concurrently from one event loop."""

    type_name: str  # "kubernetes" | "etcdv3" | "memory"

    async def get(self, key: Key) -> KVPair:
        """Return the current value; raise NotFound."""
        ...

    async def list(self, kind: str, opts: ListOptions | None = None) -> ListResult: ...

    async def create(self, key: Key, value: Resource) -> KVPair:
        """Create; raise AlreadyExists. Returns the stored pair with its new revision."""
        ...

    async def update(self, kv: KVPair) -> KVPair:
        """CAS update at kv.revision (empty revision = unconditional); raise Conflict / NotFound."""
        ...

    async def delete(self, key: Key, revision: str = "", uid: str = "") -> None:
        """Delete, conditional on revision/uid when given; raise NotFound / Conflict."""
        ...

    def watch(self, kind: str, revision: str, opts: ListOptions | None = None) -> AsyncIterator[WatchEvent]:
        """Stream changes after ``revision``. Raises Expired when the revision was compacted.

        The iterator may end (server closed the stream); the caller re-watches from the last revision seen.
        """
        ...

    async def close(self) -> None: ...


def key_of(resource: Resource) -> Key:
    md = resource.get("metadata") or {}
    return Key(kind=str(resource.get("kind", "")), name=str(md.get("name", "")),
               namespace=str(md.get("namespace", "") or ""))


def new_resource(key: Key, spec: dict[str, Any], *, labels: dict[str, str] | None = None,
                 annotations: dict[str, str] | None = None) -> Resource:
    """A fresh v3 resource dict for ``key`` (no revision)."""
    md: dict[str, Any] = {"name": key.name}
    if key.namespace:
        md["namespace"] = key.namespace
    if labels:
        md["labels"] = dict(labels)
    if annotations:
        md["annotations"] = dict(annotations)
    return {"apiVersion": API_VERSION_V3, "kind": key.kind, "metadata": md, "spec": spec}
