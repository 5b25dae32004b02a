"""The etcd v3 backend (``DATASTORE_TYPE=etcdv3``): the only importer of aetcd.

Key layout, verified against Calico's source (projectcalico/calico master 87c15906f20c, Aug 2026,
``libcalico-go/lib/backend/model/{resource,block,block_affinity,ipam_handle,ipam_config}.go`` and
``libcalico-go/lib/backend/etcdv3/etcdv3.go``, ``libcalico-go/lib/clientv3/resources.go``):

* v3 resources: ``/calico/resources/v3/projectcalico.org/<lowercase plural>/<name>``; namespaced kinds
  (WorkloadEndpoint, NetworkPolicy, NetworkSet, Staged(Kubernetes)NetworkPolicy, KubernetesNetworkPolicy)
  ``.../<plural>/<namespace>/<name>``. Nodes are ``nodes``, WorkloadEndpoints ``workloadendpoints``. The
  value is the v3 JSON; clientv3 clears ``metadata.resourceVersion`` before writing and sets ``uid``
  (a random UUID) and ``creationTimestamp`` at create. The revision is the key's mod_revision.
* IPAM keeps Calico's v1 keys and JSON (the v3 form uses the CRD field names, see
  :mod:`felixpy.datastore.conversion`):
  * block ``/calico/ipam/v2/assignment/ipv<4|6>/block/<cidr with the '/' replaced by '-'>`` e.g.
    ``.../ipv4/block/10.244.1.0-26``; JSON ``cidr, affinity, affinity_claim_time, allocations,
    unallocated, attributes[{handle_id, secondary, ...}], sequenceNumber, sequenceNumberForAllocation,
    deleted`` (legacy ``hostAffinity`` is read as ``affinity: host:<h>``).
  * affinity ``/calico/ipam/v2/<host|virtual>/<host>/ipv<N>/block/<cidr->`` with ``{"state", "deleted"}``
    (an empty value is an old-style affinity, read as ``{}``). The v3 BlockAffinity name is
    ``<host>-<CIDRToName>``; its spec carries node/cidr/type/state/deleted (``deleted`` a bool).
  * handle ``/calico/ipam/v2/handle/<handleID>`` with ``{"block": {cidr: n}, "deleted"}``; the v3 name is
    the handle ID itself (etcd keys are case-sensitive; Calico's handle IDs are lower case in practice).
  * IPAMConfig ``/calico/ipam/v2/config`` with ``{"strict_affinity", "auto_allocate_blocks",
    "maxBlocksPerHost", "kubeVirtVMAddressPersistence", "ipCooldownSeconds"}``; the v3 name is ``default``.
* Writes are transactions as in Calico's etcdv3 client: create compares create_revision == 0, update
  compares mod_revision (or, without a revision, that the key exists), delete with a revision compares
  mod_revision. Profiles always include the static ``projectcalico-default-allow`` profile.

Malformed stored values (bad JSON, wrong shape): ``get`` raises :class:`Invalid` naming the key;
``list`` leaves the item out and logs a warning; ``watch`` turns the event into a ``delete`` of that key
(logged), so list and watch agree and a consumer never keeps a stale copy of an object that became
unreadable. The stored value itself is never touched.

Extension beyond :class:`~felixpy.datastore.api.Backend`: :meth:`EtcdBackend.txn_write`, several CAS
writes in one atomic transaction (for IPAM), and :meth:`EtcdBackend.compact` (tests/administration).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import aetcd
import aetcd.rpc as rpc
import grpc

from felixpy.datastore import conversion as cv
from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
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

TxnOp = Literal["create", "update", "delete"]

_GRPC_OPTIONS = {
    # Detect a dead connection (e.g. etcd host gone) on idle watch streams.
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    # Lists of a big cluster exceed gRPC's 4 MiB default.
    "grpc.max_receive_message_length": 512 * 1024 * 1024,
}


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    tls: bool


def parse_endpoints(endpoints: Sequence[str] | str) -> list[_Endpoint]:
    """``ETCD_ENDPOINTS``-style URLs (``http://127.0.0.1:2379``, comma-separated or a list)."""
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",")]
    out = []
    for raw in endpoints:
        raw = raw.strip()
        if not raw:
            continue
        u = urlsplit(raw if "://" in raw else "http://" + raw)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad etcd endpoint {raw!r}: expected http(s)://host:port")
        out.append(_Endpoint(u.hostname, u.port or 2379, u.scheme == "https"))
    if not out:
        raise ValueError("no etcd endpoints given")
    return out


