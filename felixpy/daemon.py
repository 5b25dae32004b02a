"""The agent process: wiring only. Root tasks run in one TaskGroup, so any root task dying stops the
process (the DaemonSet restarts it) instead of leaving a half-working agent."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import time
from typing import Any

from felixpy import cniserver, health, metrics
from felixpy.calc.graph import CalcGraph
from felixpy.config import Config
from felixpy.dataplane import workload
from felixpy.dataplane.block_mgr import BlockRouteManager
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.endpoint_mgr import EndpointManager
from felixpy.dataplane.loop import Dataplane
from felixpy.dataplane.shims import netlink
from felixpy.datastore.api import KIND_IPAM_BLOCK, KIND_WEP, Backend, DatastoreError, Key, ListOptions, Resource
from felixpy.datastore.factory import make_backend
from felixpy.datastore.syncer import DedupeBuffer, Syncer, SyncStatus, WatchSpec
from felixpy.ipam import IPAMClient
from felixpy.startup import run_startup

log = logging.getLogger(__name__)

MTU_IFACE_PATTERN = re.compile(r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)")
DEFAULT_MTU = 1460  # Felix's fallback when no host interface matches


def detect_host_mtu(nl: netlink.Netlink) -> int:
    mtus = [ln.mtu for ln in nl.links() if ln.oper_up and MTU_IFACE_PATTERN.match(ln.name)]
    return min(mtus) if mtus else DEFAULT_MTU


def configure_kernel() -> None:
    """Global sysctls Felix sets (IPForwarding=Enabled): pods are routed, so the node must forward."""
    try:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    except OSError as e:
        log.error("cannot enable net.ipv4.ip_forward: %s (pod traffic will not be forwarded)", e)


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.health = health.Health()
        self.health.register("FelixStartup")
        self.health.register("Datastore")
        self.health.register("InternalDataplaneMainLoop", timeout=90.0)
        self.calc = CalcGraph(cfg.nodename)
        self.buffer = DedupeBuffer()
        self._nl = netlink.Netlink()
        self.route_table = RouteTable(self._nl, iface_prefixes=cfg.interface_prefixes)
        self.endpoint_mgr = EndpointManager(self.route_table, workload.configure_host_iface)
        self.block_mgr = BlockRouteManager(self.route_table)
        self.dataplane = Dataplane([self.endpoint_mgr, self.block_mgr], [self.route_table],
                                   refresh_interval=cfg.route_refresh_interval)
        self.backend: Backend | None = None
        self.syncer: Syncer | None = None
        self._host_mtu = 0
        self.stopping = asyncio.Event()

    # -- hooks for the CNI server -------------------------------------------------------------------
    async def program_endpoint(self, key: Key, value: Resource | None, revision: str) -> str:
        self.calc.on_local_write(key, value, revision, time.monotonic())
        self.dataplane.submit(self.calc.flush())
        await self.dataplane.barrier()
        return self.endpoint_mgr.status(key)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.dataplane.executor,
                                                                functools.partial(fn, *args))

    def default_mtu(self) -> int:
        if self.cfg.veth_mtu:
            return self.cfg.veth_mtu
        if not self._host_mtu:
            self._host_mtu = detect_host_mtu(self._nl)
        return self._host_mtu

    # -- root tasks ---------------------------------------------------------------------------------
    async def _calc_loop(self) -> None:
        while True:
            updates, status = await self.buffer.get_batch()
            t0 = time.perf_counter()
            self.calc.on_updates(updates)
            if status is not None:
                metrics.resync_state.set({SyncStatus.WAIT_FOR_DATASTORE: 1, SyncStatus.RESYNC: 2,
                                          SyncStatus.IN_SYNC: 3}[status])
                self.health.report("Datastore", ready=status == SyncStatus.IN_SYNC, detail=status.value)
                if status == SyncStatus.IN_SYNC:
                    self.calc.on_in_sync()
            before = self.calc.invalid_resources
            self.dataplane.submit(self.calc.flush())
            metrics.invalid_resources.inc(self.calc.invalid_resources - before)
            metrics.calc_updates.inc(len(updates))
            metrics.calc_update_time.observe(time.perf_counter() - t0)

    async def _housekeeping(self) -> None:
        """Overlay expiry and the dataplane liveness/readiness report."""
        while True:
            self.calc.expire(time.monotonic())
            msgs = self.calc.flush()
            if msgs:
                self.dataplane.submit(msgs)
            ready = self.dataplane.in_sync and self.dataplane.applies_ok > 0 and not self.dataplane.last_error
            detail = self.dataplane.last_error or ("" if ready else "waiting for first apply after sync")
            self.health.report("InternalDataplaneMainLoop", live=True, ready=ready, detail=detail)
            metrics.route_table_routes.set(self.route_table.num_owned_routes())
            await asyncio.sleep(1.0)

    async def _kernel_monitor(self) -> None:
        """React to route/link changes made behind our back (e.g. `ip route del`) within ~100 ms."""
        loop = asyncio.get_running_loop()
        mon = netlink.Monitor()  # its own socket: events must not mix with request acks
        event = asyncio.Event()

        def readable() -> None:
            if mon.drain_owned_route_changes(self.cfg.interface_prefixes):
                event.set()

        loop.add_reader(mon.fileno(), readable)
        try:
            while True:
                await event.wait()
                await asyncio.sleep(0.1)  # coalesce bursts (including the echoes of our own writes)
                event.clear()
                self.dataplane.queue_resync()
        finally:
            loop.remove_reader(mon.fileno())
            mon.close()

    async def _connect(self) -> Backend:
        backoff = 0.5
        while True:
            try:
                backend = await make_backend(self.cfg)
                await run_startup(backend, self.cfg)
                return backend
            except DatastoreError as e:
                self.health.report("Datastore", ready=False, detail=f"waiting for datastore: {e}")
                log.warning("waiting for datastore (%s): %s", self.cfg.datastore_type, e)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def run(self) -> None:
        servers: list[asyncio.Server] = []
        if self.cfg.health_enabled:
            servers.append(await health.serve(self.health, self.cfg.health_host, self.cfg.health_port))
        if self.cfg.prometheus_enabled and self.cfg.prometheus_port != self.cfg.health_port:
            servers.append(await health.serve(self.health, self.cfg.prometheus_host,
                                              self.cfg.prometheus_port))
        configure_kernel()
        self.health.report("FelixStartup", ready=False, detail="connecting to datastore")
        self.backend = await self._connect()
        self.health.report("FelixStartup", ready=True, detail="")
        ipam = IPAMClient(self.backend, node=self.cfg.nodename)
        hooks = cniserver.AgentHooks(node=self.cfg.nodename, backend=self.backend, ipam=ipam,
                                     program_endpoint=self.program_endpoint, run_blocking=self.run_blocking,
                                     default_mtu=self.default_mtu,
                                     interface_prefix=self.cfg.interface_prefixes[0])
        servers.append(await cniserver.serve(cniserver.CniHandler(hooks), self.cfg.cni_socket))
        self.syncer = Syncer(self.backend, [
            WatchSpec(KIND_WEP, ListOptions(node=self.cfg.nodename)),
            WatchSpec(KIND_IPAM_BLOCK),
        ], self.buffer)
        log.info("felixpy agent running on node %s (datastore %s, CNI socket %s)",
                 self.cfg.nodename, self.cfg.datastore_type, self.cfg.cni_socket)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.syncer.run(), name="syncer")
                tg.create_task(self._calc_loop(), name="calc")
                tg.create_task(self.dataplane.run(), name="dataplane")
                tg.create_task(self._kernel_monitor(), name="kernel-monitor")
                tg.create_task(self._housekeeping(), name="housekeeping")
                await self.stopping.wait()
                raise _Stop
        except* _Stop:
            log.info("agent stopping")
        finally:
            for s in servers:
                s.close()
            with contextlib.suppress(FileNotFoundError, OSError):
                import os

                os.unlink(self.cfg.cni_socket)
            self.dataplane.close()
            await self.backend.close()
            self._nl.close()


class _Stop(Exception):
    pass


def run_agent(cfg: Config) -> int:
    logging.basicConfig(level=getattr(logging, cfg.log_severity, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stopping.set)
        await agent.run()

    asyncio.run(main())
    return 0
