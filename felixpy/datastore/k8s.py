"""The Kubernetes API backend (``DATASTORE_TYPE=kubernetes``, "KDD"): the only importer of kubernetes_asyncio.

What each v3 kind maps to (Calico's ``libcalico-go/lib/backend/k8s``):

* Calico CRD kinds -> ``crd.projectcalico.org/v1`` custom resources (conversion in
  :mod:`felixpy.datastore.conversion`); ``KVPair.uid`` is the raw CR uid (used in delete preconditions),
  ``metadata.uid`` the converted v3 uid. Updates are PUTs carrying ``metadata.resourceVersion``: an empty
  ``KVPair.revision`` first reads the current one (CRs cannot be updated unconditionally).
* ``WorkloadEndpoint`` -> Pods. Reads convert valid pods (scheduled, not host-networked); with
  ``ListOptions.node`` the server filters on ``spec.nodeName``, and ``ListOptions.extra["pod"]`` narrows to
  one pod name. create/update/delete are strategic-merge PATCHes of the pod's **status** subresource
  that set (or blank) the ``cni.projectcalico.org/podIP``, ``podIPs`` and ``containerID`` annotations, as
  Calico's CNI plugin does; the revision is the pod's resourceVersion and ``KVPair.uid`` the pod uid. A
  create never raises AlreadyExists (it is the same patch); a missing pod is NotFound.
* ``Node`` -> Kubernetes Nodes plus ``projectcalico.org/*`` annotations. ``update`` PATCHes the node's
  status subresource (the RBAC calico-node has) with the annotations; Calico-only labels and annotations
  go into ``projectcalico.org/labels`` / ``projectcalico.org/annotations``, Kubernetes labels are never
  written. create/delete are refused with :class:`Invalid` (nodes belong to Kubernetes).
* ``Profile`` -> Namespaces (``kns.<ns>``) and ServiceAccounts (``ksa.<ns>.<sa>``) plus the static
  ``projectcalico-default-allow``; read-only. Revisions are ``"<namespaceRV>/<serviceAccountRV>"``.
* ``KubernetesNetworkPolicy`` -> ``networking.k8s.io/v1`` NetworkPolicies; read-only.

HTTP errors map to: 404 NotFound, 409 AlreadyExists (create) / Conflict (otherwise), 410 Expired,
400/422 Invalid, 429/5xx and connection failures Unavailable, 401/403 DatastoreError.

Watches send ``allowWatchBookmarks`` and a server-side timeout; when the server ends a stream normally the
watch resumes transparently from the newest resourceVersion seen (bookmarks included), so a quiet kind does
not fall behind the compaction window. A stream broken by the network just ends (the caller re-watches
from the last revision it saw); a 410 (as an HTTP status or an ERROR event) raises :class:`Expired`.

Malformed stored objects (e.g. a CR whose ``projectcalico.org/metadata`` annotation is not JSON, a pod
with an unparsable IP): ``get`` raises :class:`Invalid` naming the object; ``list`` leaves it out and logs
a warning; ``watch`` reports it as a ``delete`` of its key (logged), so list and watch agree and no stale
copy survives in a consumer. Nothing is written back.

All requests share one aiohttp session (kubernetes_asyncio's ApiClient) and skip the generated model
classes: bodies are decoded straight from JSON.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from felixpy import names
from felixpy.datastore import conversion as cv
from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_K8S_NETWORK_POLICY,
    KIND_NODE,
    KIND_PROFILE,
    KIND_WEP,
    AlreadyExists,
    Conflict,
    DatastoreError,
    Expired,
    Invalid,
    Key,
    KVPair,
    ListOptions,
    ListResult,
    NotFound,
    Resource,
    Unavailable,
    WatchEvent,
)

log = logging.getLogger(__name__)

JSON = "application/json"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"

_CONN_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _status_of(body: Any) -> tuple[str, str]:
    if isinstance(body, dict):
        return str(body.get("reason") or ""), str(body.get("message") or "")
    return "", str(body)[:500]


def map_http_error(status: int, body: Any, what: str, *, creating: bool = False) -> DatastoreError:
    """The datastore error for an HTTP failure ``status`` with decoded ``body`` (a k8s Status)."""
    reason, message = _status_of(body)
    text = f"{what}: {message or reason or f'HTTP {status}'}"
    if status == 404:
        return NotFound(text)
    if status == 409:
        if creating or reason == "AlreadyExists":
            return AlreadyExists(text)
        return Conflict(text)
    if status == 410:
        return Expired(text)
    if status in (400, 422):
        return Invalid(text)
    if status == 429 or status >= 500:
        return Unavailable(text)
    return DatastoreError(f"{text} (HTTP {status})")


class _End:
    pass


class K8sBackend:
    """Calico's KDD data model over the Kubernetes API."""

    type_name = "kubernetes"

    def __init__(self, api: Any, *, interface_prefix: str = names.IFACE_PREFIX, use_pod_cidr: bool = False,
                 page_size: int = 500, watch_timeout: int = 300, request_timeout: float = 30.0) -> None:
        """Use :meth:`from_kubeconfig`, :meth:`in_cluster` or :meth:`from_host` rather than this.

        ``api`` is a kubernetes_asyncio ``ApiClient`` (owned by the backend: :meth:`close` closes it).
        ``interface_prefix`` is FELIX_INTERFACEPREFIX (its first entry names workload veths).
        """
        self._api = api
        self._iface_prefix = interface_prefix.split(",")[0] or names.IFACE_PREFIX
        self._use_pod_cidr = use_pod_cidr
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    async def from_kubeconfig(cls, path: str, *, context: str | None = None, **kwargs: Any) -> K8sBackend:
        cfg = k8s_client.Configuration()
        try:
            await k8s_config.load_kube_config(config_file=path, context=context, client_configuration=cfg,
                                              persist_config=False)
        except (k8s_config.ConfigException, OSError, ValueError) as e:
            raise Invalid(f"cannot load kubeconfig {path}: {e}") from e
        return cls(k8s_client.ApiClient(cfg), **kwargs)

    @classmethod
    async def in_cluster(cls, **kwargs: Any) -> K8sBackend:
        """The pod's service-account token and CA (re-read when the token file rotates)."""
        cfg = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException as e:
            raise Invalid(f"not running in a cluster: {e}") from e
        return cls(k8s_client.ApiClient(cfg), **kwargs)

    from_in_cluster = in_cluster

    @classmethod
    async def from_host(cls, host: str, token: str, *, verify: bool = True, ca_file: str | None = None,
                        **kwargs: Any) -> K8sBackend:
        cfg = k8s_client.Configuration(host=host, api_key={"BearerToken": token},
                                       api_key_prefix={"BearerToken": "Bearer"}, ssl_ca_cert=ca_file)
        cfg.verify_ssl = verify
        return cls(k8s_client.ApiClient(cfg), **kwargs)

    async def close(self) -> None:
        await self._api.close()

    # --- HTTP -----------------------------------------------------------------------------------
    async def _send(self, method: str, path: str, query: Mapping[str, str] | None, body: Any,
                    content_type: str, timeout: Any) -> Any:
        return await self._api.call_api(
            path, method, query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": JSON}, body=body,
            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
            _request_timeout=timeout)

    async def _request(self, method: str, path: str, *, what: str, query: Mapping[str, str] | None = None,
                       body: Any = None, content_type: str = JSON, creating: bool = False) -> dict[str, Any]:
        try:
            resp = await self._send(method, path, query, body, content_type, self._request_timeout)
            async with resp:
                status = resp.status
                raw = await resp.read()
        except _CONN_ERRORS as e:
            raise Unavailable(f"{what}: cannot reach the Kubernetes API: {e!r}") from e
        try:
            decoded: Any = json.loads(raw) if raw else {}
        except ValueError:
            decoded = raw.decode(errors="replace")
        if 200 <= status < 300:
            if not isinstance(decoded, dict):
                raise Unavailable(f"{what}: unexpected response body")
            return decoded
        raise map_http_error(status, decoded, what, creating=creating)

    async def _list_raw(self, path: str, what: str,
                        query: Mapping[str, str] | None = None) -> tuple[builtins.list[dict[str, Any]], str]:
        items: builtins.list[dict[str, Any]] = []
        q = dict(query or {})
        q["limit"] = str(self._page_size)
        while True:
            body = await self._request("GET", path, what=what, query=q)
            items.extend(body.get("items") or [])
            md = body.get("metadata") or {}
            if not md.get("continue"):
                return items, str(md.get("resourceVersion") or "")
            q["continue"] = str(md["continue"])

    async def _watch_raw(self, path: str, what: str, revision: str,
                         query: Mapping[str, str] | None = None) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) for ADDED/MODIFIED/DELETED, resuming after normal server-side stream ends."""
        rv = revision
        first = True
        while True:
            q = dict(query or {})
            q.update(watch="true", allowWatchBookmarks="true",
                     # Spread re-watches like client-go does, so many watchers do not reconnect together.
                     timeoutSeconds=str(int(self._watch_timeout * random.uniform(1.0, 1.5))))
            if rv:
                q["resourceVersion"] = rv
            timeout = aiohttp.ClientTimeout(sock_connect=self._request_timeout,
                                            sock_read=int(q["timeoutSeconds"]) + 30)
            try:
                resp = await self._send("GET", path, q, None, JSON, timeout)
            except _CONN_ERRORS as e:
                if first:
                    raise Unavailable(f"{what}: cannot start watch: {e!r}") from e
                return
            async with resp:
                if resp.status != 200:
                    raw = await resp.read()
                    try:
                        body: Any = json.loads(raw)
                    except ValueError:
                        body = raw.decode(errors="replace")
                    raise map_http_error(resp.status, body, f"watch {what}")
                first = False
                try:
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        typ = str(ev.get("type") or "")
                        obj = ev.get("object") or {}
                        if typ == "ERROR":
                            code = int(obj.get("code") or 0)
                            raise map_http_error(code or 500, obj, f"watch {what}")
                        new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                        if new_rv:
                            rv = new_rv
                        if typ in ("ADDED", "MODIFIED", "DELETED"):
                            yield typ, obj
                except (*_CONN_ERRORS, ValueError) as e:
                    log.info("watch %s ended: %r", what, e)
                    return
            if not rv:
                return

    # --- dispatch -------------------------------------------------------------------------------
    @staticmethod
    def _is_crd_kind(kind: str) -> bool:
        return kind in cv.CRD_PLURALS

    def _unknown(self, kind: str) -> Invalid:
        return Invalid(f"kind {kind!r} is not supported by the Kubernetes datastore")

    async def get(self, key: Key) -> KVPair:
        if self._is_crd_kind(key.kind):
            return await self._cr_get(key)
        if key.kind == KIND_WEP:
            return await self._wep_get(key)
        if key.kind == KIND_NODE:
            node = await self._request("GET", f"/api/v1/nodes/{_q(key.name)}", what=str(key))
            return self._node_kv(node, key)
        if key.kind == KIND_PROFILE:
            return await self._profile_get(key)
        if key.kind == KIND_K8S_NETWORK_POLICY:
            self._need_ns(key)
            np = await self._request("GET", f"{self._knp_path(key.namespace)}/{_q(key.name)}", what=str(key))
            return self._convert_one(key, np, cv.k8s_network_policy_to_resource)
        raise self._unknown(key.kind)

    async def list(self, kind: str, opts: ListOptions | None = None) -> ListResult:
        opts = opts or ListOptions()
        if self._is_crd_kind(kind):
            return await self._cr_list(kind, opts)
        if kind == KIND_WEP:
            path, query = self._pods_path_query(opts)
            pods, rv = await self._list_raw(path, "list WorkloadEndpoints", query)
            if opts.extra.get("owners"):
                # IPAM's view (ipam check/release): a pod whose annotations do not convert still owns
                # its addresses, so it is listed as a minimal owner record instead of being skipped.
                return ListResult([kv for p in pods if cv.pod_is_valid_wep(p)
                                   and (kv := self._wep_kv_or_owner(p)) is not None], rv)
            return ListResult([kv for p in pods if (kv := self._wep_from_pod_or_skip(p)) is not None], rv)
        if kind == KIND_NODE:
            nodes, rv = await self._list_raw("/api/v1/nodes", "list Nodes")
            return ListResult(self._keep(KIND_NODE, nodes, self._node_kv), rv)
        if kind == KIND_PROFILE:
            return await self._profile_list()
        if kind == KIND_K8S_NETWORK_POLICY:
            nps, rv = await self._list_raw(self._knp_path(opts.namespace), "list NetworkPolicies")
            return ListResult(self._keep(kind, nps, self._knp_kv), rv)
        raise self._unknown(kind)

    async def create(self, key: Key, value: Resource) -> KVPair:
        if self._is_crd_kind(key.kind):
            return await self._cr_create(key, value)
        if key.kind == KIND_WEP:
            md = value.get("metadata") or {}
            return await self._wep_patch(key, cv.wep_pod_patch(value, uid=str(md.get("uid") or "")), value)
        if key.kind == KIND_NODE:
            raise Invalid(f"{key}: creating a Calico Node is not supported with the Kubernetes datastore "
                          "(Nodes are created by Kubernetes; update the existing Node instead)")
        if key.kind in (KIND_PROFILE, KIND_K8S_NETWORK_POLICY):
            raise Invalid(f"{key}: {key.kind} is read-only with the Kubernetes datastore")
        raise self._unknown(key.kind)

    async def update(self, kv: KVPair) -> KVPair:
        key = kv.key
        if self._is_crd_kind(key.kind):
            return await self._cr_update(kv)
        if key.kind == KIND_WEP:
            uid = kv.uid or str((kv.value.get("metadata") or {}).get("uid") or "")
            patch = cv.wep_pod_patch(kv.value, resource_version=kv.revision, uid=uid)
            return await self._wep_patch(key, patch, kv.value)
        if key.kind == KIND_NODE:
            try:
                patch = cv.calico_node_patch(kv.value, resource_version=kv.revision)
            except ValueError as e:
                raise Invalid(f"{key}: {e}") from None
            node = await self._request("PATCH", f"/api/v1/nodes/{_q(key.name)}/status", what=f"update {key}",
                                       body=patch, content_type=STRATEGIC_MERGE)
            return self._node_kv(node, key)
        if key.kind in (KIND_PROFILE, KIND_K8S_NETWORK_POLICY):
            raise Invalid(f"{key}: {key.kind} is read-only with the Kubernetes datastore")
        raise self._unknown(key.kind)

    async def delete(self, key: Key, revision: str = "", uid: str = "") -> None:
        if self._is_crd_kind(key.kind):
            await self._cr_delete(key, revision, uid)
            return
        if key.kind == KIND_WEP:
            await self._wep_patch(key, cv.wep_delete_pod_patch(resource_version=revision, uid=uid), None)
            return
        if key.kind == KIND_NODE:
            raise Invalid(f"{key}: deleting a Calico Node is not supported with the Kubernetes datastore")
        if key.kind in (KIND_PROFILE, KIND_K8S_NETWORK_POLICY):
            raise Invalid(f"{key}: {key.kind} is read-only with the Kubernetes datastore")
        raise self._unknown(key.kind)

    async def watch(self, kind: str, revision: str,
                    opts: ListOptions | None = None) -> AsyncIterator[WatchEvent]:
        """Events after ``revision`` (a list's revision). An empty revision makes the API server first
        replay every current object as a ``put`` (the etcd backend instead starts from "now")."""
        opts = opts or ListOptions()
        if self._is_crd_kind(kind):
            path, query = self._cr_path_query(kind, opts)
            async for typ, obj in self._watch_raw(path, f"{kind}s", revision, query):
                ev = self._to_event(kind, typ, obj, self._cr_kv_from_obj(kind))
                if ev is not None and self._cr_wanted(kind, ev, opts):
                    yield ev
        elif kind == KIND_WEP:
            path, query = self._pods_path_query(opts)
            async for typ, obj in self._watch_raw(path, "WorkloadEndpoints", revision, query):
                if not cv.pod_is_valid_wep(obj):
                    continue
                ev = self._to_event(kind, typ, obj, self._wep_kv)
                if ev is not None:
                    yield ev
        elif kind == KIND_NODE:
            async for typ, obj in self._watch_raw("/api/v1/nodes", "Nodes", revision):
                ev = self._to_event(kind, typ, obj, self._node_kv)
                if ev is not None:
                    yield ev
        elif kind == KIND_PROFILE:
            async for ev in self._profile_watch(revision):
                yield ev
        elif kind == KIND_K8S_NETWORK_POLICY:
            path = self._knp_path(opts.namespace)
            async for typ, obj in self._watch_raw(path, "NetworkPolicies", revision):
                ev = self._to_event(kind, typ, obj, self._knp_kv)
                if ev is not None:
                    yield ev
        else:
            raise self._unknown(kind)

    # --- helpers shared by kinds ----------------------------------------------------------------
    @staticmethod
    def _need_ns(key: Key) -> None:
        if not key.namespace:
            raise Invalid(f"{key}: a namespace is required")

    @staticmethod
    def _obj_key_text(kind: str, obj: Mapping[str, Any]) -> str:
        md = obj.get("metadata") or {}
        ns = md.get("namespace")
        return f"{kind}({ns + '/' if ns else ''}{md.get('name', '?')})"

    def _convert_one(self, key: Key, obj: dict[str, Any], fn: Any) -> KVPair:
        try:
            res: Resource = fn(obj)
        except (cv.ConversionError, ValueError) as e:
            raise Invalid(f"{key}: stored object is malformed: {e}") from None
        return self._kv(res, obj)

    @staticmethod
    def _kv(res: Resource, obj: Mapping[str, Any]) -> KVPair:
        md = obj.get("metadata") or {}
        return KVPair(key=cv_key(res), value=res, revision=str(res["metadata"].get("resourceVersion") or ""),
                      uid=str(md.get("uid") or ""))

    def _skip_bad(self, kind: str, obj: dict[str, Any], fn: Any) -> KVPair | None:
        try:
            kv: KVPair = fn(obj)
            return kv
        except (cv.ConversionError, ValueError, Invalid) as e:
            log.warning("skipping malformed %s: %s", self._obj_key_text(kind, obj), e)
            return None

    def _keep(self, kind: str, objs: builtins.list[dict[str, Any]], fn: Any) -> builtins.list[KVPair]:
        return [kv for obj in objs if (kv := self._skip_bad(kind, obj, fn)) is not None]

    def _to_event(self, kind: str, typ: str, obj: dict[str, Any], fn: Any) -> WatchEvent | None:
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        try:
            kv: KVPair = fn(obj)
        except (cv.ConversionError, ValueError, Invalid) as e:
            key = self._raw_key(kind, obj)
            if key is None:
                log.warning("ignoring %s event for an object without a name: %s", kind, e)
                return None
            log.warning("%s is malformed (%s); reporting it as deleted", key, e)
            return WatchEvent("delete", key, None, rv)
        if typ == "DELETED":
            return WatchEvent("delete", kv.key, kv, rv)
        return WatchEvent("put", kv.key, kv, rv)

    @staticmethod
    def _raw_key(kind: str, obj: Mapping[str, Any]) -> Key | None:
        md = obj.get("metadata") or {}
        name = str(md.get("name") or "")
        if not name:
            return None
        ns = str(md.get("namespace") or "")
        if kind == KIND_WEP:
            node = str((obj.get("spec") or {}).get("nodeName") or "")
            return Key(kind, names.wep_name(node, cv.ORCHESTRATOR_K8S, name, "eth0"), ns)
        if kind == KIND_PROFILE:
            if ns:
                return Key(kind, cv.service_account_profile_name(ns, name))
            return Key(kind, cv.NAMESPACE_PROFILE_PREFIX + name)
        return Key(kind, name, ns if cv.is_namespaced(kind) else "")

    # --- Calico CRs -----------------------------------------------------------------------------
    def _cr_collection(self, kind: str, namespace: str | None) -> str:
        plural = cv.crd_plural(kind)
        if namespace and cv.is_namespaced(kind):
            return f"/apis/{cv.CRD_GROUP}/{cv.CRD_VERSION}/namespaces/{_q(namespace)}/{plural}"
        return f"/apis/{cv.CRD_GROUP}/{cv.CRD_VERSION}/{plural}"

    def _cr_path(self, key: Key) -> str:
        if cv.is_namespaced(key.kind):
            self._need_ns(key)
        return f"{self._cr_collection(key.kind, key.namespace)}/{_q(key.name)}"

    def _cr_path_query(self, kind: str, opts: ListOptions) -> tuple[str, dict[str, str]]:
        query: dict[str, str] = {}
        if kind == KIND_BLOCK_AFFINITY and opts.host:
            query["labelSelector"] = f"{cv.LABEL_HOSTNAME_HASH}={cv.hostname_hash(opts.host)}"
        return self._cr_collection(kind, opts.namespace), query

    @staticmethod
    def _cr_wanted(kind: str, ev: WatchEvent, opts: ListOptions) -> bool:
        if kind == KIND_BLOCK_AFFINITY and opts.host and ev.kv is not None:
            return bool((ev.kv.value.get("spec") or {}).get("node") == opts.host)
        return True

    def _cr_kv_from_obj(self, kind: str) -> Any:
        def fn(obj: dict[str, Any]) -> KVPair:
            return self._kv(cv.cr_to_resource(obj, kind), obj)
        return fn

    def _cr_body(self, key: Key, value: Resource, resource_version: str) -> dict[str, Any]:
        res = dict(value)
        md = dict(res.get("metadata") or {})
        md["name"] = key.name
        if cv.is_namespaced(key.kind):
            self._need_ns(key)
            md["namespace"] = key.namespace
        else:
            md.pop("namespace", None)
        res["metadata"] = md
        res["kind"] = key.kind
        try:
            return cv.resource_to_cr(res, resource_version=resource_version)
        except (ValueError, cv.ConversionError) as e:
            raise Invalid(f"{key}: {e}") from None

    async def _cr_get(self, key: Key) -> KVPair:
        obj = await self._request("GET", self._cr_path(key), what=str(key))
        return self._convert_one(key, obj, lambda o: cv.cr_to_resource(o, key.kind))

    async def _cr_list(self, kind: str, opts: ListOptions) -> ListResult:
        path, query = self._cr_path_query(kind, opts)
        objs, rv = await self._list_raw(path, f"list {kind}s", query)
        items = []
        conv = self._cr_kv_from_obj(kind)
        for obj in objs:
            kv = self._skip_bad(kind, obj, conv)
            if kv is None:
                continue
            if kind == KIND_BLOCK_AFFINITY and opts.host and kv.value["spec"].get("node") != opts.host:
                continue  # a hostname-hash collision
            items.append(kv)
        return ListResult(items, rv)

    async def _cr_create(self, key: Key, value: Resource) -> KVPair:
        body = self._cr_body(key, value, "")
        path = self._cr_collection(key.kind, key.namespace)
        obj = await self._request("POST", path, what=f"create {key}", body=body, creating=True)
        return self._convert_one(key, obj, lambda o: cv.cr_to_resource(o, key.kind))

    async def _cr_update(self, kv: KVPair) -> KVPair:
        key = kv.key
        rv = kv.revision
        if not rv:
            current = await self._request("GET", self._cr_path(key), what=str(key))
            rv = str((current.get("metadata") or {}).get("resourceVersion") or "")
        body = self._cr_body(key, kv.value, rv)
        obj = await self._request("PUT", self._cr_path(key), what=f"update {key}", body=body)
        return self._convert_one(key, obj, lambda o: cv.cr_to_resource(o, key.kind))

    async def _cr_delete(self, key: Key, revision: str, uid: str) -> None:
        pre: dict[str, str] = {}
        if revision:
            pre["resourceVersion"] = revision
        if uid:
            pre["uid"] = uid
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if pre:
            body["preconditions"] = pre
        await self._request("DELETE", self._cr_path(key), what=f"delete {key}", body=body)

    # --- WorkloadEndpoints (Pods) ---------------------------------------------------------------
    def _pods_path_query(self, opts: ListOptions) -> tuple[str, dict[str, str]]:
        path = f"/api/v1/namespaces/{_q(opts.namespace)}/pods" if opts.namespace else "/api/v1/pods"
        selectors = []
        if opts.node:
            selectors.append(f"spec.nodeName={opts.node}")
        if opts.extra.get("pod"):
            selectors.append(f"metadata.name={opts.extra['pod']}")
        return path, ({"fieldSelector": ",".join(selectors)} if selectors else {})

    def _wep_kv(self, pod: dict[str, Any]) -> KVPair:
        res = cv.pod_to_wep(pod, interface_prefix=self._iface_prefix)
        return self._kv(res, pod)

    def _wep_kv_or_owner(self, pod: dict[str, Any]) -> KVPair | None:
        try:
            return self._wep_kv(pod)
        except (cv.ConversionError, ValueError, Invalid) as e:
            log.warning("%s does not convert (%s); counted as the owner of its addresses",
                        self._obj_key_text(KIND_WEP, pod), e)
            res = cv.pod_owner_record(pod)
            return KVPair(key=cv_key(res), value=res, revision=res["metadata"]["resourceVersion"],
                          uid=res["metadata"]["uid"])

    def _wep_from_pod_or_skip(self, pod: dict[str, Any]) -> KVPair | None:
        if not cv.pod_is_valid_wep(pod):
            return None
        return self._skip_bad(KIND_WEP, pod, self._wep_kv)

    def _wep_pod_name(self, key: Key) -> str:
        self._need_ns(key)
        try:
            ids = cv.parse_wep_name(key.name)
        except ValueError as e:
            raise Invalid(f"{key}: {e}") from None
        if ids.orchestrator != cv.ORCHESTRATOR_K8S or not ids.pod:
            raise Invalid(f"{key}: not a Kubernetes WorkloadEndpoint name (<node>-k8s-<pod>-<iface>)")
        return ids.pod

    async def _wep_get(self, key: Key) -> KVPair:
        pod_name = self._wep_pod_name(key)
        pod = await self._request("GET", f"/api/v1/namespaces/{_q(key.namespace)}/pods/{_q(pod_name)}",
                                  what=str(key))
        if not cv.pod_is_valid_wep(pod):
            raise NotFound(f"{key}: pod is not scheduled or uses host networking")
        kv = self._convert_one(key, pod, lambda p: cv.pod_to_wep(p, interface_prefix=self._iface_prefix))
        if kv.key != key:
            raise NotFound(f"{key}: pod {pod_name} belongs to {kv.key}")
        return kv

    async def _wep_patch(self, key: Key, patch: dict[str, Any], value: Resource | None) -> KVPair:
        pod_name = self._wep_pod_name(key)
        if value is not None:
            spec_pod = (value.get("spec") or {}).get("pod")
            if spec_pod and spec_pod != pod_name:
                raise Invalid(f"{key}: spec.pod {spec_pod!r} does not match the name")
        try:
            pod = await self._request(
                "PATCH", f"/api/v1/namespaces/{_q(key.namespace)}/pods/{_q(pod_name)}/status",
                what=f"write {key}", body=patch, content_type=STRATEGIC_MERGE)
        except Invalid as e:
            # A uid in a patch is checked as "immutable field changed" (422): for us it is a CAS failure,
            # the pod was replaced by another instance with the same name.
            if "uid" in patch["metadata"] and "metadata.uid" in str(e):
                raise Conflict(f"{key}: pod {pod_name} is no longer the instance with uid "
                               f"{patch['metadata']['uid']}") from None
            raise
        return self._convert_one(key, pod, lambda p: cv.pod_to_wep(p, interface_prefix=self._iface_prefix))

    # --- Nodes ----------------------------------------------------------------------------------
    def _node_kv(self, node: dict[str, Any], key: Key | None = None) -> KVPair:
        try:
            res = cv.k8s_node_to_calico(node, use_pod_cidr=self._use_pod_cidr)
        except cv.ConversionError as e:
            raise Invalid(f"{key or self._obj_key_text(KIND_NODE, node)}: malformed Node: {e}") from None
        return self._kv(res, node)

    # --- Profiles -------------------------------------------------------------------------------
    async def _profile_get(self, key: Key) -> KVPair:
        if key.name == cv.DEFAULT_ALLOW_PROFILE_NAME:
            return KVPair(key, cv.default_allow_profile(), cv.DEFAULT_ALLOW_PROFILE_REVISION)
        ns_name = cv.profile_name_to_namespace(key.name)
        if ns_name:
            ns = await self._request("GET", f"/api/v1/namespaces/{_q(ns_name)}", what=str(key))
            return self._convert_one(key, ns, cv.namespace_to_profile)
        sa_ref = cv.profile_name_to_service_account(key.name)
        if sa_ref:
            path = f"/api/v1/namespaces/{_q(sa_ref[0])}/serviceaccounts/{_q(sa_ref[1])}"
            sa = await self._request("GET", path, what=str(key))
            return self._convert_one(key, sa, cv.service_account_to_profile)
        raise NotFound(f"{key}: profiles come from Namespaces (kns.*) and ServiceAccounts (ksa.*) here")

    def _ns_profile_kv(self, ns: dict[str, Any]) -> KVPair:
        return self._kv(cv.namespace_to_profile(ns), ns)

    def _sa_profile_kv(self, sa: dict[str, Any]) -> KVPair:
        return self._kv(cv.service_account_to_profile(sa), sa)

    async def _profile_list(self) -> ListResult:
        (nss, ns_rv), (sas, sa_rv) = await asyncio.gather(
            self._list_raw("/api/v1/namespaces", "list Namespaces"),
            self._list_raw("/api/v1/serviceaccounts", "list ServiceAccounts"))
        items = self._keep(KIND_PROFILE, nss, self._ns_profile_kv)
        items += self._keep(KIND_PROFILE, sas, self._sa_profile_kv)
        items.append(KVPair(Key(KIND_PROFILE, cv.DEFAULT_ALLOW_PROFILE_NAME), cv.default_allow_profile(),
                            cv.DEFAULT_ALLOW_PROFILE_REVISION))
        return ListResult(items, cv.join_profile_revisions(ns_rv, sa_rv))

    async def _profile_watch(self, revision: str) -> AsyncIterator[WatchEvent]:
        try:
            ns_rv, sa_rv = cv.split_profile_revision(revision)
        except ValueError as e:
            raise Invalid(str(e)) from None
        revs = [ns_rv, sa_rv]
        streams = [
            (self._watch_raw("/api/v1/namespaces", "Namespaces", ns_rv), self._ns_profile_kv),
            (self._watch_raw("/api/v1/serviceaccounts", "ServiceAccounts", sa_rv), self._sa_profile_kv),
        ]
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=256)

        async def pump(i: int, gen: AsyncIterator[tuple[str, dict[str, Any]]]) -> None:
            try:
                async for item in gen:
                    await queue.put((i, item))
                await queue.put((i, _End()))
            except Exception as e:  # delivered to the consumer, which re-raises it
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, gen)) for i, (gen, _) in enumerate(streams)]
        try:
            while True:
                i, item = await queue.get()
                if isinstance(item, _End):
                    return  # either stream ending ends the merged stream; the caller re-watches both
                if isinstance(item, Exception):
                    raise item
                typ, obj = item
                revs[i] = str((obj.get("metadata") or {}).get("resourceVersion") or revs[i])
                ev = self._to_event(KIND_PROFILE, typ, obj, streams[i][1])
                if ev is not None:
                    yield WatchEvent(ev.type, ev.key, ev.kv, cv.join_profile_revisions(revs[0], revs[1]))
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            for gen, _ in streams:
                with contextlib.suppress(BaseException):
                    await gen.aclose()  # type: ignore[attr-defined]

    # --- Kubernetes NetworkPolicies -------------------------------------------------------------
    @staticmethod
    def _knp_path(namespace: str | None) -> str:
        if namespace:
            return f"/apis/networking.k8s.io/v1/namespaces/{_q(namespace)}/networkpolicies"
        return "/apis/networking.k8s.io/v1/networkpolicies"

    def _knp_kv(self, np: dict[str, Any]) -> KVPair:
        return self._kv(cv.k8s_network_policy_to_resource(np), np)


def cv_key(res: Mapping[str, Any]) -> Key:
    md = res.get("metadata") or {}
    kind = str(res.get("kind") or "")
    ns = str(md.get("namespace") or "") if cv.is_namespaced(kind) else ""
    return Key(kind, str(md.get("name") or ""), ns)
