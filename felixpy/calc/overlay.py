"""Local-write overlay: what this agent wrote to the datastore before the watch reports it back (pure).

The CNI path writes a WorkloadEndpoint and must see it programmed *before* ADD returns, without waiting
for the watch round trip. It records the write here; the calculation layer reads through the overlay.
An entry is dropped once the syncer delivers the same or a newer state for the key, so a stale watch
event (e.g. the ADD's own write arriving after a DEL) can never resurrect a deleted endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from felixpy.datastore.api import Key, Resource


def rev_int(rev: str) -> int:
    try:
        return int(rev)
    except ValueError:
        return -1


@dataclass
class _Entry:
    value: Resource | None
    revision: int  # put: revision of our write; delete: revision of the last put we knew of
    deadline: float


class LocalOverlay:
    def __init__(self, ttl: float = 60.0) -> None:
        self._entries: dict[Key, _Entry] = {}
        self._ttl = ttl

    def __len__(self) -> int:
        return len(self._entries)

    def record_put(self, key: Key, value: Resource, revision: str, now: float, *, synced_revision: int = -1) -> None:
        """``synced_revision``: revision of the copy the syncer already delivered (-1: none). If that is our
        write or newer, the watch got there first and the synced copy (with the Kubernetes datastore also
        richer: the Pod's labels) must win, so no entry is made (it would shadow it until the TTL)."""
        rev = rev_int(revision)
        if rev >= 0 and synced_revision >= rev:
            self._entries.pop(key, None)
            return
        self._entries[key] = _Entry(value, rev, now + self._ttl)

    def record_delete(self, key: Key, last_revision: str, now: float) -> None:
        self._entries[key] = _Entry(None, rev_int(last_revision), now + self._ttl)

    def shadows(self, key: Key, synced_value: Resource | None, revision: str) -> bool:
        """Called for each syncer update; True if the overlay still wins (the update is stale)."""
        e = self._entries.get(key)
        if e is None:
            return False
        r = rev_int(revision)
        if e.value is not None:
            caught_up = (synced_value is None and r > e.revision) or (synced_value is not None and r >= e.revision)
        else:
            caught_up = synced_value is None or r > e.revision
        if caught_up or e.revision < 0:
            del self._entries[key]
            return False
        return True

    def get(self, key: Key) -> tuple[bool, Resource | None]:
        e = self._entries.get(key)
        return (False, None) if e is None else (True, e.value)

    def expire(self, now: float) -> list[Key]:
        gone = [k for k, e in self._entries.items() if e.deadline <= now]
        for k in gone:
            del self._entries[k]
        return gone
