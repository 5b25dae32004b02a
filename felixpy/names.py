"""Kernel object names and ownership markers: the one table of who owns what.

These values are the ownership key across agent versions and match Calico's, so that felixpy can take
over a node from calico-node (and back). Never change them.

| kernel object                          | owner                                  | marker                         |
|----------------------------------------|----------------------------------------|--------------------------------|
| links ``cali*``                        | CNI path creates, agent adopts         | name prefix ``cali``           |
| routes on ``cali*`` links (main table) | dataplane route driver (endpoints)     | oif is a ``cali*`` link        |
| blackhole routes for affine blocks     | dataplane route driver (blocks)        | ``proto 80``, type blackhole   |
| routes learned over BGP                | BGP route manager (route driver)       | ``proto 12`` (bird)            |
| routes on ``vxlan.calico``, ``tunl0``  | tunnel managers (route driver)         | link name (and ``proto 80``)   |
| ``vxlan.calico`` link, its ARP and FDB | VXLAN device driver                    | link name                      |
| ``tunl0`` address and MTU              | IPIP device driver                     | link name                      |
| nft table ``ip calico``                | nftables driver (NAT and policy)       | table name, ``cali:`` hashes   |
"""

from __future__ import annotations

import hashlib

IFACE_PREFIX = "cali"
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"
POD_GATEWAY = "169.254.1.1"

# Route protocol numbers (rtnetlink rtm_protocol).
RTPROT_BOOT = 3
RTPROT_FELIX = 80  # Felix's own protocol: workload and blackhole routes we program
RTPROT_BIRD = 12  # routes learned from BGP peers

VXLAN_IFACE = "vxlan.calico"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
IPIP_IFACE = "tunl0"

# CNI / IPAM identifiers.
DEFAULT_NETWORK_NAME = "k8s-pod-network"
MTU_FILE = "/var/lib/calico/mtu"
NODENAME_FILE = "/var/lib/calico/nodename"
DEFAULT_CNI_SOCKET = "/var/run/calico/felixpy-cni.sock"


def veth_name_for_workload(namespace: str, pod: str, prefix: str = IFACE_PREFIX) -> str:
    """Calico's host-side veth name: prefix + first 11 hex digits of sha1("<namespace>.<pod>")."""
    return prefix + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def veth_name_for_container(container_id: str, prefix: str = IFACE_PREFIX) -> str:
    """Non-Kubernetes orchestrators: prefix + first 11 characters of the container ID."""
    return prefix + container_id[:11]


def ipam_handle(network_name: str, container_id: str) -> str:
    return f"{network_name}.{container_id}"


def wep_name(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """Calico's WorkloadEndpoint name: segments joined by '-' with every '-' inside a segment doubled."""
    return "-".join(s.replace("-", "--") for s in (node, orchestrator, workload, endpoint))


def vtep_mac(nodename: str) -> str:
    """Calico's VTEP MAC when the Node has none: 0x66 ('f') then the first 5 bytes of sha1(nodename)."""
    b = b"f" + hashlib.sha1(nodename.encode()).digest()[:5]
    return ":".join(f"{x:02x}" for x in b)


VXLAN_TUNNEL_HANDLE = "vxlan-tunnel-addr-{node}"  # IPAM handles of the tunnel addresses, as Calico names them
IPIP_TUNNEL_HANDLE = "ipip-tunnel-addr-{node}"
