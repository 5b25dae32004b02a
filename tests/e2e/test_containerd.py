"""The kubelet path: containerd's CRI plugin runs our CNI executable (chained with Debian's portmap)
for real pod sandboxes, against both datastores. Pods get pool addresses, reach each other and the
host, hostPort works, and removing the pods leaves no veth, route or allocation behind."""

from __future__ import annotations

import ipaddress
import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from felixpy import names
from tests.e2e.conftest import NODE, ipam_usage
from tests.e2e.harness import Agent, DatastoreEnv, cali_links, calico_conf, routes_in, sh, wait_for
from tests.realparts.containerd import (
    Containerd,
    containerd_available,
    make_cni_bin_dir,
    nat_snapshot,
    remove_idle_portmap_chains,
)
from tests.realparts.oci_image import BUSYBOX_IMAGE

pytestmark = [pytest.mark.root, pytest.mark.realparts]


@pytest.fixture
def containerd(agent: Agent, plugin: Path, tmp_path: Path) -> Iterator[Containerd]:
    missing = containerd_available()
    if missing:
        pytest.skip(f"containerd harness unavailable: {missing}")
    bin_dir = make_cni_bin_dir(tmp_path / "cni-bin", {"calico": plugin, "calico-ipam": plugin.parent / "calico-ipam"})
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    # Calico's manifest conflist (cniVersion 0.3.1, calico + portmap), plus our socket key.
    entry = {k: v for k, v in calico_conf(agent, version="0.3.1").items() if k not in ("cniVersion", "name")}
    conflist = {"name": "k8s-pod-network", "cniVersion": "0.3.1",
                "plugins": [entry, {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}}]}
    (conf_dir / "10-calico.conflist").write_text(json.dumps(conflist))
    before = nat_snapshot()
    with Containerd(cni_bin_dir=bin_dir, cni_conf_dir=conf_dir) as c:
        yield c
    remove_idle_portmap_chains(before)


def test_pods_through_containerd_cri(containerd: Containerd, agent: Agent, datastore: DatastoreEnv,
                                     pool: str) -> None:
    cri = containerd.client()
    ns = "cri-" + uuid.uuid4().hex[:6]
    datastore.ensure_namespace(ns)
    host_port = 18000 + uuid.uuid4().int % 1000
    sandboxes: dict[str, str] = {}
    containers: dict[str, str] = {}
    for pod, ports in (("alpha", [(80, host_port, "tcp")]), ("beta", [])):
        datastore.create_pod(ns, pod, NODE)
        sid = cri.run_pod(pod, ns, port_mappings=ports)
        sandboxes[pod] = sid
        containers[pod] = cri.start_container(sid, "tools", BUSYBOX_IMAGE, ["sleep", "3600"])
    ips = {pod: cri.pod_ip(sid) for pod, sid in sandboxes.items()}
    for pod, ip in ips.items():
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(pool), ips
        veth = names.veth_name_for_workload(ns, pod)
        assert f"{ip} dev {veth} proto 80 scope link" in sh("ip", "route", "show", f"{ip}/32")
    # Pod to pod, both ways, and pod to host (the node's own route towards the pod's veth).
    host_ip = sh("ip", "-o", "-4", "route", "get", "1.1.1.1").split(" src ")[1].split()[0]
    for a, b in (("alpha", "beta"), ("beta", "alpha")):
        rc, out, err = cri.exec(containers[a], ["ping", "-c", "1", "-W", "2", ips[b]])
        assert rc == 0, (out, err)
    rc, out, err = cri.exec(containers["beta"], ["ping", "-c", "1", "-W", "2", host_ip])
    assert rc == 0, (out, err)
    # hostPort through Debian's portmap chained after our plugin.
    cri.exec(containers["alpha"], ["sh", "-c", "echo felixpy-ok > /tmp/index.html; httpd -p 80 -h /tmp"])
    def fetch() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/index.html", timeout=2) as r:
                return b"felixpy-ok" in r.read()
        except OSError:
            return False
    assert wait_for(fetch, 10), "hostPort did not answer"
    if datastore.type == "kubernetes":
        ann = datastore.pod(ns, "alpha")["metadata"]["annotations"]
        assert ann["cni.projectcalico.org/podIP"] == f"{ips['alpha']}/32"
        assert ann["cni.projectcalico.org/containerID"] == sandboxes["alpha"]
    # Tear down as kubelet does: stop (CNI DEL with netns) then remove (CNI DEL again, no netns).
    for sid in sandboxes.values():
        cri.stop_pod(sid)
        cri.remove_pod(sid)
    assert not {names.veth_name_for_workload(ns, p) for p in sandboxes} & cali_links()
    assert not [r for r in routes_in(pool) if " dev cali" in r]
    handles, used = ipam_usage(datastore)
    assert not [h for h in handles if any(sid in h for sid in sandboxes.values())]
    assert not [ip for ip in used if ipaddress.ip_address(ip) in ipaddress.ip_network(pool)]
