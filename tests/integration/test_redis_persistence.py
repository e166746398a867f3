"""A restart of Redis alone keeps every answer the workers cached before it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from deploy.local.stack import RedisServer, free_port
from producers.load import publish, random_requests
from schemas.codec import ContentType, decode_result
from schemas.topics import TopicNames
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the stack's kind, the test's own (others' Redis is never restarted)."""
    server = RedisServer(run_dir=tmp_path / "redis", port=free_port())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_every_answer_survives_a_redis_restart(
    deployment: Deployment, private_redis: RedisServer
) -> None:
    private = dataclasses.replace(deployment, redis_url=private_redis.url)
    topics = TopicNames(prefix=private.prefix)
    requests = random_requests(model="mlp", count=300, input_name="input", row_shape=[784])
    async with running_worker(private) as running, private.client() as client:
        await wait_until_ready(running)
        await bounded(publish(client, requests), what="publishing", timeout_s=60)
        answered = await client.results([r.id for r in requests], timeout_s=60)
    # The worker has stopped and committed: nothing would write these answers again.

    pid_before = private_redis.process_id()
    await asyncio.to_thread(private_redis.restart)
    assert private_redis.process_id() not in {None, pid_before}, "redis-server was restarted"

    redis = aioredis.Redis.from_url(private_redis.url, socket_timeout=5)
    try:
        values = await redis.mget([topics.result_key(r.id) for r in requests])
    finally:
        await redis.aclose()
    missing = [r.id for r, value in zip(requests, values, strict=True) if value is None]
    assert not missing, f"{len(missing)} of {len(requests)} answers lost by the restart"
    for request, value in zip(requests, values, strict=True):
        assert value is not None
        assert decode_result(value, ContentType.MSGPACK) == answered[request.id]
