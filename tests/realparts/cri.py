"""A small CRI (v1) client that drives containerd the way kubelet does, for end-to-end CNI tests.

Requests are filled like kubelet's (pod metadata, the ``io.kubernetes.*`` labels, hostname, log
directory, namespace options, port mappings), so containerd hands the CNI plugin the same
``K8S_POD_NAMESPACE``/``K8S_POD_NAME``/``K8S_POD_INFRA_CONTAINER_ID``/``K8S_POD_UID`` CNI_ARGS and
``portMappings`` runtime config it would under a real kubelet.

The client is thread-safe: one gRPC channel is shared by all threads (gRPC channels and stubs
are), and the only local state, the sandbox configs that CreateContainer needs again, is locked.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

_PROTOCOLS = {"tcp": pb.TCP, "udp": pb.UDP, "sctp": pb.SCTP}
_STATE_NAMES = {pb.SANDBOX_READY: "SANDBOX_READY", pb.SANDBOX_NOTREADY: "SANDBOX_NOTREADY"}


class CriError(RuntimeError):
    """A CRI call failed; ``details`` is containerd's own message (e.g. a CNI plugin's error text)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"CRI {method} failed ({code}): {details}")
        self.method = method
        self.code = code
        self.details = details


@dataclass(frozen=True)
class PodInfo:
    """One pod sandbox as ListPodSandbox reports it."""

    id: str
    name: str
    namespace: str
    uid: str
    state: str
    labels: Mapping[str, str]
    created_at_ns: int


PortMappingSpec = tuple[int, int, str]
"""(container_port, host_port, protocol) with protocol one of "tcp", "udp", "sctp"."""


