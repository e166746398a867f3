"""One worker process: settings, models, runner, health server and the serving loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

import structlog
import torch

from workers.health import HealthServer
from workers.logging import configure_logging
from workers.metrics import WorkerMetrics
from workers.reload import ModelReloader
from workers.repository import DirectoryModelRepository
from workers.runner import ModelRunner, resolve_device
from workers.settings import WorkerSettings
from workers.worker import Worker

log = structlog.get_logger(__name__)


async def serve(settings: WorkerSettings, *, stop: asyncio.Event | None = None) -> None:
    """Load the models and serve until SIGTERM/SIGINT (or ``stop``), then shut down cleanly."""
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    device = resolve_device(settings.device)
    repository, reloader, metrics = await load_models(settings, device)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    settle_garbage_collector()
    async with ModelRunner(device=device, num_threads=settings.torch_threads) as runner:
        worker = Worker(
            settings=settings,
            repository=repository,
            runner=runner,
            metrics=metrics,
            reloader=reloader,
        )
        health = None
        if settings.http_port:
            health = HealthServer(
                registry=metrics.registry,
                is_ready=lambda: worker.ready,
                port=settings.http_port,
                models=repository.statuses,
            )
            await health.start()
        try:
            await worker.run(stop)
        finally:
            if health is not None:
                await health.close()


async def load_models(
    settings: WorkerSettings, device: torch.device
) -> tuple[DirectoryModelRepository, ModelReloader, WorkerMetrics]:
    """Load the repository (off the loop); with the reloader that follows it and the metrics
    that export it. ModelLoadError when nothing it must serve loads."""
    repository = DirectoryModelRepository(
        root=settings.models_dir, device=device, names=settings.served_model_names
    )
    started = await asyncio.to_thread(repository.load)
    metrics = WorkerMetrics()
    metrics.watch_models(repository.statuses)
    reloader = ModelReloader(
        repository=repository, interval_s=settings.model_poll_interval_s, metrics=metrics
    )
    reloader.report(started)
    return repository, reloader, metrics


def settle_garbage_collector() -> None:
    """Tune the cyclic GC for serving, once start-up is over.

    Everything alive now (torch, the models, the settings) lives as long as the process:
    freezing moves it out of the collector's sight, or each full collection walks it all and
    stalls the event loop for tens of milliseconds, which shows as latency tails.
    (Raising the young generation's threshold as well measured no gain: bench/hotpath.py.)
    """
    gc.collect()
    gc.freeze()


def device_for_child(spec: str, index: int) -> str:
    """Spread children over the visible GPUs: child i of ``auto``/``cuda`` gets ``cuda:i % n``."""
    if spec not in ("auto", "cuda"):
        return spec
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{index % count}" if count else spec


def child_settings(
    settings: WorkerSettings, index: int, *, group_instance_prefix: str | None
) -> WorkerSettings:
    """The settings of supervised child ``index``: its own id, device, port and static id.

    group_instance_prefix: the static member id stem chosen by the supervisor (kept across
        restarts); the child joins as ``{prefix}-{index}`` unless static membership is off.
    """
    updates: dict[str, object] = {
        "worker_id": f"{settings.worker_id}-{index}",
        "device": device_for_child(settings.device, index),
    }
    if settings.http_port:
        updates["http_port"] = settings.http_port + index  # one metrics port per child
    if settings.static_membership:
        prefix = settings.group_instance_id or group_instance_prefix
        if prefix:
            updates["group_instance_id"] = f"{prefix}-{index}"
    return settings.model_copy(update=updates)


def run_worker_process(index: int, *, group_instance_prefix: str | None = None) -> None:
    """Serve as supervised child ``index`` with settings from the environment."""
    settings = child_settings(WorkerSettings(), index, group_instance_prefix=group_instance_prefix)
    configure_logging(level=settings.log_level, json=settings.log_json)
    structlog.contextvars.bind_contextvars(worker=settings.worker_id)
    status = 0
    try:
        asyncio.run(serve(settings))
    except Exception:
        log.exception("worker_crashed")
        status = 1
    # Everything is stopped and committed: skip the interpreter's teardown, where extension
    # modules that torch loads (triton's nanobind bindings) print leak reports, plain text
    # in the middle of the JSON log.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
