"""Shared fixtures: a real Kafka broker and redis-server for the whole session.

The stack is started through ``deploy.local.stack`` on free loopback ports in a temporary
directory and stopped at the end of the session, whatever the outcome. Every test gets its
own topic names and Redis key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local.stack import LocalStack, StackConfig, running_stack

KAFKA_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One real Kafka broker and one redis-server, private to this test session."""
    with running_stack(StackConfig.on_free_ports(tmp_path_factory.mktemp("stack"))) as stack:
        yield stack


@pytest.fixture(scope="session")
def kafka_bootstrap(local_stack: LocalStack) -> str:
    """host:port of the session's broker."""
    return local_stack.config.bootstrap_servers


@pytest.fixture(scope="session")
def redis_url(local_stack: LocalStack) -> str:
    """DSN of the session's redis-server."""
    return local_stack.config.redis_url


@pytest.fixture
def unique_prefix(request: pytest.FixtureRequest) -> str:
    """A topic/key prefix that no other test uses: ``t-{test name}-{random}``."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


TopicFactory = Callable[..., Awaitable[str]]


@contextlib.asynccontextmanager
async def topic_factory(
    bootstrap: str, *, replication_factor: int = 1, delete_after: bool = True
) -> AsyncIterator[TopicFactory]:
    """A `TopicFactory` on the broker(s) at ``bootstrap``, which, with ``delete_after``,
    deletes the topics it created on exit."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(KAFKA_TIMEOUT_S * 1000)
    )
    await asyncio.wait_for(admin.start(), KAFKA_TIMEOUT_S)
    created: list[str] = []

    async def create(name: str, *, partitions: int = 1) -> str:
        topic = NewTopic(
            name=name, num_partitions=partitions, replication_factor=replication_factor
        )
        await asyncio.wait_for(admin.create_topics([topic]), KAFKA_TIMEOUT_S)
        created.append(name)
        return name

    try:
        yield create
    finally:
        if created and delete_after:
            try:
                await asyncio.wait_for(admin.delete_topics(created), KAFKA_TIMEOUT_S)
            except Exception as error:  # cleanup must not mask the test's outcome
                print(f"could not delete topics {created}: {error!r}")
        await admin.close()


@pytest.fixture
async def make_topic(kafka_bootstrap: str) -> AsyncIterator[TopicFactory]:
    """Creates topics with a given partition count and deletes them after the test."""
    async with topic_factory(kafka_bootstrap) as create:
        yield create


@pytest.fixture
async def redis_client(redis_url: str, unique_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client; the keys under the test's prefix are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{unique_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for model files, private to the test."""
    return tmp_path_factory.mktemp("models")
