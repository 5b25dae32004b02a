"""Both real datastore backends against real servers: etcd 3.4 and kube-apiserver 1.20 (with etcd).

Servers are module-scoped (one etcd for the etcd backend; one etcd + kube-apiserver with the CRDs from
deploy/crds for the Kubernetes backend); every test uses names with its own random prefix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from felixpy import names
from felixpy.datastore.api import (
    KIND_BLOCK_AFFINITY,
    KIND_GLOBAL_NETWORK_SET,
    KIND_IPAM_BLOCK,
    KIND_IPAM_CONFIG,
    KIND_IPAM_HANDLE,
    KIND_IPPOOL,
    KIND_K8S_NETWORK_POLICY,
    KIND_NETWORK_POLICY,
    KIND_NODE,
    KIND_PROFILE,
    KIND_WEP,
    AlreadyExists,
    Backend,
    Conflict,
    DatastoreError,
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
from felixpy.datastore.etcd import EtcdBackend
from felixpy.datastore.k8s import K8sBackend
from tests.realparts.etcd import EtcdServer, free_port
from tests.realparts.kube_apiserver import ApiError, KubeApiServer, require_kube_apiserver

pytestmark = pytest.mark.realparts

CRD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "crds"
CRD_GROUP = "crd.projectcalico.org"


# --- servers ---------------------------------------------------------------------------------------


def _throwaway_crds() -> list[dict[str, Any]]:
    """Schema-less CRDs for every Calico kind, used only while deploy/crds/ is still empty."""
    from felixpy.datastore.conversion import CRD_PLURALS, NAMESPACED

    out = []
    for kind, plural in CRD_PLURALS.items():
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{CRD_GROUP}"},
            "spec": {"group": CRD_GROUP, "scope": "Namespaced" if kind in NAMESPACED else "Cluster",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": kind + "List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
        })
    return out


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def kas_etcd() -> Iterator[EtcdServer]:
    require_kube_apiserver()
    with EtcdServer(name_prefix="felixpy-kas-etcd") as server:
        yield server


@pytest.fixture(scope="module")
def kas(kas_etcd: EtcdServer) -> Iterator[KubeApiServer]:
    with KubeApiServer(kas_etcd) as server:
        if list(CRD_DIR.glob("*.yaml")):
            names_applied = server.apply_crds(str(CRD_DIR))
        else:
            names_applied = server.apply_crd_objects(_throwaway_crds())
        assert f"ippools.{CRD_GROUP}" in names_applied
        yield server


@dataclass
class Env:
    backend: Backend
    name: str  # "etcdv3" | "kubernetes"
    etcd: EtcdServer | None = None
    kas: KubeApiServer | None = None

    def ensure_namespace(self, ns: str) -> None:
        if self.kas is not None:
            self.kas.ensure_namespace(ns)


@pytest.fixture(params=["etcdv3", "kubernetes"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if request.param == "etcdv3":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        eb = await EtcdBackend.connect([server.endpoint])
        try:
            yield Env(eb, "etcdv3", etcd=server)
        finally:
            await eb.close()
    else:
        kserver: KubeApiServer = request.getfixturevalue("kas")
        kb = await K8sBackend.from_kubeconfig(kserver.kubeconfig)
        try:
            yield Env(kb, "kubernetes", kas=kserver)
        finally:
            await kb.close()


@pytest.fixture
def uniq() -> str:
    return "t" + uuid.uuid4().hex[:8]


async def collect(gen: AsyncIterator[WatchEvent], n: int, pred: Callable[[WatchEvent], bool],
                  timeout: float = 15.0) -> list[WatchEvent]:
    out: list[WatchEvent] = []

    async def run() -> None:
        async for ev in gen:
            if pred(ev):
                out.append(ev)
                if len(out) >= n:
                    return

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    return out


def pool(key: Key, cidr: str = "10.50.0.0/16", **labels: str) -> dict[str, Any]:
    return new_resource(key, {"cidr": cidr, "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Always",
                              "natOutgoing": True}, labels=dict(labels) or None,
                        annotations={"note": "hello"})


# --- etcd raw access (the JSON gateway: tests need not import the etcd client) ---------------------


def etcd_raw(server: EtcdServer, op: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{server.endpoint}/v3/kv/{op}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()))


def etcd_get_raw(server: EtcdServer, key: str) -> bytes | None:
    out = etcd_raw(server, "range", {"key": base64.b64encode(key.encode()).decode()})
    kvs = out.get("kvs") or []
    return base64.b64decode(kvs[0]["value"]) if kvs else None


def etcd_put_raw(server: EtcdServer, key: str, value: bytes) -> None:
    etcd_raw(server, "put", {"key": base64.b64encode(key.encode()).decode(),
                             "value": base64.b64encode(value).decode()})


# --- both backends ---------------------------------------------------------------------------------


async def test_create_get_list_update_delete(env: Env, uniq: str) -> None:
    b = env.backend
    key = Key(KIND_IPPOOL, f"{uniq}-pool")
    created = await b.create(key, pool(key, team="a"))
    assert created.key == key and created.revision
    assert created.value["metadata"]["resourceVersion"] == created.revision
    assert created.value["metadata"]["uid"]
    assert created.value["metadata"]["labels"] == {"team": "a"}
    assert created.value["metadata"]["annotations"] == {"note": "hello"}

    got = await b.get(key)
    assert got.revision == created.revision
    assert got.value["spec"]["cidr"] == "10.50.0.0/16"
    assert got.value["metadata"]["labels"] == {"team": "a"}
    assert got.value["metadata"]["uid"] == created.value["metadata"]["uid"]

    listed = await b.list(KIND_IPPOOL)
    mine = [kv for kv in listed.items if kv.key == key]
    assert len(mine) == 1 and mine[0].revision == created.revision
    assert int(listed.revision) >= int(created.revision)

    changed = copy.deepcopy(got.value)
    changed["spec"]["natOutgoing"] = False
    changed["metadata"]["labels"]["team"] = "b"
    updated = await b.update(KVPair(key, changed, got.revision, got.uid))
    assert updated.revision != got.revision
    assert (await b.get(key)).value["spec"]["natOutgoing"] is False
    assert (await b.get(key)).value["metadata"]["labels"] == {"team": "b"}

    # Unconditional update (empty revision) still works. (k8s skips no-op writes, so change something.)
    changed["spec"]["natOutgoing"] = True
    unconditional = await b.update(KVPair(key, changed, ""))
    assert unconditional.revision != updated.revision

    await b.delete(key, unconditional.revision, unconditional.uid)
    with pytest.raises(NotFound):
        await b.get(key)


async def test_already_exists_conflict_and_not_found(env: Env, uniq: str) -> None:
    b = env.backend
    key = Key(KIND_IPPOOL, f"{uniq}-cas")
    first = await b.create(key, pool(key))
    with pytest.raises(AlreadyExists):
        await b.create(key, pool(key))
    second = await b.update(KVPair(key, first.value, first.revision, first.uid))
    with pytest.raises(Conflict):
        await b.update(KVPair(key, first.value, first.revision, first.uid))  # stale revision
    with pytest.raises(Conflict):
        await b.delete(key, first.revision)  # stale revision
    assert (await b.get(key)).revision == second.revision  # nothing was lost
    wrong_uid = str(uuid.uuid4())
    with pytest.raises(Conflict):
        await b.delete(key, uid=wrong_uid)
    await b.delete(key, second.revision)
    missing = Key(KIND_IPPOOL, f"{uniq}-missing")
    with pytest.raises(NotFound):
        await b.get(missing)
    with pytest.raises(NotFound):
        await b.delete(missing)
    with pytest.raises(NotFound):
        await b.update(KVPair(missing, pool(missing), "5"))


async def test_namespaced_kind_and_namespace_filter(env: Env, uniq: str) -> None:
    b = env.backend
    ns1, ns2 = f"{uniq}-a", f"{uniq}-b"
    env.ensure_namespace(ns1)
    env.ensure_namespace(ns2)
    k1 = Key(KIND_NETWORK_POLICY, "allow", ns1)
    k2 = Key(KIND_NETWORK_POLICY, "allow", ns2)
    spec = {"tier": "default", "order": 100, "selector": "all()", "types": ["Ingress"],
            "ingress": [{"action": "Allow"}]}
    await b.create(k1, new_resource(k1, spec))
    await b.create(k2, new_resource(k2, spec))
    only1 = await b.list(KIND_NETWORK_POLICY, ListOptions(namespace=ns1))
    assert [kv.key for kv in only1.items] == [k1]
    got = await b.get(k2)
    assert got.value["metadata"]["namespace"] == ns2 and got.value["spec"]["selector"] == "all()"
    everything = await b.list(KIND_NETWORK_POLICY)
    assert {k1, k2} <= {kv.key for kv in everything.items}
    with pytest.raises((Invalid, NotFound)):
        await b.get(Key(KIND_NETWORK_POLICY, "allow"))  # namespace missing


async def test_watch_delivers_changes_after_list_revision(env: Env, uniq: str) -> None:
    b = env.backend
    before = Key(KIND_GLOBAL_NETWORK_SET, f"{uniq}-before")
    await b.create(before, new_resource(before, {"nets": ["10.1.0.0/16"]}))
    listed = await b.list(KIND_GLOBAL_NETWORK_SET)
    assert before in {kv.key for kv in listed.items}

    key = Key(KIND_GLOBAL_NETWORK_SET, f"{uniq}-gns")
    c = await b.create(key, new_resource(key, {"nets": ["10.2.0.0/16"]}, labels={"role": "x"}))
    u = await b.update(KVPair(key, dict(c.value, spec={"nets": ["10.3.0.0/16"]}), c.revision, c.uid))
    await b.delete(key, u.revision)

    mine = lambda ev: ev.key.name.startswith(uniq)  # noqa: E731
    events = await collect(b.watch(KIND_GLOBAL_NETWORK_SET, listed.revision), 3, mine)
    assert [(e.type, e.key) for e in events] == [("put", key), ("put", key), ("delete", key)]
    assert events[0].kv is not None and events[0].kv.value["spec"]["nets"] == ["10.2.0.0/16"]
    assert events[0].kv.value["metadata"]["labels"] == {"role": "x"}
    assert events[1].kv is not None and events[1].kv.value["spec"]["nets"] == ["10.3.0.0/16"]
    assert events[0].revision == c.revision and events[1].revision == u.revision
    assert int(events[2].revision) > int(u.revision)


async def test_watch_from_compacted_revision_is_expired(env: Env, uniq: str) -> None:
    b = env.backend
    key = Key(KIND_GLOBAL_NETWORK_SET, f"{uniq}-old")
    first = await b.create(key, new_resource(key, {"nets": []}))
    if isinstance(b, EtcdBackend):
        for _ in range(3):
            latest = await b.update(KVPair(key, first.value, ""))
        await b.compact(latest.revision)
        old = first.revision
    else:
        old = "1"  # far older than the API server's watch window
    with pytest.raises(Expired):
        async for _ev in b.watch(KIND_GLOBAL_NETWORK_SET, old):
            pass


async def test_ipam_kinds_round_trip(env: Env, uniq: str) -> None:
    b = env.backend
    node = f"{uniq}-node"
    octet = int(uniq[1:3], 16)
    cidr = f"10.{octet}.1.0/26"
    block_name = cidr.replace(".", "-").replace("/", "-")
    bk = Key(KIND_IPAM_BLOCK, block_name)
    spec = {"cidr": cidr, "affinity": f"host:{node}", "allocations": [0] + [None] * 63,
            "unallocated": list(range(1, 64)), "strictAffinity": False,
            "attributes": [{"handle_id": f"k8s-pod-network.{uniq}", "secondary": {"node": node, "pod": "p"}}],
            "sequenceNumber": 1700000000000000000, "sequenceNumberForAllocation": {"0": 1700000000000000000},
            "deleted": False}
    blk = await b.create(bk, new_resource(bk, spec))
    assert blk.value["spec"]["allocations"][:2] == [0, None]
    got = await b.get(bk)
    assert got.value["spec"]["attributes"] == spec["attributes"]
    assert got.value["spec"]["sequenceNumber"] == spec["sequenceNumber"]
    assert got.value["spec"]["affinity"] == f"host:{node}"

    ak = Key(KIND_BLOCK_AFFINITY, f"{node}-{block_name}")
    aff = await b.create(ak, new_resource(ak, {"node": node, "cidr": cidr, "state": "pending", "deleted": False}))
    assert aff.value["spec"]["deleted"] is False and aff.value["spec"]["state"] == "pending"
    confirmed = await b.update(KVPair(ak, dict(aff.value, spec=dict(aff.value["spec"], state="confirmed")),
                                      aff.revision, aff.uid))
    assert (await b.get(ak)).value["spec"]["state"] == "confirmed"
    mine = await b.list(KIND_BLOCK_AFFINITY, ListOptions(host=node))
    assert [kv.key for kv in mine.items] == [ak]
    assert mine.items[0].value["metadata"]["labels"]["projectcalico.org/ip-version"] == "4"
    assert (await b.list(KIND_BLOCK_AFFINITY, ListOptions(host=node + "x"))).items == []

    hk = Key(KIND_IPAM_HANDLE, f"k8s-pod-network.{uniq}")
    handle = await b.create(hk, new_resource(hk, {"handleID": hk.name, "block": {cidr: 1}, "deleted": False}))
    assert (await b.get(hk)).value["spec"]["block"] == {cidr: 1}
    assert handle.value["spec"]["handleID"] == hk.name

    ck = Key(KIND_IPAM_CONFIG, "default")
    with pytest.raises(NotFound):
        await b.delete(ck)  # never created in these tests
    cfg = await b.create(ck, new_resource(ck, {"strictAffinity": False, "autoAllocateBlocks": True,
                                               "maxBlocksPerHost": 0}))
    assert (await b.get(ck)).value["spec"]["autoAllocateBlocks"] is True
    await b.delete(ck, cfg.revision)

    await b.delete(ak, confirmed.revision, confirmed.uid)
    await b.delete(hk, handle.revision)
    await b.delete(bk, blk.revision)
    with pytest.raises(NotFound):
        await b.get(ak)


async def test_profiles_include_default_allow(env: Env, uniq: str) -> None:
    b = env.backend
    listed = await b.list(KIND_PROFILE)
    default = [kv for kv in listed.items if kv.key.name == "projectcalico-default-allow"]
    assert len(default) == 1
    assert default[0].value["spec"]["ingress"] == [{"action": "Allow"}]
    assert (await b.get(Key(KIND_PROFILE, "projectcalico-default-allow"))).value["spec"]["egress"] == [
        {"action": "Allow"}]


async def test_malformed_object_is_skipped_invalid_on_get_and_deleted_in_watch(
        env: Env, uniq: str, caplog: pytest.LogCaptureFixture) -> None:
    b = env.backend
    good = Key(KIND_GLOBAL_NETWORK_SET, f"{uniq}-good")
    bad = Key(KIND_GLOBAL_NETWORK_SET, f"{uniq}-bad")
    await b.create(good, new_resource(good, {"nets": ["10.9.0.0/16"]}))
    start = await b.list(KIND_GLOBAL_NETWORK_SET)

    if env.etcd is not None:
        path = f"/calico/resources/v3/projectcalico.org/globalnetworksets/{bad.name}"
        etcd_put_raw(env.etcd, path, b"{this is not json")
    else:
        assert env.kas is not None
        env.kas.request("POST", f"/apis/{CRD_GROUP}/v1/globalnetworksets", {
            "apiVersion": f"{CRD_GROUP}/v1", "kind": "GlobalNetworkSet",
            "metadata": {"name": bad.name, "annotations": {"projectcalico.org/metadata": "{this is not json"}},
            "spec": {"nets": ["10.8.0.0/16"]}})

    with caplog.at_level(logging.WARNING, logger="felixpy.datastore"):
        listed = await b.list(KIND_GLOBAL_NETWORK_SET)
    keys = {kv.key for kv in listed.items}
    assert good in keys and bad not in keys  # the bad one is skipped, the rest still listed
    assert any(bad.name in r.getMessage() for r in caplog.records)
    with pytest.raises(Invalid, match=bad.name):
        await b.get(bad)

    with caplog.at_level(logging.WARNING, logger="felixpy.datastore"):
        events = await collect(b.watch(KIND_GLOBAL_NETWORK_SET, start.revision), 1, lambda ev: ev.key == bad)
    assert events[0].type == "delete" and events[0].kv is None
    # The stored object is untouched.
    if env.etcd is not None:
        assert etcd_get_raw(env.etcd, path) == b"{this is not json"
    else:
        assert env.kas is not None
        raw = env.kas.request("GET", f"/apis/{CRD_GROUP}/v1/globalnetworksets/{bad.name}")
        assert raw["metadata"]["annotations"]["projectcalico.org/metadata"] == "{this is not json"


async def test_unreachable_datastore_is_unavailable() -> None:
    port = free_port()
    eb = await EtcdBackend.connect([f"http://127.0.0.1:{port}"], timeout=2.0)
    try:
        with pytest.raises(Unavailable):
            await eb.get(Key(KIND_IPPOOL, "x"))
    finally:
        await eb.close()
    kb = await K8sBackend.from_host(f"https://127.0.0.1:{port}", "token", verify=False)
    try:
        with pytest.raises(Unavailable):
            await kb.get(Key(KIND_IPPOOL, "x"))
        with pytest.raises(Unavailable):
            async for _ev in kb.watch(KIND_IPPOOL, ""):
                pass
    finally:
        await kb.close()


async def test_etcd_fails_over_to_the_next_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    b = await EtcdBackend.connect(f"{dead},{etcd_server.endpoint}", timeout=2.0)
    try:
        with pytest.raises(Unavailable):
            await b.list(KIND_IPPOOL)  # the first endpoint is down: the caller retries...
        await b.list(KIND_IPPOOL)  # ...and the backend has moved on to the live one
    finally:
        await b.close()


async def test_etcd_over_tls_with_client_certificates(uniq: str) -> None:
    with EtcdServer(tls=True) as server:
        assert server.endpoint.startswith("https://")
        b = await EtcdBackend.connect([server.endpoint], ca_file=server.ca_file,
                                      cert_file=server.client_cert_file, key_file=server.client_key_file)
        try:
            key = Key(KIND_IPPOOL, uniq)
            await b.create(key, pool(key))
            assert (await b.get(key)).value["spec"]["cidr"] == "10.50.0.0/16"
        finally:
            await b.close()
        no_cert = await EtcdBackend.connect([server.endpoint], ca_file=server.ca_file, timeout=3.0)
        try:
            with pytest.raises(Unavailable):
                await no_cert.get(Key(KIND_IPPOOL, uniq))
        finally:
            await no_cert.close()
    with pytest.raises(ValueError):
        EtcdBackend(["http://127.0.0.1:2379"], cert_file="/x")  # a certificate without its key


async def test_etcd_watch_ends_when_the_server_dies(uniq: str) -> None:
    with EtcdServer() as server:
        b = await EtcdBackend.connect([server.endpoint], timeout=2.0)
        try:
            start = await b.list(KIND_IPPOOL)
            gen = b.watch(KIND_IPPOOL, start.revision)
            key = Key(KIND_IPPOOL, uniq)
            await b.create(key, pool(key))
            first = await asyncio.wait_for(gen.__anext__(), 10)
            assert first.key == key
            server.stop()
            rest = [ev async for ev in gen]  # ends without raising: the caller re-watches
            assert rest == []
            with pytest.raises(Unavailable):
                await b.get(key)
        finally:
            await b.close()


async def test_unknown_kind_is_invalid(env: Env) -> None:
    with pytest.raises(Invalid):
        await env.backend.get(Key("NoSuchKind", "x"))
    with pytest.raises(Invalid):
        await env.backend.list("NoSuchKind")


# --- etcd only -------------------------------------------------------------------------------------


@pytest.fixture
async def etcd_backend(etcd_server: EtcdServer) -> AsyncIterator[EtcdBackend]:
    b = await EtcdBackend.connect(etcd_server.endpoint)
    try:
        yield b
    finally:
        await b.close()


async def test_etcd_key_layout_matches_calico(etcd_backend: EtcdBackend, etcd_server: EtcdServer, uniq: str) -> None:
    b = etcd_backend
    node = f"{uniq}-n"
    await b.create(Key(KIND_IPPOOL, f"{uniq}-p"), pool(Key(KIND_IPPOOL, f"{uniq}-p")))
    raw = etcd_get_raw(etcd_server, f"/calico/resources/v3/projectcalico.org/ippools/{uniq}-p")
    assert raw is not None
    stored = json.loads(raw)
    assert stored["kind"] == "IPPool" and stored["apiVersion"] == "projectcalico.org/v3"
    assert "resourceVersion" not in stored["metadata"] and stored["metadata"]["uid"]

    octet = int(uniq[1:3], 16)
    bk = Key(KIND_IPAM_BLOCK, f"10-{octet}-2-0-26")
    await b.create(bk, new_resource(bk, {"cidr": f"10.{octet}.2.0/26", "affinity": f"host:{node}",
                                         "affinityClaimTime": "2024-01-01T00:00:00Z",
                                         "allocations": [None] * 64, "unallocated": list(range(64)),
                                         "attributes": [], "strictAffinity": False}))
    raw = etcd_get_raw(etcd_server, f"/calico/ipam/v2/assignment/ipv4/block/10.{octet}.2.0-26")
    assert raw is not None
    v1 = json.loads(raw)
    assert v1["affinity"] == f"host:{node}" and v1["affinity_claim_time"] == "2024-01-01T00:00:00Z"
    assert "strictAffinity" not in v1 and len(v1["allocations"]) == 64

    ak = Key(KIND_BLOCK_AFFINITY, f"{node}-10-{octet}-2-0-26")
    await b.create(ak, new_resource(ak, {"node": node, "cidr": f"10.{octet}.2.0/26", "state": "confirmed",
                                         "deleted": False}))
    raw = etcd_get_raw(etcd_server, f"/calico/ipam/v2/host/{node}/ipv4/block/10.{octet}.2.0-26")
    assert raw is not None and json.loads(raw) == {"state": "confirmed", "deleted": False}

    hk = Key(KIND_IPAM_HANDLE, f"ipip-tunnel-addr-{node}")
    await b.create(hk, new_resource(hk, {"handleID": hk.name, "block": {f"10.{octet}.2.0/26": 1}}))
    raw = etcd_get_raw(etcd_server, f"/calico/ipam/v2/handle/ipip-tunnel-addr-{node}")
    assert raw is not None and json.loads(raw)["block"] == {f"10.{octet}.2.0/26": 1}


async def test_etcd_reads_values_written_by_calico(etcd_backend: EtcdBackend, etcd_server: EtcdServer,
                                                   uniq: str) -> None:
    """Values in the exact form Calico's Go code writes them (v1 IPAM JSON, v3 JSON without revision)."""
    node = f"{uniq}-calico"
    octet = int(uniq[1:3], 16)
    etcd_put_raw(etcd_server, f"/calico/ipam/v2/host/{node}/ipv4/block/10.{octet}.3.0-26", b"")  # legacy: no value
    etcd_put_raw(etcd_server, f"/calico/ipam/v2/assignment/ipv4/block/10.{octet}.3.0-26", json.dumps({
        "cidr": f"10.{octet}.3.0/26", "affinity": f"host:{node}", "allocations": [0, None],
        "unallocated": [1], "attributes": [{"handle_id": "h", "secondary": None}], "sequenceNumber": 7,
        "sequenceNumberForAllocation": {"0": 6}, "deleted": False}).encode())
    etcd_put_raw(etcd_server, f"/calico/resources/v3/projectcalico.org/nodes/{node}", json.dumps({
        "kind": "Node", "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": node, "uid": "abc", "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"bgp": {"ipv4Address": "192.168.5.5/24"}}}).encode())

    affs = await etcd_backend.list(KIND_BLOCK_AFFINITY, ListOptions(host=node))
    assert [kv.key.name for kv in affs.items] == [f"{node}-10-{octet}-3-0-26"]
    assert affs.items[0].value["spec"]["state"] == "" and affs.items[0].value["spec"]["cidr"] == f"10.{octet}.3.0/26"
    blk = await etcd_backend.get(Key(KIND_IPAM_BLOCK, f"10-{octet}-3-0-26"))
    assert blk.value["spec"]["sequenceNumberForAllocation"] == {"0": 6}
    assert blk.value["spec"]["strictAffinity"] is False
    n = await etcd_backend.get(Key(KIND_NODE, node))
    assert n.value["spec"]["bgp"]["ipv4Address"] == "192.168.5.5/24" and n.value["metadata"]["uid"] == "abc"


async def test_etcd_txn_write_is_atomic(etcd_backend: EtcdBackend, uniq: str) -> None:
    b = etcd_backend
    k1, k2, k3 = (Key(KIND_IPAM_HANDLE, f"{uniq}-{i}") for i in range(3))
    kv1 = await b.create(k1, new_resource(k1, {"handleID": k1.name, "block": {}}))
    kv2 = await b.create(k2, new_resource(k2, {"handleID": k2.name, "block": {}}))
    v1 = dict(kv1.value, spec={"handleID": k1.name, "block": {"10.0.0.0/26": 1}})
    out = await b.txn_write([("update", KVPair(k1, v1, kv1.revision)),
                             ("create", KVPair(k3, new_resource(k3, {"handleID": k3.name, "block": {}}))),
                             ("delete", kv2)])
    assert [o.key for o in out] == [k1, k3, k2]
    assert out[0].revision == out[1].revision == out[2].revision
    assert (await b.get(k1)).value["spec"]["block"] == {"10.0.0.0/26": 1}
    with pytest.raises(NotFound):
        await b.get(k2)

    # One stale compare fails the whole transaction: nothing is written.
    k4 = Key(KIND_IPAM_HANDLE, f"{uniq}-4")
    with pytest.raises(Conflict, match="stale"):
        await b.txn_write([("create", KVPair(k4, new_resource(k4, {"handleID": k4.name, "block": {}}))),
                           ("update", KVPair(k1, v1, kv1.revision))])
    with pytest.raises(NotFound):
        await b.get(k4)
    with pytest.raises(Conflict, match="already exists"):
        await b.txn_write([("create", KVPair(k3, new_resource(k3, {"handleID": k3.name, "block": {}})))])


async def test_etcd_wep_node_filter_and_nodes(etcd_backend: EtcdBackend, uniq: str) -> None:
    b = etcd_backend
    ns = f"{uniq}-ns"
    mine, other = f"{uniq}-node-1", f"{uniq}-node-10"
    for node in (mine, other):
        key = Key(KIND_WEP, names.wep_name(node, "k8s", "web-0", "eth0"), ns)
        await b.create(key, new_resource(key, {"node": node, "orchestrator": "k8s", "pod": "web-0",
                                               "endpoint": "eth0", "ipNetworks": ["10.0.0.1/32"]}))
    for opts in (ListOptions(node=mine), ListOptions(node=mine, namespace=ns)):
        listed = await b.list(KIND_WEP, opts)
        assert [kv.value["spec"]["node"] for kv in listed.items] == [mine]
    nk = Key(KIND_NODE, mine)
    created = await b.create(nk, new_resource(nk, {"bgp": {"ipv4Address": "192.168.1.1/24"}}))
    assert (await b.get(nk)).value["spec"] == created.value["spec"]


# --- Kubernetes only -------------------------------------------------------------------------------


@pytest.fixture
async def k8s(kas: KubeApiServer) -> AsyncIterator[K8sBackend]:
    b = await K8sBackend.from_kubeconfig(kas.kubeconfig)
    try:
        yield b
    finally:
        await b.close()


def make_pod(kas: KubeApiServer, ns: str, name: str, node: str, *, host_network: bool = False,
             sa: str = "default") -> dict[str, Any]:
    return dict(kas.request("POST", f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host_network,
                 # No controller-manager runs here to create SA token secrets.
                 "automountServiceAccountToken": False,
                 "containers": [{"name": "c", "image": "busybox",
                                 "ports": [{"name": "http", "containerPort": 80}]}]}}))


async def test_k8s_workload_endpoints_from_pods(k8s: K8sBackend, kas: KubeApiServer, uniq: str) -> None:
    ns, node, other_node = f"{uniq}-ns", f"{uniq}-node-1", f"{uniq}-node-2"
    kas.ensure_namespace(ns)
    kas.ensure_service_account(ns, "web-sa")
    pod = make_pod(kas, ns, "web-0", node, sa="web-sa")
    make_pod(kas, ns, "hostnet", node, host_network=True)
    make_pod(kas, ns, "elsewhere", other_node)
    key = Key(KIND_WEP, names.wep_name(node, "k8s", "web-0", "eth0"), ns)

    listed = await k8s.list(KIND_WEP, ListOptions(node=node))
    assert [kv.key for kv in listed.items] == [key]  # host-networked and other-node pods are not WEPs here
    wep = listed.items[0]
    assert wep.uid == pod["metadata"]["uid"] and wep.revision == pod["metadata"]["resourceVersion"]
    spec = wep.value["spec"]
    assert spec["ipNetworks"] == [] and spec["profiles"] == [f"kns.{ns}", f"ksa.{ns}.web-sa"]
    assert spec["interfaceName"] == names.veth_name_for_workload(ns, "web-0")
    assert spec["ports"] == [{"name": "http", "protocol": "tcp", "port": 80, "hostPort": 0, "hostIP": ""}]
    assert wep.value["metadata"]["labels"]["projectcalico.org/namespace"] == ns
    assert (await k8s.get(key)).value == wep.value
    with pytest.raises(NotFound):
        await k8s.get(Key(KIND_WEP, names.wep_name(node, "k8s", "hostnet", "eth0"), ns))
    with pytest.raises(NotFound):
        await k8s.get(Key(KIND_WEP, names.wep_name("wrong-node", "k8s", "web-0", "eth0"), ns))
    with pytest.raises(Invalid):
        await k8s.get(Key(KIND_WEP, "garbage", ns))
    assert len((await k8s.list(KIND_WEP, ListOptions(node=node, extra={"pod": "web-0"}))).items) == 1

    # The CNI write: a status patch of the pod's annotations.
    value = copy.deepcopy(wep.value)
    value["spec"]["ipNetworks"] = ["10.244.1.5/32"]
    value["spec"]["containerID"] = "cid-1"
    written = await k8s.create(key, value)
    assert written.value["spec"]["ipNetworks"] == ["10.244.1.5/32"]
    assert written.value["spec"]["containerID"] == "cid-1"
    raw = kas.request("GET", f"/api/v1/namespaces/{ns}/pods/web-0")
    assert raw["metadata"]["annotations"] == {"cni.projectcalico.org/podIP": "10.244.1.5/32",
                                              "cni.projectcalico.org/podIPs": "10.244.1.5/32",
                                              "cni.projectcalico.org/containerID": "cid-1"}
    with pytest.raises(Conflict):
        await k8s.update(KVPair(key, value, wep.revision, wep.uid))  # stale resourceVersion
    with pytest.raises(Conflict, match="no longer the instance"):
        await k8s.update(KVPair(key, value, "", str(uuid.uuid4())))  # another pod instance
    with pytest.raises(Conflict):
        await k8s.delete(key, "", str(uuid.uuid4()))

    await k8s.delete(key, written.revision, written.uid)
    raw = kas.request("GET", f"/api/v1/namespaces/{ns}/pods/web-0")
    assert raw["metadata"]["annotations"]["cni.projectcalico.org/podIP"] == ""
    assert raw["metadata"]["annotations"]["cni.projectcalico.org/containerID"] == "cid-1"
    after = await k8s.get(key)
    assert after.value["spec"]["ipNetworks"] == []
    nopod = Key(KIND_WEP, names.wep_name(node, "k8s", "nopod", "eth0"), ns)
    with pytest.raises(NotFound):
        await k8s.create(nopod, new_resource(nopod, {"pod": "nopod", "ipNetworks": ["10.244.1.6/32"]}))
    with pytest.raises(Invalid, match="does not match"):
        await k8s.create(nopod, value)  # spec.pod says web-0

    kas.request("DELETE", f"/api/v1/namespaces/{ns}/pods/web-0", {"gracePeriodSeconds": 0})
    events: list[WatchEvent] = []
    gen = k8s.watch(KIND_WEP, listed.revision, ListOptions(node=node))

    async def until_deleted() -> None:
        async for ev in gen:
            if ev.key == key:
                events.append(ev)
                if ev.type == "delete":
                    return

    try:
        await asyncio.wait_for(until_deleted(), 15)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    # put (CNI write), put (CNI delete), possibly a put for the deletionTimestamp, then the delete.
    assert [e.type for e in events[:2]] == ["put", "put"] and events[-1].type == "delete"
    assert events[0].kv is not None and events[0].kv.value["spec"]["ipNetworks"] == ["10.244.1.5/32"]
    assert events[1].kv is not None and events[1].kv.value["spec"]["ipNetworks"] == []
    assert events[-1].kv is not None and events[-1].kv.key == key


async def test_k8s_node_annotations_round_trip(k8s: K8sBackend, kas: KubeApiServer, uniq: str) -> None:
    name = f"{uniq}-node"
    kas.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "labels": {"kubernetes.io/hostname": name}}})
    key = Key(KIND_NODE, name)
    start = await k8s.get(key)
    assert "bgp" not in start.value["spec"]
    assert start.value["metadata"]["labels"] == {"kubernetes.io/hostname": name}

    value = copy.deepcopy(start.value)
    value["spec"]["bgp"] = {"ipv4Address": "192.168.7.7/24", "asNumber": 64512,
                            "routeReflectorClusterID": "224.0.0.1", "ipv4IPIPTunnelAddr": "10.244.7.0"}
    value["spec"]["ipv4VXLANTunnelAddr"] = "10.244.7.1"
    value["spec"]["vxlanTunnelMACAddr"] = "66:0a:0b:0c:0d:0e"
    value["metadata"]["labels"]["calico-only"] = "yes"
    updated = await k8s.update(KVPair(key, value, start.revision, start.uid))
    assert updated.value["spec"]["bgp"] == value["spec"]["bgp"]
    assert updated.value["spec"]["ipv4VXLANTunnelAddr"] == "10.244.7.1"
    assert updated.value["metadata"]["labels"]["calico-only"] == "yes"

    raw = kas.request("GET", f"/api/v1/nodes/{name}")
    ann = raw["metadata"]["annotations"]
    assert ann["projectcalico.org/IPv4Address"] == "192.168.7.7/24"
    assert ann["projectcalico.org/ASNumber"] == "64512"
    assert ann["projectcalico.org/RouteReflectorClusterID"] == "224.0.0.1"
    assert ann["projectcalico.org/IPv4IPIPTunnelAddr"] == "10.244.7.0"
    assert ann["projectcalico.org/IPv4VXLANTunnelAddr"] == "10.244.7.1"
    assert ann["projectcalico.org/VXLANTunnelMACAddr"] == "66:0a:0b:0c:0d:0e"
    assert json.loads(ann["projectcalico.org/labels"]) == {"calico-only": "yes"}
    assert raw["metadata"]["labels"] == {"kubernetes.io/hostname": name}  # k8s labels untouched

    with pytest.raises(Conflict):
        await k8s.update(KVPair(key, value, start.revision))
    cleared = copy.deepcopy(updated.value)
    del cleared["spec"]["bgp"]
    await k8s.update(KVPair(key, cleared, updated.revision))
    ann = kas.request("GET", f"/api/v1/nodes/{name}")["metadata"]["annotations"]
    assert "projectcalico.org/IPv4Address" not in ann and "projectcalico.org/ASNumber" not in ann
    assert ann["projectcalico.org/IPv4VXLANTunnelAddr"] == "10.244.7.1"

    with pytest.raises(Invalid, match="not supported"):
        await k8s.create(Key(KIND_NODE, f"{uniq}-new"), new_resource(Key(KIND_NODE, "x"), {}))
    with pytest.raises(Invalid):
        await k8s.delete(key)
    events = await collect(k8s.watch(KIND_NODE, start.revision), 2, lambda ev: ev.key == key)
    assert events[0].kv is not None and events[0].kv.value["spec"]["bgp"]["asNumber"] == 64512
    kas.request("DELETE", f"/api/v1/nodes/{name}")


