"""The local stack is real: a round trip through the broker and through Redis."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from deploy.local.stack import LocalStack, StackConfig, redis_answers
from tests.conftest import TopicFactory
from tests.integration.kafka_helpers import bounded

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


async def test_produce_and_consume_through_the_real_broker(
    kafka_bootstrap: str, make_topic: TopicFactory, unique_prefix: str
) -> None:
    topic = await make_topic(f"{unique_prefix}.smoke", partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    await bounded(producer.start(), what="producer start", timeout_s=20)
    try:
        for i in range(10):
            await bounded(
                producer.send_and_wait(topic, f"value-{i}".encode(), key=str(i).encode()),
                what="send_and_wait",
                timeout_s=20,
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{unique_prefix}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await bounded(consumer.start(), what="consumer start", timeout_s=20)
    received: set[bytes] = set()
    try:

        async def read_all() -> None:
            while len(received) < 10:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    received.update(record.value for record in records)

        await bounded(read_all(), what="consuming 10 records", timeout_s=30)
    finally:
        await consumer.stop()
    assert received == {f"value-{i}".encode() for i in range(10)}


async def test_redis_round_trip(redis_client: aioredis.Redis, unique_prefix: str) -> None:
    key = f"{unique_prefix}:smoke"
    await redis_client.set(key, b"\x00\x01binary", ex=60)
    assert await redis_client.get(key) == b"\x00\x01binary"
    assert 0 < await redis_client.ttl(key) <= 60


async def test_killed_broker_fails_fast_with_a_clear_message(
    tmp_path: Path, unique_prefix: str
) -> None:
    """A dead broker is a bounded, readable failure, never a hang."""
    stack = LocalStack(StackConfig.on_free_ports(tmp_path / "stack"))
    await asyncio.to_thread(stack.up)
    try:
        producer = AIOKafkaProducer(
            bootstrap_servers=stack.config.bootstrap_servers,
            request_timeout_ms=3_000,
            retry_backoff_ms=100,
        )
        await bounded(producer.start(), what="producer start", timeout_s=20)
        try:
            topic = f"{unique_prefix}.doomed"
            await bounded(producer.send_and_wait(topic, b"before"), what="send", timeout_s=20)
            broker_pid = stack.kafka_process_id()
            assert broker_pid is not None
            os.kill(broker_pid, signal.SIGKILL)

            with pytest.raises((AssertionError, KafkaError)) as failure:
                await bounded(
                    producer.send_and_wait(topic, b"after"),
                    what="send to a killed broker",
                    timeout_s=10,
                )
            assert "killed broker" in str(failure.value) or isinstance(failure.value, KafkaError)
        finally:
            await bounded(producer.stop(), what="producer stop", timeout_s=20)
    finally:
        await asyncio.to_thread(stack.down)
    assert stack.kafka_process_id() is None
    assert not redis_answers(stack.config.host, stack.config.redis_port)


async def test_restarting_redis_alone_keeps_its_data_and_the_broker(
    tmp_path: Path, unique_prefix: str
) -> None:
    stack = LocalStack(StackConfig.on_free_ports(tmp_path / "stack"))
    await asyncio.to_thread(stack.up)
    try:
        key = f"{unique_prefix}:kept"
        client = aioredis.Redis.from_url(stack.config.redis_url, socket_timeout=5)
        try:
            await client.set(key, b"answer", ex=600)
        finally:
            await client.aclose()
        broker_pid, redis_pid = stack.kafka_process_id(), stack.redis.process_id()

        await asyncio.to_thread(stack.restart_redis)

        assert stack.redis.process_id() not in {None, redis_pid}, "redis-server restarted"
        assert stack.kafka_process_id() == broker_pid, "the broker was left alone"
        client = aioredis.Redis.from_url(stack.config.redis_url, socket_timeout=5)
        try:
            assert await client.get(key) == b"answer"
            assert 0 < await client.ttl(key) <= 600
        finally:
            await client.aclose()
    finally:
        await asyncio.to_thread(stack.down)
