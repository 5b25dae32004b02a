"""MemoryBackend: exact CAS semantics, list filters, watch replay/streaming and compaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_IPPOOL,
    KIND_WEP,
    AlreadyExists,
    Conflict,
    Expired,
    Invalid,
    Key,
    KVPair,
    ListOptions,
    NotFound,
    Unavailable,
    WatchEvent,
    new_resource,
)
from felixpy.datastore.memory import MemoryBackend

K1 = Key(KIND_IPPOOL, "p1")
K2 = Key(KIND_IPPOOL, "p2")


def res(key: Key, **spec: object) -> dict[str, object]:
    return new_resource(key, dict(spec))


async def take(it: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(it.__anext__(), 5))
    return out


async def test_create_get_update_delete_cas() -> None:
    b = MemoryBackend()
    kv = await b.create(K1, res(K1, cidr="10.0.0.0/16"))
    assert kv.revision == "1" and kv.uid
    assert kv.value["metadata"]["resourceVersion"] == "1"
    with pytest.raises(AlreadyExists):
        await b.create(K1, res(K1))
    got = await b.get(K1)
    assert got.value["spec"] == {"cidr": "10.0.0.0/16"} and got.revision == "1"
    # CAS update at the right revision succeeds and bumps the global revision.
    got.value["spec"]["cidr"] = "10.1.0.0/16"
    kv2 = await b.update(got)
    assert kv2.revision == "2" and kv2.uid == kv.uid
    # The stale revision now fails, and so does a stale delete.
    with pytest.raises(Conflict):
        await b.update(KVPair(K1, res(K1), "1"))
    with pytest.raises(Conflict):
        await b.delete(K1, revision="1")
    with pytest.raises(Conflict):
        await b.delete(K1, uid="other-uid")
    # Unconditional update (empty revision) is allowed.
    assert (await b.update(KVPair(K1, res(K1, cidr="x")))).revision == "3"
    await b.delete(K1, revision="3", uid=kv.uid)
    with pytest.raises(NotFound):
        await b.get(K1)
    with pytest.raises(NotFound):
        await b.update(KVPair(K1, res(K1), ""))
    with pytest.raises(NotFound):
        await b.delete(K1)
    # A recreated object gets a new uid and a fresh revision.
    kv3 = await b.create(K1, res(K1))
    assert kv3.uid != kv.uid and int(kv3.revision) > 3


async def test_values_are_isolated_and_must_be_json() -> None:
    b = MemoryBackend()
    value = res(K1, cidr="10.0.0.0/16")
    kv = await b.create(K1, value)
    value["spec"]["cidr"] = "mutated"  # type: ignore[index]
    kv.value["spec"]["cidr"] = "mutated too"
    assert (await b.get(K1)).value["spec"]["cidr"] == "10.0.0.0/16"
    with pytest.raises(Invalid):
        await b.create(K2, {"spec": {"x": object()}})
    assert b.keys() == [K1]


async def test_list_filters() -> None:
    b = MemoryBackend()
    for ns, node in (("a", "n1"), ("a", "n2"), ("b", "n1")):
        k = Key(KIND_WEP, f"{node}-{ns}", ns)
        await b.create(k, res(k, node=node))
    for host in ("n1", "n2"):
        k = Key(KIND_BLOCK_AFFINITY, f"{host}-10-0-0-0-26")
        await b.create(k, res(k, node=host, cidr="10.0.0.0/26"))
    assert len((await b.list(KIND_WEP)).items) == 3
    assert [kv.key.namespace for kv in (await b.list(KIND_WEP, ListOptions(namespace="a"))).items] == ["a", "a"]
    assert [kv.key.name for kv in (await b.list(KIND_WEP, ListOptions(node="n1"))).items] == ["n1-a", "n1-b"]
    affs = (await b.list(KIND_BLOCK_AFFINITY, ListOptions(host="n2"))).items
    assert [kv.key.name for kv in affs] == ["n2-10-0-0-0-26"]
    lr = await b.list(KIND_IPPOOL)
    assert lr.items == [] and lr.revision == str(b.revision)


async def test_watch_replays_after_revision_then_streams() -> None:
    b = MemoryBackend()
    await b.create(K1, res(K1))
    lr = await b.list(KIND_IPPOOL)
    kv2 = await b.create(K2, res(K2))  # after the list: must be replayed
    w = b.watch(KIND_IPPOOL, lr.revision)
    (ev,) = await take(w, 1)
    assert ev.type == "put" and ev.key == K2 and ev.revision == kv2.revision
    await b.delete(K1)
    await b.create(Key(KIND_WEP, "other", "ns"), {"spec": {}})  # another kind: not delivered
    await b.update(KVPair(K2, res(K2, x=1), kv2.revision))
    evs = await take(w, 2)
    assert [(e.type, e.key) for e in evs] == [("delete", K1), ("put", K2)]
    assert evs[0].kv is not None and evs[0].kv.key == K1  # last value on delete
    assert evs[1].kv is not None and evs[1].kv.value["spec"] == {"x": 1}
    await w.aclose()  # type: ignore[attr-defined]
    assert b.open_watches == 0


async def test_watch_from_now_and_filters() -> None:
    b = MemoryBackend()
    k = Key(KIND_WEP, "w1", "a")
    w = b.watch(KIND_WEP, "", ListOptions(namespace="b"))
    await b.create(k, res(k))
    k2 = Key(KIND_WEP, "w2", "b")
    await b.create(k2, res(k2))
    (ev,) = await take(w, 1)
    assert ev.key == k2


async def test_compaction_expires_old_watches_and_end_watches() -> None:
    b = MemoryBackend()
    await b.create(K1, res(K1))
    old = str(b.revision)
    await b.create(K2, res(K2))
    b.compact()
    with pytest.raises(Expired):
        await take(b.watch(KIND_IPPOOL, old), 1)
    # Watching from the compaction point is fine.
    w = b.watch(KIND_IPPOOL, str(b.revision))
    task = asyncio.ensure_future(take(w, 1))
    await asyncio.sleep(0.01)
    b.end_watches(Expired("gone"))
    with pytest.raises(Expired):
        await task
    # A plain end finishes the stream.
    w2 = b.watch(KIND_IPPOOL, "")
    t2 = asyncio.ensure_future(take(w2, 1))
    await asyncio.sleep(0.01)
    b.end_watches()
    with pytest.raises(StopAsyncIteration):
        await t2


async def test_hooks_inject_conflicts_and_outages_and_count_ops() -> None:
    b = MemoryBackend()
    kv = await b.create(K1, res(K1))

    def writer(op: str, target: Key | str) -> None:
        if op == "update":
            b.raw().touch(K1)  # a concurrent writer lands first

    b.hooks.append(writer)
    with pytest.raises(Conflict):
        await b.update(kv)
    b.hooks.clear()

    async def outage(op: str, target: Key | str) -> None:
        raise Unavailable("injected")

    b.hooks.append(outage)
    with pytest.raises(Unavailable):
        await b.get(K1)
    b.hooks.clear()
    assert b.ops("update", KIND_IPPOOL) == 1 and b.ops("create") == 1 and b.ops("get") == 1
    await b.close()
    with pytest.raises(Unavailable):
        await b.get(K1)
