"""A private containerd (1.6, CRI plugin) for end-to-end tests of the CNI path kubelet uses.

Each ``Containerd`` owns a temp dir holding its root, state, socket, config and log; it never
talks to a system containerd or /run/containerd/containerd.sock. Quirks of this machine that the
config handles (see /work/shared/reference/cni-clients.md):

* root lacks CAP_SYS_RESOURCE, so the CRI plugin must not raise oom_score_adj
  (``restrict_oom_score_adj``);
* pod netns bind mounts go under the private state dir, not /run/netns;
* runc's state goes under the private state dir too (its default is /run/containerd/runc);
* containerd 1.6 takes a single CNI ``bin_dir``: see ``make_cni_bin_dir``;
* shutdown takes more than a second, so ``stop`` waits for the PID to exit.

The only global paths containerd 1.6 touches regardless of config are the shim socket dir
/run/containerd/s (one socket per running pod, named by a hash of our socket path) and libcni's
result cache /var/lib/cni/results; both are left as they were found (empty dirs we created are
removed).

Typical use (our plugin installed under the names the conflist uses)::

    bin_dir = make_cni_bin_dir(work / "bin", {"calico": plugin, "calico-ipam": plugin})
    with Containerd(cni_bin_dir=bin_dir, cni_conf_dir=work / "net.d") as ctrd:
        cri = ctrd.client()                      # thread-safe, shared
        sandbox = cri.run_pod("web", "default", port_mappings=[(80, 30080, "tcp")])
        ctr = cri.start_container(sandbox, "tools", BUSYBOX_IMAGE, ["sleep", "infinity"])
        rc, out, err = cri.exec(ctr, ["ping", "-c", "1", "10.0.0.1"])
    # stop(): every pod removed through CRI (CNI DEL runs), containerd stopped, dirs gone.

ptp/portmap side effects on the host (ip_forward, portmap's global nat chains) are the caller's:
see ``nat_snapshot`` / ``remove_idle_portmap_chains``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.realparts.cri import CriClient, CriError
from tests.realparts.oci_image import BUSYBOX_IMAGE, PAUSE_IMAGE, cached_archive, import_archive

REFERENCE_CNI_DIR = Path("/usr/lib/cni")
_SHIM_BINARY = "containerd-shim-runc-v2"
_SHIM_SOCKET_DIR = Path("/run/containerd/s")
_CNI_RESULT_CACHE = Path("/var/lib/cni/results")
_SHARED_DIRS = (
    _SHIM_SOCKET_DIR,
    Path("/run/containerd"),
    _CNI_RESULT_CACHE,
    Path("/var/lib/cni"),
)
_MNT_DETACH = 2


class ContainerdError(RuntimeError):
    """containerd failed to start, or stopping it left something behind."""


def containerd_available() -> str | None:
    """None if this machine can run the harness, else the reason it cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (containerd, network namespaces, mounts)"
    for tool in ("containerd", "ctr", "runc", _SHIM_BINARY, "nsenter", "iptables-save"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run scripts/setup.sh)"
    if not (REFERENCE_CNI_DIR / "loopback").exists():
        return f"containernetworking-plugins not installed ({REFERENCE_CNI_DIR}/loopback missing)"
    if not Path("/bin/busybox").exists():
        return "busybox-static not installed (/bin/busybox missing)"
    return None


def make_cni_bin_dir(path: Path, extra: Mapping[str, Path] | None = None) -> Path:
    """Make ``path`` a CNI bin dir: links to every reference plugin plus ``extra`` (name -> file).

    containerd 1.6 searches a single bin dir, so our plugin (e.g. ``calico``/``calico-ipam``) and
    Debian's loopback/portmap/host-local must sit side by side. ``extra`` wins on a name clash.
    """
    path.mkdir(parents=True, exist_ok=True)
    links: dict[str, Path] = {}
    if REFERENCE_CNI_DIR.is_dir():
        links.update({p.name: p for p in REFERENCE_CNI_DIR.iterdir() if p.is_file()})
    for name, target in (extra or {}).items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"invalid CNI plugin name {name!r}")
        if not os.access(target, os.X_OK):
            raise ValueError(f"CNI plugin {name!r}: {target} is not an executable file")
        links[name] = Path(target).resolve()
    for name, target in links.items():
        link = path / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return path


