"""calicoctl-style subcommands of ``felixpy`` (node status, ipam, get/apply/delete, status).

Each module here owns its verbs: ``register(sub)`` adds its argparse subparsers and sets ``func`` on
them (``func(args) -> int``, the exit code). :func:`datastore_args` / :func:`open_backend` give every verb
the same way to reach the datastore as the agent (``DATASTORE_TYPE``, ``ETCD_ENDPOINTS``, ``KUBECONFIG``).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from felixpy.datastore.api import Backend

# Modules that contribute verbs, in the order they appear in --help.
MODULES = ("felixpy.ctl.node", "felixpy.ctl.ipam", "felixpy.ctl.resources", "felixpy.ctl.status")


def datastore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datastore-type", default=None, help="kubernetes | etcdv3 (default: $DATASTORE_TYPE)")
    p.add_argument("--etcd-endpoints", default=None, help="default: $ETCD_ENDPOINTS")
    p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG")


def datastore_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment the agent's config loader would see, with the command-line overrides applied."""
    env = dict(os.environ)
    if getattr(args, "datastore_type", None):
        env["DATASTORE_TYPE"] = args.datastore_type
    if getattr(args, "etcd_endpoints", None):
        env["ETCD_ENDPOINTS"] = args.etcd_endpoints
    if getattr(args, "kubeconfig", None):
        env["KUBECONFIG"] = args.kubeconfig
    env.setdefault("NODENAME", env.get("NODENAME") or os.uname().nodename)
    return env


async def open_backend(args: argparse.Namespace) -> Backend:
    from felixpy import config
    from felixpy.datastore.factory import make_backend

    return await make_backend(config.load(datastore_env(args)))


def register_all(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    import importlib

    for name in MODULES:
        importlib.import_module(name).register(sub)
