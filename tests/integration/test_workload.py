"""Pod wiring against the real kernel: a "host" netns and "pod" netns per test, never the real host.

The host netns gets an uplink with a default route, as a node has: proxy ARP only answers for
169.254.1.1 if the host routes that address out of another interface.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from collections.abc import Callable

import pytest

from felixpy import names
from felixpy.dataplane import workload
from felixpy.dataplane.shims.netlink import RT_SCOPE_LINK, Netlink, NetlinkError, Route
from felixpy.dataplane.workload import WorkloadError, WorkloadSpec

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxwl{os.getpid() % 100000}{secrets.token_hex(2)}"
POD_IP = ipaddress.IPv4Address("10.65.0.2")
HOST_UPLINK_IP = "192.168.254.1"


def ip(ns: str, *args: str, check: bool = True) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=check, capture_output=True, text=True).stdout


def sysctl(ns: str, *keys: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", *keys], check=True, capture_output=True,
                         text=True).stdout
    return out.split()


@pytest.fixture
def host(make_ns: Callable[[], str]) -> str:
    ns = make_ns()
    ip(ns, "link", "set", "lo", "up")
    ip(ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
    ip(ns, "link", "set", "uplink0", "up")
    ip(ns, "link", "set", "uplink1", "up")
    ip(ns, "addr", "add", f"{HOST_UPLINK_IP}/24", "dev", "uplink0")
    ip(ns, "route", "add", "default", "via", "192.168.254.2", "dev", "uplink0")
    return ns


@pytest.fixture
def pod(make_ns: Callable[[], str]) -> str:
    return make_ns()


def spec_for(host: str, pod: str, **kw: object) -> WorkloadSpec:
    args: dict[str, object] = dict(netns_path=f"/run/netns/{pod}", container_ifname="eth0",
                                   host_ifname="calie2etest01", ipv4=[POD_IP], mtu=1450,
                                   host_netns_path=f"/run/netns/{host}")
    args.update(kw)
    return WorkloadSpec(**args)  # type: ignore[arg-type]


def host_links(host: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip(host, "-o", "link").splitlines()}


def test_setup_wires_the_pod_like_calico(host: str, pod: str) -> None:
    spec = spec_for(host, pod, allow_ip_forwarding=True)
    res = workload.setup_workload(spec)
    assert res.host_ifname == "calie2etest01" and res.container_ifname == "eth0"
    assert res.host_mac == names.HOST_VETH_MAC
    assert res.container_mac != names.HOST_VETH_MAC

    hostlink = ip(host, "-d", "link", "show", "calie2etest01")
    assert "ee:ee:ee:ee:ee:ee" in hostlink and "mtu 1450" in hostlink and "state UP" in hostlink
    assert f"{res.host_ifindex}: calie2etest01" in hostlink
    assert "inet " not in ip(host, "addr", "show", "calie2etest01")  # no address on the host end
    assert sysctl(host, "net.ipv4.conf.calie2etest01.route_localnet", "net.ipv4.conf.calie2etest01.proxy_arp",
                  "net.ipv4.conf.calie2etest01.forwarding", "net.ipv4.neigh.calie2etest01.proxy_delay",
                  "net.ipv6.conf.calie2etest01.accept_ra") == ["1", "1", "1", "0", "0"]
    # The host /32 route belongs to the route driver, not to the wiring.
    assert "10.65.0.2" not in ip(host, "route", "show")

    podlink = ip(pod, "addr", "show", "eth0")
    assert res.container_mac in podlink and "mtu 1450" in podlink and "state UP" in podlink
    assert "inet 10.65.0.2/32 scope global eth0" in podlink
    routes = ip(pod, "route", "show").splitlines()
    assert [r.strip() for r in routes] == ["default via 169.254.1.1 dev eth0", "169.254.1.1 dev eth0 scope link"]
    assert sysctl(pod, "net.ipv4.ip_forward") == ["1"]
    workload.check_workload(spec)


def test_pod_reaches_the_host_through_proxy_arp(host: str, pod: str) -> None:
    res = workload.setup_workload(spec_for(host, pod))
    # Without a route back the reply cannot reach the pod; that is the route driver's job.
    with Netlink(f"/run/netns/{host}") as nl:
        nl.add_route(Route(ipaddress.IPv4Network("10.65.0.2/32"), protocol=names.RTPROT_FELIX,
                           scope=RT_SCOPE_LINK, oif=res.host_ifindex))
    ping = subprocess.run(["ip", "netns", "exec", pod, "ping", "-c", "1", "-W", "2", HOST_UPLINK_IP],
                          capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    neigh = ip(pod, "neigh", "show", "169.254.1.1")
    assert "lladdr ee:ee:ee:ee:ee:ee" in neigh


def test_container_mac_and_no_forwarding(host: str, pod: str) -> None:
    res = workload.setup_workload(spec_for(host, pod, container_mac="02:ab:cd:ef:00:01", mtu=0))
    assert res.container_mac == "02:ab:cd:ef:00:01"
    assert "02:ab:cd:ef:00:01" in ip(pod, "link", "show", "eth0")
    assert "mtu 1500" in ip(pod, "link", "show", "eth0")
    assert sysctl(pod, "net.ipv4.ip_forward") == ["0"]


def test_teardown_leaves_nothing_and_is_idempotent(host: str, pod: str) -> None:
    spec = spec_for(host, pod)
    workload.setup_workload(spec)
    before = host_links(host)
    assert "calie2etest01" in before
    assert workload.teardown_workload("calie2etest01", spec.netns_path, host_netns_path=spec.host_netns_path)
    assert host_links(host) == before - {"calie2etest01"}
    assert "eth0" not in ip(pod, "link", "show")
    # Again, and the way containerd's second DEL comes (no netns).
    assert not workload.teardown_workload("calie2etest01", spec.netns_path, host_netns_path=spec.host_netns_path)
    assert not workload.teardown_workload("calie2etest01", None, host_netns_path=spec.host_netns_path)
    assert not workload.teardown_workload("calie2etest01", "/run/netns/" + RUN + "-gone",
                                          host_netns_path=spec.host_netns_path)


def test_teardown_from_host_name_alone(host: str, pod: str) -> None:
    spec = spec_for(host, pod)
    workload.setup_workload(spec)
    assert workload.teardown_workload("calie2etest01", None, host_netns_path=spec.host_netns_path)
    assert "eth0" not in ip(pod, "link", "show")


def test_teardown_removes_an_orphaned_pod_end(host: str, pod: str) -> None:
    ip(pod, "link", "add", "eth0", "type", "veth", "peer", "name", "orphan1")
    assert workload.teardown_workload("calie2etest01", f"/run/netns/{pod}", host_netns_path=f"/run/netns/{host}")
    assert "eth0" not in ip(pod, "link", "show")


def test_missing_netns_is_a_clear_error(host: str) -> None:
    before = host_links(host)
    with pytest.raises(WorkloadError, match=r"netns /run/netns/.*-nope does not exist"):
        workload.setup_workload(spec_for(host, f"{RUN}-nope"))
    assert host_links(host) == before
    with pytest.raises(WorkloadError, match="does not exist"):
        workload.check_workload(spec_for(host, f"{RUN}-nope"))


def test_stale_host_link_is_replaced(host: str, pod: str) -> None:
    ip(host, "link", "add", "calie2etest01", "type", "veth", "peer", "name", "stalepeer")
    res = workload.setup_workload(spec_for(host, pod))
    assert "stalepeer" not in host_links(host)
    assert f"{res.host_ifindex}: calie2etest01" in ip(host, "link", "show", "calie2etest01")
    workload.check_workload(spec_for(host, pod))


def test_existing_container_iface_fails_cleanly(host: str, pod: str) -> None:
    ip(pod, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    before = host_links(host)
    with pytest.raises(WorkloadError, match="eth0 already exists in netns"):
        workload.setup_workload(spec_for(host, pod))
    assert host_links(host) == before
    assert "other0" in ip(pod, "link", "show")  # not ours: untouched


def test_failure_after_the_veth_exists_leaves_nothing(host: str, pod: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: the pod's default route is refused (as the kernel would for a bad route).
    real = Netlink.add_route

    def refuse_default(self: Netlink, route: Route, *, replace: bool = True) -> None:
        if route.dst.prefixlen == 0:
            raise NetlinkError(22, f"add route {route.describe()}", "injected")
        real(self, route, replace=replace)

    monkeypatch.setattr(Netlink, "add_route", refuse_default)
    before = host_links(host)
    with pytest.raises(WorkloadError, match=r"cannot configure eth0 in netns .*injected"):
        workload.setup_workload(spec_for(host, pod))
    assert host_links(host) == before
    assert "eth0" not in ip(pod, "link", "show")


def test_bad_specs_are_refused_before_touching_anything(host: str, pod: str) -> None:
    before = host_links(host)
    for kw, msg in [(dict(ipv4=[]), "no IPv4 address"), (dict(mtu=20), "invalid MTU"),
                    (dict(host_ifname="cali-much-too-long-name"), "invalid host interface name"),
                    (dict(host_ifname="default"), "invalid host interface name"),
                    (dict(container_mac="01:00:5e:00:00:01"), "multicast"),
                    (dict(container_mac="nonsense"), "invalid container MAC")]:
        with pytest.raises(WorkloadError, match=msg):
            workload.setup_workload(spec_for(host, pod, **kw))
    assert host_links(host) == before
    assert "eth0" not in ip(pod, "link", "show")


def test_check_reports_the_first_mismatch(host: str, pod: str) -> None:
    spec = spec_for(host, pod)
    workload.setup_workload(spec)
    workload.check_workload(spec)
    with pytest.raises(WorkloadError, match=r"address 10\.65\.0\.3/32 missing"):
        workload.check_workload(spec_for(host, pod, ipv4=[ipaddress.IPv4Address("10.65.0.3")]))
    with pytest.raises(WorkloadError, match="MTU 1450, expected 1400"):
        workload.check_workload(spec_for(host, pod, mtu=1400))
    ip(pod, "route", "del", "default")
    with pytest.raises(WorkloadError, match=r"route 0\.0\.0\.0/0 via 169\.254\.1\.1 dev eth0 missing"):
        workload.check_workload(spec)
    ip(pod, "addr", "del", "10.65.0.2/32", "dev", "eth0")
    with pytest.raises(WorkloadError, match=r"address 10\.65\.0\.2/32 missing"):
        workload.check_workload(spec)
    ip(host, "link", "del", "calie2etest01")
    with pytest.raises(WorkloadError, match="host interface calie2etest01 does not exist"):
        workload.check_workload(spec)


def test_configure_host_iface_on_a_missing_iface(host: str) -> None:
    with pytest.raises(FileNotFoundError, match="interface calinothere does not exist"):
        workload.configure_host_iface("calinothere", netns=f"/run/netns/{host}")
    ip(host, "link", "add", "calithere", "type", "veth", "peer", "name", "therepeer")
    workload.configure_host_iface("calithere", netns=f"/run/netns/{host}")
    assert sysctl(host, "net.ipv4.conf.calithere.proxy_arp") == ["1"]
