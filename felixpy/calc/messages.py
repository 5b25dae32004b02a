"""Dataplane messages: the plain, serialisable output of the calculation layer."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from felixpy.datastore.api import Key


@dataclass(frozen=True)
class WorkloadEndpointUpdate:
    key: Key
    iface: str
    ipv4_nets: tuple[ipaddress.IPv4Network, ...]
    mac: str
    container_id: str


@dataclass(frozen=True)
class WorkloadEndpointRemove:
    key: Key


@dataclass(frozen=True)
class LocalBlockUpdate:
    """An IPAM block affine to this node: gets a blackhole route so unused addresses never leak out."""

    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LocalBlockRemove:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class InSync:
    """The datastore view is complete: drivers may now remove stale kernel objects they own."""


Message = WorkloadEndpointUpdate | WorkloadEndpointRemove | LocalBlockUpdate | LocalBlockRemove | InSync
