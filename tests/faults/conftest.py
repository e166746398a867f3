"""Fixtures of the fault suite: a deployment on the session's stack, or on a private stack
for the faults that kill the broker or Redis (so no other test sees them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local.redis_server import RedisServer
from deploy.local.stack import LocalStack, StackConfig, free_port, running_stack
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.integration.worker_harness import Deployment
from workers.example_models import write_example_models

MODES = [
    pytest.param({}, id="at-least-once"),
    pytest.param({"INFERQ_EXACTLY_ONCE": "true"}, id="exactly-once"),
]
"""Worker settings of each delivery mode a fault runs under."""


def mode_name(env: dict[str, str]) -> str:
    """The mode a MODES entry stands for."""
    return "exactly-once" if env.get("INFERQ_EXACTLY_ONCE") == "true" else "at-least-once"


async def make_deployment(
    *, bootstrap: str, redis_url: str, prefix: str, models_dir: Path, make_topic: TopicFactory
) -> Deployment:
    """Example models and the topics of ``mlp`` (4 request partitions, one result partition)."""
    write_example_models(models_dir)
    topics = TopicNames(prefix=prefix)
    await make_topic(topics.requests("mlp"), partitions=4)
    await make_topic(topics.results("mlp"), partitions=1)
    await make_topic(topics.dead_letters, partitions=1)
    return Deployment(
        bootstrap=bootstrap,
        redis_url=redis_url,
        prefix=prefix,
        models_dir=models_dir,
        group_id=f"{prefix}-workers",
    )


@pytest.fixture
async def deployment(
    kafka_bootstrap: str,
    redis_url: str,
    unique_prefix: str,
    models_dir: Path,
    make_topic: TopicFactory,
) -> Deployment:
    """A deployment of ``mlp`` on the session's stack."""
    return await make_deployment(
        bootstrap=kafka_bootstrap, redis_url=redis_url, prefix=unique_prefix,
        models_dir=models_dir, make_topic=make_topic,
    )  # fmt: skip


@pytest.fixture
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A Kafka broker and redis-server of this test alone, which it may kill and restart."""
    config = StackConfig(
        run_dir=tmp_path_factory.mktemp("fault-stack"),
        kafka_port=free_port(),
        controller_port=free_port(),
        redis_port=free_port(),
    )
    with running_stack(config) as stack:
        yield stack


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test alone (append-only file in its own directory)."""
    server = RedisServer(run_dir=tmp_path_factory.mktemp("fault-redis"), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_fault_deployment(
    kafka_bootstrap: str,
    private_redis: RedisServer,
    unique_prefix: str,
    models_dir: Path,
    make_topic: TopicFactory,
) -> Deployment:
    """A deployment of ``mlp`` on the session's broker and a private redis-server."""
    return await make_deployment(
        bootstrap=kafka_bootstrap, redis_url=private_redis.url, prefix=unique_prefix,
        models_dir=models_dir, make_topic=make_topic,
    )  # fmt: skip


@pytest.fixture
async def broker_fault_deployment(
    private_stack: LocalStack, unique_prefix: str, models_dir: Path
) -> Deployment:
    """A deployment of ``mlp`` on a private broker and redis-server."""
    bootstrap = private_stack.config.bootstrap_servers
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()

    async def create(name: str, *, partitions: int = 1) -> str:
        await admin.create_topics(
            [NewTopic(name=name, num_partitions=partitions, replication_factor=1)]
        )
        return name

    try:
        return await asyncio.wait_for(
            make_deployment(
                bootstrap=bootstrap, redis_url=private_stack.config.redis_url,
                prefix=unique_prefix, models_dir=models_dir, make_topic=create,
            ),
            60,
        )  # fmt: skip
    finally:
        await admin.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault table of this session's rows, at the end of the run."""
    from tests.faults.harness import session_rows

    rows = session_rows()
    if not rows:
        return
    terminalreporter.section("fault suite")
    terminalreporter.line(
        "| fault | mode | sent | answered | lost | conflicting | duplicates | recovery s "
        "| drained s | peak RSS MiB |"
    )
    for row in rows:
        terminalreporter.line(row.line())
    terminalreporter.line(f"(appended to {rows[0].path()})")