class CriClient:
    """Blocking CRI v1 client over containerd's unix socket.

    ``log_root``: where per-pod log directories go (like kubelet's /var/log/pods); without it
    container output is discarded. ``cgroup_parent``: the cgroupfs parent for every pod (kubelet
    uses /kubepods/...); a unique one lets the owner of the containerd remove it afterwards.
    """

    def __init__(
        self,
        socket_path: str | Path,
        *,
        timeout: float = 120.0,
        log_root: Path | None = None,
        cgroup_parent: str | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.log_root = log_root
        self.cgroup_parent = cgroup_parent
        self._channel = grpc.insecure_channel(
            f"unix://{self.socket_path.resolve()}",
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        self._rt = pb_grpc.RuntimeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._img = pb_grpc.ImageServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._sandbox_configs: dict[str, pb.PodSandboxConfig] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CriError(method, code.name if code is not None else "UNKNOWN", details or str(exc)) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the socket answers and RuntimeReady is true (containerd just started)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.status().get("RuntimeReady"):
                    return
            except CriError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"CRI at {self.socket_path} not ready after {timeout}s: {last}")

    # -- runtime -------------------------------------------------------------------------------

    def version(self) -> str:
        resp = self._call(self._rt, "Version", pb.VersionRequest(version="v1"))
        return f"{resp.runtime_name} {resp.runtime_version} (CRI {resp.runtime_api_version})"

    def _conditions(self) -> list[Any]:
        resp = self._call(self._rt, "Status", pb.StatusRequest(verbose=False), timeout=10)
        return list(resp.status.conditions)

    def status(self) -> dict[str, bool]:
        """Runtime conditions by type, e.g. ``{"RuntimeReady": True, "NetworkReady": False}``."""
        return {c.type: bool(c.status) for c in self._conditions()}

    def status_reasons(self) -> dict[str, str]:
        """Why each condition is as it is (containerd says e.g. "cni config load failed: ...")."""
        return {c.type: f"{c.reason}: {c.message}".strip(": ") for c in self._conditions()}

    def image_present(self, image: str) -> bool:
        resp = self._call(self._img, "ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=image)))
        return bool(resp.image.id)

    # -- pods ----------------------------------------------------------------------------------

    def run_pod(
        self,
        name: str,
        namespace: str,
        uid: str | None = None,
        port_mappings: Sequence[PortMappingSpec] = (),
        labels: Mapping[str, str] | None = None,
        hostname: str | None = None,
        *,
        annotations: Mapping[str, str] | None = None,
        host_network: bool = False,
        timeout: float | None = None,
    ) -> str:
        """RunPodSandbox (this is where containerd runs CNI ADD); returns the sandbox id."""
        uid = uid or str(uuid.uuid4())
        mappings = []
        for container_port, host_port, proto in port_mappings:
            if proto.lower() not in _PROTOCOLS:
                raise ValueError(f"unknown protocol {proto!r} in port mapping; use tcp, udp or sctp")
            mappings.append(
                pb.PortMapping(protocol=_PROTOCOLS[proto.lower()], container_port=container_port, host_port=host_port)
            )
        all_labels = dict(labels or {})
        # The labels kubelet always adds; containerd copies them onto the sandbox container.
        all_labels.update(
            {
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid,
            }
        )
        all_annotations = {"kubernetes.io/config.source": "api", **(annotations or {})}
        log_dir = ""
        if self.log_root is not None:
            path = self.log_root / f"{namespace}_{name}_{uid}"
            path.mkdir(parents=True, exist_ok=True)
            log_dir = str(path)
        network_mode = pb.NODE if host_network else pb.POD
        linux = pb.LinuxPodSandboxConfig(
            cgroup_parent=self.cgroup_parent or "",
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=network_mode, pid=pb.CONTAINER, ipc=pb.POD),
            ),
        )
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            hostname="" if host_network else (hostname or name)[:63],
            log_directory=log_dir,
            port_mappings=mappings,
            labels=all_labels,
            annotations=all_annotations,
            linux=linux,
        )
        resp = self._call(self._rt, "RunPodSandbox", pb.RunPodSandboxRequest(config=config), timeout)
        sandbox_id: str = resp.pod_sandbox_id
        with self._lock:
            self._sandbox_configs[sandbox_id] = config
        return sandbox_id

    def _pod_status(self, sandbox_id: str, verbose: bool = False) -> Any:
        return self._call(
            self._rt,
            "PodSandboxStatus",
            pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose),
        )

    def pod_state(self, sandbox_id: str) -> str:
        """The sandbox state: SANDBOX_READY or SANDBOX_NOTREADY."""
        return _STATE_NAMES.get(self._pod_status(sandbox_id).status.state, "UNKNOWN")

    def pod_ip(self, sandbox_id: str) -> str:
        """The pod's primary IP as the CNI result reported it ("" for host-network pods)."""
        ip: str = self._pod_status(sandbox_id).status.network.ip
        return ip

    def pod_ips(self, sandbox_id: str) -> list[str]:
        net = self._pod_status(sandbox_id).status.network
        return [ip for ip in [net.ip, *(x.ip for x in net.additional_ips)] if ip]

    def pod_info(self, sandbox_id: str) -> dict[str, Any]:
        """containerd's verbose sandbox info (runtimeSpec, cniResult, pid, ...), parsed."""
        info = self._pod_status(sandbox_id, verbose=True).info
        raw = info.get("info")
        if not raw:
            return {}
        parsed = json.loads(raw)
        return parsed if isinstance(parsed, dict) else {}

    def pod_netns_path(self, sandbox_id: str) -> str | None:
        """The pod network namespace path containerd passed as CNI_NETNS (None for host network)."""
        spec = self.pod_info(sandbox_id).get("runtimeSpec") or {}
        for ns in (spec.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") == "network" and ns.get("path"):
                path: str = ns["path"]
                return path
        return None

    def stop_pod(self, sandbox_id: str, timeout: float | None = None) -> None:
        """StopPodSandbox: kills the containers and runs CNI DEL (with the netns still present)."""
        self._call(self._rt, "StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout)

    def remove_pod(self, sandbox_id: str, timeout: float | None = None) -> None:
        """RemovePodSandbox: containerd runs CNI DEL again, with no netns and no prevResult."""
        self._call(self._rt, "RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout)
        with self._lock:
            self._sandbox_configs.pop(sandbox_id, None)

    def list_pods(self) -> list[PodInfo]:
        resp = self._call(self._rt, "ListPodSandbox", pb.ListPodSandboxRequest())
        return [
            PodInfo(
                id=p.id,
                name=p.metadata.name,
                namespace=p.metadata.namespace,
                uid=p.metadata.uid,
                state=_STATE_NAMES.get(p.state, "UNKNOWN"),
                labels=dict(p.labels),
                created_at_ns=p.created_at,
            )
            for p in resp.items
        ]

    # -- containers ----------------------------------------------------------------------------

    def _sandbox_config(self, sandbox_id: str) -> pb.PodSandboxConfig:
        with self._lock:
            config = self._sandbox_configs.get(sandbox_id)
        if config is not None:
            return config
        # A sandbox made by another client: rebuild the parts CreateContainer uses from its status.
        status = self._pod_status(sandbox_id).status
        return pb.PodSandboxConfig(
            metadata=status.metadata, labels=dict(status.labels), annotations=dict(status.annotations)
        )

    def start_container(self, sandbox_id: str, name: str, image: str, cmd: Sequence[str]) -> str:
        """CreateContainer + StartContainer in the pod; returns the container id."""
        sandbox_config = self._sandbox_config(sandbox_id)
        meta = sandbox_config.metadata
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=image),
            command=list(cmd),
            labels={
                "io.kubernetes.container.name": name,
                "io.kubernetes.pod.name": meta.name,
                "io.kubernetes.pod.namespace": meta.namespace,
                "io.kubernetes.pod.uid": meta.uid,
            },
            log_path=f"{name}/0.log" if sandbox_config.log_directory else "",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=sandbox_config.linux.security_context.namespace_options
                ),
            ),
        )
        resp = self._call(
            self._rt,
            "CreateContainer",
            pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config),
        )
        container_id: str = resp.container_id
        self._call(self._rt, "StartContainer", pb.StartContainerRequest(container_id=container_id))
        return container_id

    def exec(self, container_id: str, cmd: Sequence[str], timeout: float = 5) -> tuple[int, str, str]:
        """ExecSync: run ``cmd`` in the container; returns (exit code, stdout, stderr).

        Raises CriError if the command outlives ``timeout`` seconds (containerd kills it).
        """
        seconds = max(1, int(timeout + 0.999))
        resp = self._call(
            self._rt,
            "ExecSync",
            pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=seconds),
            timeout=seconds + 30,
        )
        return (
            int(resp.exit_code),
            resp.stdout.decode("utf-8", "replace"),
            resp.stderr.decode("utf-8", "replace"),
        )

    def container_state(self, container_id: str) -> str:
        resp = self._call(self._rt, "ContainerStatus", pb.ContainerStatusRequest(container_id=container_id))
        return str(pb.ContainerState.Name(resp.status.state))

    def stop_container(self, container_id: str, grace_seconds: int = 0) -> None:
        self._call(
            self._rt,
            "StopContainer",
            pb.StopContainerRequest(container_id=container_id, timeout=grace_seconds),
        )

    def remove_container(self, container_id: str) -> None:
        self._call(self._rt, "RemoveContainer", pb.RemoveContainerRequest(container_id=container_id))

    def list_containers(self, sandbox_id: str | None = None) -> list[str]:
        flt = pb.ContainerFilter(pod_sandbox_id=sandbox_id or "")
        resp = self._call(self._rt, "ListContainers", pb.ListContainersRequest(filter=flt))
        return [c.id for c in resp.containers]
