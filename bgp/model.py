"""Shared BGP value types (pure): what the peer computation produces and the speaker/renderers consume.

This module is the contract between ``bgp.peers`` (Calico's peering rules), ``bgp.exabgp_conf`` /
``bgp.bird_conf`` (renderers), ``bgp.speaker`` (the ExaBGP API client) and the agent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

DEFAULT_ASN = 64512
DEFAULT_GR_TIME = 120  # seconds; BIRD's default restart time, what Calico nodes advertise
DEFAULT_HOLD_TIME = 90  # seconds; keepalive = hold / 3
BGP_PORT = 179


@dataclass(frozen=True)
class BgpNode:
    """One Calico Node as far as BGP cares (from spec.bgp and metadata.labels)."""

    name: str
    ipv4: ipaddress.IPv4Interface | None  # spec.bgp.ipv4Address (address/prefix of the node's subnet)
    asn: int | None = None  # spec.bgp.asNumber; None = the global AS
    rr_cluster_id: str = ""  # spec.bgp.routeReflectorClusterID; non-empty = this node is a reflector
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PeerSpec:
    """One BGP session this node should have. ``name`` follows Calico's protocol names
    (``Mesh_10_0_0_2``, ``Global_10_0_0_9``, ``Node_10_0_0_9``, ``..._port_1790``)."""

    name: str
    address: ipaddress.IPv4Address
    asn: int
    local_asn: int
    port: int = BGP_PORT
    passive: bool = False  # Calico: the side with the higher address (string compare) is passive in a mesh
    rr_client: bool = False  # we are a reflector and this peer is our client
    rr_cluster_id: str = ""
    graceful_restart_time: int = DEFAULT_GR_TIME
    hold_time: int = DEFAULT_HOLD_TIME
    keepalive_time: int | None = None
    next_hop_keep: bool = False
    source_address: ipaddress.IPv4Address | None = None  # None = the node IP
    password: str = ""
    # Added for bgp.peers / bgp.bird_conf (defaults keep older constructors valid):
    kind: str = ""  # "mesh" | "global" | "node": where the session came from (Calico's protocol name prefix)
    next_hop_self: bool = False  # BGPPeer nextHopMode: Self
    ttl_security: int = 0  # BGPPeer ttlSecurity hop count; 0 = off (plain multihop)
    num_allow_local_as: int = 0  # BGPPeer numAllowedLocalASNumbers


@dataclass(frozen=True)
class LocalBgpConfig:
    """What this node's speaker is: identity plus the sessions it should hold."""

    node: str
    router_id: ipaddress.IPv4Address
    local_ip: ipaddress.IPv4Address
    asn: int
    peers: tuple[PeerSpec, ...] = ()
    listen_port: int = BGP_PORT
    hold_time: int = DEFAULT_HOLD_TIME
    graceful_restart_time: int = DEFAULT_GR_TIME
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    # Added for bgp.peers / bgp.bird_conf (defaults keep older constructors valid):
    log_level: str = "info"  # BGPConfiguration logSeverityScreen as confd reduces it: debug | info | none
    listen_address: ipaddress.IPv4Address | None = None  # set when BGPConfiguration bindMode is NodeIP
