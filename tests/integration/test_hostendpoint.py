"""HostEndpoints and failsafe ports with real packets, on nftables and on iptables (legacy and nft).

The whole policy pipeline runs: HostEndpoint / GlobalNetworkPolicy / Profile resources are parsed
(felixpy.model.policy_parse), the PolicyCalculator selects, the PolicyManager renders into the kernel.

Topology: a "node" namespace with ``eth0`` 10.66.0.1/24, a veth to a "client" namespace (10.66.0.2/24,
default route via the node), and a pod 10.65.0.2 behind ``calia`` (its own namespace, wired as Calico's
CNI does). Listeners: the node on 22 (a failsafe port), 8080 and 9090; the client on TCP 6443 (outbound
failsafe) and 9999, UDP 53 (outbound failsafe) and 5353; the pod on 8080. A connection that fails (1 s
timeout, or EPERM for a locally generated packet) was dropped. Each test removes its namespaces, and
every chain, hook, set and table it made."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from felixpy.calc.graph import CalcGraph
from felixpy.calc.policy import PolicyCalculator
from felixpy.dataplane.drivers.iptables import IptablesDataplane
from felixpy.dataplane.drivers.nftables import NftTable
from felixpy.dataplane.masq_mgr import make_nat_backend
from felixpy.dataplane.policy_mgr import PolicyManager
from felixpy.dataplane.policy_render import RenderOptions
from felixpy.dataplane.shims.netns import in_netns, write_sysctl
from felixpy.dataplane.shims.nft import Nft
from felixpy.datastore.api import KIND_IPPOOL, KIND_NODE, Key
from felixpy.datastore.syncer import Update
from felixpy.model.policy import HEP_ID_PREFIX, LABEL_NAMESPACE
from felixpy.model.policy_parse import endpoint_labels, parse_host_endpoint, parse_policy, parse_profile
from tests.integration.test_policy_mgr import tcp_connects

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxhep{os.getpid() % 100000}{secrets.token_hex(2)}"
NODE_IP, CLIENT_IP, POD_IP = "10.66.0.1", "10.66.0.2", "10.65.0.2"
NODE = "node1"
# Small failsafe lists so the test proves the configured ones are used (22 in, 6443/53 out).
OPTS = RenderOptions(failsafe_inbound=("tcp:22",), failsafe_outbound=("tcp:6443", "udp:53"))
PROFILE = {"kind": "Profile", "metadata": {"name": "kns.ns1"},
           "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def hep(iface: str = "eth0") -> dict[str, Any]:
    return {"kind": "HostEndpoint", "metadata": {"name": "node1-eth0", "labels": {"role": "node"}},
            "spec": {"node": NODE, "interfaceName": iface, "expectedIPs": [NODE_IP]}}


def gnp(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "GlobalNetworkPolicy", "metadata": {"name": name}, "spec": spec}


DENY_ALL = gnp("deny-node", selector="role == 'node'", order=100, types=["Ingress", "Egress"])
ALLOW_8080 = gnp("allow-8080", selector="role == 'node'", order=10, types=["Ingress"],
                 ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [8080]}}])
FWD_DENY = gnp("fwd-deny", selector="role == 'node'", order=5, applyOnForward=True, types=["Ingress"],
               ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}}])


@dataclass
class Lab:
    backend: str
    ns: dict[str, str]  # "node" / "client" / "pod" -> netns name
    mgr: PolicyManager
    apply: Callable[[], None]
    calc: PolicyCalculator = field(default_factory=PolicyCalculator)
    servers: list[socket.socket] = field(default_factory=list)

    def sync(self) -> None:
        for m in self.calc.flush():
            self.mgr.on_update(m)
        self.mgr.complete_deferred_work()
        self.apply()
        assert self.mgr.errors == {} and self.calc.invalid_inputs == 0

    def set_hep(self, res: dict[str, Any] | None) -> None:
        if res is None:
            self.calc.remove_endpoint(HEP_ID_PREFIX + "node1-eth0")
        else:
            h = parse_host_endpoint(res)
            self.calc.set_endpoint(HEP_ID_PREFIX + h.name, local=h.node == NODE, iface=h.iface,
                                   labels=dict(h.labels), profiles=h.profiles, addrs=(), host=True,
                                   name=HEP_ID_PREFIX + h.name)
        self.sync()

    def set_policy(self, res: dict[str, Any], present: bool = True) -> None:
        pol = parse_policy(res, "GlobalNetworkPolicy")
        self.calc.set_policy(pol.key, pol if present else None)
        self.sync()

    def serve(self, where: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with in_netns(f"/run/netns/{self.ns[where]}"):
            s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        self.servers.append(s)
        return s

    def tcp(self, src: str, dst_ip: str, port: int) -> bool:
        return tcp_connects(f"/run/netns/{self.ns[src]}", dst_ip, port)

    def udp(self, src: str, dst_ip: str, receiver: socket.socket) -> bool:
        """One datagram from ``src`` to the receiver's port at ``dst_ip``: did it arrive?"""
        token = secrets.token_bytes(8)
        with in_netns(f"/run/netns/{self.ns[src]}"):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.sendto(token, (dst_ip, receiver.getsockname()[1]))
        except OSError:
            return False  # dropped in OUTPUT: EPERM
        finally:
            c.close()
        receiver.settimeout(1.0)
        try:
            while True:
                data, _ = receiver.recvfrom(64)
                if data == token:
                    return True
        except (TimeoutError, OSError):
            return False