async def test_k8s_profiles_from_namespaces_and_service_accounts(k8s: K8sBackend, kas: KubeApiServer,
                                                                 uniq: str) -> None:
    ns = f"{uniq}-prof"
    kas.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": ns, "labels": {"team": "blue"}}})
    kas.ensure_service_account(ns, "builder")
    listed = await k8s.list(KIND_PROFILE)
    by_name = {kv.key.name: kv for kv in listed.items}
    assert by_name[f"kns.{ns}"].value["spec"]["labelsToApply"] == {
        "pcns.team": "blue", "pcns.projectcalico.org/name": ns,
        "pcns.kubernetes.io/metadata.name": ns} or by_name[f"kns.{ns}"].value["spec"]["labelsToApply"] == {
        "pcns.team": "blue", "pcns.projectcalico.org/name": ns}
    assert by_name[f"ksa.{ns}.builder"].value["spec"]["labelsToApply"]["pcsa.projectcalico.org/name"] == "builder"
    assert "/" in listed.revision
    got = await k8s.get(Key(KIND_PROFILE, f"ksa.{ns}.builder"))
    assert got.revision.startswith("/")
    with pytest.raises(NotFound):
        await k8s.get(Key(KIND_PROFILE, "some-etcd-profile"))
    with pytest.raises(Invalid):
        await k8s.create(Key(KIND_PROFILE, "p"), new_resource(Key(KIND_PROFILE, "p"), {}))

    kas.request("PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"team": "red"}}},
                content_type="application/merge-patch+json")
    kas.ensure_service_account(ns, "second")
    events = await collect(k8s.watch(KIND_PROFILE, listed.revision), 2,
                           lambda ev: ev.key.name in (f"kns.{ns}", f"ksa.{ns}.second"))
    by_key = {e.key.name: e for e in events}
    ev = by_key[f"kns.{ns}"]
    assert ev.kv is not None and ev.kv.value["spec"]["labelsToApply"]["pcns.team"] == "red"
    assert f"ksa.{ns}.second" in by_key
    assert all("/" in e.revision for e in events)


