"""Offline OCI images for the containerd test harness, built from the host's busybox-static.

No registry is reachable from the test machines, so the two images the harness needs are written
as an OCI image-layout archive by hand and imported with ``ctr images import``:

* ``PAUSE_IMAGE``: the pod sandbox ("pause") image; its command sleeps forever.
* ``BUSYBOX_IMAGE``: a tools image with every busybox applet (sh, ping, nc, httpd, ip, wget, ...).

Both share one deterministic layer (fixed mtimes and owners, sorted entries), so the archive's
bytes depend only on the busybox binary and ``_FORMAT``; it is built once per machine and cached.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAUSE_IMAGE = "localhost/felixpy-pause:latest"
BUSYBOX_IMAGE = "localhost/felixpy-busybox:latest"
DEFAULT_BUSYBOX = Path("/bin/busybox")

# Bump when the archive layout or image contents change, so stale cached archives are not reused.
_FORMAT = 1

_MT_INDEX = "application/vnd.oci.image.index.v1+json"
_MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_MT_CONFIG = "application/vnd.oci.image.config.v1+json"
_MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Minimal /etc so that tools resolving users (httpd, ps, id) work and the demo page has content.
_ETC_FILES: dict[str, bytes] = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "var/www/index.html": b"felixpy\n",
}
_DIRS: dict[str, int] = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "etc": 0o755,
    "dev": 0o755,
    "proc": 0o755,
    "sys": 0o755,
    "run": 0o755,
    "tmp": 0o1777,
    "root": 0o700,
    "var": 0o755,
    "var/www": 0o755,
}


class ImageBuildError(RuntimeError):
    """The image archive could not be built or imported."""


@dataclass(frozen=True)
class ImageSpec:
    """One image in the archive: its full reference and the command it runs by default."""

    name: str
    cmd: tuple[str, ...]
    env: tuple[str, ...] = field(default=(_PATH_ENV,))


DEFAULT_IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec(PAUSE_IMAGE, ("/bin/sleep", "infinity")),
    ImageSpec(BUSYBOX_IMAGE, ("/bin/sh",)),
)


def oci_arch() -> str:
    """The OCI architecture name of this machine (containerd imports only matching platforms)."""
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
    if machine not in arch:
        raise ImageBuildError(f"unsupported machine architecture {machine!r}")
    return arch[machine]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _applet_paths(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageBuildError(f"cannot list applets of {busybox}: {exc}") from exc
    paths = sorted({p.strip().lstrip("/") for p in out.splitlines() if p.strip()})
    if "bin/sh" not in paths:
        raise ImageBuildError(f"{busybox} has no sh applet; is it busybox?")
    return [p for p in paths if p != "bin/busybox"]


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    # Fixed metadata keeps the layer digest stable across builds and machines with the same busybox.
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def build_rootfs_layer(busybox: Path = DEFAULT_BUSYBOX) -> bytes:
    """An uncompressed, deterministic layer tar holding busybox, its applet links and a tiny /etc."""
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise ImageBuildError(f"cannot read {busybox}: {exc}") from exc
    applets = _applet_paths(busybox)
    dirs = dict(_DIRS)
    for path in [*applets, *_ETC_FILES]:
        parent = os.path.dirname(path)
        while parent and parent not in dirs:
            dirs[parent] = 0o755
            parent = os.path.dirname(parent)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            tar.addfile(_tarinfo(d, tarfile.DIRTYPE, dirs[d]))
        tar.addfile(_tarinfo("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), io.BytesIO(binary))
        for path in applets:
            tar.addfile(_tarinfo(path, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
        for path, data in sorted(_ETC_FILES.items()):
            tar.addfile(_tarinfo(path, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _json_blob(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_oci_archive(
    dest: Path, images: Sequence[ImageSpec] = DEFAULT_IMAGES, busybox: Path = DEFAULT_BUSYBOX
) -> None:
    """Write an OCI image-layout tar at ``dest`` holding ``images`` (all on the busybox layer)."""
    if not images:
        raise ImageBuildError("no images requested")
    layer = build_rootfs_layer(busybox)
    layer_digest = _digest(layer)
    arch = oci_arch()
    blobs: dict[str, bytes] = {layer_digest: layer}
    manifests: list[dict[str, object]] = []
    for spec in images:
        if ":" not in spec.name.rsplit("/", 1)[-1]:
            raise ImageBuildError(f"image name {spec.name!r} needs an explicit tag")
        config = _json_blob(
            {
                "architecture": arch,
                "os": "linux",
                "created": "1970-01-01T00:00:00Z",
                "config": {"Cmd": list(spec.cmd), "Env": list(spec.env), "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "felixpy oci_image.py"}],
            }
        )
        manifest = _json_blob(
            {
                "schemaVersion": 2,
                "mediaType": _MT_MANIFEST,
                "config": {"mediaType": _MT_CONFIG, "digest": _digest(config), "size": len(config)},
                "layers": [{"mediaType": _MT_LAYER, "digest": layer_digest, "size": len(layer)}],
            }
        )
        blobs[_digest(config)] = config
        blobs[_digest(manifest)] = manifest
        manifests.append(
            {
                "mediaType": _MT_MANIFEST,
                "digest": _digest(manifest),
                "size": len(manifest),
                "platform": {"architecture": arch, "os": "linux"},
                # containerd names imported images from this annotation (full reference).
                "annotations": {
                    "io.containerd.image.name": spec.name,
                    "org.opencontainers.image.ref.name": spec.name.rsplit(":", 1)[1],
                },
            }
        )
    index = _json_blob({"schemaVersion": 2, "mediaType": _MT_INDEX, "manifests": manifests})
    files: list[tuple[str, bytes]] = [
        ("oci-layout", _json_blob({"imageLayoutVersion": "1.0.0"})),
        ("index.json", index),
    ]
    files += [(f"blobs/sha256/{d.split(':', 1)[1]}", data) for d, data in sorted(blobs.items())]
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_tarinfo(d, tarfile.DIRTYPE, 0o755))
        for name, data in files:
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))


def default_cache_dir() -> Path:
    """``$FELIXPY_CACHE/images`` (default /var/cache/felixpy/images), shared with scripts/setup.sh."""
    return Path(os.environ.get("FELIXPY_CACHE", "/var/cache/felixpy")) / "images"


def cached_archive(cache_dir: Path | None = None, busybox: Path = DEFAULT_BUSYBOX) -> Path:
    """Path of the archive with ``DEFAULT_IMAGES``, building it on first use on this machine.

    The file name carries a hash of the busybox binary and the format version, so an upgraded
    busybox or a changed layout produces a new archive instead of reusing a stale one.
    """
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    try:
        bb_hash = hashlib.sha256(busybox.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise ImageBuildError(f"cannot read {busybox}: {exc}") from exc
    key = hashlib.sha256(
        repr((_FORMAT, bb_hash, oci_arch(), [(s.name, s.cmd, s.env) for s in DEFAULT_IMAGES])).encode()
    ).hexdigest()[:16]
    path = cache / f"felixpy-images-{key}.tar"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent builders (other test runs) produce identical
    # bytes, and the rename is atomic, so readers never see a partial archive.
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".tar", dir=cache)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build_oci_archive(tmp, DEFAULT_IMAGES, busybox)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def import_archive(archive: Path, *, address: Path, namespace: str = "k8s.io", timeout: float = 120) -> None:
    """Import ``archive`` into the containerd at ``address`` (never the system one) and unpack it."""
    # A clean environment: CONTAINERD_* variables in the caller's environment must not redirect ctr.
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root"}
    cmd = [
        "ctr",
        "--address",
        str(address),
        "--namespace",
        namespace,
        "images",
        "import",
        "--snapshotter",
        "overlayfs",
        str(archive),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageBuildError(f"ctr import of {archive} failed: {exc}") from exc
    if proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise ImageBuildError(f"ctr import of {archive} failed (rc={proc.returncode}): {output}")
