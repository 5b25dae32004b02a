"""Build the configured backend (imports the heavy client library only for the chosen datastore)."""

from __future__ import annotations

from felixpy.config import Config
from felixpy.datastore.api import Backend


async def make_backend(cfg: Config) -> Backend:
    if cfg.datastore_type == "etcdv3":
        from felixpy.datastore.etcd import EtcdBackend

        return await EtcdBackend.connect(list(cfg.etcd_endpoints))
    from felixpy.datastore.k8s import K8sBackend

    if cfg.kubeconfig:
        return await K8sBackend.from_kubeconfig(cfg.kubeconfig)
    return await K8sBackend.in_cluster()
