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
import threading
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
    KIND_HOST_ENDPOINT,
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
# After SIGTERM: each shutdown step gets this long, and the process exits at SHUTDOWN_DEADLINE whatever is
# still pending (an unreachable datastore must not keep a stopping agent alive; nothing is flushed anyway).
SHUTDOWN_STEP = 1.0
SHUTDOWN_DEADLINE = 4.0
# Updates that change what policy or endpoint programming is in force (felixpy_time_to_policy_seconds).
_TTP_KINDS = frozenset({KIND_WEP, KIND_PROFILE, KIND_NETWORK_POLICY, KIND_GLOBAL_NETWORK_POLICY,
                        KIND_K8S_NETWORK_POLICY, KIND_NETWORK_SET, KIND_GLOBAL_NETWORK_SET, KIND_TIER,
                        KIND_HOST_ENDPOINT})
_POLICY_KINDS = (KIND_NETWORK_POLICY, KIND_GLOBAL_NETWORK_POLICY, KIND_K8S_NETWORK_POLICY)


def _snapshot(d: dict[Any, Any]) -> dict[str, Any]:
    """Copy a dict the dataplane thread may be changing (a concurrent resize makes the copy fail: retry)."""
    for _ in range(5):
        try:
            return {str(k): v for k, v in list(d.items())}
        except RuntimeError:
            continue
    return {}


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
        self.started = time.monotonic()
        self.bgp_ready_grace = cfg.bgp_ready_grace
        if cfg.networking_backend == "bird":
            self.health.register("BGP")
        self.cluster = health.ClusterView(cfg.nodename)
        self._ttp_pending: list[float] = []
        self._ttp_wake = asyncio.Event()
        self._ds_errors_seen = 0
        self._ds_error_at: float | None = None
        self._last_apply_at: float | None = None
        self._applies_seen = 0
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
        self.policy_mgr: Any = None
        if cfg.policy_enabled:
            # One driver per backend: policy shares the NAT's nft table, or the iptables dataplane (IP sets,
            # nat and filter tables, applied in that order), so each apply is one transaction per table.
            from felixpy.dataplane.policy_mgr import PolicyManager
            from felixpy.dataplane.policy_render import RenderOptions

            opts = RenderOptions(endpoint_to_host_action=cfg.default_endpoint_to_host_action.upper(),
                                 iface_prefix=cfg.interface_prefixes[0] if cfg.interface_prefixes else "cali",
                                 log_drops=cfg.log_drops, failsafe_inbound=tuple(cfg.failsafe_inbound),
                                 failsafe_outbound=tuple(cfg.failsafe_outbound),
                                 # The overlay between nodes passes host endpoint policy; the manager also
                                 # turns these on when the pools use VXLAN / IPIP (HostTunnelUpdate).
                                 vxlan_enabled=cfg.networking_backend == "vxlan", vxlan_port=names.VXLAN_PORT)
            self.policy_mgr = PolicyManager(self.nat_table, options=opts)
            extra_mgrs.append(self.policy_mgr)
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

    def record_local_write(self, key: Key, value: Resource | None, revision: str) -> None:
        """Like program_endpoint without the wait (the CNI server's revision of a write already programmed)."""
        self.calc.on_local_write(key, value, revision, time.monotonic())
        self._route_messages(self.calc.flush())

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

    def _route_messages(self, msgs: list[Message]) -> int:
        """Control-plane messages to the BGP glue, the rest to the dataplane; note tunnel/pool changes.
        Returns how many messages went to the dataplane."""
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
        return len(dp)

    def _policy_counts(self) -> dict[str, int]:
        if self.policy_mgr is None:
            return {"policies": 0, "profiles": 0, "endpoints": 0, "ipsets": 0}
        counts: dict[str, int] = self.policy_mgr.counts()
        return counts

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
            t_in = time.monotonic()
            t0 = time.perf_counter()
            for u in updates:
                self.cluster.on_update(u.key.kind, u.key, u.value)
            self.calc.on_updates(updates)
            if status is not None:
                metrics.resync_state.set({SyncStatus.WAIT_FOR_DATASTORE: 1, SyncStatus.RESYNC: 2,
                                          SyncStatus.IN_SYNC: 3}[status])
                self.health.report("Datastore", ready=status == SyncStatus.IN_SYNC, detail=status.value)
                if status == SyncStatus.IN_SYNC:
                    self.calc.on_in_sync()
            before = self.calc.invalid_resources
            if self._route_messages(self.calc.flush()) and any(u.key.kind in _TTP_KINDS for u in updates):
                self._ttp_pending.append(t_in)
                self._ttp_wake.set()
            metrics.invalid_resources.inc(self.calc.invalid_resources - before)
            metrics.calc_updates.inc(len(updates))
            metrics.calc_update_time.observe(time.perf_counter() - t0)

    async def _time_to_policy(self) -> None:
        """felixpy_time_to_policy_seconds: a policy/endpoint batch is effective at the end of the first
        successful apply that started after it was submitted (a failed apply is retried by the loop)."""
        while True:
            await self._ttp_wake.wait()
            self._ttp_wake.clear()
            pending, self._ttp_pending = self._ttp_pending, []
            await self.dataplane.barrier()
            while self.dataplane.last_error:
                await self.dataplane.barrier()
            now = time.monotonic()
            for t in pending:
                metrics.time_to_policy.observe(now - t)

    def _bgp_report(self) -> tuple[bool, str]:
        peers = self.bgp.status()["peers"] if self.bgp is not None else []
        return health.bgp_readiness(peers, uptime=time.monotonic() - self.started, grace=self.bgp_ready_grace)

    def _update_gauges(self) -> None:
        now = time.monotonic()
        if self.dataplane.applies_ok != self._applies_seen:
            self._applies_seen, self._last_apply_at = self.dataplane.applies_ok, now
        if self.syncer is not None and self.syncer.errors != self._ds_errors_seen:
            metrics.datastore_errors.inc(max(0, self.syncer.errors - self._ds_errors_seen))
            self._ds_errors_seen, self._ds_error_at = self.syncer.errors, now
        c = self.cluster
        metrics.cluster_num_hosts.set(c.count(KIND_NODE))
        metrics.cluster_num_weps.set(c.count(KIND_WEP))
        metrics.cluster_num_policies.set(c.count(*_POLICY_KINDS))
        metrics.cluster_num_profiles.set(c.count(KIND_PROFILE))
        pc = self._policy_counts()
        metrics.active_local_policies.set(pc["policies"])
        metrics.active_local_profiles.set(pc["profiles"])
        metrics.ipsets_total.set(pc["ipsets"])
        pools = self._pool_usage()
        local = c.local_blocks()
        metrics.set_ipam_usage({p["cidr"]: (p["total"], p["in_blocks"], p["allocated"], p["blocks"]) for p in pools},
                               (sum(b.size for b in local), sum(b.allocated for b in local)))

    def _pool_usage(self) -> list[dict[str, Any]]:
        return self.cluster.pool_usage((p.name, p.cidr) for p in self.calc.routes.pools.values())

    def status_report(self) -> dict[str, Any]:
        """The agent's view for ``GET /status`` (read by ``felixpy status`` / ``felixpy node status``)."""
        now = time.monotonic()
        dp, syncer, cfg = self.dataplane, self.syncer, self.cfg
        bgp: dict[str, Any] | None = None
        if self.bgp is not None:
            ready, detail = self._bgp_report()
            bgp = {**self.bgp.status(), "ready": ready, "detail": detail, "grace": self.bgp_ready_grace}
        elif cfg.networking_backend == "bird":
            bgp = {"peers": [], "connected": False, "ready": True, "detail": "not started yet",
                   "grace": self.bgp_ready_grace}
        pm = self.policy_mgr
        return {
            "node": cfg.nodename, "time": time.time(), "uptime": now - self.started,
            "live": self.health.live(), "ready": self.health.ready(), "reporters": self.health.reporters(),
            "datastore": {
                "type": cfg.datastore_type, "connected": self.backend is not None,
                "state": syncer.status.value if syncer is not None else "wait-for-datastore",
                "errors": syncer.errors if syncer is not None else 0,
                "relists": syncer.relists if syncer is not None else 0,
                "last_error_age": None if self._ds_error_at is None else now - self._ds_error_at,
            },
            "dataplane": {
                "in_sync": dp.in_sync, "applies_ok": dp.applies_ok,
                "failures": int(metrics.sample("felix_int_dataplane_failures") or 0),
                "last_error": dp.last_error,
                "last_apply_age": None if self._last_apply_at is None else now - self._last_apply_at,
                "routes": self.route_table.num_owned_routes(),
                "local_endpoints": len(self.calc.local_endpoints()),
                "endpoint_errors": _snapshot(self.endpoint_mgr.errors),
                "tunnel_problem": self.tunnel_mgr.problem,
            },
            "networking_backend": cfg.networking_backend,
            "bgp": bgp,
            "ipam": {
                "local_blocks": [{"cidr": str(b.cidr), "total": b.size, "allocated": b.allocated}
                                 for b in self.cluster.local_blocks()],
                "pools": self._pool_usage(),
            },
            "policy": {
                "enabled": cfg.policy_enabled, "backend": cfg.nat_backend,
                **self._policy_counts(),
                "errors": _snapshot(pm.errors) if pm is not None else {},
                "invalid_resources": self.calc.invalid_resources,
                "cluster_policies": self.cluster.count(*_POLICY_KINDS),
            },
            "cluster": {"hosts": self.cluster.count(KIND_NODE), "workload_endpoints": self.cluster.count(KIND_WEP)},
        }

    async def _housekeeping(self) -> None:
        """Overlay expiry, the dataplane and BGP liveness/readiness reports, the gauges."""
        tick = 0
        while True:
            self.calc.expire(time.monotonic())
            msgs = self.calc.flush()
            if msgs:
                self._route_messages(msgs)
            self._tunnel_report()
            ready = self.dataplane.in_sync and self.dataplane.applies_ok > 0 and not self.dataplane.last_error
            detail = self.dataplane.last_error or ("" if ready else "waiting for first apply after sync")
            self.health.report("InternalDataplaneMainLoop", live=True, ready=ready, detail=detail)
            if self.cfg.networking_backend == "bird":
                bgp_ready, bgp_detail = self._bgp_report()
                self.health.report("BGP", ready=bgp_ready, detail=bgp_detail)
            metrics.route_table_routes.set(self.route_table.num_owned_routes())
            self._update_gauges()
            tick += 1
            if self.policy_mgr is not None and tick % 5 == 0:
                # The kernel's drop counters move without any update reaching the dataplane loop, so they
                # are read here (on the dataplane's thread, which owns the nft/iptables handles).
                await self.dataplane.call_in_dataplane_thread(self.policy_mgr.publish_drop_metrics)
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
            servers.append(await health.serve(self.health, self.cfg.health_host, self.cfg.health_port,
                                              status=self.status_report))
        if self.cfg.prometheus_enabled and self.cfg.prometheus_port != self.cfg.health_port:
            # No /status here: the metrics port listens on every interface by default, and /status names
            # endpoints and policy errors (it stays on the health port, localhost by default).
            servers.append(await health.serve(self.health, self.cfg.prometheus_host, self.cfg.prometheus_port))
        configure_kernel()
        self.health.report("FelixStartup", ready=False, detail="connecting to datastore")
        # SIGTERM while the datastore is unreachable must stop the agent too, not wait for the connection.
        connect = asyncio.create_task(self._connect(), name="connect")
        stop = asyncio.create_task(self.stopping.wait(), name="stop-wait")
        await asyncio.wait({connect, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not connect.done():
            connect.cancel()
            log.info("agent stopping (datastore never connected)")
            for s in servers:
                s.close()
            return
        self.backend = connect.result()
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
                                     default_mtu=self.default_mtu, record_local_write=self.record_local_write,
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
                                      KIND_TIER, KIND_HOST_ENDPOINT)] if self.cfg.policy_enabled else []),
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
                tg.create_task(self._time_to_policy(), name="time-to-policy")
                if self.bgp is not None:
                    tg.create_task(self.bgp.run(), name="bgp")
                await self.stopping.wait()
                raise _Stop
        except* _Stop:
            log.info("agent stopping")
        finally:
            # Bounded: an apply in flight may finish (it is never interrupted half way by us), but neither it
            # nor a dead datastore may hold the exit up; the kernel state stays as it is (no flush).
            for s in servers:
                s.close()
            with contextlib.suppress(FileNotFoundError, OSError):
                os.unlink(self.cfg.cni_socket)
            closer = threading.Thread(target=self.dataplane.close, name="dataplane-close", daemon=True)
            closer.start()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.backend.close(), SHUTDOWN_STEP)
            deadline = time.monotonic() + SHUTDOWN_STEP
            while closer.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if not closer.is_alive():
                self._nl.close()  # else the apply still uses it; the process exit closes it


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

        def on_signal() -> None:
            if not agent.stopping.is_set():
                agent.stopping.set()
                _exit_after(SHUTDOWN_DEADLINE)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await agent.run()

    asyncio.run(main())
    return 0


def _exit_after(seconds: float) -> None:
    """The hard bound on shutdown: whatever still runs after ``seconds`` (a datastore call that never returns,
    a thread stuck in the kernel, interpreter exit joining the dataplane thread) does not keep us alive."""
    def fire() -> None:
        log.warning("shutdown did not finish within %gs; exiting now (dataplane left as it is)", seconds)
        logging.shutdown()
        os._exit(0)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
