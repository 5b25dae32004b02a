"""An in-memory :class:`~felixpy.datastore.api.Backend` with exact compare-and-swap semantics.

For fast unit tests of pure logic (IPAM, syncer consumers); it never stands in for the real backends in
integration tests. It behaves like etcd v3 where the contract leaves room:

* one global revision counter; every create/update/delete takes the next revision, and an object's
  revision is the revision of its last write (etcd ``mod_revision``), as a decimal string;
* values are stored as JSON text, so a caller can never alias stored state and a value that the real
  backends could not serialise fails here too (:class:`Invalid`);
* ``watch(kind, rev)`` replays the retained history after ``rev`` and then streams live events;
  :meth:`MemoryBackend.compact` drops history so older watches raise :class:`Expired`.

Test hooks: every operation first yields to the event loop once (like a network round trip, so
``asyncio.gather`` really interleaves clients), counts itself in :attr:`op_counts`, and runs the
callables in :attr:`hooks`, which may raise (inject an outage) or change the store through
:meth:`MemoryBackend.raw` (inject a concurrent writer and so a CAS conflict).

List filters: ``namespace`` for every kind, ``node`` for WorkloadEndpoints (``spec.node``), ``host`` for
BlockAffinities (``spec.node``); ``extra`` is ignored. :class:`MemoryTxnBackend` adds the etcd
backend's ``txn_write`` extension, so callers' transaction paths can be unit-tested too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_WEP,
    AlreadyExists,
    Backend,
    Conflict,
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

# A hook gets (operation, key-or-kind) and may be sync or async.
Hook = Callable[[str, Key | str], Awaitable[None] | None]


@dataclass
class _Item:
    text: str  # the stored value as JSON
    revision: int
    uid: str


@dataclass
class _Watcher:
    kind: str
    opts: ListOptions | None
    queue: asyncio.Queue[WatchEvent | BaseException | None]


def _matches(kind: str, key: Key, value: Resource | None, opts: ListOptions | None) -> bool:
    if key.kind != kind:
        return False
    if opts is None:
        return True
    if opts.namespace is not None and key.namespace != opts.namespace:
        return False
    spec = (value or {}).get("spec") or {}
    if opts.node is not None and kind == KIND_WEP and spec.get("node") != opts.node:
        return False
    return not (opts.host is not None and kind == KIND_BLOCK_AFFINITY and spec.get("node") != opts.host)


class MemoryBackend:
    type_name = "memory"

    def __init__(self, *, yield_per_op: bool = True) -> None:
        self._items: dict[Key, _Item] = {}
        self._rev = 0
        self._compacted = 0
        self._history: list[WatchEvent] = []
        self._watcher_objs: dict[int, _Watcher] = {}
        self._closed = False
        self._yield = yield_per_op
        self._in_hook = False
        self.hooks: list[Hook] = []
        self.op_counts: Counter[tuple[str, str]] = Counter()

    # -- introspection for tests --------------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._rev

    def ops(self, op: str | None = None, kind: str | None = None) -> int:
        """How many operations ran (optionally of one verb and/or kind)."""
        return sum(n for (o, k), n in self.op_counts.items()
                   if (op is None or o == op) and (kind is None or k == kind))

    def keys(self, kind: str | None = None) -> list[Key]:
        return sorted(k for k in self._items if kind is None or k.kind == kind)

    def raw(self) -> _Raw:
        """Synchronous, hook-free access to the store (for a test playing a concurrent writer)."""
        return _Raw(self)

    # -- internals ----------------------------------------------------------------------------------
    async def _enter(self, op: str, target: Key | str) -> None:
        if self._closed:
            raise Unavailable("memory backend is closed")
        if self._yield:
            await asyncio.sleep(0)
        kind = target.kind if isinstance(target, Key) else target
        self.op_counts[(op, kind)] += 1
        if self.hooks and not self._in_hook:
            self._in_hook = True
            try:
                for h in list(self.hooks):
                    r = h(op, target)
                    if r is not None:
                        await r
            finally:
                self._in_hook = False
        if self._closed:
            raise Unavailable("memory backend is closed")

    @staticmethod
    def _encode(key: Key, value: Resource) -> dict[str, Any]:
        try:
            v: dict[str, Any] = json.loads(json.dumps(value))
        except (TypeError, ValueError) as e:
            raise Invalid(f"{key}: value is not JSON-serialisable: {e}") from None
        if not isinstance(v, dict):
            raise Invalid(f"{key}: value is not an object")
        return v

    def _kv(self, key: Key, item: _Item) -> KVPair:
        return KVPair(key=key, value=json.loads(item.text), revision=str(item.revision), uid=item.uid)

    def _emit(self, ev: WatchEvent) -> None:
        self._history.append(ev)
        value = ev.kv.value if ev.kv is not None else None
        for w in self._watcher_objs.values():
            if _matches(w.kind, ev.key, value, w.opts):
                w.queue.put_nowait(ev)

    def _store(self, key: Key, value: dict[str, Any], uid: str, created: str | None) -> KVPair:
        self._rev += 1
        md = value.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise Invalid(f"{key}: metadata is not an object")
        md["name"] = key.name
        if key.namespace:
            md["namespace"] = key.namespace
        md["resourceVersion"] = str(self._rev)
        md["uid"] = uid
        if created:
            md["creationTimestamp"] = created
        value.setdefault("kind", key.kind)
        item = _Item(text=json.dumps(value), revision=self._rev, uid=uid)
        self._items[key] = item
        kv = self._kv(key, item)
        self._emit(WatchEvent("put", key, self._kv(key, item), str(self._rev)))
        return kv

    def _create(self, key: Key, value: Resource) -> KVPair:
        if key in self._items:
            raise AlreadyExists(f"{key} already exists")
        v = self._encode(key, value)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return self._store(key, v, str(uuid.uuid4()), now)

    def _update(self, kv: KVPair) -> KVPair:
        cur = self._items.get(kv.key)
        if cur is None:
            raise NotFound(f"{kv.key} not found")
        if kv.revision and kv.revision != str(cur.revision):
            raise Conflict(f"{kv.key}: revision {kv.revision} is stale (now {cur.revision})")
        if kv.uid and kv.uid != cur.uid:
            raise Conflict(f"{kv.key}: uid {kv.uid} does not match the stored object")
        v = self._encode(kv.key, kv.value)
        created = (json.loads(cur.text).get("metadata") or {}).get("creationTimestamp")
        return self._store(kv.key, v, cur.uid, created)

    def _delete(self, key: Key, revision: str, uid: str) -> None:
        cur = self._items.get(key)
        if cur is None:
            raise NotFound(f"{key} not found")
        if revision and revision != str(cur.revision):
            raise Conflict(f"{key}: revision {revision} is stale (now {cur.revision})")
        if uid and uid != cur.uid:
            raise Conflict(f"{key}: uid {uid} does not match the stored object")
        last = self._kv(key, cur)
        del self._items[key]
        self._rev += 1
        self._emit(WatchEvent("delete", key, last, str(self._rev)))

    # -- Backend protocol ---------------------------------------------------------------------------
    async def get(self, key: Key) -> KVPair:
        await self._enter("get", key)
        cur = self._items.get(key)
        if cur is None:
            raise NotFound(f"{key} not found")
        return self._kv(key, cur)

    async def list(self, kind: str, opts: ListOptions | None = None) -> ListResult:
        await self._enter("list", kind)
        items = []
        for key in sorted(k for k in self._items if k.kind == kind):
            kv = self._kv(key, self._items[key])
            if _matches(kind, key, kv.value, opts):
                items.append(kv)
        return ListResult(items=items, revision=str(self._rev))

    async def create(self, key: Key, value: Resource) -> KVPair:
        await self._enter("create", key)
        return self._create(key, value)

    async def update(self, kv: KVPair) -> KVPair:
        await self._enter("update", kv.key)
        return self._update(kv)

    async def delete(self, key: Key, revision: str = "", uid: str = "") -> None:
        await self._enter("delete", key)
        self._delete(key, revision, uid)

    def watch(self, kind: str, revision: str, opts: ListOptions | None = None) -> AsyncIterator[WatchEvent]:
        # The start point is fixed now, at call time, not when the caller first iterates.
        start: int | None
        try:
            start = int(revision) if revision else self._rev
        except ValueError:
            start = None
        return self._watch(kind, start, revision, opts)

    async def _watch(self, kind: str, start: int | None, raw: str,
                     opts: ListOptions | None) -> AsyncIterator[WatchEvent]:
        if start is None:
            raise Invalid(f"bad watch revision {raw!r}")
        await self._enter("watch", kind)
        if start < self._compacted:
            raise Expired(f"revision {start} has been compacted (oldest is {self._compacted})")
        w = _Watcher(kind, opts, asyncio.Queue())
        for ev in self._history:
            if int(ev.revision) > start:
                value = ev.kv.value if ev.kv is not None else None
                if _matches(kind, ev.key, value, opts):
                    w.queue.put_nowait(ev)
        wid = id(w)
        self._watcher_objs[wid] = w
        try:
            while True:
                item = await w.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._watcher_objs.pop(wid, None)

    async def close(self) -> None:
        self._closed = True
        self.end_watches()

    # -- test controls ------------------------------------------------------------------------------
    def compact(self, revision: int | str | None = None) -> None:
        """Forget history up to ``revision`` (default: now): watches from older revisions raise Expired."""
        rev = self._rev if revision is None else int(revision)
        self._compacted = max(self._compacted, rev)
        self._history = [ev for ev in self._history if int(ev.revision) > self._compacted]

    def end_watches(self, error: BaseException | None = None) -> None:
        """End every open watch stream (``error``: raise it in each, e.g. ``Expired`` like a k8s 410)."""
        for w in list(self._watcher_objs.values()):
            w.queue.put_nowait(error)

    @property
    def open_watches(self) -> int:
        return len(self._watcher_objs)


class _Raw:
    """Synchronous store access that bypasses yields, hooks and op counts."""

    def __init__(self, be: MemoryBackend) -> None:
        self._be = be

    def get(self, key: Key) -> KVPair:
        cur = self._be._items.get(key)
        if cur is None:
            raise NotFound(f"{key} not found")
        return self._be._kv(key, cur)

    def create(self, key: Key, value: Resource) -> KVPair:
        return self._be._create(key, value)

    def update(self, kv: KVPair) -> KVPair:
        return self._be._update(kv)

    def delete(self, key: Key, revision: str = "", uid: str = "") -> None:
        self._be._delete(key, revision, uid)

    def touch(self, key: Key) -> KVPair:
        """Rewrite the value unchanged: a new revision, so any cached revision becomes stale."""
        return self._be._update(self.get(key))

    def items(self, kind: str) -> list[KVPair]:
        return [self._be._kv(k, self._be._items[k]) for k in self._be.keys(kind)]


if TYPE_CHECKING:
    _protocol_check: type[Backend] = MemoryBackend


class MemoryTxnBackend(MemoryBackend):
    """MemoryBackend plus the etcd backend's ``txn_write`` extension (several CAS writes, all or none)."""

    async def txn_write(self, ops: Sequence[tuple[str, KVPair | Key]]) -> list[KVPair]:
        await self._enter("txn", "txn")
        seen: set[Key] = set()
        problems: list[str] = []
        for op, item in ops:
            key = item.key if isinstance(item, KVPair) else item
            if key in seen:
                raise Invalid("txn_write: a key appears more than once in one transaction")
            seen.add(key)
            cur = self._items.get(key)
            rev = item.revision if isinstance(item, KVPair) else ""
            if op == "create":
                if not isinstance(item, KVPair):
                    raise Invalid(f"txn_write create of {key} needs a KVPair")
                if cur is not None:
                    problems.append(f"create {key}: already exists")
            elif op in ("update", "delete"):
                if op == "update" and not isinstance(item, KVPair):
                    raise Invalid(f"txn_write update of {key} needs a KVPair")
                if cur is None:
                    problems.append(f"{op} {key}: not found")
                elif rev and rev != str(cur.revision):
                    problems.append(f"{op} {key}: revision {rev} is stale (now {cur.revision})")
            else:
                raise Invalid(f"txn_write: unknown op {op!r}")
        if problems:
            raise Conflict("transaction failed: " + "; ".join(problems))
        out: list[KVPair] = []
        for op, item in ops:
            if op == "create":
                assert isinstance(item, KVPair)
                out.append(self._create(item.key, item.value))
            elif op == "update":
                assert isinstance(item, KVPair)
                out.append(self._update(KVPair(item.key, item.value, "", "")))
            else:
                key = item.key if isinstance(item, KVPair) else item
                self._delete(key, "", "")
                out.append(KVPair(key, item.value if isinstance(item, KVPair) else {}, str(self._rev)))
        return out
