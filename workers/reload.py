"""Hot reload: the worker's task that keeps its served versions in step with the repository.

Every `INFERQ_MODEL_POLL_INTERVAL_S`, and at once on SIGHUP, it scans the repository and loads
what is new or changed on its own thread (checksums, load, warm-up at several batch sizes),
then swaps the result in on the event loop in one step. Batches in flight finish on the
version they started with; a version no longer served drains, and once nothing holds it, its
memory is given back. A load that fails is logged and counted, and never disturbs what serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import structlog
import torch

from workers.metrics import WorkerMetrics
from workers.repository import Change, DirectoryModelRepository

log = structlog.get_logger(__name__)

OnChange = Callable[[Change], Awaitable[None]]
DRAIN_CHECK_S = 1.0
"""While a version drains, how often the reloader checks whether it can be unloaded."""


class ModelReloader:
    """Polls the repository (and reloads on request); one reload at a time."""

    def __init__(
        self,
        *,
        repository: DirectoryModelRepository,
        interval_s: float,
        metrics: WorkerMetrics | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        """interval_s: seconds between scans; 0 scans only when `request` is called."""
        self._repository = repository
        self._interval_s = interval_s
        self._metrics = metrics
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferq-loader")
        self.reloads = 0
        """Completed scans: a test waits on it."""

    def request(self) -> None:
        """Scan now (SIGHUP): safe to call from a signal handler on the loop."""
        self._wake.set()

    async def run(self) -> None:
        """Scan on every interval or request until cancelled; while versions drain, check
        every `DRAIN_CHECK_S` whether they can be unloaded."""
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + self._interval_s if self._interval_s else math.inf
        try:
            while True:
                timeout = next_scan - loop.time()
                if self._repository.draining:
                    timeout = min(timeout, DRAIN_CHECK_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), None if math.isinf(timeout) else max(timeout, 0.0)
                    )
                if self._wake.is_set() or loop.time() >= next_scan:
                    self._wake.clear()
                    await self.reload()
                    if self._interval_s:
                        next_scan = loop.time() + self._interval_s
                else:
                    self._unload_drained()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def reload(self) -> Change:
        """Scan, load what changed off the loop, swap it in; then unload what has drained."""
        loop = asyncio.get_running_loop()
        repository = self._repository
        try:
            listings = await loop.run_in_executor(self._executor, repository.scan)
            update = await loop.run_in_executor(self._executor, repository.reconcile, listings)
        except Exception as error:  # the repository itself is unreadable: keep serving
            log.error("model repository unreadable", error=f"{type(error).__name__}: {error}")
            self.reloads += 1
            return Change()
        change = repository.apply(update)
        repository.forget_missing_failures(listings)
        self.report(change)
        if change and self._on_change is not None:
            try:
                await self._on_change(change)
            except Exception:  # a broker hiccup while resubscribing: the next change retries
                log.exception("following the model change failed")
        self._unload_drained()
        self.reloads += 1
        return change

    def follow(self, on_change: OnChange) -> None:
        """Call ``on_change`` after every reload that changed what serves."""
        self._on_change = on_change

    def report(self, change: Change) -> None:
        """Log and count what a reload (or the first load) did."""
        for failure in change.failures:
            log.error(
                "model version refused",
                model=failure.name,
                version=failure.version,
                reason=failure.reason,
                error=failure.message,
            )
            if self._metrics is not None:
                self._metrics.model_load_failed(failure.name, failure.version, failure.reason)
        for served in change.added:
            log.info(
                "model version serving",
                model=served.model.name,
                version=served.model.version,
                format=served.model.format.value,
                load_seconds=round(served.load_seconds, 3),
                memory_bytes=served.memory_bytes,
            )
        for name, version in change.retired:
            log.info("model version draining", model=name, version=version)

    def _unload_drained(self) -> None:
        drained = self._repository.drained()
        if not drained:
            return
        release_memory(self._repository.device)
        for status in drained:
            log.info("model version unloaded", model=status.model, version=status.version)


def release_memory(device: torch.device) -> None:
    """Give the memory of unloaded models back: collect cycles (frozen ones too), trim.

    The worker freezes the collector after start-up, so models loaded then are invisible to
    it; unfreezing for one collection is the price of unloading them, paid rarely.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system (RSS), where glibc is the allocator."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
