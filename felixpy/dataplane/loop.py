"""The dataplane loop: managers take messages cheaply, drivers apply the difference in one worker thread.

- ``submit(msgs)`` is called from the event loop right after the calculation layer flushes; it only
  queues them. Managers and drivers are touched by the worker thread alone (no locks in them): each
  apply first hands the queued messages to the managers' ``on_update`` (which only mark state dirty).
- ``run()`` applies whenever something is dirty, the refresh timer fires or a kernel event says our state
  may have drifted: managers' ``complete_deferred_work`` then each driver's ``apply`` in a fixed order,
  all in a single worker thread (netlink sockets are blocking and must not be shared across threads).
- ``barrier()`` resolves after an apply that *started* after the call: the CNI path uses it to return
  only once its endpoint is in the kernel.
- Nothing is removed from the kernel before the datastore is in sync (``InSync``): until then drivers
  only add, so a restart never flushes a working dataplane.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from felixpy import metrics
from felixpy.calc.messages import InSync, Message

T = TypeVar("T")

log = logging.getLogger(__name__)


class Manager(Protocol):
    def on_update(self, msg: Message) -> None: ...

    def complete_deferred_work(self) -> None: ...


class Driver(Protocol):
    def apply(self) -> object: ...

    def queue_resync(self) -> None: ...


class Dataplane:
    def __init__(self, managers: Sequence[Manager], drivers: Sequence[Driver], *,
                 refresh_interval: float = 90.0) -> None:
        self._managers = list(managers)
        self._drivers = list(drivers)
        self._refresh_interval = refresh_interval
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dataplane")
        self._wake = asyncio.Event()
        self._dirty = True
        self._generation = 0  # number of applies started
        self._completed = 0  # number of applies finished
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._inbox: list[Message] = []
        self._inbox_lock = threading.Lock()
        self.in_sync = False
        self.applies_ok = 0
        self.last_error = ""

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return self._executor

    def submit(self, msgs: Sequence[Message]) -> None:
        if not msgs:
            return
        with self._inbox_lock:
            self._inbox.extend(msgs)
        if msgs:
            self._dirty = True
            self._wake.set()

    def queue_resync(self, drivers: Sequence[Driver] | None = None) -> None:
        """Kernel state may have drifted (refresh timer, netlink event): re-read it on the next apply.
        ``drivers`` limits the re-read to the drivers whose state the event concerns (a new veth says
        nothing about the nft table, whose full re-read costs seconds at a few thousand rules)."""
        for d in self._drivers if drivers is None else drivers:
            d.queue_resync()
        self._dirty = True
        self._wake.set()

    async def barrier(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Resolved once apply number (generation + 1) has completed: it starts after this call.
        self._waiters.append((self._generation + 1, fut))
        self._dirty = True
        self._wake.set()
        await fut

    def _apply_sync(self) -> None:
        with self._inbox_lock:
            msgs, self._inbox = self._inbox, []
        for m in msgs:
            metrics.dataplane_messages.labels(type(m).__name__).inc()
            if isinstance(m, InSync):
                # The datastore view is complete: stale kernel objects may now be removed.
                for d in self._drivers:
                    allow = getattr(d, "allow_removals", None)
                    if allow is not None:
                        allow()
                    d.queue_resync()
                self.in_sync = True
            for mgr in self._managers:
                mgr.on_update(m)
        # One failing manager or driver must not starve the others (a missing tunnel device must not
        # stop workload routes): run them all, then report the first failure so the loop retries.
        failures: list[BaseException] = []
        for step in [m.complete_deferred_work for m in self._managers] + [d.apply for d in self._drivers]:
            try:
                step()
            except Exception as e:
                log.exception("dataplane step %s failed", getattr(step, "__qualname__", step))
                failures.append(e)
        if failures:
            raise failures[0]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_refresh = time.monotonic() + self._refresh_interval
        failed_in_a_row = 0
        while True:
            timeout = max(0.0, next_refresh - time.monotonic())
            if not self._dirty:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if time.monotonic() >= next_refresh:
                for d in self._drivers:
                    d.queue_resync()
                next_refresh = time.monotonic() + self._refresh_interval
            self._dirty = False
            self._generation += 1
            gen = self._generation
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self._apply_sync)
                self.applies_ok += 1
                self.last_error = ""
                failed_in_a_row = 0
            except Exception as e:  # a failed apply is retried; it must never kill the loop
                metrics.dataplane_failures.inc()
                err = f"{type(e).__name__}: {e}"
                if err != self.last_error:  # the traceback once per distinct error, not every retry
                    log.exception("dataplane apply failed; retrying")
                else:
                    log.error("dataplane apply failed again (%d in a row): %s", failed_in_a_row + 1, err)
                self.last_error = err
                self._dirty = True
                # Back off (0.1 s doubling to 5 s) so a persistent failure does not spin; a new update
                # wakes the loop early, since it may be what fixes the state.
                backoff = min(5.0, 0.1 * 2 ** min(failed_in_a_row, 6))
                failed_in_a_row += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
            metrics.apply_time.observe(time.perf_counter() - t0)
            self._completed = gen
            still: list[tuple[int, asyncio.Future[None]]] = []
            for want, fut in self._waiters:
                if want <= gen:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((want, fut))
            self._waiters = still

    async def call_in_dataplane_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread that applies (drivers' kernel handles are used from that thread only)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