def _ipt_dataplane(node: str, backend: str) -> IptablesDataplane:
    dp, _masq = make_nat_backend("iptables", netns=f"/run/netns/{node}", iptables_backend=backend, with_filter=True)
    assert isinstance(dp, IptablesDataplane)
    return dp


BACKENDS = ["nft", "iptables-legacy", "iptables-nft"]


@contextlib.contextmanager
def host_lab(backend: str, make_ns: Callable[[], str], *, node_setup: Callable[[str], None] | None = None,
             profiles: Sequence[dict[str, Any]] = (PROFILE,)) -> Iterator[Lab]:
    """The node/client/pod topology with the whole policy pipeline on ``backend``; the pod is a local
    workload with the first of ``profiles`` (every profile is known to the calculator). ``node_setup(node)``
    runs after the wiring. On exit every chain, hook and set of ours must be gone (checked)."""
    ns = {"node": make_ns(), "client": make_ns(), "pod": make_ns()}
    node, client, pod = ns["node"], ns["client"], ns["pod"]
    for n in (node, client, pod):
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client)
    sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    sh("ip", "-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    sh("ip", "-n", node, "link", "set", "eth0", "up")
    sh("ip", "-n", client, "link", "set", "eth0", "up")
    sh("ip", "-n", client, "route", "add", "default", "via", NODE_IP)
    # The pod, as Calico's CNI wires it.
    sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "calia", "netns", node)
    sh("ip", "-n", pod, "addr", "add", f"{POD_IP}/32", "dev", "eth0")
    sh("ip", "-n", pod, "link", "set", "eth0", "up")
    sh("ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", node, "link", "set", "calia", "up")
    sh("ip", "-n", node, "route", "add", f"{POD_IP}/32", "dev", "calia", "scope", "link")
    sh("ip", "-n", node, "route", "add", "169.254.1.1/32", "dev", "lo")
    with in_netns(f"/run/netns/{node}"):
        write_sysctl("net/ipv4/ip_forward", 1)
        write_sysctl("net/ipv4/conf/calia/proxy_arp", 1)
        write_sysctl("net/ipv4/neigh/calia/proxy_delay", 0)
    if node_setup is not None:
        node_setup(node)

    cleanup: Callable[[], None]
    if backend == "nft":
        table = NftTable(Nft(f"/run/netns/{node}"), removals_allowed=True)
        mgr = PolicyManager(table, options=OPTS)

        def apply() -> None:
            stats = table.apply()
            assert not stats.failed, stats.failed

        cleanup = table.delete_table
    else:
        ipt_backend = backend.split("-")[1]
        dp = _ipt_dataplane(node, ipt_backend)
        dp.allow_removals()
        mgr = PolicyManager(dp, options=OPTS)

        def apply() -> None:
            stats = dp.apply()
            assert all(s.failed == {} for s in stats.values()), stats

        def cleanup() -> None:
            cleaner = _ipt_dataplane(node, ipt_backend)
            cleaner.allow_removals()
            cleaner.apply()
            for t in ("filter", "raw", "mangle"):
                out = sh("ip", "netns", "exec", node, f"iptables-{ipt_backend}-save", "-t", t)
                left = [ln for ln in out.splitlines() if "cali" in ln and not ln.startswith("#")]
                assert left == [], (t, left)
            sets = [s for s in sh("ip", "netns", "exec", node, "ipset", "list", "-n").split() if s.startswith("cali")]
            assert sets == [], sets

    lab = Lab(backend, ns, mgr, apply)
    parsed = [parse_profile(p) for p in profiles]
    for prof in parsed:
        lab.calc.set_profile(prof.name, prof)
    lab.calc.set_endpoint("ns1/pod-a", local=True, iface="calia",
                          labels=endpoint_labels({LABEL_NAMESPACE: "ns1"}, [parsed[0]]), profiles=(parsed[0].name,),
                          addrs=(), name="ns1/pod-a")
    try:
        yield lab
    finally:
        for s in lab.servers:
            s.close()
        cleanup()


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, make_ns: Callable[[], str]) -> Iterator[Lab]:
    with host_lab(str(request.param), make_ns) as lab:
        yield lab


