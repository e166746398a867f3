"""Small bounded helpers the integration tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], *, what: str, timeout_s: float) -> T:
    """Await ``awaitable`` or fail the test with a message saying what did not happen in time."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise AssertionError(
            f"{what} did not finish within {timeout_s:.0f}s: is the broker/Redis still up?"
        ) from None


async def until(
    condition: Callable[[], bool], *, what: str, timeout_s: float, interval_s: float = 0.02
) -> None:
    """Poll ``condition`` until it holds, or fail the test saying what did not happen."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - the state lives in another component
            await asyncio.sleep(interval_s)

    await bounded(poll(), what=what, timeout_s=timeout_s)


async def set_topic_configs(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    """Change ``topic``'s configuration (e.g. a smaller ``max.message.bytes``)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
    finally:
        await admin.close()


async def topic_names(bootstrap: str) -> set[str]:
    """Every topic the cluster has (read without creating any)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def record_count(bootstrap: str, topic: str) -> int:
    """How many records ``topic`` holds (end minus beginning offsets, over its partitions)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        return sum(ends[tp] - starts[tp] for tp in partitions)
    finally:
        await consumer.stop()
