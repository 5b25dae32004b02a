"""``felixpy route-reflector``: a BIRD 2 route reflector configured from the datastore.

ExaBGP cannot reflect routes, so reflector nodes run BIRD. This module:

1. makes sure the reflector's own Calico Node exists with ``spec.bgp.ipv4Address``,
   ``routeReflectorClusterID`` and its labels (what BGPPeer ``peerSelector``\\s match), and puts them back
   if someone changes them;
2. watches Nodes, BGPConfigurations and BGPPeers (list + watch through :mod:`felixpy.datastore.syncer`),
   computes this node's sessions with Calico's rules (:func:`bgp.peers.compute_local_config`) and renders
   them with :func:`bgp.bird_conf.render_route_reflector`;
3. writes ``<run_dir>/bird.cfg`` atomically (after ``bird -p`` has accepted it), runs
   ``bird -f -R -c <cfg> -s <run_dir>/bird.ctl`` as a child, restarts it if it dies, and reloads it with
   ``birdc configure`` when the config changes (sessions that did not change stay up).

A malformed resource is logged and treated as absent; a config BIRD refuses is logged and the previous one
stays in force. :meth:`RouteReflector.protocols` parses ``birdc show protocols`` for status.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bgp import bird_conf, peers
from bgp.model import LocalBgpConfig
from felixpy.datastore.api import (
    KIND_BGP_CONFIG,
    KIND_BGP_PEER,
    KIND_NODE,
    AlreadyExists,
    Backend,
    Conflict,
    DatastoreError,
    Key,
    KVPair,
    NotFound,
    new_resource,
)
from felixpy.datastore.syncer import DedupeBuffer, Syncer, SyncStatus, Update, WatchSpec

__all__ = [
    "CONFIG_NAME",
    "CONTROL_NAME",
    "BirdProcess",
    "BirdProtocol",
    "RouteReflector",
    "ensure_node",
    "parse_show_protocols",
    "run_route_reflector",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "bird.cfg"
CONTROL_NAME = "bird.ctl"


# ------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class BirdProtocol:
    """One row of ``birdc show protocols``."""

    name: str
    proto: str  # BGP, Device, Direct, Kernel, ...
    table: str
    state: str  # up | start | down | ...
    since: str
    info: str  # for BGP: Established, Active, Connect, ... plus any last error

    @property
    def established(self) -> bool:
        return self.proto == "BGP" and self.state == "up" and self.info.startswith("Established")


_TIME_TOKEN = re.compile(r"\d{1,2}:\d{2}:\d{2}(\.\d+)?")


def parse_show_protocols(text: str) -> list[BirdProtocol]:
    """Rows of ``birdc show protocols`` output (banner and header skipped; ``since`` may be one or two words
    depending on BIRD's ``timeformat``)."""
    rows: list[BirdProtocol] = []
    header_seen = False
    for line in text.splitlines():
        if not header_seen:
            header_seen = line.split()[:2] == ["Name", "Proto"]
            continue
        parts = line.split()
        if len(parts) < 5:
            continue
        name, proto, table, state, since = parts[:5]
        rest = parts[5:]
        if rest and _TIME_TOKEN.fullmatch(rest[0]) and not _TIME_TOKEN.fullmatch(since):
            since = f"{since} {rest[0]}"  # "2024-01-02 10:00:00"
            rest = rest[1:]
        rows.append(BirdProtocol(name, proto, table, state, since, " ".join(rest)))
    return rows


# ------------------------------------------------------------------------------------------- BIRD child


async def _run(argv: Sequence[str], timeout: float = 10.0) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        return -1, f"cannot run {argv[0]}: {e}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} timed out after {timeout:.0f}s"
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")


class BirdProcess:
    """One supervised ``bird -f -R`` child with its control socket."""

    def __init__(self, config_path: str, ctl_path: str, *, bird_bin: str = "bird", birdc_bin: str = "birdc",
                 argv_prefix: Sequence[str] = (), max_backoff: float = 30.0) -> None:
        self.config_path = config_path
        self.ctl_path = ctl_path
        self.bird_bin = bird_bin
        self.birdc_bin = birdc_bin
        self.argv_prefix = list(argv_prefix)  # e.g. ["ip", "netns", "exec", "ns1"] in tests
        self.max_backoff = max_backoff
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.ensure_future(self._supervise())

    async def wait_up(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._up.wait(), timeout)

    async def check(self, text: str) -> str | None:
        """None if BIRD accepts ``text`` as a config (``bird -p``), else its complaint."""
        fd, path = tempfile.mkstemp(prefix=".bird-check-", suffix=".cfg", dir=os.path.dirname(self.config_path))
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            rc, out = await _run([self.bird_bin, "-p", "-c", path])
        finally:
            os.unlink(path)
        return None if rc == 0 else (out.strip() or f"bird -p exited {rc}")

    async def birdc(self, *args: str, timeout: float = 10.0) -> tuple[int, str]:
        return await _run([self.birdc_bin, "-s", self.ctl_path, *args], timeout)

    async def reload(self) -> bool:
        """``birdc configure``: BIRD re-reads the file, restarting only the sessions whose config changed."""
        if self.pid is None:
            return False  # the supervisor starts the next BIRD with the new file anyway
        rc, out = await self.birdc("configure")
        ok = rc == 0 and ("Reconfigured" in out or "Reconfiguration in progress" in out)
        if not ok:
            log.error("BIRD reload failed: %s", out.strip())
        return ok

    async def protocols(self) -> list[BirdProtocol]:
        rc, out = await self.birdc("show", "protocols")
        if rc != 0:
            raise RuntimeError(f"birdc show protocols failed: {out.strip()}")
        return parse_show_protocols(out)

    async def _supervise(self) -> None:
        backoff = 1.0
        try:
            while True:
                if os.path.exists(self.ctl_path):
                    os.unlink(self.ctl_path)  # left by a BIRD that was killed; only ours lives in run_dir
                argv = [*self.argv_prefix, self.bird_bin, "-f", "-R", "-c", self.config_path, "-s", self.ctl_path]
                started = time.monotonic()
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.STDOUT)
                except OSError as e:
                    log.error("cannot start BIRD (%s): %s; retrying in %.0fs", " ".join(argv), e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(self.max_backoff, backoff * 2)
                    continue
                self.starts += 1
                log.info("started BIRD (pid %d): %s", self.proc.pid, " ".join(argv))
                self._up.set()
                assert self.proc.stdout is not None
                async for raw in self.proc.stdout:
                    log.info("bird: %s", raw.decode(errors="replace").rstrip())
                rc = await self.proc.wait()
                self._up.clear()
                if time.monotonic() - started > 60:
                    backoff = 1.0
                log.error("BIRD exited with status %s; restarting in %.0fs", rc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
        finally:
            await self._kill()

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        except ProcessLookupError:
            pass
        log.info("stopped BIRD (pid %d)", proc.pid)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # not "await task": that would swallow our own cancellation
        await self._kill()


# ------------------------------------------------------------------------------------------- own Node


def _desired_node_ok(value: Mapping[str, Any], node_ip: ipaddress.IPv4Interface, cluster_id: str,
                     labels: Mapping[str, str]) -> bool:
    def obj(parent: Mapping[str, Any], field: str) -> Mapping[str, Any]:
        v = parent.get(field)
        return v if isinstance(v, dict) else {}

    bgp = obj(obj(value, "spec"), "bgp")
    have = obj(obj(value, "metadata"), "labels")
    return (bgp.get("ipv4Address") == str(node_ip) and bgp.get("routeReflectorClusterID") == cluster_id
            and all(have.get(k) == v for k, v in labels.items()))


async def ensure_node(backend: Backend, nodename: str, node_ip: ipaddress.IPv4Interface, cluster_id: str,
                      labels: Mapping[str, str], *, attempts: int = 10) -> KVPair:
    """Create or fix the reflector's Calico Node (CAS update, retried on conflict); other fields and
    labels are kept. Raises :class:`DatastoreError` if it cannot."""
    key = Key(KIND_NODE, nodename)
    for _ in range(attempts):
        try:
            kv = await backend.get(key)
        except NotFound:
            spec = {"bgp": {"ipv4Address": str(node_ip), "routeReflectorClusterID": cluster_id}}
            try:
                created = await backend.create(key, new_resource(key, spec, labels=dict(labels)))
            except AlreadyExists:
                continue
            log.info("created Node %s (%s, cluster id %s, labels %s)", nodename, node_ip, cluster_id, dict(labels))
            return created
        if _desired_node_ok(kv.value, node_ip, cluster_id, labels):
            return kv
        value = copy.deepcopy(kv.value)
        if not isinstance(value.get("spec"), dict):
            value["spec"] = {}
        if not isinstance(value["spec"].get("bgp"), dict):
            value["spec"]["bgp"] = {}
        value["spec"]["bgp"]["ipv4Address"] = str(node_ip)
        value["spec"]["bgp"]["routeReflectorClusterID"] = cluster_id
        if not isinstance(value.get("metadata"), dict):
            value["metadata"] = {"name": nodename}
        md = value["metadata"]
        md["labels"] = {**(md.get("labels") if isinstance(md.get("labels"), dict) else {}), **labels}
        try:
            updated = await backend.update(KVPair(key, value, kv.revision, kv.uid))
        except Conflict:
            continue
        log.info("updated Node %s: %s, cluster id %s, labels %s", nodename, node_ip, cluster_id, dict(labels))
        return updated
    raise DatastoreError(f"could not write Node {nodename}: {attempts} conflicting updates in a row")


# ------------------------------------------------------------------------------------------- the runner


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".bird-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RouteReflector:
    def __init__(self, backend: Backend, nodename: str, run_dir: str, *, node_ip: ipaddress.IPv4Interface,
                 cluster_id: str, labels: Mapping[str, str], router_id_setting: str = "",
                 bird_bin: str = "bird", birdc_bin: str = "birdc", bird_argv_prefix: Sequence[str] = (),
                 node_retry: float = 5.0) -> None:
        if cluster_id:
            ipaddress.IPv4Address(cluster_id)  # Calico's validation: the cluster id is IPv4-shaped
        self.backend = backend
        self.nodename = nodename
        self.run_dir = run_dir
        self.node_ip = node_ip
        self.cluster_id = cluster_id
        self.labels = dict(labels)
        self.router_id_setting = router_id_setting
        self.node_retry = node_retry
        self.config_path = os.path.join(run_dir, CONFIG_NAME)
        self.bird = BirdProcess(self.config_path, os.path.join(run_dir, CONTROL_NAME), bird_bin=bird_bin,
                                birdc_bin=birdc_bin, argv_prefix=bird_argv_prefix)
        self.nodes: dict[str, peers.BgpNode] = {}
        self.configs: dict[str, peers.BgpGlobal] = {}
        self.rules: dict[str, peers.BgpPeerRule] = {}
        self.raw_nodes: dict[str, dict[str, Any]] = {}
        self.config: LocalBgpConfig | None = None
        self.rendered: str | None = None
        self.invalid_resources = 0
        self.reloads = 0
        self.changed = asyncio.Condition()  # notified after every applied batch (tests, status)
        self._in_sync = False
        self._node_checked_at = -1e9

    # -- inputs -----------------------------------------------------------------------------------
    def _apply_update(self, u: Update) -> None:
        key, value = u.key, u.value
        try:
            if key.kind == KIND_NODE:
                if value is None:
                    self.nodes.pop(key.name, None)
                    self.raw_nodes.pop(key.name, None)
                else:
                    self.raw_nodes[key.name] = value
                    self.nodes[key.name] = peers.parse_bgp_node(value)
            elif key.kind == KIND_BGP_CONFIG:
                if value is None:
                    self.configs.pop(key.name, None)
                else:
                    self.configs[key.name] = peers.parse_bgp_configuration(value)
            elif key.kind == KIND_BGP_PEER:
                if value is None:
                    self.rules.pop(key.name, None)
                else:
                    self.rules[key.name] = peers.parse_bgp_peer(value)
        except ValueError as e:
            # Treat it as absent: a peer or node we cannot read must not keep a stale session.
            self.invalid_resources += 1
            log.error("skipping malformed %s: %s", key, e)
            if key.kind == KIND_NODE:
                self.nodes.pop(key.name, None)
            elif key.kind == KIND_BGP_CONFIG:
                self.configs.pop(key.name, None)
            else:
                self.rules.pop(key.name, None)

    # -- outputs ----------------------------------------------------------------------------------
    def compute(self) -> LocalBgpConfig | None:
        return peers.compute_local_config(
            self.nodename, self.nodes, self.configs.get(peers.GLOBAL_CONFIG_NAME),
            self.configs.get(f"{peers.NODE_CONFIG_PREFIX}{self.nodename}"),
            [self.rules[k] for k in sorted(self.rules)], router_id_setting=self.router_id_setting,
            node_cfgs=list(self.configs.values()))

    async def _render(self) -> None:
        cfg = self.compute()
        self.config = cfg
        if cfg is None:
            log.warning("Node %s has no IPv4 address in the datastore yet; BIRD not (re)configured", self.nodename)
            return
        text = bird_conf.render_route_reflector(cfg)
        if text == self.rendered:
            return
        problem = await self.bird.check(text)
        if problem is not None:
            log.error("BIRD refused the generated config; keeping the previous one: %s", problem)
            return
        try:
            _write_atomic(self.config_path, text)
        except OSError as e:
            log.error("cannot write %s: %s; BIRD keeps its previous config", self.config_path, e)
            return
        self.rendered = text
        clients = sum(1 for p in cfg.peers if p.rr_client)
        log.info("wrote %s: %d peers (%d route reflector clients), AS %d, router id %s", self.config_path,
                 len(cfg.peers), clients, cfg.asn, cfg.router_id)
        if not self.bird.running:
            self.bird.start()
        elif await self.bird.reload():
            self.reloads += 1

    async def _check_own_node(self) -> None:
        raw = self.raw_nodes.get(self.nodename)
        if raw is not None and _desired_node_ok(raw, self.node_ip, self.cluster_id, self.labels):
            return
        now = time.monotonic()
        if now - self._node_checked_at < self.node_retry:
            return
        self._node_checked_at = now
        try:
            await ensure_node(self.backend, self.nodename, self.node_ip, self.cluster_id, self.labels)
        except DatastoreError as e:
            log.error("cannot write this reflector's Node %s: %s; retrying", self.nodename, e)

    async def protocols(self) -> list[BirdProtocol]:
        return await self.bird.protocols()

    async def run(self) -> None:
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        while True:
            try:
                await ensure_node(self.backend, self.nodename, self.node_ip, self.cluster_id, self.labels)
                self._node_checked_at = time.monotonic()
                break
            except DatastoreError as e:
                log.error("cannot write this reflector's Node %s: %s; retrying in %.0fs", self.nodename, e,
                          self.node_retry)
                await asyncio.sleep(self.node_retry)
        buf = DedupeBuffer()
        syncer = Syncer(self.backend, [WatchSpec(KIND_NODE), WatchSpec(KIND_BGP_CONFIG, optional=True),
                                       WatchSpec(KIND_BGP_PEER, optional=True)], buf)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(syncer.run(), name="rr-syncer")
                tg.create_task(self._loop(buf), name="rr-loop")
        finally:
            await self.bird.stop()

    async def _loop(self, buf: DedupeBuffer) -> None:
        while True:
            updates, status = await buf.get_batch()
            for u in updates:
                self._apply_update(u)
            if status == SyncStatus.IN_SYNC:
                self._in_sync = True
            if not self._in_sync:
                continue
            await self._check_own_node()
            await self._render()
            async with self.changed:
                self.changed.notify_all()


async def run_route_reflector(backend: Backend, nodename: str, run_dir: str, *, node_ip: ipaddress.IPv4Interface,
                              cluster_id: str, labels: Mapping[str, str], router_id_setting: str = "",
                              bird_bin: str = "bird", birdc_bin: str = "birdc",
                              bird_argv_prefix: Sequence[str] = ()) -> None:
    """Run the reflector until cancelled (then BIRD is stopped by PID and this returns by raising
    CancelledError). See the module docstring."""
    rr = RouteReflector(backend, nodename, run_dir, node_ip=node_ip, cluster_id=cluster_id, labels=labels,
                        router_id_setting=router_id_setting, bird_bin=bird_bin, birdc_bin=birdc_bin,
                        bird_argv_prefix=bird_argv_prefix)
    await rr.run()
