"""The CNI fast paths against real parts: IPAMClient.assign_new_handle / release_handle_with on a real etcd
(handle, block and an extra object in one transaction, all or nothing), and netlink.LinkWatch seeing a real
veth's unregistration in a netns of our own."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_IPAM_BLOCK,
    KIND_IPAM_HANDLE,
    KIND_IPPOOL,
    KIND_PROFILE,
    Backend,
    Key,
    KVPair,
    NotFound,
    new_resource,
)
from felixpy.ipam import IPAMClient, check_ipam
from felixpy.ipam.block import Block

pytestmark = pytest.mark.realparts

try:
    from felixpy.datastore.etcd import EtcdBackend
    from tests.realparts.etcd import EtcdServer
except ImportError as e:  # pragma: no cover - the real parts are part of the repo
    print(f"SKIP tests/integration/test_cni_fastpath.py: {e}")
    pytest.skip(str(e), allow_module_level=True)

NODE = "fast-node-1"
ATTRS = {"node": NODE, "namespace": "default", "pod": "p"}


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer(name_prefix="felixpy-fastpath-etcd") as server:
        yield server


@pytest.fixture
async def backend(etcd_server: EtcdServer) -> AsyncIterator[Backend]:
    b = await EtcdBackend.connect([etcd_server.endpoint])
    try:
        k = Key(KIND_IPPOOL, "fast-pool")
        if not (await b.list(KIND_IPPOOL)).items:
            await b.create(k, new_resource(k, {"cidr": "10.78.0.0/16", "blockSize": 26, "ipipMode": "Never",
                                               "vxlanMode": "Never", "nodeSelector": "all()"}))
        yield b
    finally:
        await b.close()


def _handle(tag: str) -> str:
    return f"k8s-pod-network.{tag}{uuid.uuid4().hex}"


async def _owners(b: Backend) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for kv in (await b.list(KIND_IPAM_BLOCK)).items:
        blk = Block.from_spec(kv.value["spec"])
        for o in blk.allocated_ordinals():
            out[str(blk.ordinal_to_ip(o))] = blk.handle_of(o)
    return out


async def _consistent(b: Backend) -> None:
    blocks = [kv.value for kv in (await b.list(KIND_IPAM_BLOCK)).items]
    handles = [kv.value for kv in (await b.list(KIND_IPAM_HANDLE)).items]
    affs = [kv.value for kv in (await b.list(KIND_BLOCK_AFFINITY)).items]
    assert check_ipam(blocks, handles, affs) == []


def _extra(key: Key, seen: list[Any]) -> Any:
    def build(got: list[ipaddress.IPv4Interface]) -> list[tuple[str, KVPair]]:
        seen[:] = got
        return [("create", KVPair(key, new_resource(key, {"ingress": [], "egress": [],
                                                           "labelsToApply": {"ip": str(got[0].ip)}})))]
    return build


async def test_first_assignment_and_release_are_one_transaction_each(backend: Backend) -> None:
    c = IPAMClient(backend, node=NODE)
    warm = _handle("warm")
    await c.auto_assign(handle_id=warm, attrs=ATTRS)  # claims the block: the fast path needs it cached
    h, key = _handle("a"), Key(KIND_PROFILE, f"fast-{uuid.uuid4().hex[:8]}")
    seen: list[Any] = []
    out = await c.assign_new_handle(handle_id=h, attrs=ATTRS, extra=_extra(key, seen))
    assert out is not None
    ips, written = out
    assert [i.ip for i in ips] == [i.ip for i in seen] and len(ips) == 1
    stored = await backend.get(key)
    assert stored.value["spec"]["labelsToApply"]["ip"] == str(ips[0].ip)
    assert written[0].revision == stored.revision
    assert (await _owners(backend))[str(ips[0].ip)] == h
    assert await c.ips_by_handle(h) == [ips[0].ip]
    # A handle this client knows is never taken by the fast path (a retried ADD reuses its addresses).
    assert await c.assign_new_handle(handle_id=h, attrs=ATTRS, extra=_extra(key, [])) is None

    released = await c.release_handle_with(h, [("delete", KVPair(key, {}, stored.revision))])
    assert released == [ips[0].ip]
    with pytest.raises(NotFound):
        await backend.get(key)
    assert str(ips[0].ip) not in await _owners(backend)
    assert await c.ips_by_handle(h) == []
    # Not cached any more: the general path decides (and finds nothing).
    assert await c.release_handle_with(h, []) is None
    assert await c.release_by_handle(h) == []
    assert await c.release_by_handle(warm)
    await _consistent(backend)


async def test_a_failed_compare_writes_nothing(backend: Backend) -> None:
    c = IPAMClient(backend, node=NODE)
    warm = _handle("warm")
    await c.auto_assign(handle_id=warm, attrs=ATTRS)
    key = Key(KIND_PROFILE, f"fast-{uuid.uuid4().hex[:8]}")
    await backend.create(key, new_resource(key, {"ingress": [], "egress": []}))  # the extra object exists
    before = await _owners(backend)
    h = _handle("b")
    assert await c.assign_new_handle(handle_id=h, attrs=ATTRS, extra=_extra(key, [])) is None
    assert await _owners(backend) == before
    assert await c.ips_by_handle(h) == []
    # The general path still works afterwards (it re-reads the block the failed transaction dropped).
    got = await c.auto_assign(handle_id=h, attrs=ATTRS)
    assert (await _owners(backend))[str(got[0].ip)] == h
    # A stale revision on the extra delete makes the release transaction fail whole: nothing released.
    stored = await backend.get(key)
    h2 = _handle("c")
    ours = await c.assign_new_handle(handle_id=h2, attrs=ATTRS, extra=lambda got: [])
    assert ours is not None
    assert await c.release_handle_with(h2, [("delete", KVPair(key, {}, str(int(stored.revision) - 1)))]) is None
    assert (await _owners(backend))[str(ours[0][0].ip)] == h2
    await backend.delete(key)
    for hh in (h, h2, warm):
        assert await c.release_by_handle(hh)
    await _consistent(backend)


class _NoTxn:
    """The same backend without ``txn_write`` (as the Kubernetes backend is)."""

    def __init__(self, b: Backend) -> None:
        self._b = b

    def __getattr__(self, name: str) -> Any:
        if name == "txn_write":
            raise AttributeError(name)
        return getattr(self._b, name)


async def test_without_transactions_the_fast_paths_step_aside(backend: Backend) -> None:
    c = IPAMClient(_NoTxn(backend), node=NODE)  # type: ignore[arg-type]
    h = _handle("d")
    assert await c.assign_new_handle(handle_id=h, attrs=ATTRS, extra=lambda got: []) is None
    got = await c.auto_assign(handle_id=h, attrs=ATTRS)
    assert await c.release_handle_with(h, []) is None
    assert await c.release_by_handle(h) == [got[0].ip]


def test_link_watch_sees_a_veth_unregistered() -> None:
    from felixpy.dataplane.shims.netlink import LinkWatch, Netlink

    ns = f"fxfast-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        path = f"/run/netns/{ns}"
        watch = LinkWatch(path)
        try:
            with Netlink(path) as nl:
                nl.add_veth("fxw0", "fxw1", up=True)
                assert watch.deleted() == (set(), False)  # creations are not deletions
                assert nl.del_link("fxw0")
            deleted, lost = watch.deleted()
            assert "fxw0" in deleted and not lost
            assert watch.deleted() == (set(), False)  # drained
        finally:
            watch.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


async def test_back_to_back_fast_paths_keep_the_block_exact(backend: Backend) -> None:
    # The fast paths reuse the block they parsed and wrote; the stored block must stay exactly right.
    c = IPAMClient(backend, node=NODE)
    warm = _handle("warm")
    await c.auto_assign(handle_id=warm, attrs=ATTRS)
    hs = [_handle(f"e{i}") for i in range(6)]
    ips = []
    for h in hs:
        out = await c.assign_new_handle(handle_id=h, attrs=ATTRS, extra=lambda got: [])
        assert out is not None
        ips.append(str(out[0][0].ip))
    assert len(set(ips)) == len(hs)
    owners = await _owners(backend)
    assert [owners[ip] for ip in ips] == hs
    # Release every other one, then assign again: freed addresses are free in the stored block too.
    for h, ip in list(zip(hs, ips, strict=True))[::2]:
        assert await c.release_handle_with(h, []) == [ipaddress.ip_address(ip)]
    owners = await _owners(backend)
    assert [ip in owners for ip in ips] == [False, True] * 3
    again = await c.assign_new_handle(handle_id=_handle("f"), attrs=ATTRS, extra=lambda got: [])
    assert again is not None and str(again[0][0].ip) not in {ip for ip in ips if ip in owners}
    await _consistent(backend)
    for h in [*hs[1::2], warm]:
        assert await c.release_handle_with(h, []) or await c.release_by_handle(h)
    left = await _owners(backend)
    assert not set(hs) & set(left.values())
    for h in hs:
        assert await c.ips_by_handle(h) == []


def test_veth_first_then_addresses() -> None:
    """The CNI ADD's two halves of setup_workload: the veth (no address yet, our MAC) then the addresses;
    together they pass CHECK, as setup_workload does."""
    from felixpy.dataplane import workload

    macs = {workload.random_mac() for _ in range(64)}
    assert len(macs) == 64
    assert all(int(m[:2], 16) & 0x03 == 0x02 for m in macs)  # unicast, locally administered
    tag = uuid.uuid4().hex[:8]
    host, pod = f"fxfh-{tag}", f"fxfp-{tag}"
    for ns in (host, pod):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        mac = workload.random_mac()
        spec = workload.WorkloadSpec(netns_path=f"/run/netns/{pod}", container_ifname="eth0",
                                     host_ifname="califastpath0", ipv4=[], mtu=1400, container_mac=mac,
                                     host_netns_path=f"/run/netns/{host}")
        res = workload.create_veth(spec)
        assert res.container_mac == mac
        shown = subprocess.run(["ip", "-n", pod, "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                               text=True, check=True).stdout
        assert " inet " not in shown  # no address before IPAM has answered
        full = dataclasses.replace(spec, ipv4=[ipaddress.IPv4Address("10.79.0.5")])
        with pytest.raises(workload.WorkloadError, match=r"address 10\.79\.0\.5/32 missing"):
            workload.check_workload(full)
        workload.configure_addresses(full, res)
        workload.check_workload(full)
        assert workload.teardown_workload("califastpath0", f"/run/netns/{pod}",
                                          host_netns_path=f"/run/netns/{host}")
    finally:
        for ns in (host, pod):
            subprocess.run(["ip", "netns", "del", ns], check=False)
