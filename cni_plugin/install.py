"""install-cni: put the CNI executables and the rendered conflist/kubeconfig into the host's CNI dirs.

Same contract as Calico's install container: env ``CNI_NETWORK_CONFIG`` (template with
``__KUBERNETES_NODE_NAME__``, ``__CNI_MTU__``, ``__KUBECONFIG_FILEPATH__``, ``__LOG_LEVEL__``,
``__DATASTORE_TYPE__``, ``__CALICO_API_GROUP__``), ``CNI_NET_DIR`` (/etc/cni/net.d), ``CNI_CONF_NAME``
(10-calico.conflist), ``CNI_MTU`` (1500), ``KUBERNETES_NODE_NAME``.

The executable is our stdlib-only client; its shebang is rewritten to a Python interpreter that exists
on the *host* (the runtime executes it there, outside our container). Decision: we require a host
python3 (>= 3.8, stdlib only) and fail the install loudly when there is none, rather than ship a
compiled shim.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cni_plugin import client

DEFAULT_TEMPLATE = """{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "__LOG_LEVEL__", "datastore_type": "__DATASTORE_TYPE__",
     "nodename": "__KUBERNETES_NODE_NAME__", "mtu": __CNI_MTU__, "ipam": {"type": "calico-ipam"},
     "policy": {"type": "k8s"}, "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"""

log = logging.getLogger(__name__)

PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


class InstallError(RuntimeError):
    pass


def resolve_in_root(host_root: Path, path: str, max_links: int = 40) -> Path | None:
    """``path`` as the host sees it: symlinks (absolute ones too, e.g. /etc/alternatives) are resolved
    inside ``host_root``, never in our own container's filesystem. None for a missing file or a loop."""
    parts = [p for p in path.split("/") if p]
    cur: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if cur:
                cur.pop()
            continue
        if part == ".":
            continue
        real = host_root.joinpath(*cur, part)
        if real.is_symlink():
            links += 1
            if links > max_links:
                return None
            target = os.readlink(real)
            if target.startswith("/"):
                cur = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not real.exists():
            return None
        cur.append(part)
    return host_root.joinpath(*cur)


def host_python_ok(host_root: Path, python: str) -> bool:
    """A regular, executable file at ``python`` on the host (following the host's own symlinks)."""
    real = resolve_in_root(host_root, python)
    return real is not None and real.is_file() and os.access(real, os.X_OK)


def find_host_python(host_root: Path) -> str:
    for cand in PYTHON_CANDIDATES:
        if host_python_ok(host_root, cand):
            return cand
    raise InstallError(f"no python3 found on the host under {host_root} (looked for {PYTHON_CANDIDATES}); "
                       "felixpy's CNI client needs the host's python3")


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_binaries(bin_dir: Path, python: str, names: tuple[str, ...] = ("calico", "calico-ipam")) -> list[Path]:
    src = Path(client.__file__).read_text()
    body = src.split("\n", 1)[1] if src.startswith("#!") else src
    data = f"#!{python} -IS\n{body}".encode()  # one argument: Linux passes shebang flags as one
    out = []
    for n in names:
        p = bin_dir / n
        _atomic_write(p, data, 0o755)
        out.append(p)
    return out


# Where the image keeps the reference plugins it ships (portmap, bandwidth, loopback...), as Calico's
# install-cni image does; copied next to ours so Calico's default conflist works on a bare host.
BUNDLED_CNI_DIR = "/opt/felixpy/cni-bin"


def install_bundled_plugins(bin_dir: Path, src_dir: Path, *, update: bool = True) -> list[Path]:
    """Copy every executable in ``src_dir`` into ``bin_dir``; an existing one is replaced only when
    ``update`` (Calico's ``UPDATE_CNI_BINARIES``, default true). A missing ``src_dir`` installs nothing."""
    if not src_dir.is_dir():
        return []
    out = []
    for src in sorted(src_dir.iterdir()):
        if not src.is_file() or not os.access(src, os.X_OK):
            continue
        dst = bin_dir / src.name
        if dst.exists() and not update:
            continue
        _atomic_write(dst, src.read_bytes(), 0o755)
        out.append(dst)
    return out


def render_conflist(template: str, env: Mapping[str, str], kubeconfig_path: str) -> str:
    subs = {
        "__KUBERNETES_NODE_NAME__": env.get("KUBERNETES_NODE_NAME", ""),
        "__CNI_MTU__": env.get("CNI_MTU", "1500"),
        "__KUBECONFIG_FILEPATH__": kubeconfig_path,
        "__LOG_LEVEL__": env.get("LOG_LEVEL", "info"),
        "__DATASTORE_TYPE__": env.get("DATASTORE_TYPE", "kubernetes"),
        "__CALICO_API_GROUP__": env.get("CALICO_API_GROUP", "crd.projectcalico.org/v1"),
    }
    out = template
    for k, v in subs.items():
        out = out.replace(k, v)
    try:
        doc = json.loads(out)
    except ValueError as e:
        raise InstallError(f"CNI_NETWORK_CONFIG does not render to valid JSON: {e}") from None
    if "plugins" not in doc and "type" not in doc:
        raise InstallError("CNI_NETWORK_CONFIG is neither a conflist nor a single plugin config")
    return json.dumps(doc, indent=2) + "\n"


def plugin_types(conflist: str) -> list[str]:
    """The executables a rendered conflist (or single plugin config) makes the runtime call."""
    doc = json.loads(conflist)
    plugins = doc.get("plugins") if "plugins" in doc else [doc]
    out: list[str] = []
    for p in plugins or []:
        for t in (p.get("type"), (p.get("ipam") or {}).get("type")):
            if isinstance(t, str) and t and t not in out:
                out.append(t)
    return out


def run_install(env: Mapping[str, str], *, host_root: Path = Path("/host"), bin_dir: Path | None = None,
                net_dir: Path | None = None, kubeconfig: str = "") -> dict[str, str]:
    """Install into ``host_root`` (the host filesystem mounted in the init container)."""
    bdir = bin_dir or host_root / "opt/cni/bin"
    ndir = net_dir or host_root / env.get("CNI_NET_DIR", "/etc/cni/net.d").lstrip("/")
    python = env.get("FELIXPY_HOST_PYTHON") or find_host_python(host_root)
    if not host_python_ok(host_root, python):
        raise InstallError(f"FELIXPY_HOST_PYTHON={python!r} is not an executable file on the host under {host_root}")
    installed = install_binaries(bdir, python)
    installed += install_bundled_plugins(bdir, Path(env.get("FELIXPY_BUNDLED_CNI_DIR", BUNDLED_CNI_DIR)),
                                         update=env.get("UPDATE_CNI_BINARIES", "true").lower() != "false")
    kubeconfig_host_path = ""
    if kubeconfig:
        kc = ndir / "calico-kubeconfig"
        _atomic_write(kc, kubeconfig.encode(), 0o600)
        kubeconfig_host_path = "/" + str(kc.relative_to(host_root)) if kc.is_relative_to(host_root) else str(kc)
    conf = render_conflist(env.get("CNI_NETWORK_CONFIG", DEFAULT_TEMPLATE), env, kubeconfig_host_path)
    conf_path = ndir / env.get("CNI_CONF_NAME", "10-calico.conflist")
    _atomic_write(conf_path, conf.encode(), 0o644)
    # Chained plugins (portmap, bandwidth...) are the host's (kubeadm's kubernetes-cni package and most
    # distributions ship them). Not fatal: they may be installed after us, but say so now rather than
    # let every pod fail later with "failed to find plugin".
    missing = [t for t in plugin_types(conf) if not (bdir / t).exists()]
    if missing:
        log.warning("the CNI config names plugins not installed in %s: %s (pods will fail until they are)",
                    bdir, ", ".join(missing))
    return {"binaries": ",".join(str(p) for p in installed), "conflist": str(conf_path), "python": python,
            "missing_plugins": ",".join(missing)}


def copy_plugin(dst: Path) -> None:
    """Test/lab helper: install the client under one name with this machine's /usr/bin/python3."""
    shutil.copyfile(client.__file__, dst)
    os.chmod(dst, 0o755)
