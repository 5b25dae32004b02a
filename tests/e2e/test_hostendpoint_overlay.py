"""A deny-all host endpoint policy on every node's uplink must not cut the pod network between nodes.

Two nodes, VXLAN Always, etcd datastore, policy on (nftables). Each node gets a HostEndpoint for ``eth0``
and one GlobalNetworkPolicy selecting them denies everything. Felix's overlay allowances (accept VXLAN from
and to the all-hosts set before host endpoint policy) keep pods pinging across nodes, while a host port
(8080) between the nodes is closed by the same policy."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from felixpy.dataplane.shims.netns import in_netns
from felixpy.datastore.api import KIND_GLOBAL_NETWORK_POLICY, KIND_HOST_ENDPOINT
from tests.e2e.multinode import Cluster

pytestmark = [pytest.mark.root, pytest.mark.realparts, pytest.mark.timeout(600)]

HOST_PORT = 8080
LABEL = "e2e-hep-overlay"


def _create(c: Cluster, kind: str, name: str, spec: dict[str, Any], labels: dict[str, str]) -> None:
    from felixpy.datastore.api import Key, new_resource

    async def go(b: Any) -> None:
        key = Key(kind, name)
        await b.create(key, new_resource(key, spec, labels=labels))

    c.with_backend(go)


def _host_tcp(c: Cluster, src: int, dst: int) -> bool:
    """Node ``src`` connects to node ``dst``'s address on HOST_PORT (host to host, through eth0)."""
    with in_netns(f"/run/netns/{c.node(src).netns}"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((c.node(dst).ip, HOST_PORT))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(mode="vxlan", nodes=2, datastore="etcdv3", agent_env={"FELIXPY_POLICY": "enabled"}) as c:
        c.require_vxlan_device()
        yield c


def test_pods_ping_across_nodes_through_deny_all_host_endpoints(cluster: Cluster) -> None:
    c = cluster
    a, b = c.add_pod(1), c.add_pod(2)
    listeners = []
    try:
        with in_netns(f"/run/netns/{c.node(1).netns}"):
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listeners.append(srv)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", HOST_PORT))
        srv.listen(16)
        assert c.wait_for(lambda: c.ping(a, b) and c.ping(b, a), timeout=60.0), c.diagnostics()
        assert _host_tcp(c, 2, 1), "host port open before any host endpoint"

        for i in (1, 2):
            node = c.node(i).name
            _create(c, KIND_HOST_ENDPOINT, f"{node}-eth0", {"node": node, "interfaceName": "eth0"}, {LABEL: "yes"})
        _create(c, KIND_GLOBAL_NETWORK_POLICY, "deny-hosts",
                {"selector": f"{LABEL} == 'yes'", "types": ["Ingress", "Egress"]}, {})
        # The policy is in force once the host port closes (each node denies in and out).
        assert c.wait_for(lambda: not _host_tcp(c, 2, 1), timeout=60.0), c.diagnostics()
        for i in (1, 2):
            rules = c.ruleset(i)
            assert "filter-cali-fh-eth0" in rules and "cali40all-hosts-net" in rules, rules
            # Both nodes' addresses are the allowed VXLAN sources.
            assert c.node(1).ip in rules and c.node(2).ip in rules, rules
        assert not _host_tcp(c, 1, 2)
        # The overlay between the nodes still carries pod traffic, both ways.
        assert c.ping(a, b, count=3) and c.ping(b, a, count=3), c.diagnostics()
    finally:
        for s in listeners:
            s.close()
