"""`/readyz` follows the worker's dependencies: the group, the broker and Redis.

On a private stack, since the test stalls and stops its broker and Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.local.stack import LocalStack, StackConfig, running_stack
from schemas.settings import RedisSettings
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready
from workers.example_models import write_example_models
from workers.health import HealthServer
from workers.readiness import Condition

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[LocalStack]:
    with running_stack(StackConfig.on_free_ports(tmp_path / "stack")) as stack:
        yield stack


async def readyz(port: int) -> int:
    """The status code of GET /readyz."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Poll ``condition`` (a plain flag, with no event to wait on) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s")
        await asyncio.sleep(0.05)


def pid_of(stack: LocalStack, name: str) -> int:
    return int((stack.config.run_dir / f"{name}.pid").read_text().strip())


async def test_readyz_turns_unready_while_redis_or_the_broker_does_not_answer(
    private_stack: LocalStack, models_dir: Path, unique_prefix: str
) -> None:
    write_example_models(models_dir)
    config = private_stack.config
    deployment = Deployment(
        bootstrap=config.bootstrap_servers,
        redis_url=config.redis_url,
        prefix=unique_prefix,
        models_dir=models_dir,
        group_id=f"{unique_prefix}-workers",
    )
    redis_pid, kafka_pid = pid_of(private_stack, "redis"), pid_of(private_stack, "kafka")
    overrides = {
        "readiness_interval_s": 0.2,
        "redis": RedisSettings(url=config.redis_url, socket_timeout_s=0.5),
    }
    async with running_worker(deployment, **overrides) as running:
        worker = running.worker
        health = HealthServer(
            registry=running.metrics.registry, is_ready=lambda: worker.ready, port=0
        )
        await health.start()
        try:
            await wait_until_ready(running)
            assert worker.readiness.unmet == frozenset()
            assert await readyz(health.port) == 200

            for name, pid, condition in (
                ("redis", redis_pid, Condition.REDIS),
                ("kafka", kafka_pid, Condition.KAFKA),
            ):
                os.kill(pid, signal.SIGSTOP)
                try:
                    await until(lambda: not worker.ready, f"unready while {name} is stalled")
                    assert condition in worker.readiness.unmet
                    assert await readyz(health.port) == 503
                finally:
                    os.kill(pid, signal.SIGCONT)
                await until(lambda: worker.ready, f"ready again once {name} answers", 60)
                assert await readyz(health.port) == 200

            os.kill(redis_pid, signal.SIGTERM)
            await until(lambda: not worker.ready, "unready while redis is down")
            assert Condition.REDIS in worker.readiness.unmet
            assert await readyz(health.port) == 503
        finally:
            await health.close()
