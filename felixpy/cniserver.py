"""Agent side of the CNI plugin: a root-only unix socket serving ADD / DEL / CHECK.

The thin executable (:mod:`cni_plugin.client`) forwards the raw request; here we parse it
(:mod:`cni_plugin.spec`), allocate addresses (IPAM), wire the pod (``dataplane.workload``), record the
WorkloadEndpoint in the datastore, and hand the endpoint to the calculation layer as a local write, then
wait until the dataplane has programmed it. So ADD returns only once the pod's routes and policy are in
the kernel.

Latency (bench/cni_latency.py): on a first ADD on etcd the IPAM handle, the block and the WorkloadEndpoint
are one transaction (the container MAC is chosen up front so the endpoint is complete before the veth
exists), sent before the veth is created, and the pod addresses are set while the dataplane applies. DEL
deletes the veth first and goes on as soon as the kernel announces it unregistered; the addresses are
released (with the endpoint, in one transaction) only after that, so an address is never handed out while
its old veth exists.

Failure rule: anything that fails after IPAM releases the addresses and removes the veth before the
error is returned: a failed ADD leaves nothing behind. DEL is idempotent and works from the container ID
alone (containerd's second DEL has no netns and no prevResult).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cni_plugin import spec
from cni_plugin.spec import CniError, CniRequest
from felixpy import metrics, names
from felixpy.dataplane import workload
from felixpy.dataplane.shims import netlink
from felixpy.datastore import conversion
from felixpy.datastore.api import (
    KIND_PROFILE,
    KIND_WEP,
    AlreadyExists,
    Backend,
    DatastoreError,
    Invalid,
    Key,
    KVPair,
    NotFound,
    Resource,
    new_resource,
)
from felixpy.ipam import IPAMClient, IPAMError

log = logging.getLogger(__name__)

MAX_HEADER = 256
MAX_BODY = 1 << 20
_WEP_CACHE_SIZE = 4096
# A veth deletion blocks its thread ~20 ms in the kernel's RCU teardown after the device is already gone;
# these threads (not the dataplane's) absorb that.
_REAP_THREADS = 8


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
    # Record a local write without waiting for the dataplane (the revision of an endpoint that was
    # programmed while its datastore write was in flight). None: the overlay keeps it revision-less.
    record_local_write: Callable[[Key, Resource | None, str], None] | None = None


class CniHandler:
    def __init__(self, hooks: AgentHooks) -> None:
        self.h = hooks
        self._profiles_seen: set[str] = set()
        self._reap_pool = concurrent.futures.ThreadPoolExecutor(_REAP_THREADS, thread_name_prefix="cni-reap")
        # WEP key -> (container ID, revision) of the endpoints this agent wrote: lets DEL delete the WEP
        # by revision inside the IPAM release transaction, without reading it first.
        self._weps: OrderedDict[Key, tuple[str, str]] = OrderedDict()

    def _remember_wep(self, key: Key, container_id: str, revision: str) -> None:
        self._weps[key] = (container_id, revision)
        self._weps.move_to_end(key)
        while len(self._weps) > _WEP_CACHE_SIZE:
            self._weps.popitem(last=False)

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
        self._check_ipam_conf(req)
        handle = self._handle_id(req)
        try:
            existing = await self.h.ipam.ips_by_handle(handle)
            if existing:
                return [ipaddress.IPv4Interface(f"{ip}/32") for ip in existing], False
            ips = await self.h.ipam.auto_assign(handle_id=handle, attrs=self._ipam_attrs(req, ns, pod), num_v4=1,
                                                pools=list(req.conf.ipam.ipv4_pools) or None)
        except IPAMError as e:
            raise CniError(spec.ERR_GENERIC, f"failed to request IPv4 addresses: {e}") from None
        except DatastoreError as e:
            raise CniError(spec.ERR_TRY_LATER, f"IPAM datastore error: {e}") from None
        return [ipaddress.IPv4Interface(f"{i.ip}/32") for i in ips], True

    @staticmethod
    def _check_ipam_conf(req: CniRequest) -> None:
        ipam_type = req.conf.ipam.type
        if ipam_type not in ("calico-ipam", ""):
            raise CniError(spec.ERR_INVALID_CONFIG,
                           f"unsupported ipam type {ipam_type!r}: felixpy serves calico-ipam")
        if not req.conf.ipam.assign_ipv4:
            raise CniError(spec.ERR_INVALID_CONFIG, "assign_ipv4=false: IPv6-only pods are not supported yet")

    def _ipam_attrs(self, req: CniRequest, ns: str, pod: str) -> dict[str, str]:
        ts = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())
        if not req.is_k8s:
            return {"node": self.h.node, "timestamp": ts}
        return {"node": self.h.node, "namespace": ns, "pod": pod, "timestamp": ts}

    async def _assign_with_wep(self, req: CniRequest, ns: str, pod: str, key: Key, veth: str, mac: str,
                               built: list[Resource]) -> tuple[list[ipaddress.IPv4Interface], Resource, str] | None:
        """First ADD of a container (etcd): handle, block and WorkloadEndpoint in one transaction.
        None when that does not apply (nothing written): the caller takes the general path. ``built``
        receives the WorkloadEndpoint as soon as the addresses are chosen, before the transaction is sent."""

        def wep_op(got: list[ipaddress.IPv4Interface]) -> list[tuple[str, KVPair]]:
            ips = [ipaddress.IPv4Interface(f"{i.ip}/32") for i in got]
            built[:] = [self._wep_resource(key, req, ns, pod, veth, ips, mac)]
            return [("create", KVPair(key, built[0]))]

        try:
            out = await self.h.ipam.assign_new_handle(handle_id=self._handle_id(req),
                                                      attrs=self._ipam_attrs(req, ns, pod), extra=wep_op,
                                                      pools=list(req.conf.ipam.ipv4_pools) or None)
        except IPAMError as e:
            raise CniError(spec.ERR_GENERIC, f"failed to request IPv4 addresses: {e}") from None
        except DatastoreError as e:
            raise CniError(spec.ERR_TRY_LATER, f"IPAM datastore error: {e}") from None
        if out is None:
            return None
        got, written = out
        return [ipaddress.IPv4Interface(f"{i.ip}/32") for i in got], built[0], written[0].revision

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
        """Overlapped: the veth is created while the IPAM transaction (which, on a first ADD on etcd, also
        creates the WorkloadEndpoint) is in flight; if it still is once the veth exists, the dataplane
        starts programming the endpoint (routes + policy) meanwhile; the pod addresses are set while the
        dataplane applies. The reply waits for all of it, and a transaction that failed is undone.

        The netlink work (~1.5 ms of short syscalls) runs inline on the event loop: on a busy node every
        hop to a worker thread and back costs more than the work itself."""
        ns, pod, veth, key = self._identity(req)
        if not os.path.exists(req.netns):
            raise CniError(spec.ERR_GENERIC, f"failed to open netns {req.netns!r}: no such file or directory")
        self._check_ipam_conf(req)
        if req.is_k8s:
            await self._ensure_namespace_profile(ns)
        mtu = req.conf.mtu or self.h.default_mtu()
        mac = workload.random_mac()
        ws = workload.WorkloadSpec(netns_path=req.netns, container_ifname=req.ifname, host_ifname=veth,
                                   ipv4=[], mtu=mtu, container_mac=mac)
        fresh = False
        wired = False
        wep_written = False
        early: asyncio.Future[str] | None = None  # programming started before the transaction returned
        try:
            chosen: list[Resource] = []
            ipam_job = asyncio.ensure_future(self._assign_with_wep(req, ns, pod, key, veth, mac, chosen))
            await _let_run()  # the transaction goes out before the loop blocks on netlink
            try:
                res = workload.create_veth(ws)
                wired = True
                if chosen and not ipam_job.done():
                    early = asyncio.ensure_future(self.h.program_endpoint(key, chosen[0], ""))
            except workload.WorkloadError as e:
                raise CniError(spec.ERR_GENERIC, str(e)) from None
            finally:
                try:
                    fast = await asyncio.shield(ipam_job)
                except asyncio.CancelledError:
                    fresh = wep_written = True  # the transaction may still land: clean up as if it did
                    raise
                if fast is not None:
                    fresh = wep_written = True
            if fast is not None:
                ips, wep, rev = fast
                if early is not None and self.h.record_local_write is not None:
                    self.h.record_local_write(key, wep, rev)
            else:
                ips, fresh = await self._assign(req, ns, pod)
                wep = self._wep_resource(key, req, ns, pod, veth, ips, res.container_mac)
                wep_written = True
                rev = await self._write_wep(key, wep)
            self._remember_wep(key, req.container_id, rev)
            ws = workload.WorkloadSpec(netns_path=req.netns, container_ifname=req.ifname, host_ifname=veth,
                                       ipv4=[i.ip for i in ips], mtu=mtu)
            if early is not None and fast is not None:
                prog_job = early
            else:
                if early is not None:
                    await early  # superseded by the general path's endpoint below
                prog_job = asyncio.ensure_future(self.h.program_endpoint(key, wep, rev))
                await _let_run()  # the dataplane thread starts applying while we set the addresses
            try:
                workload.configure_addresses(ws, res)
            except workload.WorkloadError as e:
                raise CniError(spec.ERR_GENERIC, str(e)) from None
            finally:
                problem = await prog_job
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
            cached = self._weps.get(key)
            if cached is not None and cached[0] == req.container_id:
                self._weps.pop(key, None)
            if early is not None:
                with contextlib.suppress(BaseException):
                    await early
            veth_gone = True
            if wired:
                try:
                    await self._reap(veth, req.netns, req.ifname)
                except Exception as e:
                    # The addresses stay allocated while the veth may still exist (no reuse under a live
                    # interface); the runtime's DEL for this failed ADD retries the teardown and releases.
                    log.warning("ADD %s failed and its veth %s could not be removed: %s", key, veth, e)
                    veth_gone = False
            if wep_written:
                with contextlib.suppress(Exception):
                    last = await self._delete_wep(key, req.container_id)
                    if last is not None:
                        await self.h.program_endpoint(key, None, last)
            elif early is not None:
                with contextlib.suppress(Exception):
                    await self.h.program_endpoint(key, None, "")  # take the early endpoint back
            if fresh and veth_gone:
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
            except Invalid as e:
                # A malformed stored endpoint (e.g. a Pod annotation that is not valid JSON) must not make
                # DEL fail forever: the veth is gone and the addresses are released by handle; the endpoint
                # itself is left for its owner to fix or delete (we cannot tell which sandbox owns it).
                log.warning("DEL: leaving malformed %s in place: %s", key, e)
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
        """The veth goes first: once the kernel has unregistered it (no traffic, its routes gone) the
        addresses may be reused, so the release (with the WorkloadEndpoint, in one transaction when this
        agent wrote it, while the dataplane drops the endpoint) follows; the ~20 ms of RCU teardown after
        that finishes in the background."""
        _, _, veth, key = self._identity(req)
        netns = req.netns if req.netns and os.path.exists(req.netns) else None
        cached = self._weps.get(key)
        if cached is not None and cached[0] != req.container_id:
            # A late DEL for an older sandbox of this pod: the host-side name now belongs to the newer
            # sandbox's veth, so only the old pod end (inside the old netns, if it still exists) goes.
            log.info("DEL %s for container %s: the pod's veth belongs to newer container %s; only the old "
                     "netns is cleaned", key, req.container_id, cached[0])
            if netns is not None:
                await self._reap(None, netns, req.ifname)
            await self._release(req)
            return
        await self._remove_veth(veth, netns, req.ifname)
        self._weps.pop(key, None)
        if cached is not None:
            # The endpoint leaves the dataplane while the transaction is in flight (its veth is gone already).
            prog_job = asyncio.ensure_future(self.h.program_endpoint(key, None, cached[1]))
            try:
                gone = await self.h.ipam.release_handle_with(self._handle_id(req),
                                                             [("delete", KVPair(key, {}, cached[1]))])
            except DatastoreError as e:
                with contextlib.suppress(Exception):
                    await prog_job
                raise CniError(spec.ERR_TRY_LATER, f"failed to release IPs: {e}") from None
            except BaseException:
                with contextlib.suppress(BaseException):
                    await prog_job
                raise
            problem = await prog_job
            if gone is not None:
                if problem:
                    log.warning("DEL %s: dataplane: %s", key, problem)
                return
        last_rev = await self._delete_wep(key, req.container_id)
        if last_rev is not None:
            problem = await self.h.program_endpoint(key, None, last_rev)
            if problem:
                log.warning("DEL %s: dataplane: %s", key, problem)
        await self._release(req)

    async def _remove_veth(self, veth: str, netns: str | None, ifname: str) -> None:
        """Delete the pod's veth and return once the kernel announced the host end unregistered (or the
        deletion finished, whichever is first); the rest of the deletion goes on in a reaper thread."""
        loop = asyncio.get_running_loop()
        try:
            watch = netlink.LinkWatch()
        except OSError as e:  # cannot watch: wait for the whole deletion
            log.debug("no link watch (%s): waiting for the full veth deletion", e)
            await self._reap(veth, netns, ifname)
            return
        gone: asyncio.Future[bool] = loop.create_future()

        def readable() -> None:
            try:
                deleted, lost = watch.deleted()
            except OSError:
                deleted, lost = set(), True
            if (veth in deleted or lost) and not gone.done():
                gone.set_result(not lost)  # lost events: fall back to waiting for the deletion itself

        loop.add_reader(watch.fileno(), readable)
        try:
            job: asyncio.Future[None] = asyncio.ensure_future(self._reap(veth, netns, ifname))
            waits: set[asyncio.Future[Any]] = {job, gone}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if job in done or not gone.result():
                await job  # finished first (nothing to delete, an error, the pod end only) or events lost
            else:
                job.add_done_callback(_log_reap_failure)
        finally:
            loop.remove_reader(watch.fileno())
            watch.close()

    async def _reap(self, veth: str | None, netns: str | None, ifname: str) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._reap_pool, functools.partial(workload.teardown_workload, veth, netns, ifname))
        except workload.WorkloadError as e:
            raise CniError(spec.ERR_TRY_LATER, str(e)) from None

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


async def _let_run(steps: int = 3) -> None:
    """Let tasks just started take their first steps (a gRPC call is sent from a task of its own, the
    dataplane loop hands the apply to its thread from another) before the caller blocks the loop. Only
    the overlap depends on it, never correctness."""
    for _ in range(steps):
        await asyncio.sleep(0)


def _log_reap_failure(job: asyncio.Future[None]) -> None:
    if not job.cancelled() and job.exception() is not None:
        log.error("veth deletion failed after the device was unregistered: %s", job.exception())


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
