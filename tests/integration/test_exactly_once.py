"""Exactly-once mode against real processes: a worker SIGKILLed mid-run, again and again,
leaves each request's result once on the results topic for a read_committed reader.

The same run in at-least-once mode prints how many duplicates its kills left there (each
result re-sent with the same bytes, as that mode promises); its count depends on where the
kills land, so it is reported, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from producers.load import publish, random_requests
from schemas.codec import decode_result
from schemas.topics import TopicNames
from tests.integration.test_worker_process import children_of, count_results, wait_for
from tests.integration.worker_harness import (
    Deployment,
    assert_outputs_match,
    spawn_worker_cli,
    stop_process,
)

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

COUNT = 20_000
KILLS_AT = (3_000, 9_000, 15_000)
"""Results in Redis at which the worker process is SIGKILLed (and restarted by its
supervisor)."""
RESULT_PARTITIONS = 1
"""Of the results topic, as the `deployment` fixture creates it."""


Records = list[ConsumerRecord[bytes, bytes]]


async def read_committed_to_end(bootstrap: str, topic: str) -> tuple[Records, int]:
    """Every committed record of ``topic`` up to its end, and the sum of its partitions'
    end offsets (which count transaction markers too)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(RESULT_PARTITIONS)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)  # the last stable offsets
        records: Records = []
        async with asyncio.timeout(120):
            behind = set(partitions)
            while behind:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
                behind = {tp for tp in behind if await consumer.position(tp) < ends[tp]}
        return records, sum(ends.values())
    finally:
        await consumer.stop()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
async def test_sigkilled_workers_leave_one_result_per_request_on_the_results_topic(
    deployment: Deployment, redis_client: aioredis.Redis, tmp_path: Path, exactly_once: bool
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    requests = random_requests(model="mlp", count=COUNT, input_name="input", row_shape=[784])
    log = tmp_path / "worker.log"
    started = time.monotonic()
    supervisor = spawn_worker_cli(
        deployment, log, "--procs", "1", INFERQ_EXACTLY_ONCE=str(exactly_once).lower()
    )
    try:
        async with deployment.client() as client:
            sending = asyncio.create_task(publish(client, requests))
            for threshold in KILLS_AT:

                async def reached(threshold: int = threshold) -> bool:
                    return await count_results(redis_client, deployment.prefix) >= threshold

                await wait_for(reached, what=f"{threshold} results", timeout_s=120)
                (child,) = children_of(supervisor.pid)
                os.kill(child, signal.SIGKILL)

                async def restarted(child: int = child) -> bool:
                    alive = children_of(supervisor.pid)
                    return bool(alive) and alive != [child]

                await wait_for(restarted, what="the child's restart", timeout_s=30)
            await sending
            results = await client.results([r.id for r in requests], timeout_s=240)
    finally:
        exit_code = stop_process(supervisor)
    elapsed_s = time.monotonic() - started
    assert exit_code == 0, log.read_text()[-3000:]
    assert len(results) == COUNT
    (version,) = {result.version for result in results.values()}  # the latest: 2
    assert_outputs_match(deployment.models_dir / "mlp" / str(version), requests, results)
    assert await count_results(redis_client, deployment.prefix) == COUNT

    records, end_offsets = await read_committed_to_end(deployment.bootstrap, topics.results("mlp"))
    per_id = Counter(record.key for record in records)
    duplicates = sum(n - 1 for n in per_id.values())
    mode = "exactly-once" if exactly_once else "at-least-once"
    print(
        f"\n{mode}: {len(KILLS_AT)} SIGKILLs, {COUNT} requests, {len(records)} result records"
        f" read committed, {duplicates} duplicates, {elapsed_s:.0f} s"
    )
    assert set(per_id) == {r.id.encode() for r in requests}, "every request has a result"
    cached = await redis_client.mget([topics.result_key(r.id) for r in requests])
    by_id = {r.id: value for r, value in zip(requests, cached, strict=True)}
    for record in records:
        assert record.key is not None
        assert record.value is not None
        key, value = record.key.decode(), record.value
        assert value == by_id[key], f"{key}: the topic's result is not the one in Redis"
        assert decode_result(value).ok
    if exactly_once:
        assert duplicates == 0, f"{duplicates} results twice on the results topic"
        # Each committed transaction leaves a marker, which takes an offset of its own.
        assert end_offsets > len(records), "no transaction markers: transactions were not used"
        assert '"exactly_once": true' in log.read_text()
    else:
        assert end_offsets == len(records)