def _toml_str(value: str | Path) -> str:
    # JSON string escaping is a valid TOML basic string for everything a path can contain.
    return json.dumps(str(value))


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base`` in this mount namespace, deepest first."""
    prefix = str(base).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mnt = _unescape_mountinfo(line.split()[4])
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=lambda m: (m.count("/"), m), reverse=True)


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # already gone
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def _cgroup_roots() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 controllers and/or the v2 unified tree)."""
    roots = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split()[:1] in (["cgroup"], ["cgroup2"]):
                roots.append(Path(_unescape_mountinfo(pre.split()[4])))
    return roots


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_with_args(binary_name: str, required: Iterable[str]) -> list[tuple[int, list[str]]]:
    want = list(required)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == binary_name and all(w in argv for w in want):
            found.append((int(entry), argv))
    return found


class Containerd:
    """A containerd child process with a private root/state/socket, as a context manager.

    ``cni_bin_dir`` / ``cni_conf_dir``: the CNI plugin dir and the dir whose first conflist
    (alphabetically) is the pod network. ``netns``: path of a network namespace to run
    containerd (and so every CNI plugin it execs) in, e.g. a simulated node; None = the host's.
    ``env``: extra environment for containerd, inherited by the CNI plugins.
    """

    def __init__(
        self,
        *,
        cni_bin_dir: Path,
        cni_conf_dir: Path,
        parent_dir: Path | None = None,
        prefix: str = "felixpy-ctrd-",
        netns: Path | None = None,
        env: Mapping[str, str] | None = None,
        image_cache_dir: Path | None = None,
        log_level: str = "info",
        start_timeout: float = 60.0,
    ) -> None:
        self.cni_bin_dir = Path(cni_bin_dir)
        self.cni_conf_dir = Path(cni_conf_dir)
        self.parent_dir = parent_dir
        self.prefix = prefix
        self.netns = netns
        self.extra_env = dict(env or {})
        self.image_cache_dir = image_cache_dir
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: CriClient | None = None
        self._preexisting_shared: set[Path] = set()

    # -- paths ---------------------------------------------------------------------------------

    def _path(self, *parts: str) -> Path:
        if self.base is None:
            raise ContainerdError("containerd not started")
        return self.base.joinpath(*parts)

    @property
    def socket(self) -> Path:
        return self._path("containerd.sock")

    @property
    def root(self) -> Path:
        return self._path("root")

    @property
    def state(self) -> Path:
        return self._path("state")

    @property
    def log_path(self) -> Path:
        return self._path("containerd.log")

    @property
    def pod_log_root(self) -> Path:
        return self._path("pods")

    @property
    def netns_dir(self) -> Path:
        """Where containerd bind-mounts pod network namespaces (CNI_NETNS is a file in here)."""
        return self._path("state", "io.containerd.grpc.v1.cri", "netns")

    @property
    def runc_root(self) -> Path:
        return self._path("state", "runc")

    @property
    def cgroup_parent(self) -> str:
        # A pod cgroup parent per instance, like kubelet's /kubepods: removable as a whole at stop.
        return "/" + self._path().name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, ContainerdError):
            return ""

    # -- config --------------------------------------------------------------------------------

    def config_toml(self) -> str:
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = {_toml_str(self.root)}
state = {_toml_str(self.state)}
oom_score = 0
# Plugins that would probe or create global paths and are of no use here.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = {_toml_str(self.socket)}
[ttrpc]
  address = {_toml_str(self._path("containerd.sock.ttrpc"))}
[debug]
  address = ""
  level = {_toml_str(self.log_level)}
