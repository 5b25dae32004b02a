"""BGP calculator (pure): Nodes, BGPConfiguration, BGPPeers, IPPools and this node's blocks -> this
node's speaker config (:class:`BgpConfigUpdate`) and announcements (:class:`BgpAnnounceUpdate`).

Calico's peering rules live in :mod:`bgp.peers`, its export rules in :mod:`bgp.routes`; this class only
keeps their inputs and emits when the result changes. The state is small (one entry per node and per
peer resource), so it is recomputed wholesale on change, like confd re-renders BIRD's config.
"""

from __future__ import annotations

import ipaddress
import logging

from bgp import peers as bgp_peers
from bgp import routes as bgp_routes
from felixpy.calc.messages import BgpAnnounceUpdate, BgpConfigUpdate, Message
from felixpy.ipam.pools import IPPool

log = logging.getLogger(__name__)


class BgpCalculator:
    def __init__(self, node: str, *, router_id_setting: str = "", enabled: bool = True,
                 hold_time: int = 90) -> None:
        self.hold_time = hold_time
        self.node = node
        self.enabled = enabled
        self.router_id_setting = router_id_setting
        self.nodes: dict[str, bgp_peers.BgpNode] = {}
        self.configs: dict[str, bgp_peers.BgpGlobal] = {}  # BGPConfiguration by name
        self.peer_rules: dict[str, bgp_peers.BgpPeerRule] = {}
        self.pools: dict[str, IPPool] = {}
        self.local_blocks: set[ipaddress.IPv4Network] = set()
        self._dirty = True
        self._config: BgpConfigUpdate | None = None
        self._announce: BgpAnnounceUpdate | None = None

    def mark_dirty(self) -> None:
        self._dirty = True

    def flush(self) -> list[Message]:
        if not self._dirty or not self.enabled:
            return []
        self._dirty = False
        out: list[Message] = []
        glob = self.configs.get("default")
        node_cfg = self.configs.get(f"node.{self.node}")
        local = bgp_peers.compute_local_config(self.node, self.nodes, glob, node_cfg,
                                               [self.peer_rules[k] for k in sorted(self.peer_rules)],
                                               router_id_setting=self.router_id_setting,
                                               node_cfgs=[self.configs[k] for k in sorted(self.configs)],
                                               hold_time=self.hold_time)
        cfg_msg = BgpConfigUpdate(local)
        if cfg_msg != self._config:
            self._config = cfg_msg
            out.append(cfg_msg)
        pools = [bgp_routes.pool_info(p) for p in self.pools.values()]
        prefixes = bgp_routes.announcements(sorted(self.local_blocks, key=str), pools, glob)
        reject = bgp_routes.service_cidrs(glob)
        ann = BgpAnnounceUpdate(frozenset(p for p in prefixes if p.version == 4),
                                frozenset(c for c in reject if c.version == 4))
        if ann != self._announce:
            self._announce = ann
            out.append(ann)
        return out
