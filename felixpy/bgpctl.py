"""The agent's BGP control plane (asyncio side): calc-layer BGP messages in, ExaBGP sidecar and kernel
routes out.

- :class:`BgpConfigUpdate` -> the ExaBGP config and env file in ``FELIXPY_BGP_DIR`` (the sidecar reloads
  on change with SIGUSR1, which keeps unaffected sessions up) and the speaker's peer list.
- :class:`BgpAnnounceUpdate` -> the speaker's announcements (it diffs against what it sent).
- Speaker changes (routes learned, peers up/down) -> the import rules of :mod:`bgp.routes` ->
  :class:`BgpRoutesUpdate` for the dataplane (the agent owns every kernel route, ExaBGP none), plus the
  session table in ``<bgp dir>/status.json`` and metrics (for ``node status`` and operators).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bgp import exabgp_conf, routes, sidecar
from bgp.model import LocalBgpConfig
from bgp.speaker import Speaker
from felixpy import metrics, names
from felixpy.calc.messages import BgpAnnounceUpdate, BgpConfigUpdate, BgpRoutesUpdate, HostTunnelUpdate, Message
from felixpy.ipam.pools import IPPool

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
STATUS_NAME = "status.json"


class BgpControl:
    def __init__(self, bgp_dir: str, *, submit: Callable[[Sequence[Message]], None],
                 pools: Callable[[], Sequence[IPPool]], ipip_available: Callable[[], bool],
                 gr_max: float = 120.0, sync_timeout: float = 30.0) -> None:
        self.bgp_dir = bgp_dir
        os.makedirs(bgp_dir, mode=0o700, exist_ok=True)
        self._submit = submit
        self._pools = pools
        self._ipip_available = ipip_available
        self.speaker = Speaker(os.path.join(bgp_dir, SOCKET_NAME), on_change=self._on_change, gr_max=gr_max)
        self.config: LocalBgpConfig | None = None
        self._announce: frozenset[ipaddress.IPv4Network] = frozenset()
        self._reject: frozenset[ipaddress.IPv4Network] = frozenset()
        self._host: HostTunnelUpdate | None = None
        self._publish_scheduled = False
        self._last_routes: tuple[Any, ...] | None = None
        # Import decisions per learned prefix: (next hop, kernel route or None if rejected), valid while the
        # other inputs of the import rules stay as recorded in _decided_inputs. A 10k-route burst arrives in
        # several reads; re-checking every prefix on each publish was the largest cost of a bulk receive.
        self._decided: dict[ipaddress.IPv4Network, tuple[ipaddress.IPv4Address, routes.KernelRoute | None]] = {}
        self._decided_inputs: tuple[Any, ...] | None = None
        # Until the speaker has resynced with ExaBGP (or sync_timeout passes) the kernel keeps the BGP
        # routes it had: an agent restart must not withdraw routes from the dataplane.
        self.sync_timeout = sync_timeout
        self._started = time.monotonic()
        self._routes_released = False
        self.relay_argv = [sys.executable, "-m", "bgp.relay", "--socket", os.path.join(bgp_dir, SOCKET_NAME)]

    # -- inputs (event loop) ------------------------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        if isinstance(msg, BgpConfigUpdate):
            self._set_config(msg.config)
        elif isinstance(msg, BgpAnnounceUpdate):
            self._announce = msg.prefixes
            self._reject = msg.reject_cidrs
            self.speaker.set_announced(msg.prefixes)
            self._on_change()
        elif isinstance(msg, HostTunnelUpdate):
            self._host = msg
            self._on_change()

    def adopt_kernel_routes(self, kernel: Sequence[Any], ifnames: dict[int, str]) -> int:
        """At startup: keep the BGP routes already in the kernel (proto bird) as the desired set until the
        speaker has synced, so the route table does not sweep them as stale. Returns how many."""
        adopted = []
        for r in kernel:
            if r.protocol != names.RTPROT_BIRD or r.type != "unicast" or r.gateway is None:
                continue
            if not isinstance(r.dst, ipaddress.IPv4Network):
                continue
            dev = ifnames.get(r.oif) if r.oif is not None else None
            adopted.append((r.dst, r.gateway, dev if dev == names.IPIP_IFACE else None, bool(r.onlink)))
        snapshot = tuple(sorted(adopted, key=lambda t: (int(t[0].network_address), t[0].prefixlen)))
        self._last_routes = snapshot
        self._submit([BgpRoutesUpdate(snapshot)])
        return len(snapshot)

    def _maybe_release(self) -> bool:
        if not self._routes_released and (
                self.speaker.synced or time.monotonic() - self._started > self.sync_timeout):
            self._routes_released = True
            if not self.speaker.synced:
                log.warning("BGP: speaker not synced after %.0fs; programming what it has", self.sync_timeout)
        return self._routes_released

    def pools_changed(self) -> None:
        self._on_change()

    def _set_config(self, cfg: LocalBgpConfig | None) -> None:
        if cfg == self.config:
            return
        self.config = cfg
        if cfg is None:
            log.info("BGP: this node has no IPv4 address or BGP is off; no sessions")
            self.speaker.set_peers([])
            return
        conf = exabgp_conf.render_config(cfg, relay_argv=self.relay_argv)
        env = exabgp_conf.render_env(bind_ip=str(cfg.local_ip), port=cfg.listen_port)
        if sidecar.write_config(self.bgp_dir, conf, env):
            log.info("BGP: wrote ExaBGP config for %d peers (AS %d, router id %s)", len(cfg.peers), cfg.asn,
                     cfg.router_id)
        self.speaker.set_peers(cfg.peers)
        self._on_change()

    def _on_change(self) -> None:
        if self._publish_scheduled:
            return
        self._publish_scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self._publish)
        except RuntimeError:  # no loop (unit tests): publish inline
            self._publish()

    # -- outputs ------------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._publish_scheduled = False
        learned = self.speaker.learned()
        host = self._host
        my_subnet = host.node_ip if host is not None else None
        mine = [] if host is None else [a for a in (host.node_ip.ip if host.node_ip else None,
                                                    host.vxlan_tunnel_ip, host.ipip_tunnel_ip) if a is not None]
        pools = list(self._pools())
        ipip = self._ipip_available()
        inputs = (pools, my_subnet, self._announce, self._reject, ipip, mine)
        if inputs != self._decided_inputs:
            self._decided_inputs = inputs
            self._decided = {}
        decided = self._decided
        # Only prefixes that are new or changed next hop go through the rules again (each is decided alone).
        changed = {net: nh for net, nh in learned.items() if (d := decided.get(net)) is None or d[0] != nh}
        if len(decided) + len(changed) > len(learned):  # else no decided prefix can be missing from learned
            for net in [n for n in decided if n not in learned]:
                del decided[net]
        if changed:
            new = routes.kernel_routes(changed, pools, my_subnet=my_subnet, local_blocks=self._announce,
                                       reject_cidrs=self._reject, ipip_available=ipip, my_addresses=mine)
            for net, nh in changed.items():
                decided[net] = (nh, new.get(net))
        snapshot = tuple(sorted(((kr.dst, kr.gateway, kr.device, kr.onlink) for _nh, kr in decided.values()
                                 if kr is not None),
                                key=lambda t: (int(t[0].network_address), t[0].prefixlen)))
        if self._maybe_release() and snapshot != self._last_routes:
            self._last_routes = snapshot
            self._submit([BgpRoutesUpdate(snapshot)])
        self._write_status(len(learned), len(snapshot))

    def status(self) -> dict[str, Any]:
        peers = []
        for p in self.speaker.peer_status():
            peers.append({"address": str(p.address), "name": p.name, "state": p.state,
                          "since": p.since, "info": p.last_reason, "received": p.received, "stale": p.stale})
        cfg = self.config
        return {"time": time.time(), "connected": self.speaker.connected,
                "asn": cfg.asn if cfg else None, "router_id": str(cfg.router_id) if cfg else None,
                "announced": sorted(map(str, self._announce)), "peers": peers}

    def _write_status(self, learned: int, installed: int) -> None:
        st = self.status()
        st["learned"] = learned
        st["installed"] = installed
        path = os.path.join(self.bgp_dir, STATUS_NAME)
        try:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(st, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
        metrics.set_bgp_status(st["peers"], learned=learned, installed=installed)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.speaker.run(), name="bgp-speaker")
            tg.create_task(self._sync_watch(), name="bgp-sync-watch")

    async def _sync_watch(self) -> None:
        """Publish once when the speaker first syncs (or the timeout passes), then refresh the status file
        periodically so `since` and stale flags stay current for operators."""
        while not self._maybe_release():
            await asyncio.sleep(0.1)
        self._on_change()
        while True:
            await asyncio.sleep(5.0)
            self._on_change()