[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {_toml_str(self._path("root", "opt"))}
  # Unused (CRI runs io.containerd.runc.v2), but the tasks service needs it loaded; its default
  # runtime_root is the global /run/containerd/runc.
  [plugins."io.containerd.runtime.v1.linux"]
    runtime_root = {_toml_str(self._path("state", "runc-v1"))}
  {cri}]
    sandbox_image = {_toml_str(PAUSE_IMAGE)}
    # Root here has no CAP_SYS_RESOURCE: never raise a container's oom_score_adj.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    enable_selinux = false
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    {cri}.cni]
      bin_dir = {_toml_str(self.cni_bin_dir)}
      conf_dir = {_toml_str(self.cni_conf_dir)}
      max_conf_num = 1
    {cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      {cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        {cri}.containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = {_toml_str(self.runc_root)}
"""

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> CriClient:
        """The shared CRI client for this containerd (logs and cgroups inside its private dirs)."""
        if self._client is None:
            raise ContainerdError("containerd not started")
        return self._client

    def new_client(self) -> CriClient:
        """An extra CRI client (its own gRPC channel); the caller closes it."""
        return CriClient(self.socket, log_root=self.pod_log_root, cgroup_parent=self.cgroup_parent)

    def start(self) -> None:
        if self._proc is not None:
            raise ContainerdError("already started")
        archive = cached_archive(self.image_cache_dir)
        self._preexisting_shared = {d for d in _SHARED_DIRS if d.exists()}
        parent = self.parent_dir or Path(tempfile.gettempdir())
        self.base = Path(tempfile.mkdtemp(prefix=self.prefix, dir=parent))
        try:
            for d in ("root", "state", "tmp", "pods"):
                self._path(d).mkdir(mode=0o711)
            # Unix socket paths are limited to 107 bytes; fail clearly rather than deep in gRPC.
            if len(str(self.socket)) > 100:
                raise ContainerdError(f"socket path too long: {self.socket}")
            config = self._path("config.toml")
            config.write_text(self.config_toml())
            self._spawn(config)
            self._client = self.new_client()
            self._wait_ready()
            import_archive(archive, address=self.socket)
            self._wait_images()
            if self._conf_dir_has_network():
                self.wait_network_ready()
        except BaseException as exc:
            try:
                self.stop()
            except ContainerdError as cleanup:
                exc.add_note(str(cleanup))
            raise

    def _spawn(self, config: Path) -> None:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            # Temporary mounts made while unpacking images land in our dir, not /tmp.
            "TMPDIR": str(self._path("tmp")),
            **self.extra_env,
        }
        argv = ["containerd", "--config", str(config)]
        if self.netns is not None:
            # nsenter execs containerd, so the PID we hold is containerd's own.
            argv = ["nsenter", f"--net={self.netns}", "--", *argv]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C of the test run must not kill it before cleanup
            )

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ContainerdError(f"containerd exited with {self._proc.returncode}:\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._check_alive()
            if self.socket.exists():
                try:
                    if self.client().status().get("RuntimeReady"):
                        return
                except CriError:
                    pass
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd not ready after {self.start_timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _wait_images(self) -> None:
        # The CRI plugin learns about imported images asynchronously (event subscription).
        deadline = time.monotonic() + self.start_timeout
        for image in (PAUSE_IMAGE, BUSYBOX_IMAGE):
            while not self.client().image_present(image):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ContainerdError(f"image {image} not visible to CRI after import:\n{self.log_tail()}")
                time.sleep(0.05)

    def _conf_dir_has_network(self) -> bool:
        return self.cni_conf_dir.is_dir() and any(
            p.suffix in (".conf", ".conflist", ".json") for p in self.cni_conf_dir.iterdir()
        )

    def wait_network_ready(self, timeout: float = 30.0) -> None:
        """Wait until the CRI plugin has loaded a CNI config (NetworkReady)."""
        deadline = time.monotonic() + timeout
        while not self.client().status().get("NetworkReady"):
            self._check_alive()
            if time.monotonic() > deadline:
                reasons = self.client().status_reasons().get("NetworkReady", "")
                raise ContainerdError(f"NetworkReady still false after {timeout}s: {reasons}")
            time.sleep(0.05)

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove every pod through CRI, stop containerd, then sweep and delete everything it made.

        Raises ContainerdError (after finishing all steps) if anything could not be cleaned up.
        """
        problems: list[str] = []
        if self._proc is not None and self._proc.poll() is None and self._client is not None:
            problems += self._remove_all_pods()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._proc is not None:
            problems += self._stop_process(self._proc)
            self._proc = None
        if self.base is not None:
            problems += self._sweep()
            self.base = None
        if problems:
            raise ContainerdError("containerd cleanup incomplete:\n  " + "\n  ".join(problems))

    def _remove_all_pods(self) -> list[str]:
        client = self.client()
        try:
            pods = client.list_pods()
        except CriError as exc:
            return [f"ListPodSandbox: {exc}"]

        def remove(sandbox_id: str) -> str | None:
            try:
                client.stop_pod(sandbox_id)
                client.remove_pod(sandbox_id)
            except CriError as exc:
                return f"pod {sandbox_id[:12]}: {exc}"
            return None

        with ThreadPoolExecutor(max_workers=8) as pool:
            return [p for p in pool.map(remove, [pod.id for pod in pods]) if p]

    def _stop_process(self, proc: subprocess.Popen[bytes]) -> list[str]:
        problems = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(f"containerd pid {proc.pid} ignored SIGTERM for 30s; killed")
                proc.kill()
                proc.wait(timeout=10)
        return problems

    def _sweep(self) -> list[str]:
        problems: list[str] = []
        base = self._path()
        # Containers whose pods CRI failed to remove: kill them through runc with our private root.
        runc_ns_root = self.runc_root / "k8s.io"
        task_ids: set[str] = set()
        if runc_ns_root.is_dir():
            ids = [p.name for p in runc_ns_root.iterdir() if p.is_dir()]
            task_ids.update(ids)
            for cid in ids:
                subprocess.run(
                    ["runc", "--root", str(runc_ns_root), "delete", "--force", cid],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            if ids:
                problems.append(f"{len(ids)} runc container(s) left by containerd; force-deleted")
        # Shims outlive containerd; they are recognisable by our socket path in their argv.
        for pid, argv in _processes_with_args(_SHIM_BINARY, ["-address", str(self.socket)]):
            problems.append(f"shim pid {pid} still running; killed")
            if "-id" in argv[:-1]:
                task_ids.add(argv[argv.index("-id") + 1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # Sandboxes CRI never removed (containerd died) still have a dir; their CNI DEL never ran,
        # so libcni's cached results ("<network>-<sandbox id>-<ifname>") would stay behind.
        sandboxes_dir = self._path("root", "io.containerd.grpc.v1.cri", "sandboxes")
        sandbox_ids = [p.name for p in sandboxes_dir.iterdir()] if sandboxes_dir.is_dir() else []
        for sandbox_id in sandbox_ids:
            for cached in _CNI_RESULT_CACHE.glob(f"*-{sandbox_id}-*"):
                cached.unlink(missing_ok=True)
        if sandbox_ids:
            problems.append(f"{len(sandbox_ids)} sandbox(es) were never removed through CRI (no CNI DEL)")
        # A killed shim leaves its socket, named sha256("<containerd address>/<namespace>/<id>").
        for task_id in task_ids:
            name = hashlib.sha256(f"{self.socket}/k8s.io/{task_id}".encode()).hexdigest()
            (_SHIM_SOCKET_DIR / name).unlink(missing_ok=True)
        # Overlay rootfs mounts, netns bind mounts, shm mounts: lazily detach, deepest first.
        for mnt in mounts_under(base):
            try:
                _umount(mnt)
            except OSError as exc:
                problems.append(str(exc))
        for root in _cgroup_roots():
            cg = root / self.cgroup_parent.lstrip("/")
            if cg.is_dir():
                for dirpath, _dirs, _files in sorted(os.walk(cg), key=lambda w: -w[0].count("/")):
                    try:
                        os.rmdir(dirpath)
                    except OSError as exc:
                        problems.append(f"cgroup {dirpath}: {exc.strerror}")
        shutil.rmtree(base, ignore_errors=True)
        if base.exists():
            problems.append(f"could not remove {base}")
        # Shared dirs containerd/libcni created because of us: drop them only if empty.
        for d in _SHARED_DIRS:
            if d not in self._preexisting_shared:
                with contextlib.suppress(OSError):
                    d.rmdir()
        return problems


# -- portmap's global iptables chains ---------------------------------------------------------

PORTMAP_GLOBAL_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")
# (save tool, rule tool, nft family): iptables-nft keeps the nat table as nft table "<family> nat".
_IPTABLES = (("iptables-save", "iptables", "ip"), ("ip6tables-save", "ip6tables", "ip6"))
_BUILTIN_NAT_CHAINS = {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


def _nat_rules(save: str) -> tuple[set[str], list[str]]:
    if shutil.which(save) is None:
        return set(), []
    out = _run([save, "-t", "nat"]).stdout
    chains = {line[1:].split()[0] for line in out.splitlines() if line.startswith(":")}
    rules = [line for line in out.splitlines() if line.startswith("-A ")]
    return chains, rules


def _nft_nat_tables() -> set[str]:
    # Only iptables-nft creates deletable nat tables; with legacy xtables there is nothing to drop.
    if shutil.which("nft") is None or "nf_tables" not in _run(["iptables", "-V"]).stdout:
        return set()
    tables = {" ".join(line.split()[1:3]) for line in _run(["nft", "list", "tables"]).stdout.splitlines()}
    return {f"nft:{t}" for t in tables if t in ("ip nat", "ip6 nat")}


def nat_snapshot() -> set[str]:
    """portmap's nat chains (``ip6:`` prefix for IPv6) and the nft nat tables present now.

    Take it before a test that uses portmap and pass it to ``remove_idle_portmap_chains`` after.
    """
    found = _nft_nat_tables()
    for save, _cmd, family in _IPTABLES:
        tag = "ip6:" if family == "ip6" else ""
        chains, _rules = _nat_rules(save)
        found |= {tag + c for c in chains if c.startswith(("CNI-HOSTPORT-", "CNI-DN-"))}
    return found


def remove_idle_portmap_chains(preexisting: set[str]) -> list[str]:
    """Delete portmap's global chains (and the jumps to them) if we created them and they are idle.

    portmap keeps its CNI-HOSTPORT-* chains after its last DEL, and iptables-nft keeps the nat
    table it created. ``preexisting`` is ``nat_snapshot()`` from before the test: what existed then
    belongs to someone else, and while any CNI-DN-* chain or DNAT rule exists another runtime's pods
    still use the chains. Returns what was removed.
    """
    removed = []
    nft_tables = _nft_nat_tables()
    for save, cmd, family in _IPTABLES:
        tag = "ip6:" if family == "ip6" else ""
        chains, rules = _nat_rules(save)
        busy = any(c.startswith("CNI-DN-") for c in chains) or any(r.startswith("-A CNI-HOSTPORT-DNAT ") for r in rules)
        ours = [c for c in PORTMAP_GLOBAL_CHAINS if c in chains and tag + c not in preexisting]
        if not busy and ours:
            for rule in rules:
                words = shlex.split(rule)
                if words[1] not in ours and "-j" in words and words[words.index("-j") + 1] in ours:
                    _run([cmd, "-w", "-t", "nat", "-D", *words[1:]])
            for chain in ours:
                _run([cmd, "-w", "-t", "nat", "-F", chain])
            for chain in ours:
                if _run([cmd, "-w", "-t", "nat", "-X", chain]).returncode == 0:
                    removed.append(tag + chain)
            chains, rules = _nat_rules(save)
        table = f"nft:{family} nat"
        ours_and_idle = table in nft_tables and table not in preexisting
        ours_and_idle = ours_and_idle and not rules and chains <= _BUILTIN_NAT_CHAINS
        if ours_and_idle and _run(["nft", "delete", "table", family, "nat"]).returncode == 0:
            removed.append(table)
    return removed
