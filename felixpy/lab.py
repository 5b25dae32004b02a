"""A one-node lab on this machine: a local etcd (the embedded default datastore), the agent, and pods
created through the real CNI path (the installed ``calico`` executable called exactly as a container
runtime calls it: CNI_* environment + the conflist entry on stdin, one network namespace per pod).

Everything it creates is recorded in a state file so ``lab down`` removes exactly that (processes by
PID, namespaces by name), even after a crash of ``lab up``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cni_plugin.install import install_binaries

STATE_DIR = Path(os.environ.get("FELIXPY_LAB_DIR", "/run/felixpy-lab"))
STATE_FILE = STATE_DIR / "state.json"
NODE = "lab-node-1"
NETNS_PREFIX = "felixpy-lab-"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save(state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2))


def _load() -> dict[str, Any]:
    try:
        return dict(json.loads(STATE_FILE.read_text()))
    except (OSError, ValueError):
        return {}


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _conf(sock: str, pool: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico", "nodename": NODE,
            "mtu": 0, "ipam": {"type": "calico-ipam", "ipv4_pools": [pool]}, "datastore_type": "etcdv3",
            "felixpy_socket": sock}


def cni(state: dict[str, Any], command: str, pod: str, netns: str) -> tuple[int, dict[str, Any]]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": state["pods"][pod]["cid"], "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": state["bin_dir"], "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod}"}
    p = subprocess.run([os.path.join(state["bin_dir"], "calico")], input=json.dumps(state["conf"]).encode(),
                       env=env, capture_output=True, timeout=60)
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return p.returncode, out


def up(*, pods: int = 2, pool: str = "10.244.0.0/16") -> int:
    if _load():
        print(f"a lab is already up (state in {STATE_FILE}); run `felixpy lab down` first", file=sys.stderr)
        return 1
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"pods": {}, "pids": {}, "pool": pool}
    state["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    _save(state)
    try:
        etcd_port, peer_port, health_port = _free_port(), _free_port(), _free_port()
        etcd_dir = STATE_DIR / "etcd"
        etcd_log = open(STATE_DIR / "etcd.log", "wb")  # noqa: SIM115 - handed to the child
        etcd = subprocess.Popen(
            ["etcd", "--name", "felixpy-lab", "--data-dir", str(etcd_dir),
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"felixpy-lab=http://127.0.0.1:{peer_port}"],
            stdout=etcd_log, stderr=subprocess.STDOUT, start_new_session=True)
        state["pids"]["etcd"] = etcd.pid
        _save(state)
        if not _wait_http(f"http://127.0.0.1:{etcd_port}/health", 20):
            raise RuntimeError(f"etcd did not become healthy; see {STATE_DIR}/etcd.log")
        print(f"etcd      http://127.0.0.1:{etcd_port} (pid {etcd.pid})")

        sock = str(STATE_DIR / "cni.sock")
        env = dict(os.environ, DATASTORE_TYPE="etcdv3", ETCD_ENDPOINTS=f"http://127.0.0.1:{etcd_port}",
                   NODENAME=NODE, CALICO_IPV4POOL_CIDR=pool, FELIXPY_CNI_SOCKET=sock,
                   FELIX_HEALTHENABLED="true", FELIX_HEALTHPORT=str(health_port),
                   FELIXPY_STATE_DIR=str(STATE_DIR / "calico"))
        agent_log = open(STATE_DIR / "agent.log", "wb")  # noqa: SIM115 - handed to the child
        agent = subprocess.Popen([sys.executable, "-m", "felixpy", "agent"], env=env, stdout=agent_log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        state["pids"]["agent"] = agent.pid
        state["health"] = f"http://127.0.0.1:{health_port}"
        _save(state)
        if not _wait_http(f"{state['health']}/readiness", 30):
            raise RuntimeError(f"agent did not become ready; see {STATE_DIR}/agent.log")
        print(f"agent     node {NODE}, ready ({state['health']}/readiness, metrics at /metrics)")

        bin_dir = STATE_DIR / "bin"
        install_binaries(bin_dir, "/usr/bin/python3")
        state["bin_dir"] = str(bin_dir)
        state["conf"] = _conf(sock, pool)
        _save(state)
        for i in range(pods):
            pod = f"pod-{i}"
            netns = f"{NETNS_PREFIX}{pod}"
            subprocess.run(["ip", "netns", "add", netns], check=True)
            state["pods"][pod] = {"netns": netns, "cid": uuid.uuid4().hex}
            _save(state)
            rc, out = cni(state, "ADD", pod, f"/run/netns/{netns}")
            if rc != 0:
                raise RuntimeError(f"CNI ADD for {pod} failed: {out}")
            state["pods"][pod]["ip"] = out["ips"][0]["address"].split("/")[0]
            state["pods"][pod]["veth"] = out["interfaces"][0]["name"]
            _save(state)
            print(f"pod       {pod:8s} {state['pods'][pod]['ip']:15s} veth {state['pods'][pod]['veth']}"
                  f"  (netns {netns})")
        names = sorted(state["pods"])
        for a in names:
            for b in names:
                if a == b:
                    continue
                dst = state["pods"][b]["ip"]
                p = subprocess.run(["ip", "netns", "exec", state["pods"][a]["netns"], "ping", "-c", "2",
                                    "-W", "1", "-i", "0.2", dst], capture_output=True, text=True)
                summary = next((ln for ln in p.stdout.splitlines() if "packet loss" in ln), p.stderr.strip())
                print(f"ping      {a} -> {b} ({dst}): {'OK' if p.returncode == 0 else 'FAILED'}  {summary}")
        print("routes on the node (ip route show proto 80):")
        print(subprocess.run(["ip", "route", "show", "proto", "80"], capture_output=True, text=True).stdout,
              end="")
        print("`felixpy lab down` removes everything.")
        return 0
    except Exception as e:
        print(f"lab up failed: {e}", file=sys.stderr)
        return 1


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def down() -> int:
    state = _load()
    if not state:
        print("no lab is up")
        return 0
    for pod, p in state.get("pods", {}).items():
        if "bin_dir" in state and state["pids"].get("agent"):
            rc, out = cni(state, "DEL", pod, f"/run/netns/{p['netns']}")
            if rc != 0:
                print(f"CNI DEL for {pod}: {out}", file=sys.stderr)
        subprocess.run(["ip", "netns", "del", p["netns"]], capture_output=True)
    for name in ("agent", "etcd"):
        pid = state.get("pids", {}).get(name)
        if pid:
            _stop_pid(int(pid))
    # Blackhole routes for the lab's blocks are the agent's; with the agent gone, remove them.
    if state.get("pool"):
        subprocess.run(["ip", "route", "flush", "root", state["pool"], "proto", "80"], capture_output=True)
    if state.get("ip_forward") in ("0", "1"):
        Path("/proc/sys/net/ipv4/ip_forward").write_text(state["ip_forward"])
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    print("lab removed")
    return 0


def status() -> int:
    state = _load()
    if not state:
        print("no lab is up")
        return 1
    print(json.dumps({k: state[k] for k in ("pids", "pods", "health") if k in state}, indent=2))
    return 0
