"""Datastore syncer: list, then watch from the list's revision, per resource kind.

Semantics (Felix's syncer contract):
- Status goes WAIT_FOR_DATASTORE -> RESYNC -> IN_SYNC; IN_SYNC once every kind has been listed.
- A watch that expires (k8s 410 / etcd compaction) triggers a relist; keys that vanished meanwhile get a
  synthesised delete, so consumers never keep a stale object.
- A datastore outage is retried with capped backoff; status drops back to WAIT_FOR_DATASTORE only before
  the first sync (after that the consumer keeps its last good view; Felix does the same).
- Updates go into a :class:`DedupeBuffer`: bursts to one key coalesce to the latest value.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from felixpy.datastore.api import (
    Backend,
    DatastoreError,
    Expired,
    Key,
    ListOptions,
    Resource,
)

log = logging.getLogger(__name__)


class SyncStatus(enum.Enum):
    WAIT_FOR_DATASTORE = "wait-for-datastore"
    RESYNC = "resync"
    IN_SYNC = "in-sync"


@dataclass(frozen=True)
class Update:
    key: Key
    value: Resource | None  # None = deleted
    revision: str = ""


@dataclass(frozen=True)
class WatchSpec:
    kind: str
    opts: ListOptions | None = None
    # Kinds some deployments lack (e.g. a CRD not installed) do not block IN_SYNC when marked optional.
    optional: bool = False


class DedupeBuffer:
    """Keyed coalescing queue between the syncer and the calculation layer.

    Only the latest value per key survives until the consumer takes a batch; key order is first-arrival
    order so causally related keys stay roughly ordered. Status changes are delivered with the batch in
    which they happened (after its updates).
    """

    def __init__(self) -> None:
        self._pending: dict[Key, Update] = {}
        self._status: SyncStatus | None = None
        self._event = asyncio.Event()
        self.total_in = 0
        self.total_coalesced = 0

    def put(self, upd: Update) -> None:
        self.total_in += 1
        if upd.key in self._pending:
            self.total_coalesced += 1
        self._pending[upd.key] = upd
        self._event.set()

    def set_status(self, status: SyncStatus) -> None:
        self._status = status
        self._event.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def get_batch(self) -> tuple[list[Update], SyncStatus | None]:
        while not self._pending and self._status is None:
            self._event.clear()
            await self._event.wait()
        batch = list(self._pending.values())
        status = self._status
        self._pending = {}
        self._status = None
        self._event.clear()
        return batch, status


class Syncer:
    def __init__(self, backend: Backend, specs: Sequence[WatchSpec], out: DedupeBuffer, *,
                 min_backoff: float = 0.2, max_backoff: float = 5.0) -> None:
        self._backend = backend
        self._specs = list(specs)
        self._out = out
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._synced: set[int] = set()
        self.status = SyncStatus.WAIT_FOR_DATASTORE
        self.relists = 0
        self.errors = 0
        out.set_status(self.status)

    def _set_status(self, status: SyncStatus) -> None:
        if status != self.status:
            log.info("syncer status %s -> %s", self.status.value, status.value)
            self.status = status
            self._out.set_status(status)

    def _mark_synced(self, idx: int) -> None:
        self._synced.add(idx)
        needed = {i for i, s in enumerate(self._specs) if not s.optional}
        if needed <= self._synced and self.status != SyncStatus.IN_SYNC:
            self._set_status(SyncStatus.IN_SYNC)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, spec in enumerate(self._specs):
                tg.create_task(self._run_kind(i, spec), name=f"syncer-{spec.kind}")

    async def _run_kind(self, idx: int, spec: WatchSpec) -> None:
        known: dict[Key, str] = {}
        backoff = self._min_backoff
        revision = ""
        need_list = True
        while True:
            try:
                if need_list:
                    if self.status == SyncStatus.WAIT_FOR_DATASTORE and idx == 0:
                        self._set_status(SyncStatus.RESYNC)
                    res = await self._backend.list(spec.kind, spec.opts)
                    seen: dict[Key, str] = {}
                    for kv in res.items:
                        seen[kv.key] = kv.revision
                        if known.get(kv.key) != kv.revision:
                            self._out.put(Update(kv.key, kv.value, kv.revision))
                    for gone in known.keys() - seen.keys():
                        # Deleted while we were not watching: synthesise the delete.
                        self._out.put(Update(gone, None, res.revision))
                    known = seen
                    revision = res.revision
                    need_list = False
                    self._mark_synced(idx)
                    backoff = self._min_backoff
                async for ev in self._backend.watch(spec.kind, revision, spec.opts):
                    if ev.revision:
                        revision = ev.revision
                    if ev.type == "put" and ev.kv is not None:
                        known[ev.key] = ev.kv.revision
                        self._out.put(Update(ev.key, ev.kv.value, ev.kv.revision))
                    elif ev.type == "delete":
                        known.pop(ev.key, None)
                        self._out.put(Update(ev.key, None, ev.revision))
                    backoff = self._min_backoff
                # Stream ended normally (server timeout): re-watch from the last revision.
            except Expired:
                log.info("watch of %s expired at revision %s: relisting", spec.kind, revision)
                self.relists += 1
                need_list = True
            except DatastoreError as e:
                self.errors += 1
                if spec.optional and need_list and idx not in self._synced:
                    log.warning("optional kind %s unavailable (%s); continuing without it", spec.kind, e)
                    self._mark_synced(idx)
                log.warning("datastore error on %s: %s; retrying in %.1fs", spec.kind, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                need_list = True