class _TLSClient(aetcd.Client):  # type: ignore[misc]
    """aetcd only builds plaintext channels; this one dials with TLS (optionally a client certificate)."""

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                          options=list(self._options.items()))
        if self._username is not None and self._password is not None:
            stub = rpc.AuthStub(self.channel)
            req = rpc.AuthenticateRequest(name=self._username, password=self._password)
            resp = await stub.Authenticate(req, timeout=self._timeout)
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                      metadata=self.metadata)
        self._connected.set()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b(s: str) -> bytes:
    return s.encode()


def _range_req(start: str, end: str | None = None, *, revision: int = 0) -> Any:
    req = rpc.RangeRequest(key=_b(start))
    if end is not None:
        req.range_end = _b(end)
    if revision:
        req.revision = revision
    return req


def _cmp_create_rev(path: str, value: int) -> Any:
    return rpc.Compare(key=_b(path), result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                       create_revision=value)


def _cmp_mod_rev(path: str, value: int) -> Any:
    return rpc.Compare(key=_b(path), result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=value)


def _cmp_exists(path: str) -> Any:
    return rpc.Compare(key=_b(path), result=rpc.Compare.GREATER, target=rpc.Compare.VERSION, version=0)


def _parse_revision(revision: str) -> int:
    try:
        rev = int(revision)
    except ValueError:
        raise Invalid(f"bad etcd revision {revision!r}") from None
    if rev < 0:
        raise Invalid(f"bad etcd revision {revision!r}")
    return rev


