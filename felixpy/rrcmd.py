"""``felixpy route-reflector``: a BIRD route reflector configured from the datastore (ExaBGP cannot reflect).

Environment (calico-node's names where they exist): the datastore variables, ``NODENAME``, ``IP`` (the
reflector's address with prefix, required), ``FELIXPY_RR_CLUSTER_ID`` (default: the IP, as operators
usually set ``projectcalico.org/RouteReflectorClusterID``), ``FELIXPY_RR_LABELS`` (``k=v,...``, default
``route-reflector=true``, what BGPPeer peerSelectors usually match) and ``FELIXPY_BGP_DIR`` (BIRD's
config and control socket).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys


def run_route_reflector_cmd() -> int:
    from bgp.rr import run_route_reflector
    from felixpy import config
    from felixpy.datastore.factory import make_backend

    try:
        cfg = config.load()
        ip_text = os.environ.get("IP", "")
        if not ip_text or "/" not in ip_text:
            raise config.ConfigError("IP: a route reflector needs its address with prefix, e.g. 10.0.0.254/24")
        node_ip = ipaddress.IPv4Interface(ip_text)
    except (config.ConfigError, ValueError) as e:
        print(f"felixpy route-reflector: invalid configuration: {e}", file=sys.stderr)
        return 2
    cluster_id = os.environ.get("FELIXPY_RR_CLUSTER_ID", "") or str(node_ip.ip)
    try:
        ipaddress.IPv4Address(cluster_id)
    except ValueError:
        print(f"felixpy route-reflector: FELIXPY_RR_CLUSTER_ID must be an IPv4 address, got {cluster_id!r}",
              file=sys.stderr)
        return 2
    labels = {}
    for item in os.environ.get("FELIXPY_RR_LABELS", "route-reflector=true").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            labels[k.strip()] = v.strip()
    logging.basicConfig(level=getattr(logging, cfg.log_severity, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        backend = await make_backend(cfg)
        task = asyncio.ensure_future(run_route_reflector(backend, cfg.nodename, cfg.bgp_dir, node_ip=node_ip,
                                                         cluster_id=cluster_id, labels=labels,
                                                         router_id_setting=cfg.router_id))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            await backend.close()

    asyncio.run(main())
    return 0
