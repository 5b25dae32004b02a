"""The container image (Dockerfile, scripts/build-image.sh; docs/image.md), checked for real with podman.

Cheap tests (always run): the Dockerfile's COPY sources exist and are not excluded by .dockerignore, and the
subcommands the image documents exist in ``felixpy.cli``.

Image tests (root): the module fixture runs ``scripts/build-image.sh``, which is incremental (a code change
rebuilds in about 30 s; a machine without podman/debootstrap or the cached base needs about 3 minutes,
measured in docs/image.md), so the checks always see the current tree, never a stale image. Set
``FELIXPY_IMAGE_NO_BUILD=1`` to check an already-built image as it is. Then every container is
``podman run --rm --network none`` with a unique name, removed again if a run times out.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from felixpy import cli

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("FELIXPY_IMAGE", "localhost/felixpy:latest")
SIZE_BUDGET = 275 * 1000 * 1000  # bytes, as `podman image inspect` counts them; docs/image.md explains it
RUN = f"fximg{os.getpid() % 100000}{secrets.token_hex(2)}"
ENTRYPOINT_SUBCOMMANDS = ("agent", "install-cni", "bgp-sidecar", "route-reflector")  # the image's documented uses

pytestmark = pytest.mark.timeout(900)  # a cold build (tools + debootstrap + build) takes about 3 minutes


# ---- cheap checks: always run --------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: Sequence[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        bare = pat.removeprefix("**/")
        if any(fnmatch.fnmatch(p, pat) or (bare != pat and fnmatch.fnmatch(p.rsplit("/", 1)[-1], bare))
               for p in prefixes):
            return True
    return False


def test_dockerfile_copy_sources_exist_and_are_in_the_context() -> None:
    patterns = _dockerignore_patterns()
    copies = [rest for word, rest in _dockerfile_instructions() if word == "COPY" and "--from" not in rest]
    assert copies, "no COPY from the build context in the Dockerfile"
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile: COPY {src}: no such file in the repository"
            assert not _ignored(src, patterns), f"Dockerfile: COPY {src}: excluded by .dockerignore"
    # The heavy local directories must stay out of the build context.
    for heavy in (".venv", ".git", "tests", "bench"):
        assert _ignored(heavy, patterns), f".dockerignore does not exclude {heavy}"


def test_entrypoint_subcommands_exist(capsys: pytest.CaptureFixture[str]) -> None:
    instr = _dockerfile_instructions()
    assert ("ENTRYPOINT", '["felixpy"]') in instr
    cmd = [rest for word, rest in instr if word == "CMD"]
    assert cmd and json.loads(cmd[-1])[0] in ENTRYPOINT_SUBCOMMANDS
    header = (ROOT / "Dockerfile").read_text()
    for sub in ENTRYPOINT_SUBCOMMANDS:
        assert f"felixpy {sub}" in header, f"the Dockerfile does not document `felixpy {sub}`"
        with pytest.raises(SystemExit) as exc:
            cli.main([sub, "--help"])
        assert exc.value.code == 0, f"`felixpy {sub} --help` exited {exc.value.code}"
        assert f"felixpy {sub}" in capsys.readouterr().out
    # The console script the image's ENTRYPOINT runs.
    assert re.search(r'^felixpy = "felixpy\.cli:main"$', (ROOT / "pyproject.toml").read_text(), re.M)


def test_dockerfile_installs_no_compilers() -> None:
    runs = " ".join(rest for word, rest in _dockerfile_instructions() if word == "RUN")
    for pkg in ("gcc", "build-essential", "python3-dev", "make", "g++"):
        assert not re.search(rf"(?<![\w.-]){re.escape(pkg)}(?![\w.-])", runs), f"the Dockerfile installs {pkg}"


# ---- the built image -----------------------------------------------------------------------------------------


def _ulimits() -> list[str]:
    # podman's defaults exceed what root may set where it lacks CAP_SYS_RESOURCE (this sandbox: runc's
    # "error setting rlimit ... operation not permitted"), so ask for limits at or below this process's own.
    # (root is not bound by nproc anyway.)
    out = []
    for name, res, cap in (("nofile", resource.RLIMIT_NOFILE, 65536), ("nproc", resource.RLIMIT_NPROC, 4096)):
        hard = resource.getrlimit(res)[1]
        n = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        out += ["--ulimit", f"{name}={n}:{n}"]
    return out


_seq = iter(range(1, 1000))


def podman_run(*args: str, entrypoint: str | None = None, opts: Sequence[str] = (),
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    name = f"{RUN}-{next(_seq)}"
    cmd = ["podman", "run", "--rm", "--network", "none", "--name", name, *_ulimits(), *opts]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    try:
        return subprocess.run([*cmd, IMAGE, *args], capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        # --rm removes it on exit; this covers a timeout (the container would outlive the podman client).
        subprocess.run(["podman", "rm", "-f", "--ignore", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("the image tests need root (podman with the system storage; debootstrap to build)")
    if os.environ.get("FELIXPY_IMAGE_NO_BUILD") == "1":
        if not shutil.which("podman") or subprocess.run(["podman", "image", "exists", IMAGE],
                                                        check=False).returncode != 0:
            pytest.skip(f"FELIXPY_IMAGE_NO_BUILD=1 and no {IMAGE}: build it with scripts/build-image.sh")
    else:
        p = subprocess.run([str(ROOT / "scripts/build-image.sh")], capture_output=True, text=True, timeout=840,
                           check=False, env={**os.environ, "FELIXPY_IMAGE": IMAGE})
        print(p.stdout + p.stderr)
        assert p.returncode == 0, f"scripts/build-image.sh failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    yield IMAGE


def test_image_size_within_budget(image: str) -> None:
    size = int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                              text=True, check=True).stdout)
    print(f"{image}: {size} bytes, budget {SIZE_BUDGET}")
    assert size <= SIZE_BUDGET, f"{image} is {size / 1e6:.1f} MB, over the {SIZE_BUDGET / 1e6:.0f} MB budget"


def test_entrypoints_run(image: str) -> None:
    p = podman_run("--help")
    assert p.returncode == 0, p.stderr
    for sub in ENTRYPOINT_SUBCOMMANDS:
        assert sub in p.stdout
    p = podman_run("install-cni", "--help")
    assert p.returncode == 0 and "--host-root" in p.stdout, p.stderr
    pin = re.search(r'"exabgp==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin
    p = podman_run("version", entrypoint="exabgp")  # ExaBGP 5 has `exabgp version`, no --version flag
    assert p.returncode == 0 and f"ExaBGP : {pin.group(1)}" in p.stdout, p.stdout + p.stderr
    assert "From   : /opt/felixpy/venv/" in p.stdout
    p = podman_run("--version", entrypoint="bird")
    assert p.returncode == 0 and re.search(r"BIRD version 2\.", p.stdout + p.stderr), p.stdout + p.stderr
    p = podman_run("-c", "import nftables, sys; print(nftables.__file__, sys.prefix)", entrypoint="python3")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["/usr/lib/python3/dist-packages/nftables/__init__.py", "/opt/felixpy/venv"]
    # Bad configuration: a clear error and a non-zero exit, not a traceback.
    p = podman_run("route-reflector")
    assert p.returncode == 2 and "IP: a route reflector needs its address" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_image_carries_no_build_leftovers(image: str) -> None:
    script = ("for c in gcc cc g++ make pip pip3; do command -v $c && echo FOUND $c; done; "
              "ls -A /var/lib/apt/lists /root/.cache 2>/dev/null; ls /opt/felixpy/venv/lib/python3*/site-packages")
    p = podman_run("-c", script, entrypoint="sh")
    assert p.returncode == 0, p.stderr
    assert "FOUND" not in p.stdout, p.stdout
    entries = p.stdout.split()
    assert not any(e.startswith(("pip", "setuptools")) for e in entries), entries  # pip left the venv
    assert "felixpy" in entries and "exabgp" in entries
    assert not any(e in ("partial", "lock") or e.endswith("_Packages") for e in entries), "apt lists left"


def test_nftables_binding_programs_the_kernel(image: str) -> None:
    # Privileged but in its own network namespace (--network none): the table lives and dies with it.
    code = ("import json, nftables\n"
            "n = nftables.Nftables()\n"
            "rc, _, err = n.cmd('add table ip fximg')\n"
            "assert rc == 0, err\n"
            "n.set_json_output(True)\n"
            "rc, out, err = n.cmd('list tables')\n"
            "print(json.dumps([o['table']['name'] for o in json.loads(out)['nftables'] if 'table' in o]))\n")
    p = podman_run("-c", code, entrypoint="python3", opts=["--privileged"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == ["fximg"]


def _run_install(host: Path, *args: str, env: dict[str, str] | None = None,
                 opts: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    e = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
    return podman_run("install-cni", *args, opts=["-v", f"{host}:/host", *e, *opts])


def test_install_cni_into_a_host_root(image: str, tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "usr/bin").mkdir(parents=True)
    # The host's own interpreter, so the installed executable can then be run here, on the host.
    shutil.copy2("/usr/bin/python3", host / "usr/bin/python3")
    kc = tmp_path / "kubeconfig"
    kc.write_text("apiVersion: v1\nkind: Config\n")
    p = _run_install(host, "--kubeconfig-from", "/kc/kubeconfig",
                     env={"KUBERNETES_NODE_NAME": "node-img", "CNI_MTU": "1410"}, opts=["-v", f"{tmp_path}:/kc:ro"])
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["python"] == "/usr/bin/python3"
    conflist = host / "etc/cni/net.d/10-calico.conflist"
    assert res["conflist"] == "/host/etc/cni/net.d/10-calico.conflist"
    doc = json.loads(conflist.read_text())
    calico = doc["plugins"][0]
    assert (calico["type"], calico["nodename"], calico["mtu"]) == ("calico", "node-img", 1410)
    assert calico["kubernetes"]["kubeconfig"] == "/etc/cni/net.d/calico-kubeconfig"
    kc_inst = host / "etc/cni/net.d/calico-kubeconfig"
    assert kc_inst.read_text() == kc.read_text() and kc_inst.stat().st_mode & 0o777 == 0o600
    for name in ("calico", "calico-ipam"):
        exe = host / "opt/cni/bin" / name
        assert exe.stat().st_mode & 0o777 == 0o755
        shebang = exe.read_text().splitlines()[0]
        # The runtime runs it on the host: it must name the host's python, never the image's venv.
        assert shebang == "#!/usr/bin/python3 -IS", shebang
        v = subprocess.run([str(exe)], input="{}", capture_output=True, text=True, timeout=30, check=False,
                           env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
        assert v.returncode == 0, v.stdout + v.stderr
        assert "1.0.0" in json.loads(v.stdout)["supportedVersions"]
    # The reference plugins the image bundles (portmap for hostPort, ...) land next to ours.
    assert res["missing_plugins"] == "", res
    for name in ("portmap", "bandwidth", "tuning", "loopback", "host-local"):
        exe = host / "opt/cni/bin" / name
        assert exe.stat().st_mode & 0o111, name
        v = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=False,
                           env={"CNI_COMMAND": "VERSION"})
        assert v.returncode == 0 and "cniVersion" in v.stdout, (name, v.stdout, v.stderr)


def test_install_cni_without_host_python_fails_and_writes_nothing(image: str, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    p = _run_install(host)
    assert p.returncode == 1
    assert "no python3 found on the host" in p.stderr and "Traceback" not in p.stderr
    assert [x for x in host.rglob("*")] == []


# Run inside the image by its own python: the same code paths the agent and the sidecar take.
SIDECAR_CHECK = r'''
import ipaddress, json, os, signal, subprocess, sys, time
from bgp.exabgp_conf import render_config, render_env
from bgp.model import LocalBgpConfig, PeerSpec
from bgp.sidecar import write_config
A = ipaddress.IPv4Address
d = "/tmp/bgp"
os.makedirs(d, exist_ok=True)
cfg = LocalBgpConfig(node="n1", router_id=A("127.0.0.1"), local_ip=A("127.0.0.1"), asn=64512,
                     peers=(PeerSpec(name="Mesh_127_0_0_2", address=A("127.0.0.2"), asn=64512, local_asn=64512),))
relay = [sys.executable, "-m", "bgp.relay", "--socket", d + "/relay.sock"]  # as felixpy.bgpctl renders it
write_config(d, render_config(cfg, relay_argv=relay), render_env(bind_ip=None, pipename="fximg"))
val = subprocess.run(["exabgp", "validate", d + "/exabgp.conf"], capture_output=True, text=True,
                     env={**os.environ, "EXABGP_ENVFILE": d + "/exabgp.env"})
sc = subprocess.Popen(["felixpy", "bgp-sidecar", "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
def cmdlines():
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                out[int(p)] = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return out
exa_pid, relay_seen = None, False
for _ in range(600):  # wait (at most 60 s) for ExaBGP and the relay process it runs
    try:
        exa_pid = int(open(d + "/exabgp.pid").read())
    except (OSError, ValueError):
        exa_pid = None
    relay_seen = any("-m bgp.relay" in c for c in cmdlines().values())
    if exa_pid and relay_seen:
        break
    time.sleep(0.1)
exa_cmd = cmdlines().get(exa_pid or -1, "")
sc.send_signal(signal.SIGTERM)
rc = sc.wait(30)
print(json.dumps({"validate_rc": val.returncode, "validate_err": val.stderr[-500:], "exabgp_cmd": exa_cmd,
                  "relay_seen": relay_seen, "sidecar_rc": rc,
                  "exabgp_left": bool(exa_pid and os.path.exists(f"/proc/{exa_pid}")),
                  "sidecar_err": sc.stderr.read().decode()[-800:]}))
'''

RR_CHECK = r'''
import ipaddress, json, os, subprocess, time
from bgp.bird_conf import render_route_reflector
from bgp.model import LocalBgpConfig, PeerSpec
A = ipaddress.IPv4Address
d = "/tmp/rr"
os.makedirs(d, exist_ok=True)
peer = PeerSpec(name="Node_127_0_0_2", address=A("127.0.0.2"), asn=64512, local_asn=64512, rr_client=True,
                rr_cluster_id="127.0.0.1", kind="node")
cfg = LocalBgpConfig(node="rr1", router_id=A("127.0.0.1"), local_ip=A("127.0.0.1"), asn=64512, peers=(peer,))
conf, ctl = d + "/bird.cfg", d + "/bird.ctl"
open(conf, "w").write(render_route_reflector(cfg))
parse = subprocess.run(["bird", "-p", "-c", conf], capture_output=True, text=True)
bird = subprocess.Popen(["bird", "-f", "-c", conf, "-s", ctl], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
show = None
for _ in range(300):  # wait (at most 30 s) for BIRD's control socket to list the session
    if os.path.exists(ctl):
        p = subprocess.run(["birdc", "-s", ctl, "show", "protocols"], capture_output=True, text=True)
        if p.returncode == 0 and "Node_127_0_0_2" in p.stdout:
            show = p.stdout
            break
    if bird.poll() is not None:
        break
    time.sleep(0.1)
if show:
    subprocess.run(["birdc", "-s", ctl, "down"], capture_output=True, text=True)
try:
    bird_rc = bird.wait(30)
except subprocess.TimeoutExpired:
    bird.kill()
    bird_rc = bird.wait()
print(json.dumps({"parse_rc": parse.returncode, "parse_err": parse.stderr[-500:], "show": show, "bird_rc": bird_rc,
                  "bird_err": bird.stderr.read().decode()[-800:]}))
'''


def _in_image(code: str) -> dict[str, object]:
    p = podman_run("-c", code, entrypoint="python3")
    assert p.returncode == 0, p.stdout + p.stderr
    out: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def test_bgp_sidecar_runs_exabgp_with_the_agents_config(image: str) -> None:
    r = _in_image(SIDECAR_CHECK)
    assert r["validate_rc"] == 0, r
    assert str(r["exabgp_cmd"]).startswith("/opt/felixpy/venv/bin/python3 /opt/felixpy/venv/bin/exabgp server"), r
    assert r["relay_seen"] is True, r  # ExaBGP ran the relay from the path the agent's config names
    assert r["sidecar_rc"] == 0 and r["exabgp_left"] is False, r


def test_route_reflector_bird_runs_the_rendered_config(image: str) -> None:
    r = _in_image(RR_CHECK)
    assert r["parse_rc"] == 0, r
    assert r["show"] and "BGP" in str(r["show"]), r
    assert r["bird_rc"] == 0, r
