"""The DaemonSet's init step for real: `felixpy install-cni` with the install-cni container's environment
(deploy/felixpy.yaml + the calico-config ConfigMap) into a temp host root, then a real containerd whose CNI
dirs are that root's /opt/cni/bin and /etc/cni/net.d runs a pod sandbox through the installed files and a
running agent."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from felixpy import names
from tests.e2e.conftest import NODE, ipam_usage
from tests.e2e.harness import REPO, Agent, DatastoreEnv, cali_links, routes_in, sh
from tests.realparts.containerd import (
    Containerd,
    containerd_available,
    make_cni_bin_dir,
    nat_snapshot,
    remove_idle_portmap_chains,
)
from tests.unit.test_config import _find, container_env

pytestmark = [pytest.mark.root, pytest.mark.realparts]


def _fake_python(root: Path) -> None:
    """The host's /usr/bin/python3 as install-cni checks it: an executable file inside the host root (the
    installed client's shebang is then run by this machine's own /usr/bin/python3)."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").write_text("#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n")
    (root / "usr/bin/python3").chmod(0o755)


def _host_root(tmp_path: Path) -> Path:
    """A fake host filesystem: a python3 (what install-cni checks for) and the host's reference plugins
    in /opt/cni/bin (kubeadm's kubernetes-cni package puts portmap & co. there)."""
    root = tmp_path / "host"
    _fake_python(root)
    make_cni_bin_dir(root / "opt/cni/bin")
    return root


