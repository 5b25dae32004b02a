"""IP pool parsing/validation and calico-node's default-pool rule (felixpy.ipam.pools)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from felixpy.datastore.api import KIND_IPPOOL, Key, new_resource
from felixpy.datastore.memory import MemoryBackend
from felixpy.ipam.pools import (
    DEFAULT_IPV4_POOL_NAME,
    InvalidPoolError,
    IPPool,
    ensure_default_pool,
    parse_encap_mode,
    parse_pool,
)


def pool(name: str = "p", **spec: Any) -> dict[str, Any]:
    return new_resource(Key(KIND_IPPOOL, name), spec)


def test_parse_pool_defaults() -> None:
    p = parse_pool(pool(cidr="10.244.0.0/16"))
    assert p == IPPool(name="p", cidr=ipaddress.IPv4Network("10.244.0.0/16"), block_size=26)
    assert p.allowed_uses == ("Workload", "Tunnel") and p.assignment_mode == "Automatic"
    assert p.node_selector == "all()" and p.selects_node({}) and p.allows("Tunnel")
    v6 = parse_pool(pool(cidr="fd00:10::/64"))
    assert v6.block_size == 122 and v6.version == 6
    # Host bits are masked like Calico's ParseCIDR.
    assert str(parse_pool(pool(cidr="10.244.3.4/16")).cidr) == "10.244.0.0/16"


def test_parse_pool_fields() -> None:
    p = parse_pool(pool(cidr="10.1.0.0/16", blockSize=28, ipipMode="CrossSubnet", natOutgoing=True,
                        disabled=True, disableBGPExport=True, nodeSelector='zone == "a"',
                        allowedUses=["Tunnel"], assignmentMode="Manual"))
    assert (p.block_size, p.ipip_mode, p.vxlan_mode) == (28, "CrossSubnet", "Never")
    assert p.nat_outgoing and p.disabled and p.disable_bgp_export
    assert p.selects_node({"zone": "a"}) and not p.selects_node({"zone": "b"})
    assert not p.allows("Workload") and p.assignment_mode == "Manual"
    assert parse_pool({"kind": "IPPool", "metadata": {"name": "x"}, "spec": p.to_spec()}) == \
        IPPool(**{**p.__dict__, "name": "x"})


@pytest.mark.parametrize("spec, message", [
    ({"cidr": "nonsense"}, "invalid cidr"),
    ({"cidr": "10.0.0.0/16", "blockSize": 19}, "block size 19 is outside 20..32"),
    ({"cidr": "10.0.0.0/28", "blockSize": 26}, "smaller than one block"),
    ({"cidr": "169.254.0.0/16"}, "link-local"),
    ({"cidr": "10.0.0.0/16", "ipipMode": "Always", "vxlanMode": "Always"}, "cannot both be enabled"),
    ({"cidr": "10.0.0.0/16", "vxlanMode": "sometimes"}, "vxlanMode must be one of"),
    ({"cidr": "10.0.0.0/16", "nodeSelector": "zone =="}, "invalid nodeSelector"),
    ({"cidr": "10.0.0.0/16", "allowedUses": ["Everything"]}, "allowedUses"),
    ({"cidr": "10.0.0.0/16", "assignmentMode": "Sometimes"}, "assignmentMode"),
    ({"cidr": "10.0.0.0/16", "natOutgoing": "yes"}, "natOutgoing must be a boolean"),
    ({"cidr": "fd00::/64", "ipipMode": "Always"}, "IPIP is not supported on an IPv6 pool"),
])
def test_parse_pool_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPoolError, match=message):
        parse_pool(pool("bad", **spec))


def test_parse_pool_rejects_non_pools() -> None:
    with pytest.raises(InvalidPoolError, match="not an IPPool"):
        parse_pool({"kind": "Node", "metadata": {"name": "x"}, "spec": {"cidr": "10.0.0.0/16"}})
    with pytest.raises(InvalidPoolError, match="spec is missing"):
        parse_pool({"kind": "IPPool", "metadata": {"name": "x"}})


def test_parse_encap_mode_is_calico_node_lenient() -> None:
    assert [parse_encap_mode(v, "X") for v in ("", "off", "Never", "always", "CrossSubnet", "cross-subnet")] == \
        ["Never", "Never", "Never", "Always", "CrossSubnet", "CrossSubnet"]
    with pytest.raises(InvalidPoolError, match="CALICO_IPV4POOL_IPIP: unrecognised mode 'maybe'"):
        parse_encap_mode("maybe", "CALICO_IPV4POOL_IPIP")


async def test_ensure_default_pool_creates_only_without_an_ipv4_pool() -> None:
    b = MemoryBackend()
    created = await ensure_default_pool(b, cidr="10.244.0.0/16", ipip_mode="Always")
    assert created is not None and created.name == DEFAULT_IPV4_POOL_NAME
    kv = b.raw().get(Key(KIND_IPPOOL, DEFAULT_IPV4_POOL_NAME))
    assert kv.value["spec"] == {"cidr": "10.244.0.0/16", "blockSize": 26, "ipipMode": "Always",
                                "vxlanMode": "Never", "natOutgoing": True, "nodeSelector": "all()",
                                "allowedUses": ["Workload", "Tunnel"], "assignmentMode": "Automatic"}
    # Running again (or on another node) changes nothing.
    assert await ensure_default_pool(b, cidr="10.99.0.0/16") is None
    assert len(b.raw().items(KIND_IPPOOL)) == 1


async def test_ensure_default_pool_respects_existing_pools() -> None:
    b = MemoryBackend()
    k = Key(KIND_IPPOOL, "admin-pool")
    await b.create(k, new_resource(k, {"cidr": "10.5.0.0/16", "disabled": True}))
    assert await ensure_default_pool(b, cidr="10.244.0.0/16") is None  # a disabled v4 pool counts
    b2 = MemoryBackend()
    k6 = Key(KIND_IPPOOL, "v6")
    await b2.create(k6, new_resource(k6, {"cidr": "fd00::/48"}))
    assert await ensure_default_pool(b2, cidr="10.244.0.0/16") is not None  # only a v6 pool: create


@pytest.mark.parametrize("kwargs, message", [
    ({"cidr": "300.0.0.0/8"}, "CALICO_IPV4POOL_CIDR: invalid CIDR"),
    ({"cidr": "fd00::/48"}, "not an IPv4 CIDR"),
    ({"cidr": "10.0.0.0/16", "block_size": 33}, "block size 33"),
    ({"cidr": "10.0.0.0/27", "block_size": 26}, "smaller than one block"),
    ({"cidr": "10.0.0.0/16", "ipip_mode": "Always", "vxlan_mode": "CrossSubnet"}, "cannot both be enabled"),
    ({"cidr": "10.0.0.0/16", "vxlan_mode": "yes"}, "CALICO_IPV4POOL_VXLAN"),
    ({"cidr": "10.0.0.0/16", "node_selector": "a =="}, "CALICO_IPV4POOL_NODE_SELECTOR"),
])
async def test_ensure_default_pool_validates_before_writing(kwargs: dict[str, Any], message: str) -> None:
    b = MemoryBackend()
    with pytest.raises(InvalidPoolError, match=message):
        await ensure_default_pool(b, **kwargs)
    assert b.raw().items(KIND_IPPOOL) == [] and b.ops() == 0