def test_host_endpoint_failsafe_and_policy(lab: Lab) -> None:
    for port in (22, 8080, 9090):
        lab.serve("node", port)
    for port in (6443, 9999):
        lab.serve("client", port)
    dns, other_udp = lab.serve("client", 53, socket.SOCK_DGRAM), lab.serve("client", 5353, socket.SOCK_DGRAM)
    lab.serve("pod", 8080)
    lab.sync()
    # No host endpoint: the host's traffic is not policed.
    assert lab.tcp("client", NODE_IP, 8080) and lab.tcp("node", CLIENT_IP, 9999)
    assert lab.udp("node", CLIENT_IP, other_udp)

    # A host endpoint on eth0 with a deny-all policy: only failsafe ports (and conntrack replies) pass.
    lab.set_policy(DENY_ALL)
    lab.set_hep(hep())
    assert lab.mgr.host_endpoint_ifaces == {"eth0"}
    assert lab.tcp("client", NODE_IP, 22)  # inbound failsafe
    assert not lab.tcp("client", NODE_IP, 8080)
    assert lab.tcp("node", CLIENT_IP, 6443)  # outbound failsafe (TCP)
    assert not lab.tcp("node", CLIENT_IP, 9999)
    assert lab.udp("node", CLIENT_IP, dns)  # outbound failsafe (UDP 53)
    assert not lab.udp("node", CLIENT_IP, other_udp)
    drops = lab.mgr.drop_counters()
    assert drops[("default", "end-of-tier", "ingress")][0] > 0
    assert drops[("default", "end-of-tier", "egress")][0] > 0

    # Workload traffic never meets host endpoint policy (no applyOnForward policy): forwarded both ways,
    # pod -> host (the pod's egress policy, then DefaultEndpointToHostAction), host -> pod.
    assert lab.tcp("client", POD_IP, 8080)
    assert lab.tcp("pod", CLIENT_IP, 9999)
    assert lab.tcp("pod", NODE_IP, 8080)
    assert lab.tcp("node", POD_IP, 8080)

    # An allow rule (earlier in the tier) opens 8080 only.
    lab.set_policy(ALLOW_8080)
    assert lab.tcp("client", NODE_IP, 8080)
    assert not lab.tcp("client", NODE_IP, 9090)

    # applyOnForward: forwarded traffic arriving on eth0 now meets the host endpoint's forward policy.
    lab.set_policy(FWD_DENY)
    assert not lab.tcp("client", POD_IP, 8080)
    assert lab.tcp("pod", CLIENT_IP, 9999)  # no forward egress policy: the other direction is untouched
    assert not lab.tcp("client", NODE_IP, 8080)  # the Deny also applies to the host's own traffic
    lab.set_policy(FWD_DENY, present=False)
    assert lab.tcp("client", POD_IP, 8080) and lab.tcp("client", NODE_IP, 8080)

    # The all-interfaces endpoint behaves the same for eth0 and still leaves the pod alone.
    lab.set_hep(hep("*"))
    assert lab.mgr.host_endpoint_ifaces == {"*"}
    assert lab.tcp("client", NODE_IP, 22) and not lab.tcp("client", NODE_IP, 9090)
    assert not lab.tcp("node", CLIENT_IP, 9999)
    assert lab.tcp("pod", NODE_IP, 8080) and lab.tcp("node", POD_IP, 8080) and lab.tcp("client", POD_IP, 8080)

    # The host endpoint goes: open again.
    lab.set_hep(None)
    assert lab.mgr.host_endpoint_ifaces == frozenset()
    assert lab.tcp("client", NODE_IP, 9090) and lab.tcp("node", CLIENT_IP, 9999)
    assert lab.udp("node", CLIENT_IP, other_udp)


