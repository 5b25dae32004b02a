"""Fixtures for end-to-end tests: a real datastore (etcd, or etcd + kube-apiserver with our CRDs), the
agent as a process in this machine's network namespace (the node's), and the installed CNI executable."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import REPO, Agent, DatastoreEnv, install_plugin, ip_forward, routes_in
from tests.realparts.etcd import EtcdServer
from tests.realparts.kube_apiserver import KubeApiServer

NODE = "e2e-node"


@pytest.fixture(scope="module", params=["etcdv3", "kubernetes"])
def datastore(request: pytest.FixtureRequest) -> Iterator[DatastoreEnv]:
    with EtcdServer() as etcd:
        if request.param == "etcdv3":
            yield DatastoreEnv("etcdv3", etcd.endpoint)
            return
        with KubeApiServer(etcd) as kas:
            kas.apply_crds(str(REPO / "deploy" / "crds"))
            ds = DatastoreEnv("kubernetes", etcd.endpoint, kas)
            ds.ensure_node(NODE)
            yield ds


@pytest.fixture(scope="module")
def pool(datastore: DatastoreEnv) -> str:
    # The agent creates it as the default pool when the datastore has none, i.e. once per datastore.
    return f"10.{200 + uuid.uuid4().int % 50}.0.0/16"


@pytest.fixture
def agent(datastore: DatastoreEnv, tmp_path: Path, pool: str) -> Iterator[Agent]:
    saved_forward = ip_forward()
    a = Agent(datastore, tmp_path, NODE, pool)
    a.start()
    yield a
    a.stop()
    # The agent's routes outlive it by design (restart must not flush); tests clean up their pool.
    subprocess.run(["ip", "route", "flush", "root", pool, "proto", "80"], capture_output=True)
    assert not routes_in(pool), routes_in(pool)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(saved_forward)


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    return install_plugin(tmp_path / "bin")


async def _ipam_usage(ds: DatastoreEnv) -> tuple[list[str], list[str]]:
    from felixpy.datastore.api import KIND_IPAM_BLOCK, KIND_IPAM_HANDLE

    backend: Any
    if ds.type == "etcdv3":
        from felixpy.datastore.etcd import EtcdBackend

        backend = await EtcdBackend.connect([ds.etcd_endpoint])
    else:
        from felixpy.datastore.k8s import K8sBackend

        backend = await K8sBackend.from_kubeconfig(ds.kubeconfig)
    try:
        handles = [kv.value["spec"].get("handleID", kv.key.name)
                   for kv in (await backend.list(KIND_IPAM_HANDLE)).items
                   if not kv.value["spec"].get("deleted")]
        used: list[str] = []
        import ipaddress

        for kv in (await backend.list(KIND_IPAM_BLOCK)).items:
            spec = kv.value["spec"]
            net = ipaddress.ip_network(spec["cidr"])
            for ordinal, attr in enumerate(spec.get("allocations") or []):
                if attr is not None:
                    used.append(str(net[ordinal]))
        return handles, used
    finally:
        await backend.close()


def ipam_usage(ds: DatastoreEnv) -> tuple[list[str], list[str]]:
    """(live handle IDs, allocated addresses) straight from the datastore."""
    return asyncio.run(_ipam_usage(ds))
