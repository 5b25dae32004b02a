"""Prometheus metrics (the only importer of prometheus_client). Felix's names where Felix has them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

apply_time = Summary("felix_int_dataplane_apply_time_seconds",
                     "Time in seconds for each dataplane apply.", registry=REGISTRY)
dataplane_failures = Counter("felix_int_dataplane_failures",
                             "Number of dataplane apply failures.", registry=REGISTRY)
dataplane_messages = Counter("felix_int_dataplane_messages",
                             "Dataplane messages by type.", ["type"], registry=REGISTRY)
active_local_endpoints = Gauge("felix_active_local_endpoints",
                               "Number of active endpoints on this host.", registry=REGISTRY)
route_table_routes = Gauge("felix_route_table_num_routes",
                           "Number of routes the agent owns in the main route table.", registry=REGISTRY)
route_table_resync = Summary("felix_route_table_resync_seconds",
                             "Time taken to dump and reconcile the route table.", registry=REGISTRY)
resync_state = Gauge("felix_resync_state", "Datastore sync state: 1 wait, 2 resync, 3 in-sync.",
                     registry=REGISTRY)
calc_update_time = Summary("felix_calc_graph_update_time_seconds",
                           "Time to process a batch of datastore updates.", registry=REGISTRY)
calc_updates = Counter("felix_calc_graph_updates_processed",
                       "Datastore updates processed by the calculation layer.", registry=REGISTRY)
local_blocks = Gauge("felixpy_local_ipam_blocks", "IPAM blocks affine to this node.", registry=REGISTRY)
cni_requests = Counter("felixpy_cni_requests", "CNI requests handled by the agent.",
                       ["command", "result"], registry=REGISTRY)
cni_latency = Histogram("felixpy_cni_request_seconds", "Agent-side CNI request latency.", ["command"],
                        buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                        registry=REGISTRY)
invalid_resources = Counter("felixpy_invalid_resources", "Malformed datastore resources skipped.",
                            registry=REGISTRY)
kernel_capability = Gauge("felixpy_kernel_capability", "Kernel features detected (1 present, 0 absent).",
                          ["feature"], registry=REGISTRY)
bgp_peer_up = Gauge("felixpy_bgp_peer_established", "1 when the BGP session to the peer is established.",
                    ["peer", "name"], registry=REGISTRY)
bgp_peer_received = Gauge("felixpy_bgp_peer_prefixes_received", "Prefixes received from the BGP peer.",
                          ["peer", "name"], registry=REGISTRY)
bgp_routes_learned = Gauge("felixpy_bgp_routes_learned", "Prefixes learned over BGP (best paths).",
                           registry=REGISTRY)
bgp_routes_installed = Gauge("felixpy_bgp_routes_installed",
                             "BGP-learned prefixes that passed the import rules.", registry=REGISTRY)
_bgp_peers_seen: set[tuple[str, str]] = set()


def set_bgp_status(peers: list[dict[str, object]], *, learned: int, installed: int) -> None:
    global _bgp_peers_seen
    seen = set()
    for p in peers:
        labels = (str(p.get("address")), str(p.get("name")))
        seen.add(labels)
        bgp_peer_up.labels(*labels).set(1 if p.get("state") == "established" else 0)
        received = p.get("received")
        bgp_peer_received.labels(*labels).set(float(received) if isinstance(received, int | float) else 0.0)
    for labels in _bgp_peers_seen - seen:  # peers that were removed from the config
        bgp_peer_up.remove(*labels)
        bgp_peer_received.remove(*labels)
    _bgp_peers_seen = seen
    bgp_routes_learned.set(learned)
    bgp_routes_installed.set(installed)


# Policy drops, read from the kernel's per-rule counters by the policy manager (felixpy extension:
# Felix has no per-policy drop counter). Labels: the tier and policy (or "profile"/"default-deny"), the
# direction, and the endpoint's "<namespace>/<pod>" when the drop is the endpoint's own default deny.
policy_dropped_packets = Gauge("felixpy_policy_dropped_packets", "Packets dropped by a policy (kernel counter).",
                               ["tier", "policy", "direction"], registry=REGISTRY)
policy_dropped_bytes = Gauge("felixpy_policy_dropped_bytes", "Bytes dropped by a policy (kernel counter).",
                             ["tier", "policy", "direction"], registry=REGISTRY)
_policy_drop_seen: set[tuple[str, str, str]] = set()


def set_policy_drops(rows: dict[tuple[str, str, str], tuple[int, int]]) -> None:
    """Replace the drop counters: ``{(tier, policy, direction): (packets, bytes)}`` (absent rows are removed)."""
    global _policy_drop_seen
    for labels, (pkts, nbytes) in rows.items():
        policy_dropped_packets.labels(*labels).set(pkts)
        policy_dropped_bytes.labels(*labels).set(nbytes)
    for labels in _policy_drop_seen - rows.keys():
        policy_dropped_packets.remove(*labels)
        policy_dropped_bytes.remove(*labels)
    _policy_drop_seen = set(rows)


def render() -> bytes:
    return generate_latest(REGISTRY)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
