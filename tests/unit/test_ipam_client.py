"""IPAMClient on the in-memory backend: claims, affinity states, borrowing, exhaustion, release, races,
injected CAS conflicts and the round trips of the steady state.

The in-memory backend yields to the event loop on every operation, so ``asyncio.gather`` really
interleaves clients; hooks play a concurrent writer between a read and the CAS that follows it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_IPAM_BLOCK,
    KIND_IPAM_CONFIG,
    KIND_IPAM_HANDLE,
    KIND_IPPOOL,
    KIND_NODE,
    Key,
    KVPair,
    Unavailable,
    new_resource,
)
from felixpy.datastore.memory import MemoryBackend, MemoryTxnBackend
from felixpy.ipam import (
    AddressInUseError,
    AddressNotInPoolError,
    BlockLimitError,
    BlockNotEmptyError,
    IPAMClient,
    NoPoolsError,
    PoolExhaustedError,
    PoolNotFoundError,
    StrictAffinityError,
    TooManyConflictsError,
    check_ipam,
)
from felixpy.ipam.block import LABEL_HOSTNAME_HASH, Block, hostname_hash

ATTRS = {"node": "n1", "namespace": "default", "pod": "p"}


# -- helpers -------------------------------------------------------------------------------------------
async def add_pool(b: MemoryBackend, name: str, cidr: str, block_size: int = 26, **spec: Any) -> None:
    k = Key(KIND_IPPOOL, name)
    await b.create(k, new_resource(k, {"cidr": cidr, "blockSize": block_size, **spec}))


async def set_config(b: MemoryBackend, **spec: Any) -> None:
    k = Key(KIND_IPAM_CONFIG, "default")
    full = {"strictAffinity": False, "autoAllocateBlocks": True, "maxBlocksPerHost": 0, **spec}
    try:
        kv = b.raw().get(k)
    except Exception:
        b.raw().create(k, new_resource(k, full))
        return
    b.raw().update(KVPair(k, new_resource(k, full), kv.revision))


def client(b: MemoryBackend, node: str = "n1", **kw: Any) -> IPAMClient:
    kw.setdefault("cache_ttl", 0.0)
    return IPAMClient(b, node=node, **kw)


def blocks(b: MemoryBackend) -> dict[str, Block]:
    return {kv.value["spec"]["cidr"]: Block.from_spec(kv.value["spec"]) for kv in b.raw().items(KIND_IPAM_BLOCK)}


def allocations(b: MemoryBackend) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for blk in blocks(b).values():
        for o in blk.allocated_ordinals():
            ip = str(blk.ordinal_to_ip(o))
            assert ip not in out, f"{ip} has two owners"
            out[ip] = blk.handle_of(o)
    return out


def handles(b: MemoryBackend) -> dict[str, dict[str, int]]:
    return {kv.value["spec"]["handleID"]: kv.value["spec"]["block"] for kv in b.raw().items(KIND_IPAM_HANDLE)}


def block_write(op: str, target: Key | str, blk_key: Key) -> bool:
    """A write of the block: a CAS update, or a transaction (the txn backend's only kind here)."""
    return (op == "update" and target == blk_key) or op == "txn"


def assert_consistent(b: MemoryBackend) -> None:
    problems = check_ipam([kv.value for kv in b.raw().items(KIND_IPAM_BLOCK)],
                          [kv.value for kv in b.raw().items(KIND_IPAM_HANDLE)],
                          [kv.value for kv in b.raw().items(KIND_BLOCK_AFFINITY)])
    assert problems == []


@pytest.fixture(params=["plain", "txn"])
async def be(request: pytest.FixtureRequest) -> MemoryBackend:
    """Every test on this fixture runs twice: without and with the optional ``txn_write`` extension."""
    b = MemoryTxnBackend() if request.param == "txn" else MemoryBackend()
    await add_pool(b, "default-ipv4-ippool", "10.244.0.0/16")
    return b


# -- claiming and affinity -----------------------------------------------------------------------------
async def test_first_assign_claims_a_block_with_confirmed_affinity(be: MemoryBackend) -> None:
    c = client(be, clock=lambda: 1_700_000_000.0)
    (ip,) = await c.auto_assign(handle_id="k8s-pod-network.abc", attrs=ATTRS)
    assert ip.network.prefixlen == 26 and ip.ip == ip.network.network_address  # ordinal 0 first
    cidr = str(ip.network)
    blk = blocks(be)[cidr]
    assert blk.affinity == "host:n1" and blk.affinity_claim_time == "2023-11-14T22:13:20Z"
    assert blk.attrs_of(0) == ATTRS and blk.handle_of(0) == "k8s-pod-network.abc"
    (aff,) = be.raw().items(KIND_BLOCK_AFFINITY)
    assert aff.key.name == f"n1-{cidr.replace('.', '-').replace('/', '-')}"
    assert aff.value["spec"] == {"state": "confirmed", "node": "n1", "cidr": cidr, "type": "host",
                                 "deleted": False}
    assert aff.value["metadata"]["labels"][LABEL_HOSTNAME_HASH] == hostname_hash("n1")
    assert handles(be) == {"k8s-pod-network.abc": {cidr: 1}}
    assert be.raw().get(Key(KIND_IPAM_HANDLE, "k8s-pod-network.abc")).value["spec"]["deleted"] is False
    # Calico's IPAMConfig defaults were created because none existed.
    cfg = be.raw().get(Key(KIND_IPAM_CONFIG, "default")).value["spec"]
    assert cfg == {"strictAffinity": False, "autoAllocateBlocks": True, "maxBlocksPerHost": 0}
    assert_consistent(be)


async def test_fills_affine_block_then_claims_next() -> None:
    b = MemoryBackend()
    await add_pool(b, "small", "10.9.0.0/28", block_size=30)
    c = client(b)
    got = [str(i) for _ in range(6) for i in await c.auto_assign(handle_id=f"h{_}", attrs={})]
    nets = {ipaddress.ip_interface(g).network for g in got}
    assert len(set(got)) == 6 and len(nets) == 2
    assert all(blk.host == "n1" for blk in blocks(b).values())
    # Multi-address request spanning blocks.
    more = await c.auto_assign(handle_id="multi", attrs={}, num_v4=5)
    assert len(more) == 5 and len(blocks(b)) == 3  # 11 addresses in /30 blocks
    assert sum(handles(b)["multi"].values()) == 5
    assert_consistent(b)


async def test_exhaustion_is_all_or_nothing_and_names_the_pool() -> None:
    b = MemoryBackend()
    await add_pool(b, "tiny", "10.9.0.0/30", block_size=30)
    c = client(b)
    await c.auto_assign(handle_id="a", attrs={}, num_v4=3)
    with pytest.raises(PoolExhaustedError, match=r"assigned only 1 of 2 IPv4 addresses: no free IPv4 "
                                                 r"addresses in pools \[10\.9\.0\.0/30\]"):
        await c.auto_assign(handle_id="b", attrs={}, num_v4=2)
    assert "b" not in handles(b) and len(allocations(b)) == 3  # the partial address was given back
    (last,) = await c.auto_assign(handle_id="c", attrs={})
    assert str(last.ip) == "10.9.0.3"
    with pytest.raises(PoolExhaustedError, match=r"no free IPv4 addresses in pools \[10\.9\.0\.0/30\]"):
        await c.auto_assign(handle_id="d", attrs={})
    assert_consistent(b)


async def test_no_pools_and_requested_pools() -> None:
    b = MemoryBackend()
    c = client(b)
    with pytest.raises(NoPoolsError, match="no enabled IPv4 IP pools"):
        await c.auto_assign(handle_id="h", attrs={})
    await add_pool(b, "p1", "10.1.0.0/16")
    await add_pool(b, "p2", "10.2.0.0/16")
    await add_pool(b, "off", "10.3.0.0/16", disabled=True)
    await add_pool(b, "manual", "10.4.0.0/16", assignmentMode="Manual")
    (ip,) = await c.auto_assign(handle_id="h1", attrs={}, pools=["p2"])
    assert ip.ip in ipaddress.ip_network("10.2.0.0/16")
    (ip,) = await c.auto_assign(handle_id="h2", attrs={}, pools=["10.1.0.0/16"])
    assert ip.ip in ipaddress.ip_network("10.1.0.0/16")
    (ip,) = await c.auto_assign(handle_id="h3", attrs={}, pools=["manual"])  # requested: selectors ignored
    assert ip.ip in ipaddress.ip_network("10.4.0.0/16")
    for ref in ("nope", "10.3.0.0/16", "off"):
        with pytest.raises(PoolNotFoundError, match=r"does not exist, or is not enabled"):
            await c.auto_assign(handle_id="h4", attrs={}, pools=[ref])
    # Automatic selection never uses the Manual or disabled pools.
    for i in range(10):
        (ip,) = await c.auto_assign(handle_id=f"auto{i}", attrs={})
        assert any(ip.ip in ipaddress.ip_network(n) for n in ("10.1.0.0/16", "10.2.0.0/16"))
    assert "h4" not in handles(b)
    assert_consistent(b)


async def test_malformed_pool_is_skipped_not_fatal() -> None:
    b = MemoryBackend()
    await add_pool(b, "bad", "10.1.0.0/16", ipipMode="Sometimes")
    await add_pool(b, "good", "10.2.0.0/16")
    (ip,) = await client(b).auto_assign(handle_id="h", attrs={})
    assert ip.ip in ipaddress.ip_network("10.2.0.0/16")


async def test_node_selector_and_allowed_uses() -> None:
    b = MemoryBackend()
    await add_pool(b, "zone-a", "10.1.0.0/16", nodeSelector='zone == "a"')
    await add_pool(b, "zone-b", "10.2.0.0/16", nodeSelector='zone == "b"')
    await add_pool(b, "tunnels", "10.3.0.0/16", allowedUses=["Tunnel"])
    c = client(b)
    (ip,) = await c.auto_assign(handle_id="h1", attrs={}, node_labels={"zone": "b"})
    assert ip.ip in ipaddress.ip_network("10.2.0.0/16")
    (ip,) = await c.auto_assign(handle_id="t1", attrs={}, use="Tunnel", node_labels={"zone": "c"})
    assert ip.ip in ipaddress.ip_network("10.3.0.0/16")
    with pytest.raises(NoPoolsError, match="allow use Workload"):
        await c.auto_assign(handle_id="h2", attrs={}, node_labels={"zone": "c"})
    # Without explicit labels the Node resource's labels are read.
    nk = Key(KIND_NODE, "n1")
    await b.create(nk, {"kind": "Node", "metadata": {"name": "n1", "labels": {"zone": "a"}}, "spec": {}})
    (ip,) = await c.auto_assign(handle_id="h3", attrs={})
    assert ip.ip in ipaddress.ip_network("10.1.0.0/16")


async def test_affine_block_of_a_pool_that_stops_selecting_the_node_is_released_when_empty() -> None:
    b = MemoryBackend()
    await add_pool(b, "p1", "10.1.0.0/16", nodeSelector='zone == "a"')
    await add_pool(b, "p2", "10.2.0.0/16")
    c = client(b)
    (ip,) = await c.auto_assign(handle_id="h1", attrs={}, pools=["p1"], node_labels={"zone": "a"})
    await c.release_by_handle("h1")
    assert str(ip.network) in blocks(b)  # empty affine block is kept
    (ip2,) = await c.auto_assign(handle_id="h2", attrs={}, node_labels={"zone": "z"})
    assert ip2.ip in ipaddress.ip_network("10.2.0.0/16")
    assert str(ip.network) not in blocks(b)  # p1 no longer selects us: its empty block was let go
    assert all(kv.value["spec"]["cidr"] != str(ip.network) for kv in b.raw().items(KIND_BLOCK_AFFINITY))
    assert_consistent(b)


# -- borrowing and strict affinity -------------------------------------------------------------------
async def _two_full_nodes() -> tuple[MemoryBackend, IPAMClient, IPAMClient]:
    b = MemoryBackend()
    await add_pool(b, "p", "10.9.0.0/29", block_size=30)
    c1, c2 = client(b, "n1"), client(b, "n2")
    await c1.auto_assign(handle_id="a", attrs={}, num_v4=4)
    await c2.auto_assign(handle_id="b", attrs={}, num_v4=4)
    return b, c1, c2


async def test_borrowing_from_another_nodes_block() -> None:
    b, c1, c2 = await _two_full_nodes()
    n1_block = next(ipaddress.ip_network(c) for c, blk in blocks(b).items() if blk.host == "n1")
    freed = await c1.release_ips([n1_block.network_address + 1])
    assert freed == [n1_block.network_address + 1]
    (ip,) = await c2.auto_assign(handle_id="borrow", attrs={})
    assert [ip.ip] == freed
    owner_block = blocks(b)[str(ip.network)]
    assert owner_block.host == "n1"  # borrowed: the block stays affine to n1
    assert handles(b)["borrow"] == {str(ip.network): 1}
    assert_consistent(b)
    # Releasing the borrowed address gives it back to n1's block.
    assert await c2.release_by_handle("borrow") == [ip.ip]
    assert blocks(b)[str(ip.network)].host == "n1"
    assert_consistent(b)


async def test_strict_affinity_forbids_borrowing() -> None:
    b, c1, c2 = await _two_full_nodes()
    await set_config(b, strictAffinity=True)
    own = next(c for c, blk in blocks(b).items() if blk.host == "n1")
    await c1.release_ips([str(ipaddress.ip_network(own).network_address)])
    with pytest.raises(PoolExhaustedError, match="strict affinity is enabled"):
        await c2.auto_assign(handle_id="x", attrs={})
    assert "x" not in handles(b)


async def test_max_blocks_per_host() -> None:
    b = MemoryBackend()
    await add_pool(b, "p", "10.9.0.0/24", block_size=30)
    await set_config(b, strictAffinity=True, maxBlocksPerHost=1)
    c = client(b)
    await c.auto_assign(handle_id="a", attrs={}, num_v4=4)
    with pytest.raises(BlockLimitError, match="per-host block limit is 1"):
        await c.auto_assign(handle_id="b", attrs={})
    assert "b" not in handles(b)


async def test_reclaims_empty_block_of_another_node_after_60s() -> None:
    b = MemoryBackend()
    await add_pool(b, "p", "10.9.0.0/29", block_size=30)
    now = [1_000_000.0]
    c1, c2 = client(b, "n1", clock=lambda: now[0]), client(b, "n2", clock=lambda: now[0])
    await c1.auto_assign(handle_id="a", attrs={}, num_v4=4)
    await c2.auto_assign(handle_id="b", attrs={})
    await c2.release_by_handle("b")  # n2's block is now empty but still affine to n2
    await set_config(b, strictAffinity=True)  # so the only way out is reclaiming
    with pytest.raises(PoolExhaustedError):
        await c1.auto_assign(handle_id="c", attrs={})  # claimed 0 s ago: not yet
    now[0] += 61
    (ip,) = await c1.auto_assign(handle_id="c", attrs={})
    blk = blocks(b)[str(ip.network)]
    assert blk.host == "n1"
    assert {kv.value["spec"]["node"] for kv in b.raw().items(KIND_BLOCK_AFFINITY)} == {"n1"}
    assert_consistent(b)


# -- exact assignment --------------------------------------------------------------------------------
async def test_assign_ip(be: MemoryBackend) -> None:
    c = client(be)
    iface = await c.assign_ip("10.244.7.9", handle_id="fixed", attrs={"pod": "x"})
    assert str(iface) == "10.244.7.9/26"
    blk = blocks(be)["10.244.7.0/26"]
    assert blk.host == "n1" and blk.handle_of(9) == "fixed"
    assert handles(be)["fixed"] == {"10.244.7.0/26": 1}
    with pytest.raises(AddressInUseError, match=r"10\.244\.7\.9 is already in use \(handle fixed\)"):
        await c.assign_ip("10.244.7.9", handle_id="other", attrs={})
    assert "other" not in handles(be)
    with pytest.raises(AddressNotInPoolError):
        await c.assign_ip("192.168.1.1", handle_id="x", attrs={})
    # Another node may take an address in our block unless strict affinity is on.
    c2 = client(be, "n2")
    await c2.assign_ip("10.244.7.10", handle_id="n2-fixed", attrs={})
    await set_config(be, strictAffinity=True)
    with pytest.raises(StrictAffinityError):
        await c2.assign_ip("10.244.7.11", handle_id="n2-strict", attrs={})
    assert await c.ips_by_handle("fixed") == [ipaddress.IPv4Address("10.244.7.9")]
    assert_consistent(be)


# -- release ------------------------------------------------------------------------------------------
async def test_release_is_idempotent_and_missing_handle_is_empty(be: MemoryBackend) -> None:
    c = client(be)
    (ip,) = await c.auto_assign(handle_id="H", attrs={})
    assert await c.release_by_handle("H") == [ip.ip]
    assert await c.release_by_handle("H") == []
    assert await c.release_by_handle("never-existed") == []
    assert handles(be) == {} and allocations(be) == {}
    assert await c.ips_by_handle("H") == []
    # The affine block stays (empty) for the next pod.
    assert blocks(be)[str(ip.network)].host == "n1"
    # release_ips of a free or unknown address is a no-op.
    assert await c.release_ips([ip.ip, "10.99.0.1"]) == []
    assert_consistent(be)


async def test_release_block_affinity(be: MemoryBackend) -> None:
    c = client(be)
    (ip1,) = await c.auto_assign(handle_id="a", attrs={})
    net = ip1.network
    with pytest.raises(BlockNotEmptyError):
        await c.release_block_affinity(net, must_be_empty=True)
    assert await c.release_block_affinity(str(net))
    blk = blocks(be)[str(net)]
    assert blk.affinity is None and blk.affinity_claim_time is None and blk.handle_of(0) == "a"
    assert be.raw().items(KIND_BLOCK_AFFINITY) == []
    # The next assignment claims a different block.
    (ip2,) = await c.auto_assign(handle_id="b", attrs={})
    assert ip2.network != net
    # Releasing the last address of the non-affine block deletes the block.
    await c.release_by_handle("a")
    assert str(net) not in blocks(be)
    # Releasing an empty affine block deletes block and affinity.
    await c.release_by_handle("b")
    assert await c.release_host_affinities() == [ip2.network]
    assert blocks(be) == {} and be.raw().items(KIND_BLOCK_AFFINITY) == []
    assert not await c.release_block_affinity(ip2.network)  # nothing left: idempotent
    assert_consistent(be)


async def test_half_deleted_objects_are_treated_as_absent(be: MemoryBackend) -> None:
    c = client(be)
    (ip,) = await c.auto_assign(handle_id="h", attrs={})
    hk = Key(KIND_IPAM_HANDLE, "h")
    kv = be.raw().get(hk)
    kv.value["spec"]["deleted"] = True
    be.raw().update(kv)  # a crashed two-phase delete
    c2 = client(be)  # a fresh process sees it
    assert await c2.ips_by_handle("h") == []
    with pytest.raises(Exception, match="not found"):
        be.raw().get(hk)  # ...and finished the delete
    # The orphaned allocation is what `ipam check` reports.
    kinds = {p.kind for p in check_ipam([kv.value for kv in be.raw().items(KIND_IPAM_BLOCK)], [])}
    assert "missing-handle" in kinds
    await c2.release_ips([ip.ip])
    assert allocations(be) == {}


# -- concurrency ---------------------------------------------------------------------------------------
async def test_fifty_concurrent_assigns_on_one_node_then_release_all(be: MemoryBackend) -> None:
    c = client(be, cache_ttl=2.0)
    res = await asyncio.gather(*(c.auto_assign(handle_id=f"k8s-pod-network.{i}", attrs=ATTRS)
                                 for i in range(50)))
    ips = [r[0].ip for r in res]
    assert len(set(ips)) == 50
    assert len(blocks(be)) == 1  # 50 fit in one /26
    # This node's requests are serialised, so they never collide with each other: one CAS each.
    assert be.ops("update", KIND_IPAM_BLOCK) + be.ops("txn") == 50
    assert_consistent(be)
    rel = await asyncio.gather(*(c.release_by_handle(f"k8s-pod-network.{i}") for i in range(50)))
    assert sorted(ip for r in rel for ip in r) == sorted(ips)
    assert allocations(be) == {} and handles(be) == {}
    assert_consistent(be)


async def test_two_nodes_racing_get_unique_addresses() -> None:
    b = MemoryBackend()
    await add_pool(b, "p", "10.9.0.0/26", block_size=29)  # 8 blocks of 8
    clients = [client(b, f"n{i}") for i in range(2)]
    res = await asyncio.gather(*(clients[i % 2].auto_assign(handle_id=f"h{i}", attrs={}) for i in range(60)))
    ips = [r[0].ip for r in res]
    assert len(set(ips)) == 60
    owners = allocations(b)
    assert set(owners.values()) == {f"h{i}" for i in range(60)}
    assert_consistent(b)
    # Six more for the last four addresses: four succeed (borrowing as needed), two fail cleanly.
    out = await asyncio.gather(*(clients[i % 2].auto_assign(handle_id=f"x{i}", attrs={}) for i in range(6)),
                               return_exceptions=True)
    assert sum(isinstance(o, list) for o in out) == 4
    assert sum(isinstance(o, PoolExhaustedError) for o in out) == 2
    assert len(allocations(b)) == 64
    assert_consistent(b)


async def test_same_node_two_processes_racing() -> None:
    """Two client instances for one node (e.g. two processes): only CAS separates them."""
    b = MemoryBackend()
    await add_pool(b, "p", "10.9.0.0/24", block_size=28)
    a, a2 = client(b, "n1"), client(b, "n1")
    res = await asyncio.gather(*((a if i % 2 else a2).auto_assign(handle_id=f"h{i}", attrs={})
                                 for i in range(40)))
    assert len({r[0].ip for r in res}) == 40
    assert_consistent(b)
    await asyncio.gather(*((a2 if i % 2 else a).release_by_handle(f"h{i}") for i in range(40)))
    assert allocations(b) == {} and handles(b) == {}
    assert_consistent(b)


# -- injected conflicts ----------------------------------------------------------------------------------
async def test_conflict_on_block_write_is_retried_without_leaking_handle_counts(be: MemoryBackend) -> None:
    c = client(be)
    await c.auto_assign(handle_id="warm", attrs={})
    blk_key = be.raw().items(KIND_IPAM_BLOCK)[0].key
    left = [3]

    def concurrent_writer(op: str, target: Key | str) -> None:
        if block_write(op, target, blk_key) and left[0] > 0:
            left[0] -= 1
            be.raw().touch(blk_key)  # someone else wrote the block first

    be.hooks.append(concurrent_writer)
    (ip,) = await c.auto_assign(handle_id="h", attrs={})
    assert left[0] == 0
    assert handles(be)["h"] == {str(ip.network): 1}
    assert allocations(be)[str(ip.ip)] == "h"
    assert_consistent(be)


async def test_other_node_takes_the_next_address_between_read_and_cas(be: MemoryBackend) -> None:
    c = client(be)
    (_first,) = await c.auto_assign(handle_id="warm", attrs={})
    blk_key = be.raw().items(KIND_IPAM_BLOCK)[0].key
    stolen: list[str] = []

    def borrower(op: str, target: Key | str) -> None:
        if block_write(op, target, blk_key) and not stolen:
            kv = be.raw().get(blk_key)
            blk = Block.from_spec(kv.value["spec"])
            (o,) = blk.auto_assign(1, "other-node-handle", None)
            blk.bump_sequence()
            kv.value["spec"] = blk.to_spec()
            be.raw().update(kv)
            stolen.append(str(blk.ordinal_to_ip(o)))

    be.hooks.append(borrower)
    (ip,) = await c.auto_assign(handle_id="mine", attrs={})
    assert stolen and str(ip.ip) != stolen[0]
    owners = allocations(be)
    assert owners[stolen[0]] == "other-node-handle" and owners[str(ip.ip)] == "mine"


async def test_conflicts_exhaust_the_retry_budget_cleanly(be: MemoryBackend) -> None:
    c = client(be, retries=5)
    await c.auto_assign(handle_id="warm", attrs={})
    blk_key = be.raw().items(KIND_IPAM_BLOCK)[0].key

    def always(op: str, target: Key | str) -> None:
        if block_write(op, target, blk_key):
            be.raw().touch(blk_key)

    be.hooks.append(always)
    with pytest.raises(TooManyConflictsError):
        await c.auto_assign(handle_id="h", attrs={})
    be.hooks.clear()
    assert "h" not in handles(be) and "h" not in allocations(be).values()


async def test_outcome_unknown_write_never_leaks_an_address(be: MemoryBackend) -> None:
    """The block write lands but the reply is lost: the handle must still find the address."""

    c = client(be)
    await c.auto_assign(handle_id="warm", attrs={})
    orig_update = be.update
    orig_txn = getattr(be, "txn_write", None)
    fired = []

    async def update(kv: KVPair) -> KVPair:
        out = await orig_update(kv)
        if kv.key.kind == KIND_IPAM_BLOCK and not fired:
            fired.append(1)
            raise Unavailable("connection reset after the write")
        return out

    async def txn_write(ops: Any) -> Any:
        assert orig_txn is not None
        await orig_txn(ops)
        fired.append(1)
        raise Unavailable("connection reset after the transaction")

    be.update = update  # type: ignore[method-assign]
    if orig_txn is not None:
        be.txn_write = txn_write  # type: ignore[attr-defined]
    with pytest.raises(Unavailable):
        await c.auto_assign(handle_id="lost", attrs={})
    be.update = orig_update  # type: ignore[method-assign]
    if orig_txn is not None:
        be.txn_write = orig_txn  # type: ignore[attr-defined]
    assert fired
    assert "lost" in allocations(be).values() and "lost" in handles(be)
    # The CNI DEL that follows a failed ADD cleans it up.
    assert len(await c.release_by_handle("lost")) == 1
    assert "lost" not in allocations(be).values() and "lost" not in handles(be)
    assert_consistent(be)


async def test_stale_cache_never_hides_an_allocation_from_release(be: MemoryBackend) -> None:
    a = client(be, cache_ttl=60.0)
    await a.auto_assign(handle_id="warm", attrs={})  # a now caches the block
    other = client(be)  # another process for the same node
    (ip,) = await other.auto_assign(handle_id="H", attrs={})
    assert await a.release_by_handle("H") == [ip.ip]
    assert "H" not in allocations(be).values() and handles(be).keys() == {"warm"}


async def test_stale_affinity_is_dropped_when_the_block_changed_hands(be: MemoryBackend) -> None:
    c = client(be, cache_ttl=60.0)
    (ip,) = await c.auto_assign(handle_id="h", attrs={})
    await c.release_by_handle("h")
    net = str(ip.network)
    # An admin moves the (empty) block to n2 behind our back.
    kv = be.raw().get(Key(KIND_IPAM_BLOCK, net.replace(".", "-").replace("/", "-")))
    kv.value["spec"]["affinity"] = "host:n2"
    be.raw().update(kv)
    (ip2,) = await c.auto_assign(handle_id="h2", attrs={})
    assert ip2.network != ip.network
    assert all(kv.value["spec"]["cidr"] != net or kv.value["spec"]["node"] != "n1"
               for kv in be.raw().items(KIND_BLOCK_AFFINITY))


async def test_affinity_left_pending_is_reconfirmed(be: MemoryBackend) -> None:
    c = client(be)
    (ip,) = await c.auto_assign(handle_id="h", attrs={})
    (aff,) = be.raw().items(KIND_BLOCK_AFFINITY)
    aff.value["spec"]["state"] = "pending"
    be.raw().update(aff)
    (ip2,) = await client(be).auto_assign(handle_id="h2", attrs={})
    assert ip2.network == ip.network
    (aff,) = be.raw().items(KIND_BLOCK_AFFINITY)
    assert aff.value["spec"]["state"] == "confirmed"


async def test_block_deleted_under_its_affinity_is_recreated(be: MemoryBackend) -> None:
    c = client(be, cache_ttl=60.0)
    (ip,) = await c.auto_assign(handle_id="h", attrs={})
    await c.release_by_handle("h")
    bk = be.raw().items(KIND_IPAM_BLOCK)[0].key
    be.raw().delete(bk)
    (ip2,) = await c.auto_assign(handle_id="h2", attrs={})
    assert ip2.network == ip.network and blocks(be)[str(ip.network)].host == "n1"
    assert_consistent(be)


# -- round trips ---------------------------------------------------------------------------------------
async def test_steady_state_round_trips() -> None:
    be = MemoryBackend()
    await add_pool(be, "p", "10.244.0.0/16")
    c = IPAMClient(be, node="n1", cache_ttl=3600.0)
    await c.auto_assign(handle_id="warm", attrs={})
    be.op_counts.clear()
    await c.auto_assign(handle_id="h", attrs={})
    assert dict(be.op_counts) == {("create", KIND_IPAM_HANDLE): 1, ("update", KIND_IPAM_BLOCK): 1}
    be.op_counts.clear()
    await c.release_by_handle("h")
    # Block CAS + two-phase handle delete (mark, then delete).
    assert dict(be.op_counts) == {("update", KIND_IPAM_BLOCK): 1, ("update", KIND_IPAM_HANDLE): 1,
                                  ("delete", KIND_IPAM_HANDLE): 1}
    be.op_counts.clear()
    c1 = IPAMClient(be, node="n1", cache_ttl=3600.0, two_phase_delete=False)
    await c1.auto_assign(handle_id="h1", attrs={})
    be.op_counts.clear()
    await c1.release_by_handle("h1")
    assert dict(be.op_counts) == {("update", KIND_IPAM_BLOCK): 1, ("delete", KIND_IPAM_HANDLE): 1}


async def test_a_full_block_ahead_costs_no_reads() -> None:
    be = MemoryBackend()
    await add_pool(be, "p", "10.9.0.0/24", block_size=30)
    c = IPAMClient(be, node="n1", cache_ttl=3600.0)
    await c.auto_assign(handle_id="fill", attrs={}, num_v4=5)  # one full block, one started
    await c.auto_assign(handle_id="warm", attrs={})
    be.op_counts.clear()
    await c.auto_assign(handle_id="h", attrs={})
    assert dict(be.op_counts) == {("create", KIND_IPAM_HANDLE): 1, ("update", KIND_IPAM_BLOCK): 1}
    assert_consistent(be)


async def test_steady_state_round_trips_with_transactions() -> None:
    be = MemoryTxnBackend()
    await add_pool(be, "p", "10.244.0.0/16")
    c = IPAMClient(be, node="n1", cache_ttl=3600.0, two_phase_delete=False)  # as on etcd
    await c.auto_assign(handle_id="warm", attrs={})
    be.op_counts.clear()
    (ip,) = await c.auto_assign(handle_id="h", attrs={})
    assert dict(be.op_counts) == {("txn", "txn"): 1}
    be.op_counts.clear()
    assert await c.release_by_handle("h") == [ip.ip]
    assert dict(be.op_counts) == {("txn", "txn"): 1}
    assert "h" not in handles(be) and str(ip.ip) not in allocations(be)
    # A handle that already exists makes the transaction fail; the step-by-step path takes over.
    hk = Key(KIND_IPAM_HANDLE, "pre")
    be.raw().create(hk, new_resource(hk, {"handleID": "pre", "block": {}, "deleted": False}))
    (ip2,) = await c.auto_assign(handle_id="pre", attrs={})
    assert handles(be)["pre"] == {str(ip2.network): 1}
    assert_consistent(be)
