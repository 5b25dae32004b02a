"""Pure IPAM block logic (felixpy.ipam.block) and the consistency checker (felixpy.ipam.check).

Expected values restate Calico's documented data model (calico-compat.md §3.1, §3.3, §3.4); hash and
checksum vectors are the published NIST SHA3-256 and FNV-1 test vectors.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felixpy.ipam.block import (
    LABEL_AFFINITY_TYPE,
    LABEL_HOSTNAME_HASH,
    LABEL_IP_VERSION,
    WINDOWS_RESERVED_HANDLE,
    Block,
    affinity_labels,
    affinity_name,
    block_cidr_for,
    block_cidrs,
    check_block,
    cidr_to_name,
    fnv1_32,
    format_time,
    handle_name,
    hostname_hash,
    parse_time,
    sanitize_handle,
)
from felixpy.ipam.check import (
    DANGLING_HANDLE,
    DUPLICATE_AFFINITY,
    DUPLICATE_OWNER,
    HANDLE_OVERCOUNT,
    MISSING_AFFINITY,
    MISSING_HANDLE,
    STALE_AFFINITY,
    check_ipam,
)
from felixpy.ipam.errors import AddressInUseError, InvalidBlockError

NET26 = ipaddress.IPv4Network("10.244.1.0/26")
NET29 = ipaddress.IPv4Network("10.0.0.0/29")


def new_block(net: ipaddress.IPv4Network = NET26, host: str | None = "node-1") -> Block:
    return Block.new(net, host=host, claim_time=1_700_000_000.0, sequence_number=1000)


# -- names, labels, hashes --------------------------------------------------------------------------------
def test_cidr_to_name() -> None:
    assert cidr_to_name(NET26) == "10-244-1-0-26"
    assert cidr_to_name("192.168.0.0/16") == "192-168-0-0-16"
    assert cidr_to_name(ipaddress.ip_network("fd00::/122")) == "fd00---122"


def test_affinity_name_short_and_hashed() -> None:
    assert affinity_name("node-1", NET26) == "node-1-10-244-1-0-26"
    host = "h" * 250
    name = affinity_name(host, NET26)
    digest = hashlib.sha256(f"{host}+10-244-1-0-26".encode()).hexdigest()[:11]
    assert len(name) == 252
    assert name == f"{host[:252 - len('10-244-1-0-26') - 13]}-10-244-1-0-26-{digest}"
    # The boundary: 252 characters stay as they are, 253 get hashed.
    h238 = "x" * (252 - len("-10-244-1-0-26"))
    assert affinity_name(h238, NET26) == f"{h238}-10-244-1-0-26"
    assert affinity_name(h238 + "y", NET26) != f"{h238}y-10-244-1-0-26"
    assert len(affinity_name(h238 + "y", NET26)) == 252


def test_hostname_hash_is_base32_sha3_256_unpadded() -> None:
    empty_sha3 = bytes.fromhex("a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a")
    assert hostname_hash("") == base64.b32encode(empty_sha3).decode().rstrip("=")
    abc_sha3 = bytes.fromhex("3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532")
    h = hostname_hash("abc")
    assert h == base64.b32encode(abc_sha3).decode().rstrip("=")
    assert len(h) == 52 and "=" not in h and h.upper() == h
    labels = affinity_labels("abc", NET26)
    assert labels == {LABEL_HOSTNAME_HASH: h, LABEL_AFFINITY_TYPE: "host", LABEL_IP_VERSION: "4"}
    assert all(len(v) <= 63 for v in labels.values())


def test_fnv1_32_vectors() -> None:
    assert fnv1_32(b"") == 0x811C9DC5
    assert fnv1_32(b"a") == 0x050C5D7E
    assert fnv1_32(b"foobar") == 0x31F0B262


def test_handle_names() -> None:
    assert handle_name("k8s-pod-network.ABCdef") == "k8s-pod-network.abcdef"
    assert sanitize_handle("k8s-pod-network.abc\r\neth0") == "k8s-pod-network.abc"


def test_time_round_trip() -> None:
    s = format_time(1_700_000_000.7)
    assert s == "2023-11-14T22:13:20Z"
    assert parse_time(s) == 1_700_000_000.0
    assert parse_time("garbage") is None and parse_time(None) is None


# -- block generation --------------------------------------------------------------------------------------
def test_block_cidrs_visits_every_block_once_from_a_host_seeded_start() -> None:
    pool = ipaddress.IPv4Network("10.0.0.0/24")
    a = list(block_cidrs(pool, 28, "node-a"))
    assert sorted(a, key=lambda n: int(n.network_address)) == list(pool.subnets(new_prefix=28))
    # Same host, same order (concurrent claims on one node meet on the same block first).
    assert list(block_cidrs(pool, 28, "node-a")) == a
    starts = {next(iter(block_cidrs(pool, 28, f"node-{i}"))) for i in range(20)}
    assert len(starts) > 1  # hosts spread over the pool
    # Wrap-around order: consecutive blocks after the start.
    idx = [int(n.network_address) - int(pool.network_address) for n in a]
    assert all((j - i) % 256 == 16 for i, j in itertools.pairwise(idx))
    assert list(block_cidrs(pool, 20, "x")) == []  # block larger than the pool
    assert block_cidr_for(ipaddress.IPv4Address("10.0.0.77"), 26) == ipaddress.IPv4Network("10.0.0.64/26")


# -- a block's life ----------------------------------------------------------------------------------------
def test_new_block_matches_calico_layout() -> None:
    b = new_block()
    spec = b.to_spec()
    assert spec["cidr"] == "10.244.1.0/26"
    assert spec["affinity"] == "host:node-1"
    assert spec["affinityClaimTime"] == "2023-11-14T22:13:20Z"
    assert spec["allocations"] == [None] * 64
    assert spec["unallocated"] == list(range(64))
    assert spec["attributes"] == []
    assert spec["sequenceNumber"] == 1000
    assert spec["sequenceNumberForAllocation"] == {}
    assert spec["deleted"] is False and spec["strictAffinity"] is False
    nb = new_block(host=None).to_spec()
    assert "affinity" not in nb  # omitted, not null


def test_assign_from_front_attributes_and_sequence_numbers() -> None:
    b = new_block()
    ords = b.auto_assign(2, "h1", {"pod": "a"})
    assert ords == [0, 1]
    assert [str(b.interface(o)) for o in ords] == ["10.244.1.0/26", "10.244.1.1/26"]
    assert b.attributes == [{"handle_id": "h1", "secondary": {"pod": "a"}}]
    assert b.allocations[:3] == [0, 0, None]
    assert b.unallocated[:2] == [2, 3]
    assert b.seq_for_allocation == {"0": 1000, "1": 1000}
    b.bump_sequence()
    assert b.auto_assign(1, "h2", {"pod": "b"}) == [2]
    assert b.seq_for_allocation["2"] == 1001
    assert b.allocations[2] == 1
    # Same handle and attributes share the attribute entry.
    assert b.auto_assign(1, "h1", {"pod": "a"}) == [3]
    assert b.allocations[3] == 0
    assert check_block(b) == []


def test_release_renumbers_attributes_and_appends_fifo() -> None:
    b = new_block()
    b.auto_assign(1, "h1", {"pod": "a"})
    b.auto_assign(1, "h2", {"pod": "b"})
    b.auto_assign(1, "h3", {"pod": "c"})
    released, not_alloc, by_handle = b.release([0, 5])
    assert released == [0] and not_alloc == [5] and by_handle == {"h1": 1}
    assert [a["handle_id"] for a in b.attributes] == ["h2", "h3"]
    assert b.allocations[:3] == [None, 0, 1]
    assert b.unallocated[-1] == 0  # reused last
    assert "0" not in b.seq_for_allocation
    assert b.release_by_handle("h3") == [2]
    assert b.unallocated[-2:] == [0, 2]
    assert b.attributes == [{"handle_id": "h2", "secondary": {"pod": "b"}}]
    assert check_block(b) == []
    # The next assignment takes the front of the list, not the just-freed ordinals.
    assert b.auto_assign(1, "h4", None) == [3]


def test_assign_specific_and_in_use() -> None:
    b = new_block()
    b.assign(10, "h1", {"pod": "a"})
    assert 10 not in b.unallocated and b.handle_of(10) == "h1"
    with pytest.raises(AddressInUseError, match=r"10\.244\.1\.10 is already in use \(handle h1\)"):
        b.assign(10, "h2", None)
    assert b.auto_assign(64, "h2", None) == [o for o in range(64) if o != 10]
    assert b.num_free() == 0 and b.auto_assign(1, "h3", None) == []


def test_is_empty_ignores_windows_reserved_addresses() -> None:
    b = new_block()
    assert b.is_empty()
    b.assign(0, WINDOWS_RESERVED_HANDLE, {"note": "reserved"})
    assert b.is_empty()
    b.auto_assign(1, "pod", None)
    assert not b.is_empty()


def test_skip_keeps_reserved_addresses_in_order() -> None:
    b = new_block(NET29)
    got = b.auto_assign(3, "h", None, skip=lambda ip: int(ip) % 2 == 0)
    assert got == [1, 3, 5]
    assert b.unallocated == [0, 2, 4, 6, 7]


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(cidr="10.244.1.1/26"), "invalid cidr"),
    (lambda s: s.update(allocations=[None] * 3), "allocations must be a list of 64"),
    (lambda s: s["allocations"].__setitem__(0, 7), "bad attribute index 7"),
    (lambda s: s["allocations"].__setitem__(0, 0), "both allocated and unallocated"),
    (lambda s: s["unallocated"].append(1), "listed twice"),
    (lambda s: s["unallocated"].append(99), "bad ordinal 99"),
    (lambda s: s.update(sequenceNumber="x"), "sequenceNumber is not an integer"),
    (lambda s: s.update(attributes="x"), "attributes is not a list"),
])
def test_from_spec_rejects_malformed_blocks(mutate: object, message: str) -> None:
    spec = new_block().to_spec()
    spec["attributes"] = [{"handle_id": "h"}]
    mutate(spec)  # type: ignore[operator]
    with pytest.raises(InvalidBlockError, match=message):
        Block.from_spec(spec)


def test_spec_round_trip_keeps_unknown_fields() -> None:
    spec = new_block().to_spec()
    spec["futureField"] = {"x": 1}
    b = Block.from_spec(spec)
    assert b.to_spec() == spec


# -- property tests ----------------------------------------------------------------------------------------
HANDLES = ["h0", "h1", "h2", "h3"]
op = st.one_of(
    st.tuples(st.just("auto"), st.integers(0, 10), st.sampled_from(HANDLES)),
    st.tuples(st.just("assign"), st.integers(0, 31), st.sampled_from(HANDLES)),
    st.tuples(st.just("release"), st.lists(st.integers(0, 31), max_size=6), st.just("")),
    st.tuples(st.just("release_handle"), st.just(0), st.sampled_from(HANDLES)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.booleans())
def test_random_sequences_never_double_allocate(ops: list[tuple[str, object, str]], roundtrip: bool) -> None:
    b = Block.new(ipaddress.IPv4Network("10.1.0.0/27"), host="n", claim_time=0, sequence_number=0)
    model: dict[int, str] = {}  # ordinal -> handle
    free_order: list[int] = list(range(32))
    for kind, arg, handle in ops:
        if kind == "auto":
            assert isinstance(arg, int)
            got = b.auto_assign(arg, handle, {"h": handle})
            assert not set(got) & set(model), "an allocated ordinal was handed out again"
            assert got == free_order[:len(got)], "auto_assign must take from the front of the free list"
            assert len(got) == min(arg, len(free_order))
            free_order = free_order[len(got):]
            model.update(dict.fromkeys(got, handle))
        elif kind == "assign":
            assert isinstance(arg, int)
            if arg in model:
                with pytest.raises(AddressInUseError):
                    b.assign(arg, handle, None)
            else:
                b.assign(arg, handle, None)
                model[arg] = handle
                free_order.remove(arg)
        elif kind == "release":
            assert isinstance(arg, list)
            released, not_alloc, by_handle = b.release(arg)
            uniq = list(dict.fromkeys(arg))
            assert released == [o for o in uniq if o in model]
            assert not_alloc == [o for o in uniq if o not in model]
            expect: dict[str, int] = {}
            for o in released:
                expect[model[o]] = expect.get(model[o], 0) + 1
                del model[o]
            assert by_handle == expect
            free_order.extend(released)
        else:
            released = b.release_by_handle(handle)
            assert sorted(released) == sorted(o for o, h in model.items() if h == handle)
            for o in released:
                del model[o]
            free_order.extend(released)
        # Invariants: free list and allocations partition the block; every attribute is used.
        assert check_block(b) == []
        assert sorted(b.unallocated + b.allocated_ordinals()) == list(range(32))
        assert b.unallocated == free_order
        assert {o: b.handle_of(o) for o in b.allocated_ordinals()} == model
        assert b.is_empty() == (not model)
        if roundtrip:
            b = Block.from_spec(b.to_spec())


# -- consistency checker -----------------------------------------------------------------------------------
def _res(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"kind": kind, "metadata": {"name": name}, "spec": spec}


def test_check_ipam_finds_leaks_and_duplicates() -> None:
    b1 = new_block(ipaddress.IPv4Network("10.0.0.0/30"), host="n1")
    b1.auto_assign(1, "ok", None)
    b1.auto_assign(1, "leaked", None)
    b2 = new_block(ipaddress.IPv4Network("10.0.0.0/29"), host="n2")  # overlaps b1
    b2.assign(0, "ok", None)
    blocks = [_res("IPAMBlock", "a", b1.to_spec()), _res("IPAMBlock", "b", b2.to_spec())]
    handles = [
        _res("IPAMHandle", "ok", {"handleID": "ok", "block": {"10.0.0.0/30": 1, "10.0.0.0/29": 2}}),
        _res("IPAMHandle", "empty", {"handleID": "empty", "block": {"10.0.0.4/30": 1}}),
    ]
    affs = [
        _res("BlockAffinity", "n1-x", {"node": "n1", "cidr": "10.0.0.0/30", "state": "confirmed"}),
        _res("BlockAffinity", "n3-x", {"node": "n3", "cidr": "10.0.0.0/30", "state": "confirmed"}),
    ]
    kinds = {p.kind for p in check_ipam(blocks, handles, affs)}
    assert {DUPLICATE_OWNER, MISSING_HANDLE, DANGLING_HANDLE, HANDLE_OVERCOUNT, STALE_AFFINITY,
            DUPLICATE_AFFINITY, MISSING_AFFINITY} <= kinds
    assert check_ipam(blocks[:1], [_res("IPAMHandle", "ok", {"handleID": "ok", "block": {"10.0.0.0/30": 1}}),
                                   _res("IPAMHandle", "leaked", {"handleID": "leaked",
                                                                 "block": {"10.0.0.0/30": 1}})],
                      affs[:1]) == []


def test_random_blocks_check_clean() -> None:
    rng = random.Random(7)
    b = new_block()
    for _ in range(200):
        if rng.random() < 0.6:
            b.auto_assign(rng.randint(1, 3), f"h{rng.randint(0, 9)}", None)
        else:
            b.release([rng.randrange(64) for _ in range(3)])
    handles: dict[str, int] = {}
    for o in b.allocated_ordinals():
        h = b.handle_of(o)
        assert h is not None
        handles[h] = handles.get(h, 0) + 1
    res = [_res("IPAMHandle", h, {"handleID": h, "block": {str(b.cidr): n}}) for h, n in handles.items()]
    assert check_ipam([_res("IPAMBlock", "b", b.to_spec())], res) == []
