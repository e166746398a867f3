"""Helpers to run workers against the real stack: in-process or as ``inferq-worker``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from deploy.local.demo import model_outputs
from producers.client import InferenceClient
from producers.settings import ProducerSettings
from schemas.messages import InferenceRequest, InferenceResult
from schemas.settings import KafkaSettings, RedisSettings
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from workers.example_models import write_example_models
from workers.metrics import WorkerMetrics
from workers.process import load_models
from workers.reload import ModelReloader
from workers.repository import DirectoryModelRepository
from workers.runner import ModelRunner
from workers.settings import WorkerSettings
from workers.worker import Worker


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """Where one test's inferq lives: broker, Redis, topic prefix, models, group."""

    bootstrap: str
    redis_url: str
    prefix: str
    models_dir: Path
    group_id: str
    redis_cluster: bool = False
    """Whether `redis_url` names a node of a Redis Cluster."""

    @property
    def redis_settings(self) -> RedisSettings:
        return RedisSettings(url=self.redis_url, cluster=self.redis_cluster)

    def worker_settings(self, **overrides: object) -> WorkerSettings:
        values: dict[str, object] = {
            "kafka": KafkaSettings(bootstrap_servers=self.bootstrap, topic_prefix=self.prefix),
            "redis": self.redis_settings,
            "models_dir": self.models_dir,
            "group_id": self.group_id,
            "device": "cpu",
            "torch_threads": 1,
            "http_port": 0,
            "session_timeout_ms": 6000,
            "shutdown_timeout_s": 20.0,
            **overrides,
        }
        return WorkerSettings(**values)  # type: ignore[arg-type]

    def worker_env(self, **overrides: str) -> dict[str, str]:
        return {
            **os.environ,
            "INFERQ_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "INFERQ_KAFKA__TOPIC_PREFIX": self.prefix,
            "INFERQ_REDIS__URL": self.redis_url,
            "INFERQ_REDIS__CLUSTER": str(self.redis_cluster).lower(),
            "INFERQ_MODELS_DIR": str(self.models_dir),
            "INFERQ_GROUP_ID": self.group_id,
            "INFERQ_DEVICE": "cpu",
            "INFERQ_TORCH_THREADS": "1",
            "INFERQ_HTTP_PORT": "0",
            "INFERQ_SESSION_TIMEOUT_MS": "6000",
            "INFERQ_SHUTDOWN_TIMEOUT_S": "20",
            "INFERQ_LOG_JSON": "true",
            **overrides,
        }

    def producer_settings(self) -> ProducerSettings:
        return ProducerSettings(
            kafka=KafkaSettings(bootstrap_servers=self.bootstrap, topic_prefix=self.prefix),
            redis=self.redis_settings,
            result_poll_interval_ms=20,
        )

    def client(self) -> InferenceClient:
        return InferenceClient(settings=self.producer_settings())


async def make_deployment(
    *,
    bootstrap: str,
    redis_url: str,
    prefix: str,
    models_dir: Path,
    make_topic: TopicFactory,
    models: Sequence[str] = ("mlp",),
) -> Deployment:
    """The example models, and under ``prefix`` the topics of ``models`` (4 request
    partitions, one result partition each) and the dead letters (one partition)."""
    write_example_models(models_dir)
    topics = TopicNames(prefix=prefix)
    for name in models:
        await make_topic(topics.requests(name), partitions=4)
        await make_topic(topics.results(name), partitions=1)
    await make_topic(topics.dead_letters, partitions=1)
    return Deployment(
        bootstrap=bootstrap,
        redis_url=redis_url,
        prefix=prefix,
        models_dir=models_dir,
        group_id=f"{prefix}-workers",
    )


@dataclass
class RunningWorker:
    """An in-process worker task and what it exports."""

    worker: Worker
    metrics: WorkerMetrics
    stop: asyncio.Event
    task: asyncio.Task[None]
    repository: DirectoryModelRepository
    reloader: ModelReloader


@contextlib.asynccontextmanager
async def running_worker(
    deployment: Deployment, **overrides: object
) -> AsyncIterator[RunningWorker]:
    """A worker serving in this event loop; stopped (gracefully) on exit."""
    settings = deployment.worker_settings(**overrides)
    repository, reloader, metrics = await load_models(settings, torch.device("cpu"))
    async with ModelRunner(device=torch.device("cpu"), num_threads=1) as runner:
        worker = Worker(
            settings=settings,
            repository=repository,
            runner=runner,
            metrics=metrics,
            reloader=reloader,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield RunningWorker(
                worker=worker,
                metrics=metrics,
                stop=stop,
                task=task,
                repository=repository,
                reloader=reloader,
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, settings.shutdown_timeout_s + 20)


async def wait_until_ready(running: RunningWorker, timeout_s: float = 30) -> None:
    """Until the worker has joined its group (or failed)."""
    async with asyncio.timeout(timeout_s):
        while not running.worker.ready:
            if running.task.done():
                running.task.result()
            await asyncio.sleep(0.05)


def spawn_worker_cli(
    deployment: Deployment, log: Path, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """``python -m workers`` (the supervisor and its children) as a subprocess."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", *args],
            env=deployment.worker_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """SIGTERM, wait; SIGKILL the whole group if it overstays."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def assert_outputs_match(
    version_dir: Path, requests: Sequence[InferenceRequest], results: dict[str, InferenceResult]
) -> None:
    expected = model_outputs(version_dir, requests)
    for row, request in enumerate(requests):
        result = results[request.id]
        assert result.ok, f"{request.id}: {result.error}"
        np.testing.assert_allclose(
            result.outputs[0].to_numpy(), expected[row : row + 1], rtol=1e-4, atol=1e-5
        )


async def read_topic(
    bootstrap: str, topic: str, *, expected: int, timeout_s: float = 60
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the start, once ``expected`` of them are there."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=200)
            for batch in polled.values():
                records.extend(batch)
        # Anything beyond `expected` (a duplicate) must show up too.
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records
