"""A real etcd v3 server on loopback for tests.

Usage::

    with EtcdServer() as etcd:
        backend = await EtcdBackend.connect([etcd.endpoint])

Each server gets free ports, its own data dir (on /dev/shm when present: etcd 3.4 has no
``--unsafe-no-fsync``, and tmpfs makes its fsyncs nearly free) and a log file. ``stop()`` kills the process
by PID (the process group it leads) and removes the data dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType

ETCD_BINARY = os.environ.get("FELIXPY_ETCD", shutil.which("etcd") or "/usr/bin/etcd")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def temp_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def kill_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL one process we started (and its process group, which it leads)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def log_tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class EtcdServer:
    """One single-member etcd cluster. ``start()`` returns once ``/health`` reports healthy."""

    def __init__(self, *, name_prefix: str = "felixpy-etcd", start_timeout: float = 30.0,
                 tls: bool = False) -> None:
        """``tls=True`` serves https with a fresh CA and requires client certificates (see ``ca_file``,
        ``client_cert_file``, ``client_key_file``)."""
        self._name_prefix = name_prefix
        self._start_timeout = start_timeout
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self.client_port = 0
        self.peer_port = 0

    @property
    def endpoint(self) -> str:
        if not self.client_port:
            raise RuntimeError("EtcdServer is not running")
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def ca_file(self) -> str:
        return os.path.join(self._dir or "", "pki", "ca.crt")

    @property
    def client_cert_file(self) -> str:
        return os.path.join(self._dir or "", "pki", "client.crt")

    @property
    def client_key_file(self) -> str:
        return os.path.join(self._dir or "", "pki", "client.key")

    def _make_pki(self) -> None:
        """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
        pki = os.path.join(self._dir or "", "pki")
        os.makedirs(pki)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=pki)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=felixpy-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
        for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                          ("client", "extendedKeyUsage=clientAuth")):
            with open(os.path.join(pki, f"{name}.ext"), "w") as f:
                f.write(ext + "\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=felixpy-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("EtcdServer is not running")
        return self._proc.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self._dir or "", "etcd.log")

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("EtcdServer already started")
        if not os.access(ETCD_BINARY, os.X_OK):
            raise FileNotFoundError(f"etcd binary not found at {ETCD_BINARY} (apt-get install etcd-server)")
        self._dir = tempfile.mkdtemp(prefix=self._name_prefix + "-", dir=temp_root())
        if self.tls:
            self._make_pki()
        last_error = ""
        # A port picked by free_port() can be taken before etcd binds it; retry with new ports.
        for _attempt in range(3):
            self.client_port, self.peer_port = free_port(), free_port()
            if self.client_port == self.peer_port:
                continue
            self._spawn()
            try:
                self._wait_healthy()
                return
            except RuntimeError as e:
                last_error = str(e)
                kill_process(self._proc)
                self._proc = None
                shutil.rmtree(os.path.join(self._dir, "data"), ignore_errors=True)
        self.stop()
        raise RuntimeError(f"etcd did not start: {last_error}")

    def _spawn(self) -> None:
        assert self._dir is not None
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        name = os.path.basename(self._dir)
        args = [
            ETCD_BINARY,
            "--name", name,
            "--data-dir", os.path.join(self._dir, "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}",
            "--initial-cluster-state", "new",
            "--enable-v2=false",
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self.tls:
            pki = os.path.join(self._dir, "pki")
            args += ["--cert-file", os.path.join(pki, "server.crt"), "--key-file", os.path.join(pki, "server.key"),
                     "--trusted-ca-file", self.ca_file, "--client-cert-auth"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        url = f"{self.endpoint}/health"
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._proc.returncode}: {log_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy after {self._start_timeout}s: {log_tail(self.log_path)}")

    def stop(self) -> None:
        kill_process(self._proc)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.client_port = self.peer_port = 0

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