class EtcdBackend:
    """Calico's etcd v3 data model over one shared gRPC channel (endpoints are tried in turn on failure)."""

    type_name = "etcdv3"

    def __init__(self, endpoints: Sequence[str] | str, *, timeout: float = 10.0,
                 username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self._timeout = timeout
        self._username = username
        self._password = password
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        if (cert_file is None) != (key_file is None):
            raise ValueError("etcd client TLS needs both a certificate and a key file")
        if (username is None) != (password is None):
            raise ValueError("etcd authentication needs both a username and a password")
        self._idx = 0
        self._client: aetcd.Client | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(cls, endpoints: Sequence[str] | str, **kwargs: Any) -> EtcdBackend:
        """Build a backend and open its channel (no request is made: errors show on first use)."""
        b = cls(endpoints, **kwargs)
        await b._get_client()
        return b

    # --- connection -----------------------------------------------------------------------------
    def _new_client(self, ep: _Endpoint) -> aetcd.Client:
        if ep.tls or self._ca_file:
            def read(p: str | None) -> bytes | None:
                if p is None:
                    return None
                with open(p, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(read(self._ca_file), read(self._key_file),
                                                 read(self._cert_file))
            return _TLSClient(ep.host, ep.port, self._username, self._password, options=dict(_GRPC_OPTIONS),
                              credentials=creds)
        return aetcd.Client(ep.host, ep.port, self._username, self._password, options=dict(_GRPC_OPTIONS))

    async def _get_client(self) -> aetcd.Client:
        client = self._client
        if client is not None:
            return client
        if self._closed:
            raise Unavailable("etcd backend is closed")
        async with self._connect_lock:
            if self._client is None:
                client = self._new_client(self._endpoints[self._idx])
                try:
                    await client.connect()
                except (aetcd.ClientError, grpc.RpcError, OSError) as e:
                    raise Unavailable(f"cannot connect to etcd {self._describe()}: {e}") from e
                self._client = client
            return self._client

    def _describe(self) -> str:
        ep = self._endpoints[self._idx]
        return f"{'https' if ep.tls else 'http'}://{ep.host}:{ep.port}"

    async def _failover(self, failed: aetcd.Client) -> None:
        # Only the first caller to see this client fail rotates to the next endpoint.
        async with self._connect_lock:
            if id(self._client) != id(failed):
                return
            self._client = None
            self._idx = (self._idx + 1) % len(self._endpoints)
        with contextlib.suppress(Exception):
            await failed.close()

    async def _call(self, method: str, request: Any) -> Any:
        client = await self._get_client()
        try:
            stub = getattr(client.kvstub, method)
            return await stub(request, timeout=self._timeout, metadata=client.metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                await self._failover(client)
                raise Unavailable(f"etcd {self._describe()} unavailable: {e.details()}") from e
            if code == grpc.StatusCode.OUT_OF_RANGE:
                raise Expired(f"etcd: {e.details()}") from e
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise Invalid(f"etcd refused the request: {e.details()}") from e
            raise DatastoreError(f"etcd error {code.name}: {e.details()}") from e

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # --- key mapping ----------------------------------------------------------------------------
    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in cv.IPAM_KINDS:
            try:
                cv.etcd_plural(kind)
            except ValueError as e:
                raise Invalid(str(e)) from None

    def _decode(self, kind: str, path: str, raw: bytes, mod_revision: int) -> tuple[Key, Resource] | None:
        """(key, resource) for a stored kv of ``kind``; None if the path is not one of its objects.
        Raises ConversionError for a malformed value."""
        if kind in cv.IPAM_KINDS:
            key = cv.etcd_ipam_path_to_key(kind, path)
            if key is None:
                return None
            return key, cv.etcd_ipam_decode(kind, path, raw, mod_revision)
        key = cv.etcd_v3_path_to_key(kind, path)
        if key is None:
            return None
        return key, cv.etcd_v3_decode(key, raw, mod_revision)

    def _encode(self, key: Key, value: Resource, *, create: bool) -> tuple[str, bytes]:
        try:
            if key.kind in cv.IPAM_KINDS:
                return cv.etcd_ipam_encode(key.kind, key, value)
            if cv.is_namespaced(key.kind) != bool(key.namespace):
                need = "required" if cv.is_namespaced(key.kind) else "not allowed"
                raise ValueError(f"{key}: namespace {need}")
            if create:
                md = dict(value.get("metadata") or {})
                md.setdefault("uid", str(uuid.uuid4()))
                md.setdefault("creationTimestamp", _now())
                value = dict(value, metadata=md)
            return cv.etcd_v3_path(key), cv.etcd_v3_encode(key, value)
        except (ValueError, cv.ConversionError) as e:
            raise Invalid(f"{key}: {e}") from None

    def _kv_of(self, kind: str, path: str, raw: bytes, mod_revision: int, fallback: Key) -> KVPair:
        try:
            decoded = self._decode(kind, path, raw, mod_revision)
        except cv.ConversionError as e:
            raise Invalid(f"{fallback}: malformed value at {path}: {e}") from None
        if decoded is None:
            raise Invalid(f"{fallback}: {path} is not a {kind} key")
        key, res = decoded
        return KVPair(key=key, value=res, revision=str(mod_revision))

    async def _resolve_path(self, key: Key) -> tuple[str, Any | None]:
        """The etcd path holding ``key`` and (when it had to be read to decide) its current kv."""
        try:
            paths = cv.etcd_ipam_candidate_paths(key) if key.kind in cv.IPAM_KINDS else [cv.etcd_v3_path(key)]
        except ValueError as e:
            raise Invalid(f"{key}: {e}") from None
        if len(paths) == 1:
            return paths[0], None
        if not paths:
            # A hashed BlockAffinity name cannot be inverted: find it by scanning.
            res = await self.list(key.kind)
            for kv in res.items:
                if kv.key == key:
                    spec = kv.value["spec"]
                    return cv.etcd_affinity_path(spec["node"], spec["cidr"], spec.get("type") or "host"), None
            raise NotFound(str(key))
        resp = await self._call("Txn", rpc.TxnRequest(
            success=[rpc.RequestOp(request_range=_range_req(p)) for p in paths]))
        for p, r in zip(paths, resp.responses, strict=True):
            if r.response_range.kvs:
                return p, r.response_range.kvs[0]
        raise NotFound(str(key))

    # --- Backend API ----------------------------------------------------------------------------
    async def get(self, key: Key) -> KVPair:
        self._check_kind(key.kind)
        if key.kind == KIND_PROFILE and key.name == cv.DEFAULT_ALLOW_PROFILE_NAME:
            return KVPair(key, cv.default_allow_profile(), cv.DEFAULT_ALLOW_PROFILE_REVISION)
        path, kv = await self._resolve_path(key)
        if kv is None:
            resp = await self._call("Range", _range_req(path))
            if not resp.kvs:
                raise NotFound(str(key))
            kv = resp.kvs[0]
        return self._kv_of(key.kind, path, kv.value, kv.mod_revision, key)

    def _range_for(self, kind: str, opts: ListOptions) -> tuple[str, str]:
        if kind in cv.IPAM_KINDS:
            return cv.etcd_ipam_range(kind, opts.host if kind == KIND_BLOCK_AFFINITY else None)
        prefix = cv.etcd_v3_prefix(kind, opts.namespace)
        if kind == KIND_WEP and opts.node and opts.namespace:
            # WEP names start with the escaped node name: narrow the range server-side.
            prefix += opts.node.replace("-", "--") + "-"
        return prefix, cv.prefix_end(prefix)

    @staticmethod
    def _wanted(key: Key, opts: ListOptions) -> bool:
        if opts.namespace and cv.is_namespaced(key.kind) and key.namespace != opts.namespace:
            return False
        if key.kind == KIND_WEP and (opts.node or opts.extra.get("pod")):
            try:
                ids = cv.parse_wep_name(key.name)
            except ValueError:
                return False
            if opts.node and ids.node != opts.node:
                return False
            if opts.extra.get("pod") and ids.pod != opts.extra["pod"]:
                return False
        return True

    async def list(self, kind: str, opts: ListOptions | None = None) -> ListResult:
        self._check_kind(kind)
        opts = opts or ListOptions()
        start, end = self._range_for(kind, opts)
        resp = await self._call("Range", _range_req(start, end))
        items = []
        for kv in resp.kvs:
            path = kv.key.decode(errors="replace")
            try:
                decoded = self._decode(kind, path, kv.value, kv.mod_revision)
            except cv.ConversionError as e:
                log.warning("etcd: skipping malformed %s at %s: %s", kind, path, e)
                continue
            if decoded is None or not self._wanted(decoded[0], opts):
                continue
            items.append(KVPair(decoded[0], decoded[1], str(kv.mod_revision)))
        if kind == KIND_PROFILE:
            items.append(KVPair(Key(KIND_PROFILE, cv.DEFAULT_ALLOW_PROFILE_NAME), cv.default_allow_profile(),
                                cv.DEFAULT_ALLOW_PROFILE_REVISION))
        return ListResult(items=items, revision=str(resp.header.revision))

    async def create(self, key: Key, value: Resource) -> KVPair:
        self._check_kind(key.kind)
        path, data = self._encode(key, value, create=True)
        resp = await self._call("Txn", rpc.TxnRequest(
            compare=[_cmp_create_rev(path, 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=_b(path), value=data))]))
        if not resp.succeeded:
            raise AlreadyExists(str(key))
        return self._kv_of(key.kind, path, data, resp.header.revision, key)

    async def update(self, kv: KVPair) -> KVPair:
        key = kv.key
        self._check_kind(key.kind)
        path, data = self._encode(key, kv.value, create=False)
        cmp = _cmp_mod_rev(path, _parse_revision(kv.revision)) if kv.revision else _cmp_exists(path)
        resp = await self._call("Txn", rpc.TxnRequest(
            compare=[cmp],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=_b(path), value=data))],
            failure=[rpc.RequestOp(request_range=_range_req(path))]))
        if not resp.succeeded:
            current = resp.responses[0].response_range.kvs
            if not current:
                raise NotFound(str(key))
            raise Conflict(f"{key}: revision {kv.revision} is stale (now {current[0].mod_revision})")
        return self._kv_of(key.kind, path, data, resp.header.revision, key)

    async def delete(self, key: Key, revision: str = "", uid: str = "") -> None:
        self._check_kind(key.kind)
        path, current = await self._resolve_path(key)
        if uid:
            if current is None:
                r = await self._call("Range", _range_req(path))
                if not r.kvs:
                    raise NotFound(str(key))
                current = r.kvs[0]
            stored = self._kv_of(key.kind, path, current.value, current.mod_revision, key)
            stored_uid = str(stored.value.get("metadata", {}).get("uid") or "")
            if stored_uid != uid:
                raise Conflict(f"{key}: uid {uid} does not match stored uid {stored_uid or '(none)'}")
            revision = revision or str(current.mod_revision)
        compare = [_cmp_mod_rev(path, _parse_revision(revision))] if revision else [_cmp_exists(path)]
        resp = await self._call("Txn", rpc.TxnRequest(
            compare=compare,
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_b(path)))],
            failure=[rpc.RequestOp(request_range=_range_req(path))]))
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                raise NotFound(str(key))
            raise Conflict(f"{key}: revision {revision} is stale (now {kvs[0].mod_revision})")

    async def txn_write(self, ops: Sequence[tuple[TxnOp, KVPair | Key]]) -> builtins.list[KVPair]:
        """Several CAS writes in one atomic etcd transaction: all apply or none.

        Each op is ``("create", KVPair)`` (must not exist), ``("update", KVPair)`` (mod_revision must equal
        ``kv.revision``; an empty revision only requires the key to exist) or ``("delete", KVPair | Key)``
        (a KVPair with a revision deletes only that revision; a Key just requires existence). Raises
        :class:`Conflict` naming every failed comparison when any compare fails (nothing is written).
        Returns one KVPair per op: the stored value and new revision for create/update; for delete the
        pair that was passed (value ``{}`` for a bare Key) with the transaction's revision.
        """
        compares: builtins.list[Any] = []
        success: builtins.list[Any] = []
        planned: builtins.list[tuple[TxnOp, Key, str, bytes | None, KVPair | None]] = []
        for op, item in ops:
            data: bytes | None
            kvp = item if isinstance(item, KVPair) else None
            key = kvp.key if kvp is not None else item
            assert isinstance(key, Key)
            self._check_kind(key.kind)
            if op in ("create", "update"):
                if kvp is None:
                    raise Invalid(f"txn_write {op} of {key} needs a KVPair")
                path, data = self._encode(key, kvp.value, create=op == "create")
                if op == "create":
                    compares.append(_cmp_create_rev(path, 0))
                elif kvp.revision:
                    compares.append(_cmp_mod_rev(path, _parse_revision(kvp.revision)))
                else:
                    compares.append(_cmp_exists(path))
                success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=_b(path), value=data)))
                planned.append((op, key, path, data, kvp))
            elif op == "delete":
                path, _ = await self._resolve_path(key)
                data = None
                rev = kvp.revision if kvp is not None else ""
                compares.append(_cmp_mod_rev(path, _parse_revision(rev)) if rev else _cmp_exists(path))
                success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_b(path))))
                planned.append((op, key, path, data, kvp))
            else:
                raise Invalid(f"txn_write: unknown op {op!r}")
        if len({p[2] for p in planned}) != len(planned):
            raise Invalid("txn_write: a key appears more than once in one transaction")
        failure = [rpc.RequestOp(request_range=_range_req(p[2])) for p in planned]
        resp = await self._call("Txn", rpc.TxnRequest(compare=compares, success=success, failure=failure))
        if not resp.succeeded:
            problems = []
            for (op, key, _path, _data, kvp), r in zip(planned, resp.responses, strict=True):
                cur = r.response_range.kvs
                if op == "create" and cur:
                    problems.append(f"create {key}: already exists")
                elif op != "create" and not cur:
                    problems.append(f"{op} {key}: not found")
                elif op != "create" and kvp is not None and kvp.revision \
                        and str(cur[0].mod_revision) != kvp.revision:
                    now = cur[0].mod_revision
                    problems.append(f"{op} {key}: revision {kvp.revision} is stale (now {now})")
            raise Conflict("transaction failed: " + ("; ".join(problems) or "a comparison failed"))
        out: builtins.list[KVPair] = []
        rev = resp.header.revision
        for _op, key, path, data, kvp in planned:
            if data is not None:
                out.append(self._kv_of(key.kind, path, data, rev, key))
            else:
                out.append(KVPair(key, kvp.value if kvp is not None else {}, str(rev)))
        return out

    async def watch(self, kind: str, revision: str,
                    opts: ListOptions | None = None) -> AsyncIterator[WatchEvent]:
        """Events after ``revision`` (an empty revision: from now). Raises :class:`Expired` if compacted,
        :class:`Unavailable` if the watch cannot be set up; ends quietly if the stream breaks later."""
        self._check_kind(kind)
        opts = opts or ListOptions()
        start, end = self._range_for(kind, opts)
        start_rev = _parse_revision(revision) + 1 if revision else None
        client = await self._get_client()
        try:
            w = await client.watch(_b(start), range_end=_b(end), start_revision=start_rev, prev_kv=True)
        except aetcd.RevisionCompactedError as e:
            raise Expired(f"etcd revision {revision} compacted (now {e.compacted_revision})") from e
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, aetcd.WatchTimeoutError) as e:
            await self._failover(client)
            raise Unavailable(f"etcd watch failed: {e}") from e
        except aetcd.ClientError as e:
            raise DatastoreError(f"etcd watch failed: {e}") from e
        try:
            async for ev in w:
                out = self._watch_event(kind, ev, opts)
                if out is not None:
                    yield out
        except aetcd.RevisionCompactedError as e:
            raise Expired(f"etcd revision {revision} compacted (now {e.compacted_revision})") from e
        except aetcd.ClientError as e:
            log.info("etcd watch of %s ended: %s", kind, e)
        finally:
            with contextlib.suppress(Exception):
                await w.cancel()

    def _watch_event(self, kind: str, ev: Any, opts: ListOptions) -> WatchEvent | None:
        path = ev.kv.key.decode(errors="replace")
        rev = str(ev.kv.mod_revision)
        try:
            key = cv.etcd_ipam_path_to_key(kind, path) if kind in cv.IPAM_KINDS else cv.etcd_v3_path_to_key(kind, path)
        except cv.ConversionError as e:
            log.warning("etcd: ignoring event for malformed key %s: %s", path, e)
            return None
        if key is None or not self._wanted(key, opts):
            return None
        if ev.kind == "DELETE":
            prev = None
            if ev.prev_kv is not None:
                with contextlib.suppress(cv.ConversionError):
                    decoded = self._decode(kind, path, ev.prev_kv.value, ev.prev_kv.mod_revision)
                    if decoded is not None:
                        prev = KVPair(decoded[0], decoded[1], str(ev.prev_kv.mod_revision))
            return WatchEvent("delete", key, prev, rev)
        try:
            decoded = self._decode(kind, path, ev.kv.value, ev.kv.mod_revision)
        except cv.ConversionError as e:
            log.warning("etcd: %s at %s is malformed (%s); reporting it as deleted", key, path, e)
            return WatchEvent("delete", key, None, rev)
        if decoded is None:
            return None
        return WatchEvent("put", decoded[0], KVPair(decoded[0], decoded[1], rev), rev)

    # --- administration -------------------------------------------------------------------------
    async def compact(self, revision: str, *, physical: bool = True) -> None:
        """Compact etcd history up to ``revision`` (watches from older revisions then get Expired)."""
        client = await self._get_client()
        try:
            await client.compact(_parse_revision(revision), physical=physical)
        except aetcd.ClientError as e:
            raise DatastoreError(f"etcd compact failed: {e}") from e

    async def current_revision(self) -> str:
        resp = await self._call("Range", _range_req("/calico/", None))
        return str(resp.header.revision)
