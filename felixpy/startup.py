"""What calico-node's startup ensures before the agent runs: cluster-wide defaults, the default IPv4
pool (only when no IPv4 pool exists), and this node's identity files."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

from felixpy.config import Config
from felixpy.datastore.api import (
    KIND_CLUSTER_INFO,
    KIND_NODE,
    AlreadyExists,
    Backend,
    Key,
    NotFound,
    new_resource,
)
from felixpy.ipam.pools import ensure_default_pool

log = logging.getLogger(__name__)

VERSION = "felixpy-0.1.0"


async def ensure_cluster_information(backend: Backend, cfg: Config) -> None:
    key = Key(KIND_CLUSTER_INFO, "default")
    try:
        kv = await backend.get(key)
        if not kv.value.get("spec", {}).get("datastoreReady", False):
            log.warning("ClusterInformation default has datastoreReady=false (an operator paused Calico)")
        return
    except NotFound:
        pass
    res = new_resource(key, {"clusterGUID": uuid.uuid4().hex, "calicoVersion": VERSION,
                             "clusterType": "k8s,bgp", "datastoreReady": True})
    with contextlib.suppress(AlreadyExists):
        await backend.create(key, res)


async def ensure_node(backend: Backend, cfg: Config) -> None:
    """etcd mode: the Calico Node resource is ours to create. KDD: the k8s Node is kubelet's."""
    if backend.type_name == "kubernetes":
        return
    key = Key(KIND_NODE, cfg.nodename)
    try:
        await backend.get(key)
    except NotFound:
        with contextlib.suppress(AlreadyExists):
            await backend.create(key, new_resource(key, {"orchRefs": [{"nodeName": cfg.nodename,
                                                                        "orchestrator": "k8s"}]}))


def write_nodename_file(cfg: Config) -> None:
    """The CNI plugin convention (/var/lib/calico/nodename); best effort outside a real node."""
    try:
        os.makedirs(cfg.state_dir, exist_ok=True)
        with open(os.path.join(cfg.state_dir, "nodename"), "w") as f:
            f.write(cfg.nodename)
    except OSError as e:
        log.warning("cannot write %s/nodename: %s", cfg.state_dir, e)


async def run_startup(backend: Backend, cfg: Config) -> None:
    await ensure_cluster_information(backend, cfg)
    await ensure_node(backend, cfg)
    if not cfg.no_default_pools and cfg.ipv4pool_cidr.lower() != "none":
        await ensure_default_pool(backend, cidr=cfg.ipv4pool_cidr, block_size=cfg.ipv4pool_block_size,
                                  ipip_mode=cfg.ipv4pool_ipip, vxlan_mode=cfg.ipv4pool_vxlan,
                                  nat_outgoing=cfg.ipv4pool_nat_outgoing,
                                  node_selector=cfg.ipv4pool_node_selector,
                                  disable_bgp_export=cfg.ipv4pool_disable_bgp_export)
    write_nodename_file(cfg)