async def test_k8s_network_policies_are_read_only(k8s: K8sBackend, kas: KubeApiServer, uniq: str) -> None:
    ns = f"{uniq}-np"
    kas.ensure_namespace(ns)
    spec = {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 5432, "protocol": "TCP"}]}]}
    kas.request("POST", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db", "namespace": ns}, "spec": spec})
    listed = await k8s.list(KIND_K8S_NETWORK_POLICY, ListOptions(namespace=ns))
    assert [kv.key for kv in listed.items] == [Key(KIND_K8S_NETWORK_POLICY, "db", ns)]
    assert listed.items[0].value["spec"] == spec
    got = await k8s.get(Key(KIND_K8S_NETWORK_POLICY, "db", ns))
    assert got.value["kind"] == "KubernetesNetworkPolicy"
    with pytest.raises(Invalid):
        await k8s.delete(Key(KIND_K8S_NETWORK_POLICY, "db", ns))


async def test_k8s_service_account_token_and_rbac(kas: KubeApiServer, uniq: str) -> None:
    ns = f"{uniq}-rbac"
    kas.ensure_namespace(ns)
    token = kas.mint_token(ns, "agent")
    b = await K8sBackend.from_host(kas.host, token, ca_file=kas.ca_file)
    try:
        with pytest.raises(DatastoreError) as exc:
            await b.list(KIND_IPPOOL)
        assert not isinstance(exc.value, (NotFound, Unavailable))
        kas.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": f"{uniq}-read-pools"},
            "rules": [{"apiGroups": [CRD_GROUP], "resources": ["ippools"], "verbs": ["get", "list", "watch"]}]})
        kas.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{uniq}-read-pools"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{uniq}-read-pools"},
            "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]})
        for _ in range(50):  # RBAC caches refresh asynchronously
            try:
                await b.list(KIND_IPPOOL)
                break
            except DatastoreError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the SA token never gained access to ippools")
    finally:
        await b.close()


