"""A real kube-apiserver (v1.20, built from Debian's source package) on loopback for tests.

Usage::

    with EtcdServer() as etcd, KubeApiServer(etcd) as kas:
        kas.apply_crds("deploy/crds")
        backend = await K8sBackend.from_kubeconfig(kas.kubeconfig)

The server runs with RBAC on, a static admin token (group ``system:masters``), a service-account signing
key (so TokenRequest works) and a self-signed serving certificate in a temp cert dir. Its etcd keys live
under a unique ``--etcd-prefix``, so several servers can share one etcd. ``stop()`` kills it by PID and
removes its files. Tests that need it call :func:`require_kube_apiserver` to skip with a reason when the
binary is missing (see /work/shared/reference/control-plane.md for how it is built).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import yaml

from tests.realparts.etcd import EtcdServer, free_port, kill_process, log_tail, temp_root

KUBE_APISERVER_BINARY = os.environ.get("FELIXPY_KUBE_APISERVER", "/var/cache/felixpy/kube-apiserver-1.20.2-fx2")


def kube_apiserver_missing_reason() -> str | None:
    if not os.access(KUBE_APISERVER_BINARY, os.X_OK):
        return (f"kube-apiserver binary not found at {KUBE_APISERVER_BINARY} "
                "(build it as described in /work/shared/reference/control-plane.md)")
    return None


def require_kube_apiserver() -> None:
    """pytest.skip with a clear reason when the binary is absent."""
    reason = kube_apiserver_missing_reason()
    if reason:
        import pytest

        pytest.skip(reason)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class KubeApiServer:
    def __init__(self, etcd: EtcdServer, *, start_timeout: float = 90.0, audit: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        """``audit``: log every request's metadata (user, verb, resource, response code) as JSON lines
        to :attr:`audit_log_path` (see :meth:`audit_events`). ``extra_args`` are appended to the command
        line (a repeated flag overrides the default, as the last occurrence wins)."""
        self._etcd = etcd
        self._start_timeout = start_timeout
        self._audit = audit
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self.port = 0
        self.admin_token = ""
        self.etcd_prefix = ""
        self._ssl = ssl.create_default_context()

    # --- properties -----------------------------------------------------------------------------
    @property
    def host(self) -> str:
        if not self.port:
            raise RuntimeError("KubeApiServer is not running")
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("KubeApiServer is not running")
        return self._proc.pid

    @property
    def dir(self) -> str:
        if self._dir is None:
            raise RuntimeError("KubeApiServer is not running")
        return self._dir

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "kube-apiserver.log")

    @property
    def audit_log_path(self) -> str:
        return os.path.join(self.dir, "audit.log")

    def audit_events(self, stages: Iterable[str] = ("ResponseComplete",)) -> list[dict[str, Any]]:
        """The requests logged so far at ``stages`` (needs ``audit=True``), oldest first. A watch still
        open has only a ``ResponseStarted`` event."""
        wanted = set(stages)
        out: list[dict[str, Any]] = []
        with open(self.audit_log_path) as f:
            for line in f:
                if line.strip():
                    ev = json.loads(line)
                    if ev.get("stage") in wanted:
                        out.append(ev)
        return out

    @property
    def ca_file(self) -> str:
        """The self-signed serving certificate bundle (its CA is included), usable as a CA file."""
        return os.path.join(self.dir, "certs", "apiserver.crt")

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.dir, "kubeconfig")

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("KubeApiServer already started")
        reason = kube_apiserver_missing_reason()
        if reason:
            raise FileNotFoundError(reason)
        self._dir = tempfile.mkdtemp(prefix="felixpy-kas-", dir=temp_root())
        self.admin_token = secrets.token_hex(16)
        self.etcd_prefix = "/registry-" + os.path.basename(self._dir)
        sa_key = os.path.join(self._dir, "sa.key")
        subprocess.run(["openssl", "genrsa", "-out", sa_key, "2048"], check=True, capture_output=True)
        tokens = os.path.join(self._dir, "tokens.csv")
        with open(tokens, "w") as f:
            f.write(f'{self.admin_token},admin,admin,"system:masters"\n')
        os.chmod(tokens, 0o600)
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            self._spawn(sa_key, tokens)
            try:
                self._wait_ready()
                break
            except RuntimeError as e:
                last_error = str(e)
                kill_process(self._proc)
                self._proc = None
        else:
            self.stop()
            raise RuntimeError(f"kube-apiserver did not start: {last_error}")
        # The generated certificate bundle carries its own CA; trust it rather than skipping verification.
        # Its SANs include 127.0.0.1 (the advertise address), so full verification works.
        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        self._write_kubeconfig()

    def _spawn(self, sa_key: str, tokens: str) -> None:
        assert self._dir is not None
        args = [
            KUBE_APISERVER_BINARY,
            f"--etcd-servers={self._etcd.endpoint}",
            f"--etcd-prefix={self.etcd_prefix}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={os.path.join(self._dir, 'certs')}",
            f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            # Less background work on a 2-core machine shared with other tests.
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--endpoint-reconciler-type=none",
            "--v=1",
        ]
        if self._audit:
            policy = os.path.join(self._dir, "audit-policy.yaml")
            with open(policy, "w") as f:
                yaml.safe_dump({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}, f)
            args += [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log_path}",
                     "--audit-log-mode=blocking"]
        args += self._extra_args
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited with {self._proc.returncode}: {log_tail(self.log_path)}")
            try:
                req = urllib.request.Request(self.host + "/readyz",
                                             headers={"Authorization": f"Bearer {self.admin_token}"})
                with urllib.request.urlopen(req, timeout=5, context=insecure) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {self._start_timeout}s: {log_tail(self.log_path)}")

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "felixpy-test", "cluster": {
                "server": self.host, "certificate-authority": self.ca_file}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "admin", "context": {"cluster": "felixpy-test", "user": "admin"}}],
            "current-context": "admin",
        }
        with open(self.kubeconfig, "w") as f:
            yaml.safe_dump(cfg, f)
        os.chmod(self.kubeconfig, 0o600)

    def write_kubeconfig_for_token(self, token: str, path: str) -> str:
        """A kubeconfig at ``path`` that authenticates with ``token`` (e.g. a minted SA token)."""
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": self.host, "certificate-authority": self.ca_file}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        os.chmod(path, 0o600)
        return path

    def stop(self) -> None:
        kill_process(self._proc)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = 0

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- a small synchronous REST client for test setup -----------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                content_type: str = "application/json", query: dict[str, str] | None = None) -> Any:
        """One API call as admin (or ``token``); returns the decoded JSON body, raises :class:`ApiError`."""
        url = self.host + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}",
            "Content-Type": content_type,
            "Accept": "application/json",
        })
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise ApiError(e.code, parsed) from None
        return json.loads(raw) if raw else None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``, or replace it if it exists (a tiny ``kubectl apply`` for the kinds tests use)."""
        path = self._collection_path(obj)
        try:
            return dict(self.request("POST", path, obj))
        except ApiError as e:
            if e.status != 409:
                raise
        name = obj["metadata"]["name"]
        current = self.request("GET", f"{path}/{name}")
        obj = dict(obj)
        obj["metadata"] = dict(obj["metadata"], resourceVersion=current["metadata"]["resourceVersion"])
        return dict(self.request("PUT", f"{path}/{name}", obj))

    @staticmethod
    def _collection_path(obj: dict[str, Any]) -> str:
        api_version: str = obj["apiVersion"]
        kind: str = obj["kind"]
        ns = obj.get("metadata", {}).get("namespace")
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        plurals = {
            "Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "Pod": "pods", "Node": "nodes",
            "CustomResourceDefinition": "customresourcedefinitions", "ClusterRole": "clusterroles",
            "ClusterRoleBinding": "clusterrolebindings", "Role": "roles", "RoleBinding": "rolebindings",
            "NetworkPolicy": "networkpolicies", "ConfigMap": "configmaps", "Secret": "secrets",
            "Service": "services", "DaemonSet": "daemonsets", "Deployment": "deployments",
            "PriorityClass": "priorityclasses",
        }
        if kind not in plurals:
            raise ValueError(f"apply(): unsupported kind {kind}")
        if ns:
            return f"{base}/namespaces/{ns}/{plurals[kind]}"
        return f"{base}/{plurals[kind]}"

    # --- CRDs -----------------------------------------------------------------------------------
    def apply_crds(self, crd_dir: str, *, timeout: float = 60.0) -> list[str]:
        """Apply every CRD in ``crd_dir`` (*.yaml / *.yml, multi-document allowed); wait until Established."""
        docs: list[dict[str, Any]] = []
        for path in sorted(glob.glob(os.path.join(crd_dir, "*.yaml")) + glob.glob(os.path.join(crd_dir, "*.yml"))):
            with open(path) as f:
                docs.extend(d for d in yaml.safe_load_all(f) if d)
        return self.apply_crd_objects(docs, timeout=timeout)

    def apply_crd_objects(self, docs: Iterable[dict[str, Any]], *, timeout: float = 60.0) -> list[str]:
        names = []
        for doc in docs:
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            self.apply(doc)
            names.append(doc["metadata"]["name"])
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in sorted(pending):
                crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                conds = (crd.get("status") or {}).get("conditions") or []
                if any(c.get("type") == "Established" and c.get("status") == "True" for c in conds):
                    pending.discard(name)
            if pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CRDs not Established after {timeout}s: {sorted(pending)}")
                time.sleep(0.1)
        return names

    # --- namespaces, service accounts, tokens ---------------------------------------------------
    def ensure_namespace(self, name: str, *, with_default_sa: bool = True) -> None:
        """Create a namespace (and its ``default`` ServiceAccount: no controller-manager runs here)."""
        with contextlib.suppress(ApiError):
            self.request("POST", "/api/v1/namespaces",
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if with_default_sa:
            self.ensure_service_account(name, "default")

    def ensure_service_account(self, namespace: str, name: str) -> None:
        try:
            self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                         {"apiVersion": "v1", "kind": "ServiceAccount",
                          "metadata": {"name": name, "namespace": namespace}})
        except ApiError as e:
            if e.status != 409:
                raise

    def mint_token(self, namespace: str, service_account: str, *, expiration_seconds: int = 3600,
                   audiences: list[str] | None = None) -> str:
        """A bound token for a ServiceAccount via the TokenRequest API (creates the SA if needed)."""
        self.ensure_service_account(namespace, service_account)
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        out = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return str(out["status"]["token"])
