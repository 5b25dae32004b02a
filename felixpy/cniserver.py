"""Agent side of the CNI plugin: a root-only unix socket serving ADD / DEL / CHECK.

The thin executable (:mod:`cni_plugin.client`) forwards the raw request; here we parse it
(:mod:`cni_plugin.spec`), allocate addresses (IPAM), wire the pod (``dataplane.workload``), record the
WorkloadEndpoint in the datastore, and hand the endpoint to the calculation layer as a local write, then
wait until the dataplane has programmed it. So ADD returns only once the pod's routes are in the kernel.

Failure rule: anything that fails after IPAM releases the addresses and removes the veth before the
error is returned: a failed ADD leaves nothing behind. DEL is idempotent and works from the container ID
alone (containerd's second DEL has no netns and no prevResult).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cni_plugin import spec
from cni_plugin.spec import CniError, CniRequest
from felixpy import metrics, names
from felixpy.dataplane import workload
from felixpy.datastore import conversion
from felixpy.datastore.api import (
    KIND_PROFILE,
    KIND_WEP,
    AlreadyExists,
    Backend,
    DatastoreError,
    Key,
    NotFound,
    Resource,
    new_resource,
)
from felixpy.ipam import IPAMClient, IPAMError

log = logging.getLogger(__name__)

MAX_HEADER = 256
MAX_BODY = 1 << 20


@dataclass
class AgentHooks:
    """What the CNI server needs from the running agent (wired in daemon.py)."""

    node: str
    backend: Backend
    ipam: IPAMClient
    # Record a local write of a WorkloadEndpoint and wait until the dataplane applied it.
    # Returns "" on success or an error text describing what could not be programmed.
    program_endpoint: Callable[[Key, Resource | None, str], Awaitable[str]]
    run_blocking: Callable[..., Awaitable[Any]]
    default_mtu: Callable[[], int]
    interface_prefix: str = names.IFACE_PREFIX


class CniHandler:
    def __init__(self, hooks: AgentHooks) -> None:
        self.h = hooks
        self._profiles_seen: set[str] = set()

    async def _ensure_namespace_profile(self, ns: str) -> None:
        """etcd datastore: Calico's kube-controllers creates a ``kns.<namespace>`` profile per namespace
        (allow-all, namespace labels to apply). Where no controller runs, create it on the namespace's
        first pod so its endpoints are not cut off by the fail-closed missing-profile rule; an existing
        profile (a controller's) is never touched. Kubernetes datastore: profiles come from Namespaces."""
        if self.h.backend.type_name != "etcdv3" or ns in self._profiles_seen:
            return
        key = Key(KIND_PROFILE, f"kns.{ns}")
        try:
            await self.h.backend.create(key, conversion.namespace_to_profile({"metadata": {"name": ns}}))
            log.info("created profile %s (no namespace controller had made it)", key.name)
        except AlreadyExists:
            pass
        self._profiles_seen.add(ns)

    # -- entry --------------------------------------------------------------------------------------
    async def handle(self, env: dict[str, str], stdin: bytes, plugin: str) -> tuple[int, bytes]:
        version = spec.requested_version(stdin)
        command = env.get("CNI_COMMAND", "?")
        t0 = time.perf_counter()
        try:
            req = spec.parse_request(env, stdin, plugin)
            version = req.conf.cni_version
            if req.command == "VERSION":
                out: dict[str, Any] | None = spec.version_response()
            elif req.plugin == "calico-ipam":
                out = await self._ipam_only(req)
            elif req.command == "ADD":
                out = await self._add(req)
            elif req.command == "DEL":
                await self._del(req)
                out = None
            else:
                await self._check(req)
                out = None
            metrics.cni_requests.labels(command, "ok").inc()
            return 0, (json.dumps(out).encode() if out is not None else b"")
        except CniError as e:
            log.warning("CNI %s failed: %s %s", command, e.msg, e.details)
            metrics.cni_requests.labels(command, "error").inc()
            return 1, json.dumps(spec.format_error(e, version)).encode()
        except Exception as e:  # never let a bug leave the runtime without an answer
            log.exception("CNI %s crashed", command)
            metrics.cni_requests.labels(command, "error").inc()
            err = CniError(spec.ERR_GENERIC, f"felixpy agent failed during {command}: {type(e).__name__}: {e}")
            return 1, json.dumps(spec.format_error(err, version)).encode()
        finally:
            metrics.cni_latency.labels(command).observe(time.perf_counter() - t0)

    # -- identity -----------------------------------------------------------------------------------
    def _identity(self, req: CniRequest) -> tuple[str, str, str, Key]:
        """(namespace, pod/workload, host veth name, WEP key) of a request."""
        if req.is_k8s:
            ns = req.pod_namespace or "default"
            pod = req.pod_name
            veth = names.veth_name_for_workload(ns, pod, self.h.interface_prefix)
            orch = "k8s"
        else:
            ns, pod, orch = "default", req.container_id, "cni"
            veth = names.veth_name_for_container(req.container_id, self.h.interface_prefix)
        self._check_node(req)
        key = Key(KIND_WEP, names.wep_name(self.h.node, orch, pod, req.ifname), ns)
        return ns, pod, veth, key

    def _check_node(self, req: CniRequest) -> None:
        if req.conf.nodename and req.conf.nodename.lower() != self.h.node:
            raise CniError(spec.ERR_INVALID_CONFIG,
                           f"config nodename {req.conf.nodename!r} does not match this agent's node "
                           f"{self.h.node!r}")

    def _handle_id(self, req: CniRequest) -> str:
        return names.ipam_handle(req.conf.name, req.container_id)

    # -- IPAM ---------------------------------------------------------------------------------------
    async def _assign(self, req: CniRequest, ns: str, pod: str) -> tuple[list[ipaddress.IPv4Interface], bool]:
        """Addresses for this container: (ips, newly_allocated). A retried ADD reuses its addresses."""
        ipam_type = req.conf.ipam.type
        if ipam_type not in ("calico-ipam", ""):
            raise CniError(spec.ERR_INVALID_CONFIG,
                           f"unsupported ipam type {ipam_type!r}: felixpy serves calico-ipam")
        if not req.conf.ipam.assign_ipv4:
            raise CniError(spec.ERR_INVALID_CONFIG, "assign_ipv4=false: IPv6-only pods are not supported yet")
        handle = self._handle_id(req)
        try:
            existing = await self.h.ipam.ips_by_handle(handle)
            if existing:
                return [ipaddress.IPv4Interface(f"{ip}/32") for ip in existing], False
            attrs = {"node": self.h.node, "namespace": ns, "pod": pod,
                     "timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())}
            if not req.is_k8s:
                attrs = {"node": self.h.node, "timestamp": attrs["timestamp"]}
            ips = await self.h.ipam.auto_assign(handle_id=handle, attrs=attrs, num_v4=1,
                                                pools=list(req.conf.ipam.ipv4_pools) or None)
        except IPAMError as e:
            raise CniError(spec.ERR_GENERIC, f"failed to request IPv4 addresses: {e}") from None
        except DatastoreError as e:
            raise CniError(spec.ERR_TRY_LATER, f"IPAM datastore error: {e}") from None
        return [ipaddress.IPv4Interface(f"{i.ip}/32") for i in ips], True

    async def _release(self, req: CniRequest) -> None:
        try:
            await self.h.ipam.release_by_handle(self._handle_id(req))
        except DatastoreError as e:
            raise CniError(spec.ERR_TRY_LATER, f"failed to release IPs: {e}") from None

    async def _ipam_only(self, req: CniRequest) -> dict[str, Any] | None:
        """Invoked as ``calico-ipam`` by another plugin: allocate/release only."""
        ns = req.pod_namespace or "default"
        pod = req.pod_name or req.container_id
        self._check_node(req)
        if req.command == "ADD":
            ips, _ = await self._assign(req, ns, pod)
            res = spec.Result(interfaces=(), ips=tuple(spec.IPConfig(ip) for ip in ips),
                              routes=({"dst": "0.0.0.0/0"},))
            return spec.format_result(res, req.conf.cni_version)
        if req.command == "DEL":
            await self._release(req)
        return None

    # -- ADD ----------------------------------------------------------------------------------------
    async def _add(self, req: CniRequest) -> dict[str, Any]:
        ns, pod, veth, key = self._identity(req)
        if not os.path.exists(req.netns):
            raise CniError(spec.ERR_GENERIC, f"failed to open netns {req.netns!r}: no such file or directory")
        if req.is_k8s:
            await self._ensure_namespace_profile(ns)
        ips, fresh = await self._assign(req, ns, pod)
        wired = False
        try:
            mtu = req.conf.mtu or self.h.default_mtu()
            ws = workload.WorkloadSpec(netns_path=req.netns, container_ifname=req.ifname, host_ifname=veth,
                                       ipv4=[i.ip for i in ips], mtu=mtu)
            try:
                res: workload.WorkloadResult = await self.h.run_blocking(workload.setup_workload, ws)
            except workload.WorkloadError as e:
                raise CniError(spec.ERR_GENERIC, str(e)) from None
            wired = True
            wep = self._wep_resource(key, req, ns, pod, veth, ips, res.container_mac)
            rev = await self._write_wep(key, wep)
            problem = await self.h.program_endpoint(key, wep, rev)
            if problem:
                raise CniError(spec.ERR_GENERIC, f"dataplane failed to program the endpoint: {problem}")
            result = spec.Result(
                interfaces=(spec.Interface(veth, res.host_mac),
                            spec.Interface(req.ifname, res.container_mac, sandbox=req.netns, mtu=mtu)),
                ips=tuple(spec.IPConfig(ip, interface=1) for ip in ips),
                routes=({"dst": "0.0.0.0/0"},),
            )
            return spec.format_result(result, req.conf.cni_version)
        except BaseException:
            # Leave nothing behind: veth, endpoint, addresses (only ones this ADD allocated).
            if wired:
                with contextlib.suppress(Exception):
                    await self.h.run_blocking(workload.teardown_workload, veth, req.netns, req.ifname)
            with contextlib.suppress(Exception):
                await self._delete_wep(key, req.container_id)
            if fresh:
                with contextlib.suppress(Exception):
                    await self._release(req)
            raise

    def _wep_resource(self, key: Key, req: CniRequest, ns: str, pod: str, veth: str,
                      ips: list[ipaddress.IPv4Interface], mac: str) -> Resource:
        spec_: dict[str, Any] = {
            "orchestrator": "k8s" if req.is_k8s else "cni",
            "node": self.h.node,
            "containerID": req.container_id,
            "endpoint": req.ifname,
            "interfaceName": veth,
            "mac": mac,
            "ipNetworks": [str(i) for i in ips],
            "profiles": [f"kns.{ns}"] if req.is_k8s else [req.conf.name],
        }
        if req.is_k8s:
            spec_["pod"] = pod
        labels = {"projectcalico.org/namespace": ns,
                  "projectcalico.org/orchestrator": spec_["orchestrator"]}
        return new_resource(key, spec_, labels=labels)

    async def _write_wep(self, key: Key, wep: Resource) -> str:
        """Create or overwrite the WEP (KDD: patches the Pod's status annotations). Returns the revision.

        Create first: in KDD it is the pod patch itself, and in etcd a first ADD has no WEP yet, so the
        common case costs one round trip; only an existing WEP (etcd) needs the read + CAS update.
        """
        b = self.h.backend
        last: DatastoreError | None = None
        for _ in range(5):
            try:
                try:
                    return (await b.create(key, wep)).revision
                except AlreadyExists:
                    cur = await b.get(key)
                cur.value = {**cur.value, "spec": wep["spec"],
                             "metadata": {**cur.value.get("metadata", {}),
                                          "labels": {**(cur.value.get("metadata", {}).get("labels") or {}),
                                                     **wep["metadata"]["labels"]}}}
                return (await b.update(cur)).revision
            except DatastoreError as e:
                last = e
                await asyncio.sleep(0.01)
        raise CniError(spec.ERR_TRY_LATER, f"failed to write WorkloadEndpoint {key}: {last}")

    async def _delete_wep(self, key: Key, container_id: str) -> str | None:
        """Delete our WEP unless a newer sandbox owns it. Returns the last revision seen, None if absent."""
        b = self.h.backend
        for _ in range(6):
            try:
                cur = await b.get(key)
            except NotFound:
                return None
            owner = (cur.value.get("spec") or {}).get("containerID", "")
            if owner and owner != container_id:
                log.info("not deleting %s: owned by newer container %s", key, owner)
                return None
            try:
                await b.delete(key, revision=cur.revision)
                return cur.revision
            except NotFound:
                return None
            except DatastoreError as e:
                log.info("retrying delete of %s: %s", key, e)
        raise CniError(spec.ERR_TRY_LATER, f"failed to delete WorkloadEndpoint {key}")

    # -- DEL ----------------------------------------------------------------------------------------
    async def _del(self, req: CniRequest) -> None:
        _, _, veth, key = self._identity(req)
        last_rev = await self._delete_wep(key, req.container_id)
        if last_rev is not None:
            problem = await self.h.program_endpoint(key, None, last_rev)
            if problem:
                log.warning("DEL %s: dataplane: %s", key, problem)
        netns = req.netns if req.netns and os.path.exists(req.netns) else None
        await self.h.run_blocking(workload.teardown_workload, veth, netns, req.ifname)
        await self._release(req)

    # -- CHECK --------------------------------------------------------------------------------------
    async def _check(self, req: CniRequest) -> None:
        _, _, veth, _ = self._identity(req)
        prev = req.conf.prev_result
        if prev is None:
            raise CniError(spec.ERR_INVALID_CONFIG, "CHECK: required prevResult missing")
        ips = [i.ip for i in spec.parse_result_ips(prev) if i.version == 4]
        if not ips:
            raise CniError(spec.ERR_INVALID_CONFIG, "CHECK: prevResult has no IPv4 address")
        if not os.path.exists(req.netns):
            raise CniError(spec.ERR_GENERIC, f"CHECK: netns {req.netns!r} does not exist")
        ws = workload.WorkloadSpec(netns_path=req.netns, container_ifname=req.ifname, host_ifname=veth,
                                   ipv4=ips, mtu=0)
        try:
            await self.h.run_blocking(workload.check_workload, ws)
        except workload.WorkloadError as e:
            raise CniError(spec.ERR_GENERIC, f"CHECK failed: {e}") from None
        owned = await self.h.ipam.ips_by_handle(self._handle_id(req))
        missing = [str(ip) for ip in ips if ip not in owned]
        if missing:
            raise CniError(spec.ERR_GENERIC, f"CHECK failed: {', '.join(missing)} not allocated to this container")


# -- socket server ----------------------------------------------------------------------------------
async def serve(handler: CniHandler, path: str) -> asyncio.Server:
    """Listen on a root-only unix socket (mode 0600 in a 0700-or-stricter directory we create)."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readline()
            if len(header) > MAX_HEADER:
                raise ValueError("header too long")
            magic, plugin, elen, slen = header.decode().split()
            if magic != "FXCNI1":
                raise ValueError(f"bad magic {magic!r}")
            n_env, n_stdin = int(elen), int(slen)
            if n_env > MAX_BODY or n_stdin > MAX_BODY:
                raise ValueError("request too large")
            envb = await reader.readexactly(n_env)
            stdin = await reader.readexactly(n_stdin)
            env = dict(p.split("=", 1) for p in envb.decode().split("\0") if "=" in p)
            rc, out = await handler.handle(env, stdin, plugin)
        except (ValueError, asyncio.IncompleteReadError, UnicodeDecodeError) as e:
            rc, out = 1, json.dumps(spec.format_error(
                CniError(spec.ERR_DECODE, f"malformed request from CNI client: {e}"))).encode()
        try:
            writer.write(f"{rc}\n".encode() + out)
            await writer.drain()
        except ConnectionError:
            log.warning("CNI client went away before the answer was sent")
        finally:
            writer.close()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_conn, path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server