async def test_k8s_kubeconfig_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(Invalid, match="kubeconfig"):
        await K8sBackend.from_kubeconfig(str(tmp_path / "missing"))
    if os.environ.get("KUBERNETES_SERVICE_HOST") is None:
        with pytest.raises(Invalid):
            await K8sBackend.in_cluster()


async def test_k8s_watch_resumes_after_server_side_timeouts(kas: KubeApiServer, uniq: str) -> None:
    # A 1-second server-side watch timeout: the stream ends and is resumed several times while we wait.
    b = await K8sBackend.from_kubeconfig(kas.kubeconfig, watch_timeout=1)
    try:
        start = await b.list(KIND_GLOBAL_NETWORK_SET)
        gen = b.watch(KIND_GLOBAL_NETWORK_SET, start.revision)
        seen: list[WatchEvent] = []

        async def consume() -> None:
            async for ev in gen:
                if ev.key.name.startswith(uniq):
                    seen.append(ev)

        task = asyncio.create_task(consume())
        await asyncio.sleep(3.5)
        key = Key(KIND_GLOBAL_NETWORK_SET, f"{uniq}-late")
        await b.create(key, new_resource(key, {"nets": []}))
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # one more resume: the event must not be delivered twice
        assert not task.done(), "the watch ended instead of resuming"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert [(e.type, e.key) for e in seen] == [("put", key)]
    finally:
        await b.close()


async def test_k8s_watch_ends_when_the_api_server_dies(kas_etcd: EtcdServer) -> None:
    with KubeApiServer(kas_etcd) as server:
        b = await K8sBackend.from_kubeconfig(server.kubeconfig)
        try:
            start = await b.list(KIND_NODE)
            gen = b.watch(KIND_NODE, start.revision)
            name = "t" + uuid.uuid4().hex[:8]
            server.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
            first = await asyncio.wait_for(gen.__anext__(), 10)
            assert first.key == Key(KIND_NODE, name)
            server.request("DELETE", f"/api/v1/nodes/{name}")
            await asyncio.wait_for(gen.__anext__(), 10)
            server.stop()
            rest = [ev async for ev in gen]
            assert rest == []
            with pytest.raises(Unavailable):
                await b.list(KIND_NODE)
        finally:
            await b.close()


def test_api_error_is_raised_by_test_client(kas: KubeApiServer) -> None:
    with pytest.raises(ApiError) as exc:
        kas.request("GET", "/api/v1/namespaces/does-not-exist-ever")
    assert exc.value.status == 404