def _install(root: Path, env_over: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = container_env(_find("DaemonSet", "calico-node"), "install-cni", node=NODE, init=True)
    env.update(env_over or {})
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    return subprocess.run([sys.executable, "-m", "felixpy", "install-cni", f"--host-root={root}"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def _expected_conflist(node: str, mtu: str) -> dict[str, Any]:
    template = _find("ConfigMap", "calico-config")["data"]["cni_network_config"]
    rendered = (template.replace("__KUBERNETES_NODE_NAME__", node).replace("__CNI_MTU__", mtu)
                .replace("__KUBECONFIG_FILEPATH__", ""))
    doc: dict[str, Any] = json.loads(rendered)
    return doc


def test_install_renders_the_configmap_template(tmp_path: Path) -> None:
    root = _host_root(tmp_path)
    p = _install(root)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["missing_plugins"] == "", res
    conf_path = root / "etc/cni/net.d/10-calico.conflist"
    assert res["conflist"] == str(conf_path)
    conf = json.loads(conf_path.read_text())
    assert conf == _expected_conflist(NODE, "0")  # veth_mtu "0": the plugin uses the agent's MTU
    assert "__" not in conf_path.read_text()
    for name in ("calico", "calico-ipam"):
        exe = root / "opt/cni/bin" / name
        assert os.access(exe, os.X_OK)
        assert exe.read_text().startswith("#!/usr/bin/python3 -IS\n")
    # The installed executable is a working CNI plugin (VERSION needs no agent).
    out = subprocess.run([str(root / "opt/cni/bin/calico")], input=b"{}", capture_output=True, timeout=30,
                         env={"CNI_COMMAND": "VERSION", "FELIXPY_CNI_SOCKET": str(tmp_path / "none.sock")})
    assert out.returncode == 0, out
    assert "1.0.0" in json.loads(out.stdout)["supportedVersions"]
    # Idempotent: a second run (init containers re-run on every pod restart) gives the same files.
    before = conf_path.read_bytes()
    assert _install(root).returncode == 0
    assert conf_path.read_bytes() == before


def test_install_reports_missing_chained_plugins(tmp_path: Path) -> None:
    root = tmp_path / "host"
    _fake_python(root)
    p = _install(root)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["missing_plugins"] == "portmap"
    assert "portmap" in p.stderr


def test_bundled_plugins_are_installed_and_update_can_be_turned_off(tmp_path: Path) -> None:
    """The image ships portmap & co. in a bundled dir; install-cni copies them like Calico's image does."""
    root = tmp_path / "host"
    _fake_python(root)
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "portmap").write_bytes(Path("/usr/lib/cni/portmap").read_bytes())
    (bundled / "portmap").chmod(0o755)
    (bundled / "README").write_text("not an executable: skipped")
    p = _install(root, {"FELIXPY_BUNDLED_CNI_DIR": str(bundled)})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["missing_plugins"] == "", res
    assert (root / "opt/cni/bin/portmap").read_bytes() == (bundled / "portmap").read_bytes()
    assert not (root / "opt/cni/bin/README").exists()
    # UPDATE_CNI_BINARIES=false keeps what the host already has.
    (root / "opt/cni/bin/portmap").write_bytes(b"#!/bin/sh\n# the host's own\n")
    p = _install(root, {"FELIXPY_BUNDLED_CNI_DIR": str(bundled), "UPDATE_CNI_BINARIES": "false"})
    assert p.returncode == 0, p.stderr
    assert b"the host's own" in (root / "opt/cni/bin/portmap").read_bytes()
    p = _install(root, {"FELIXPY_BUNDLED_CNI_DIR": str(bundled)})
    assert (root / "opt/cni/bin/portmap").read_bytes() == (bundled / "portmap").read_bytes()


def test_bad_template_is_refused_and_keeps_the_installed_config(tmp_path: Path) -> None:
    root = _host_root(tmp_path)
    assert _install(root).returncode == 0
    conf_path = root / "etc/cni/net.d/10-calico.conflist"
    good = conf_path.read_bytes()
    p = _install(root, {"CNI_MTU": ""})  # "mtu": , is not JSON
    assert p.returncode == 1
    assert "CNI_NETWORK_CONFIG does not render to valid JSON" in p.stderr
    assert conf_path.read_bytes() == good


def test_install_without_host_python_fails_clearly(tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()
    p = _install(root)
    assert p.returncode == 1
    assert "no python3 found on the host" in p.stderr
    assert not (root / "etc/cni/net.d/10-calico.conflist").exists()


@pytest.mark.parametrize("datastore", ["kubernetes"], indirect=True)
def test_containerd_runs_pods_through_the_installed_files(tmp_path: Path, agent: Agent, datastore: DatastoreEnv,
                                                          pool: str) -> None:
    missing = containerd_available()
    if missing:
        pytest.skip(f"containerd harness unavailable: {missing}")
    root = _host_root(tmp_path)
    p = _install(root)
    assert p.returncode == 0, p.stderr
    ns = "inst-" + uuid.uuid4().hex[:6]
    datastore.ensure_namespace(ns)
    before = nat_snapshot()
    sandboxes: list[str] = []
    try:
        # The rendered conflist is used as installed; only the agent's socket differs from the default
        # (/var/run/calico/felixpy-cni.sock) because this test's agent is not the node's.
        with Containerd(cni_bin_dir=root / "opt/cni/bin", cni_conf_dir=root / "etc/cni/net.d",
                        env={"FELIXPY_CNI_SOCKET": agent.socket}) as ctrd:
            ctrd.wait_network_ready()
            cri = ctrd.client()
            for pod in ("one", "two"):
                datastore.create_pod(ns, pod, NODE)
                sandboxes.append(cri.run_pod(pod, ns))
            ips = [cri.pod_ip(sid) for sid in sandboxes]
            for pod, sid, ip in zip(("one", "two"), sandboxes, ips, strict=True):
                assert ipaddress.ip_address(ip) in ipaddress.ip_network(pool), ips
                veth = names.veth_name_for_workload(ns, pod)
                assert f"{ip} dev {veth} proto 80 scope link" in sh("ip", "route", "show", f"{ip}/32")
                ann = datastore.pod(ns, pod)["metadata"]["annotations"]
                assert ann["cni.projectcalico.org/podIP"] == f"{ip}/32"
                assert ann["cni.projectcalico.org/containerID"] == sid
            for sid in sandboxes:
                cri.stop_pod(sid)
                cri.remove_pod(sid)
            assert not {names.veth_name_for_workload(ns, p) for p in ("one", "two")} & cali_links()
            assert not [r for r in routes_in(pool) if " dev cali" in r]
            handles, used = ipam_usage(datastore)
            assert not [h for h in handles if any(sid in h for sid in sandboxes)]
            assert not [ip for ip in used if ipaddress.ip_address(ip) in ipaddress.ip_network(pool)]
    finally:
        remove_idle_portmap_chains(before)


def test_host_python_is_resolved_in_the_host_root(tmp_path: Path) -> None:
    """Symlinks are followed inside the host root (RHEL's /etc/alternatives), and a dangling one is refused
    even when the same path exists in our own filesystem."""
    from cni_plugin.install import InstallError, find_host_python

    alt = tmp_path / "rhel"
    (alt / "usr/bin").mkdir(parents=True)
    (alt / "etc/alternatives").mkdir(parents=True)
    (alt / "usr/libexec").mkdir(parents=True)
    real = alt / "usr/libexec/platform-python3.9"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    (alt / "etc/alternatives/python3").symlink_to("/usr/libexec/platform-python3.9")  # absolute, host-relative
    (alt / "usr/bin/python3").symlink_to("/etc/alternatives/python3")
    assert find_host_python(alt) == "/usr/bin/python3"

    broken = tmp_path / "broken"
    (broken / "usr/bin").mkdir(parents=True)
    # /usr/bin/python3.11 exists in this (the installer's) filesystem, but not on that host.
    (broken / "usr/bin/python3").symlink_to("/usr/bin/python3.11")
    with pytest.raises(InstallError, match="no python3 found"):
        find_host_python(broken)
    p = _install(broken, {"FELIXPY_HOST_PYTHON": "/usr/bin/python3"})
    assert p.returncode == 1 and "not an executable file on the host" in p.stderr
    assert not (broken / "etc/cni/net.d/10-calico.conflist").exists()
