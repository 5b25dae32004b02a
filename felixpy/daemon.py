"""The agent process: wiring only. Root tasks run in one TaskGroup, so any root task dying stops the
process (the DaemonSet restarts it) instead of leaving a half-working agent."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import time
from typing import Any

from felixpy import autodetect, cniserver, health, metrics, names, nodeinfo
from felixpy.calc.graph import CalcGraph
from felixpy.calc.messages import CONTROL_PLANE_MESSAGES, HostTunnelUpdate, IPPoolRemove, IPPoolUpdate, Message
from felixpy.config import Config
from felixpy.dataplane import workload
from felixpy.dataplane.bgp_route_mgr import BgpRouteManager
from felixpy.dataplane.block_mgr import BlockRouteManager
from felixpy.dataplane.drivers.ipip import IpipDevice
from felixpy.dataplane.drivers.routetable import RouteTable
from felixpy.dataplane.drivers.vxlan import VxlanDevice
from felixpy.dataplane.endpoint_mgr import EndpointManager
from felixpy.dataplane.loop import Dataplane
from felixpy.dataplane.shims import netlink
from felixpy.dataplane.tunnel_mgr import TunnelManager
from felixpy.datastore.api import (
    KIND_BGP_CONFIG,
    KIND_BGP_PEER,
    KIND_GLOBAL_NETWORK_POLICY,
    KIND_GLOBAL_NETWORK_SET,
    KIND_IPAM_BLOCK,
    KIND_IPPOOL,
    KIND_K8S_NETWORK_POLICY,
    KIND_NETWORK_POLICY,
    KIND_NETWORK_SET,
    KIND_NODE,
    KIND_PROFILE,
    KIND_TIER,
    KIND_WEP,
    Backend,
    DatastoreError,
    Key,
    ListOptions,
    NotFound,
    Resource,
)
from felixpy.datastore.factory import make_backend
from felixpy.datastore.syncer import DedupeBuffer, Syncer, SyncStatus, WatchSpec
from felixpy.ipam import IPAMClient
from felixpy.startup import run_startup

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50
IPIP_OVERHEAD = 20


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
        self.health.register("Tunnels")
        self.calc = CalcGraph(cfg.nodename, router_id_setting=cfg.router_id,
                              bgp_enabled=cfg.networking_backend == "bird", bgp_hold_time=cfg.bgp_hold_time,
                              policy_enabled=cfg.policy_enabled)
        self.buffer = DedupeBuffer()
        self._nl = netlink.Netlink()
        # Ours: proto 80 (Felix) and 12 (routes learned over BGP, as BIRD marks them), plus every route on
        # workload, VXLAN and IPIP links (see felixpy.names).
        self.route_table = RouteTable(
            self._nl, owned_protocols=(names.RTPROT_FELIX, names.RTPROT_BIRD),
            iface_prefixes=(*cfg.interface_prefixes, names.VXLAN_IFACE, names.IPIP_IFACE))
        self.endpoint_mgr = EndpointManager(self.route_table, workload.configure_host_iface)
        self.block_mgr = BlockRouteManager(self.route_table)
        self.host_mtu = autodetect.detect_host_mtu(self._nl, cfg.mtu_iface_pattern)
        self.vxlan_mtu = cfg.vxlan_mtu or self.host_mtu - VXLAN_OVERHEAD
        self.ipip_mtu = cfg.ipip_mtu or self.host_mtu - IPIP_OVERHEAD
        self.ipip_supported, self.ipip_reason = netlink.ipip_supported(self._nl)
        metrics.kernel_capability.labels("ipip").set(1 if self.ipip_supported else 0)
        if not self.ipip_supported:
            log.warning("IPIP unavailable: %s; IPIP pools will not get tunnel routes (VXLAN, BGP and "
                        "policy are unaffected)", self.ipip_reason)
        # A recreated device loses its routes: let the route table look the new index up.
        self.vxlan_dev = VxlanDevice(self._nl, on_link_change=self.route_table.iface_changed)
        self.ipip_dev = IpipDevice(self._nl, on_link_change=self.route_table.iface_changed)
        self.tunnel_mgr = TunnelManager(self._nl, self.route_table, self.vxlan_dev, self.ipip_dev,
                                        vxlan_mtu=self.vxlan_mtu, ipip_mtu=self.ipip_mtu)
        self.bgp_route_mgr = BgpRouteManager(self._nl, self.route_table)
        self.nat_table, self.masq_mgr = _nat_backend(cfg)
        extra_mgrs: list[Any] = []
        if cfg.policy_enabled:
            # One driver per backend: policy shares the NAT's nft table, or the iptables dataplane (IP sets,
            # nat and filter tables, applied in that order), so each apply is one transaction per table.
            from felixpy.dataplane.policy_mgr import PolicyManager
            from felixpy.dataplane.policy_render import RenderOptions

            opts = RenderOptions(endpoint_to_host_action=cfg.default_endpoint_to_host_action.upper(),
                                 iface_prefix=cfg.interface_prefixes[0] if cfg.interface_prefixes else "cali")
            extra_mgrs.append(PolicyManager(self.nat_table, options=opts))
        self.dataplane = Dataplane(
            [self.endpoint_mgr, self.block_mgr, self.tunnel_mgr, self.bgp_route_mgr, *extra_mgrs, self.masq_mgr],
            # Devices before routes (routes via vxlan.calico need the link); NAT last.
            [self.vxlan_dev, self.ipip_dev, self.bgp_route_mgr, self.route_table, self.nat_table],
            refresh_interval=cfg.route_refresh_interval)
        self.backend: Backend | None = None
        self.syncer: Syncer | None = None
        self.ipam: IPAMClient | None = None
        self.bgp: Any = None  # felixpy.bgpctl.BgpControl when CALICO_NETWORKING_BACKEND=bird
        self._host: HostTunnelUpdate | None = None
        self._pod_mtu = 0
        self._tunnel_addrs_wanted = asyncio.Event()
        self.stopping = asyncio.Event()

    # -- hooks for the CNI server -------------------------------------------------------------------
    async def program_endpoint(self, key: Key, value: Resource | None, revision: str) -> str:
        self.calc.on_local_write(key, value, revision, time.monotonic())
        self._route_messages(self.calc.flush())
        await self.dataplane.barrier()
        return self.endpoint_mgr.status(key)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.dataplane.executor,
                                                                functools.partial(fn, *args))

    def default_mtu(self) -> int:
        if self.cfg.veth_mtu:
            return self.cfg.veth_mtu
        return self._pod_mtu or self.host_mtu

    def _update_pod_mtu(self) -> None:
        """Pod MTU = the smallest over enabled encapsulations, else the host MTU (Calico's rule), written to
        <state dir>/mtu, which Calico's CNI plugin reads when the conflist says "mtu": 0."""
        host = self._host
        candidates = [self.host_mtu]
        if host is not None and host.vxlan_enabled:
            candidates.append(self.vxlan_mtu)
        if host is not None and host.ipip_enabled and self.ipip_supported:
            candidates.append(self.ipip_mtu)
        mtu = self.cfg.veth_mtu or min(candidates)
        if mtu == self._pod_mtu:
            return
        self._pod_mtu = mtu
        path = os.path.join(self.cfg.state_dir, "mtu")
        try:
            os.makedirs(self.cfg.state_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                f.write(f"{mtu}\n")
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
        log.info("pod MTU %d (host %d, VXLAN %d, IPIP %d)", mtu, self.host_mtu, self.vxlan_mtu, self.ipip_mtu)

    def _route_messages(self, msgs: list[Message]) -> None:
        """Control-plane messages to the BGP glue, the rest to the dataplane; note tunnel/pool changes."""
        dp: list[Message] = []
        pools_changed = False
        for m in msgs:
            if isinstance(m, CONTROL_PLANE_MESSAGES):
                if self.bgp is not None:
                    self.bgp.on_message(m)
                continue
            dp.append(m)
            if isinstance(m, HostTunnelUpdate):
                self._host = m
                self._update_pod_mtu()
                self._tunnel_report()
                if self.bgp is not None:
                    self.bgp.on_message(m)
                self._tunnel_addrs_wanted.set()
            elif isinstance(m, IPPoolUpdate | IPPoolRemove):
                pools_changed = True
        if pools_changed:
            self._tunnel_addrs_wanted.set()
            if self.bgp is not None:
                self.bgp.pools_changed()
        if dp:
            self.dataplane.submit(dp)

    def _tunnel_report(self) -> None:
        host = self._host
        problems = []
        if host is not None and host.ipip_enabled and not self.ipip_supported:
            problems.append(f"IPIP pools present but {self.ipip_reason}")
        if self.tunnel_mgr.problem:
            problems.append(self.tunnel_mgr.problem)
        self.health.report("Tunnels", ready=True, detail="; ".join(problems))

    async def _tunnel_addrs(self) -> None:
        """Keep this node's VXLAN/IPIP tunnel addresses in line with the pools (Calico's allocateip)."""
        assert self.backend is not None and self.ipam is not None
        backoff = 1.0
        while True:
            await self._tunnel_addrs_wanted.wait()
            await asyncio.sleep(0.2)  # let a burst of pool updates settle
            self._tunnel_addrs_wanted.clear()
            try:
                pools = list(self.calc.routes.pools.values())
                await nodeinfo.reconcile_tunnel_addrs(self.backend, self.ipam, self.cfg.nodename, pools)
                backoff = 1.0
            except (DatastoreError, nodeinfo.NodeIdentityError, ValueError) as e:
                log.warning("tunnel address allocation failed (retrying in %.0fs): %s", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                self._tunnel_addrs_wanted.set()

    async def _node_address(self, backend: Backend) -> None:
        """IP / IP_AUTODETECTION_METHOD -> the Node's spec.bgp.ipv4Address (and AS), as calico-node does."""
        cfg = self.cfg
        ip: ipaddress.IPv4Interface | None
        if cfg.ip.lower() == "none":
            return
        try:
            node_res = (await nodeinfo.get_node(backend, cfg.nodename)).value
        except NotFound:
            node_res = {}
        if cfg.ip.lower() == "autodetect":
            ip = await self.run_blocking(autodetect.detect_ipv4, cfg.ip_autodetection_method, self._nl,
                                         nodeinfo.node_internal_ips(node_res))
        else:
            ip = autodetect.parse_ip_setting(cfg.ip, self._nl)
        await nodeinfo.set_node_address(backend, cfg.nodename, ip, asn=cfg.as_number)
        log.info("node %s: IPv4 address %s", cfg.nodename, ip)

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
            self._route_messages(self.calc.flush())
            metrics.invalid_resources.inc(self.calc.invalid_resources - before)
            metrics.calc_updates.inc(len(updates))
            metrics.calc_update_time.observe(time.perf_counter() - t0)

    async def _housekeeping(self) -> None:
        """Overlay expiry and the dataplane liveness/readiness report."""
        while True:
            self.calc.expire(time.monotonic())
            msgs = self.calc.flush()
            if msgs:
                self._route_messages(msgs)
            self._tunnel_report()
            ready = self.dataplane.in_sync and self.dataplane.applies_ok > 0 and not self.dataplane.last_error
            detail = self.dataplane.last_error or ("" if ready else "waiting for first apply after sync")
            self.health.report("InternalDataplaneMainLoop", live=True, ready=ready, detail=detail)
            metrics.route_table_routes.set(self.route_table.num_owned_routes())
            await asyncio.sleep(1.0)

    async def _kernel_monitor(self) -> None:
        """React to route/link changes made behind our back (e.g. `ip route del`) within ~100 ms."""
        loop = asyncio.get_running_loop()
        mon = netlink.Monitor()  # its own socket: events must not mix with request acks
        watched = (*self.cfg.interface_prefixes, names.VXLAN_IFACE, names.IPIP_IFACE)
        event = asyncio.Event()

        def readable() -> None:
            if mon.drain_owned_route_changes(watched, (names.RTPROT_FELIX, names.RTPROT_BIRD)):
                event.set()

        loop.add_reader(mon.fileno(), readable)
        try:
            while True:
                await event.wait()
                await asyncio.sleep(0.1)  # coalesce bursts (including the echoes of our own writes)
                event.clear()
                # Link/route events only concern routes and tunnel devices; nft/iptables drift is left to
                # the refresh timer, as Felix does with its iptables refresh.
                self.dataplane.queue_resync([self.vxlan_dev, self.ipip_dev, self.bgp_route_mgr, self.route_table])
        finally:
            loop.remove_reader(mon.fileno())
            mon.close()

    async def _connect(self) -> Backend:
        backoff = 0.5
        while True:
            try:
                backend = await make_backend(self.cfg)
                await run_startup(backend, self.cfg)
                await self._node_address(backend)
                return backend
            except autodetect.AutodetectError as e:
                self.health.report("FelixStartup", ready=False, detail=f"IP autodetection failed: {e}")
                log.error("IP autodetection failed (%s); retrying: %s", self.cfg.ip_autodetection_method, e)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
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
        ipam = self.ipam = IPAMClient(self.backend, node=self.cfg.nodename)
        if self.cfg.networking_backend == "bird":
            from felixpy.bgpctl import BgpControl

            self.bgp = BgpControl(self.cfg.bgp_dir, submit=self.dataplane.submit,
                                  pools=lambda: list(self.calc.routes.pools.values()),
                                  ipip_available=lambda: self.ipip_supported)
            n = self.bgp.adopt_kernel_routes(self._nl.routes(), {ln.index: ln.name for ln in self._nl.links()})
            if n:
                log.info("BGP: keeping %d routes from before the restart until the speaker has resynced", n)
        hooks = cniserver.AgentHooks(node=self.cfg.nodename, backend=self.backend, ipam=ipam,
                                     program_endpoint=self.program_endpoint, run_blocking=self.run_blocking,
                                     default_mtu=self.default_mtu,
                                     interface_prefix=self.cfg.interface_prefixes[0])
        servers.append(await cniserver.serve(cniserver.CniHandler(hooks), self.cfg.cni_socket))
        self.syncer = Syncer(self.backend, [
            # With policy on, every endpoint in the cluster feeds the IP sets; otherwise only ours matter.
            WatchSpec(KIND_WEP, ListOptions() if self.cfg.policy_enabled else ListOptions(node=self.cfg.nodename)),
            WatchSpec(KIND_IPAM_BLOCK),
            WatchSpec(KIND_NODE),
            WatchSpec(KIND_IPPOOL),
            WatchSpec(KIND_BGP_CONFIG),
            WatchSpec(KIND_BGP_PEER),
            *([WatchSpec(k) for k in (KIND_PROFILE, KIND_NETWORK_POLICY, KIND_GLOBAL_NETWORK_POLICY,
                                      KIND_K8S_NETWORK_POLICY, KIND_NETWORK_SET, KIND_GLOBAL_NETWORK_SET,
                                      KIND_TIER)] if self.cfg.policy_enabled else []),
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
                tg.create_task(self._tunnel_addrs(), name="tunnel-addrs")
                if self.bgp is not None:
                    tg.create_task(self.bgp.run(), name="bgp")
                await self.stopping.wait()
                raise _Stop
        except* _Stop:
            log.info("agent stopping")
        finally:
            for s in servers:
                s.close()
            with contextlib.suppress(FileNotFoundError, OSError):
                os.unlink(self.cfg.cni_socket)
            self.dataplane.close()
            await self.backend.close()
            self._nl.close()


class _Stop(Exception):
    pass


def _nat_backend(cfg: Config) -> tuple[Any, Any]:
    """The NAT-outgoing table driver (nftables by default, iptables-restore with FELIX_NFTABLESMODE=Disabled)."""
    from felixpy.dataplane.masq_mgr import make_nat_backend

    return make_nat_backend(cfg.nat_backend, with_filter=cfg.policy_enabled)


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