def test_host_endpoint_without_policy_or_profile_drops_all_but_failsafe(lab: Lab) -> None:
    lab.serve("node", 22)
    lab.serve("node", 8080)
    lab.serve("client", 9999)
    lab.set_hep(hep())
    assert lab.tcp("client", NODE_IP, 22)
    assert not lab.tcp("client", NODE_IP, 8080)
    assert not lab.tcp("node", CLIENT_IP, 9999)
    assert lab.mgr.drop_counters()[("", "no-profile-matched", "ingress")][0] > 0
    # The default-allow profile (as Calico's auto host endpoints carry) opens everything.
    allow = parse_profile({"kind": "Profile", "metadata": {"name": "projectcalico-default-allow"},
                           "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}})
    lab.calc.set_profile(allow.name, allow)
    res = hep()
    res["spec"]["profiles"] = [allow.name]
    lab.set_hep(res)
    assert lab.tcp("client", NODE_IP, 8080) and lab.tcp("node", CLIENT_IP, 9999)


# -- the overlay between nodes survives a deny-all host endpoint (Felix's "allow VXLAN/IPIP from hosts") ----
OTHER_IP = "10.66.0.3"  # a second address of the client namespace: never a Calico host


def _send(lab: Lab, src: str, src_ip: str, dst_ip: str, proto: str, port: int = 0) -> bytes | None:
    """A UDP datagram (``proto`` "udp", to ``port``) or an IPIP packet (IP proto 4: a fake inner IPv4
    header, then a token) from ``src_ip``; returns the token, or None if OUTPUT refused it (EPERM)."""
    token = secrets.token_bytes(8)
    with in_netns(f"/run/netns/{lab.ns[src]}"):
        if proto == "udp":
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        else:
            c = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
    try:
        c.bind((src_ip, 0))
        if proto == "udp":
            c.sendto(token, (dst_ip, port))
        else:
            inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(token), 0, 0, 64, 17, 0,
                                socket.inet_aton("10.65.1.1"), socket.inet_aton(POD_IP))
            c.sendto(inner + token, (dst_ip, 0))
        return token
    except OSError:
        return None
    finally:
        c.close()


def _arrived(receiver: socket.socket, token: bytes | None) -> bool:
    if token is None:
        return False
    receiver.settimeout(1.0)
    try:
        while True:
            data, _ = receiver.recvfrom(2048)
            if data.endswith(token):  # a raw socket gets the outer IP header too
                return True
    except (TimeoutError, OSError):
        return False


def _raw_ipip(lab: Lab, where: str) -> socket.socket:
    """Sees every IPIP packet delivered locally (after INPUT: a packet dropped there never shows)."""
    with in_netns(f"/run/netns/{lab.ns[where]}"):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
    lab.servers.append(s)
    return s


def test_overlay_from_hosts_passes_deny_all_host_endpoint(lab: Lab) -> None:
    sh("ip", "-n", lab.ns["client"], "addr", "add", f"{OTHER_IP}/24", "dev", "eth0")
    node_vxlan = lab.serve("node", 4789, socket.SOCK_DGRAM)
    node_other = lab.serve("node", 5353, socket.SOCK_DGRAM)
    client_vxlan = lab.serve("client", 4789, socket.SOCK_DGRAM)
    node_ipip, client_ipip = _raw_ipip(lab, "node"), _raw_ipip(lab, "client")
    # Node resources and pools through the calculation graph: the all-hosts set is both nodes' addresses
    # (the client plays the other node), and the pools turn VXLAN and IPIP on (HostTunnelUpdate).
    g = CalcGraph(NODE, policy_enabled=True)
    g.on_updates([
        Update(Key(KIND_NODE, NODE), {"kind": "Node", "metadata": {"name": NODE},
                                      "spec": {"bgp": {"ipv4Address": f"{NODE_IP}/24"}}}, "1"),
        Update(Key(KIND_NODE, "node2"), {"kind": "Node", "metadata": {"name": "node2"},
                                         "spec": {"bgp": {"ipv4Address": f"{CLIENT_IP}/24"}}}, "1"),
        Update(Key(KIND_IPPOOL, "vx"), {"kind": "IPPool", "metadata": {"name": "vx"},
                                        "spec": {"cidr": "10.65.0.0/24", "vxlanMode": "Always"}}, "1"),
        Update(Key(KIND_IPPOOL, "ipip"), {"kind": "IPPool", "metadata": {"name": "ipip"},
                                          "spec": {"cidr": "10.65.1.0/24", "ipipMode": "Always"}}, "1"),
    ])
    for m in g.flush():
        lab.mgr.on_update(m)
    lab.set_policy(DENY_ALL)
    lab.set_hep(hep())
    assert lab.mgr.options.vxlan_enabled and lab.mgr.options.ipip_enabled

    # In: VXLAN and IPIP from the other node reach the node; from a non-host address they are dropped,
    # and anything else from the other node still meets the deny-all policy.
    assert _arrived(node_vxlan, _send(lab, "client", CLIENT_IP, NODE_IP, "udp", 4789))
    assert not _arrived(node_vxlan, _send(lab, "client", OTHER_IP, NODE_IP, "udp", 4789))
    assert _arrived(node_ipip, _send(lab, "client", CLIENT_IP, NODE_IP, "ipip"))
    assert not _arrived(node_ipip, _send(lab, "client", OTHER_IP, NODE_IP, "ipip"))
    assert not _arrived(node_other, _send(lab, "client", CLIENT_IP, NODE_IP, "udp", 5353))
    # Out: to the other node passes host endpoint egress; to a non-host address it does not.
    assert _arrived(client_vxlan, _send(lab, "node", NODE_IP, CLIENT_IP, "udp", 4789))
    assert not _arrived(client_vxlan, _send(lab, "node", NODE_IP, OTHER_IP, "udp", 4789))
    assert _arrived(client_ipip, _send(lab, "node", NODE_IP, CLIENT_IP, "ipip"))
    assert not _arrived(client_ipip, _send(lab, "node", NODE_IP, OTHER_IP, "ipip"))

    # The other node's address changes: the set follows, the old address is a stranger now.
    g.on_updates([Update(Key(KIND_NODE, "node2"), {"kind": "Node", "metadata": {"name": "node2"},
                                                   "spec": {"bgp": {"ipv4Address": f"{OTHER_IP}/24"}}}, "2")])
    for m in g.flush():
        lab.mgr.on_update(m)
    lab.sync()
    assert _arrived(node_vxlan, _send(lab, "client", OTHER_IP, NODE_IP, "udp", 4789))
    assert not _arrived(node_vxlan, _send(lab, "client", CLIENT_IP, NODE_IP, "udp", 4789))

    # The pools stop using encapsulation: VXLAN/IPIP are plain traffic again, so the deny-all policy drops
    # them even from a host, while without a host endpoint they pass from anyone.
    for name in ("vx", "ipip"):
        g.on_updates([Update(Key(KIND_IPPOOL, name), None, "3")])
    for m in g.flush():
        lab.mgr.on_update(m)
    lab.sync()
    assert not lab.mgr.options.vxlan_enabled and not lab.mgr.options.ipip_enabled
    assert not _arrived(node_vxlan, _send(lab, "client", OTHER_IP, NODE_IP, "udp", 4789))
    lab.set_hep(None)
    assert _arrived(node_vxlan, _send(lab, "client", CLIENT_IP, NODE_IP, "udp", 4789))
    assert _arrived(node_ipip, _send(lab, "client", CLIENT_IP, NODE_IP, "ipip"))
