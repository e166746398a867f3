"""``inferq-worker`` as real processes: a SIGKILLed child, and SIGTERM during load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from producers.load import publish, random_requests
from schemas.topics import TopicNames
from tests.integration.worker_harness import (
    Deployment,
    read_topic,
    spawn_worker_cli,
    stop_process,
)

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


def children_of(pid: int) -> list[int]:
    """The worker processes the supervisor ``pid`` runs (not multiprocessing's helpers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(p) for p in path.read_text().split()] if path.exists() else []
    workers = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in command:
            workers.append(child)
    return workers


async def count_results(redis: aioredis.Redis, prefix: str) -> int:
    return len([k async for k in redis.scan_iter(match=f"{prefix}:result:*", count=10_000)])


async def wait_for(predicate_s: object, *, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate_s():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s")


@pytest.mark.timeout(400)
async def test_a_killed_worker_is_restarted_and_every_request_still_answered_once(
    deployment: Deployment, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    count = 20_000
    requests = random_requests(model="mlp", count=count, input_name="input", row_shape=[784])
    supervisor = spawn_worker_cli(deployment, tmp_path / "worker.log", "--procs", "1")
    try:
        async with deployment.client() as client:
            sending = asyncio.create_task(publish(client, requests))

            async def some_answered() -> bool:
                return await count_results(redis_client, deployment.prefix) >= 3000

            await wait_for(some_answered, what="3000 results", timeout_s=120)
            (child,) = children_of(supervisor.pid)
            os.kill(child, signal.SIGKILL)

            async def restarted() -> bool:
                alive = children_of(supervisor.pid)
                return bool(alive) and alive != [child]

            await wait_for(restarted, what="the supervisor restarting the child", timeout_s=30)
            await sending
            results = await client.results([r.id for r in requests], timeout_s=240)
        assert len(results) == count
        assert all(result.ok for result in results.values())
    finally:
        exit_code = stop_process(supervisor)
    assert exit_code == 0, (tmp_path / "worker.log").read_text()[-3000:]

    topic = TopicNames(prefix=deployment.prefix).results("mlp")
    records = await read_topic(deployment.bootstrap, topic, expected=count, timeout_s=120)
    values_by_id: dict[bytes, set[bytes]] = defaultdict(set)
    for record in records:
        values_by_id[record.key].add(record.value)
    assert len(values_by_id) == count
    different = [key for key, values in values_by_id.items() if len(values) > 1]
    assert not different, f"{len(different)} requests got two different results"


@pytest.mark.timeout(300)
async def test_sigterm_during_load_exits_zero_with_everything_consumed_answered(
    deployment: Deployment, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    count = 6000
    shutdown_bound_s = 20 + 15  # INFERQ_SHUTDOWN_TIMEOUT_S in the harness, plus start-up slack
    topics = TopicNames(prefix=deployment.prefix)
    requests = random_requests(model="mlp", count=count, input_name="input", row_shape=[784])
    supervisor = spawn_worker_cli(deployment, tmp_path / "worker.log", "--procs", "1")
    try:
        async with deployment.client() as client:
            await publish(client, requests)

        async def some_answered() -> bool:
            return await count_results(redis_client, deployment.prefix) >= 1000

        await wait_for(some_answered, what="1000 results", timeout_s=120)
        supervisor.send_signal(signal.SIGTERM)
        started = time.monotonic()
        exit_code = await asyncio.to_thread(supervisor.wait, shutdown_bound_s)
        stopped_s = time.monotonic() - started
    finally:
        stop_process(supervisor)
    log = (tmp_path / "worker.log").read_text()
    assert exit_code == 0, log[-3000:]
    assert stopped_s < shutdown_bound_s

    consumer = AIOKafkaConsumer(
        bootstrap_servers=deployment.bootstrap, group_id=deployment.group_id,
        enable_auto_commit=False,
    )  # fmt: skip
    await consumer.start()
    try:
        partitions = [TopicPartition(topics.requests("mlp"), p) for p in range(4)]
        committed = {tp: await consumer.committed(tp) or 0 for tp in partitions}
    finally:
        await consumer.stop()
    assert sum(committed.values()) >= 1000, committed

    records = await read_topic(deployment.bootstrap, topics.requests("mlp"), expected=count)
    below = [
        r.key.decode()
        for r in records
        if r.offset < committed[TopicPartition(r.topic, r.partition)]
    ]
    cached = await redis_client.mget([topics.result_key(i) for i in below])
    missing = [request_id for request_id, value in zip(below, cached, strict=True) if value is None]
    assert not missing, f"{len(missing)} committed requests have no result"
