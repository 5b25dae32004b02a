"""Prometheus metrics (the only importer of prometheus_client). Felix's names where Felix has them."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

apply_time = Summary("felix_int_dataplane_apply_time_seconds",
                     "Time in seconds for each dataplane apply.", registry=REGISTRY)
# Go's client exposes Felix's counters without the "_total" suffix prometheus_client adds to a Counter; a Gauge
# that only goes up keeps Felix's exact series names, so Felix dashboards and alerts work unchanged.
dataplane_failures = Gauge("felix_int_dataplane_failures",
                           "Number of dataplane apply failures.", registry=REGISTRY)
dataplane_messages = Gauge("felix_int_dataplane_messages",
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
calc_updates = Gauge("felix_calc_graph_updates_processed",
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

# Felix's cluster and policy gauges (same names and meaning).
active_local_policies = Gauge("felix_active_local_policies",
                              "Number of policies that apply to at least one local endpoint.", registry=REGISTRY)
active_local_profiles = Gauge("felixpy_active_local_profiles",
                              "Number of profiles used by local endpoints.", registry=REGISTRY)
ipsets_total = Gauge("felix_ipsets_total", "Number of IP sets the agent programs.", registry=REGISTRY)
cluster_num_hosts = Gauge("felix_cluster_num_hosts", "Number of Calico Nodes in the cluster.", registry=REGISTRY)
cluster_num_weps = Gauge("felix_cluster_num_workload_endpoints",
                         "Number of workload endpoints the agent sees (cluster-wide with policy on, else local).",
                         registry=REGISTRY)
cluster_num_policies = Gauge("felix_cluster_num_policies", "Number of policies in the cluster.", registry=REGISTRY)
cluster_num_profiles = Gauge("felix_cluster_num_profiles", "Number of profiles in the cluster.", registry=REGISTRY)
# felixpy extensions.
time_to_policy = Histogram(
    "felixpy_time_to_policy_seconds",
    "From a datastore update (policy or endpoint) entering the calculation layer to the end of the "
    "successful dataplane apply that made it effective.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
datastore_errors = Counter("felixpy_datastore_errors", "Datastore list/watch errors (each is retried).",
                           registry=REGISTRY)
ipam_pool_addresses = Gauge("felixpy_ipam_pool_addresses",
                            "Addresses per IP pool: state=total (pool size), in_blocks (covered by allocated "
                            "blocks), allocated (assigned to pods, tunnels ...), free (total - allocated).",
                            ["pool", "state"], registry=REGISTRY)
ipam_pool_blocks = Gauge("felixpy_ipam_pool_blocks", "IPAM blocks allocated from the pool.", ["pool"],
                         registry=REGISTRY)
ipam_local_addresses = Gauge("felixpy_ipam_local_addresses",
                             "Addresses in this node's affine blocks: state=total or allocated.", ["state"],
                             registry=REGISTRY)
bgp_peer_state = Gauge("felixpy_bgp_peer_state",
                       "1 for the session's current state (idle, connect, established, down), 0 otherwise.",
                       ["peer", "name", "state"], registry=REGISTRY)
bgp_peer_since = Gauge("felixpy_bgp_peer_state_since_seconds",
                       "Unix time of the session's last state change.", ["peer", "name"], registry=REGISTRY)
BGP_STATES = ("idle", "connect", "established", "down")
_ipam_pools_seen: set[str] = set()


def set_bgp_status(peers: list[dict[str, object]], *, learned: int, installed: int) -> None:
    global _bgp_peers_seen
    seen = set()
    for p in peers:
        labels = (str(p.get("address")), str(p.get("name")))
        seen.add(labels)
        bgp_peer_up.labels(*labels).set(1 if p.get("state") == "established" else 0)
        received = p.get("received")
        bgp_peer_received.labels(*labels).set(float(received) if isinstance(received, int | float) else 0.0)
        for state in BGP_STATES:
            bgp_peer_state.labels(*labels, state).set(1 if p.get("state") == state else 0)
        since = p.get("since")
        if isinstance(since, int | float):
            bgp_peer_since.labels(*labels).set(since)
    for labels in _bgp_peers_seen - seen:  # peers that were removed from the config
        bgp_peer_up.remove(*labels)
        bgp_peer_received.remove(*labels)
        for state in BGP_STATES:
            bgp_peer_state.remove(*labels, state)
        with contextlib.suppress(KeyError):
            bgp_peer_since.remove(*labels)
    _bgp_peers_seen = seen
    bgp_routes_learned.set(learned)
    bgp_routes_installed.set(installed)


# Policy drops, read from the kernel's per-rule counters by the policy manager (felixpy extension: Felix has
# no per-policy drop counter). Labels: the tier ("" outside tiers), the policy (its id such as
# "knp/<ns>/<name>", "end-of-tier", "profile/<name>" or "no-profile-matched") and the direction.
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


def set_ipam_usage(pools: dict[str, tuple[int, int, int, int]], local: tuple[int, int]) -> None:
    """``pools``: ``{pool cidr: (total, in_blocks, allocated, blocks)}``; ``local``: (total, allocated) of this
    node's affine blocks. Pools no longer present are removed."""
    global _ipam_pools_seen
    for pool, (total, in_blocks, allocated, blocks) in pools.items():
        for state, v in (("total", total), ("in_blocks", in_blocks), ("allocated", allocated),
                         ("free", total - allocated)):
            ipam_pool_addresses.labels(pool, state).set(v)
        ipam_pool_blocks.labels(pool).set(blocks)
    for pool in _ipam_pools_seen - pools.keys():
        for state in ("total", "in_blocks", "allocated", "free"):
            ipam_pool_addresses.remove(pool, state)
        ipam_pool_blocks.remove(pool)
    _ipam_pools_seen = set(pools)
    ipam_local_addresses.labels("total").set(local[0])
    ipam_local_addresses.labels("allocated").set(local[1])


def sample(name: str, labels: dict[str, str] | None = None) -> float | None:
    """The current value of one exported sample (e.g. ``felix_int_dataplane_failures_total``), None if absent."""
    return REGISTRY.get_sample_value(name, labels or {})


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created")}


def exported_names() -> frozenset[str]:
    """Every series name the agent can export (the dashboard test checks its expressions against these)."""
    out = set()
    for fam in REGISTRY.collect():
        suffixes = _SUFFIXES.get(fam.type, ())
        out.add(fam.name)  # a histogram's/summary's base name is valid too (e.g. in a dashboard's legend)
        out.update(fam.name + sfx for sfx in suffixes)
    return frozenset(out)


def render() -> bytes:
    return generate_latest(REGISTRY)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
