"""Fixtures of the fault suite: a deployment on the session's stack, or on a private stack
for the faults that kill the broker or Redis (so no other test sees them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.redis_server import RedisServer
from deploy.local.stack import LocalStack, StackConfig, free_port, running_stack
from tests.conftest import TopicFactory, topic_factory
from tests.integration.worker_harness import Deployment, make_deployment

MODES = [
    pytest.param({}, id="at-least-once"),
    pytest.param({"INFERQ_EXACTLY_ONCE": "true"}, id="exactly-once"),
]
"""Worker settings of each delivery mode a fault runs under."""


def mode_name(env: dict[str, str]) -> str:
    """The mode a MODES entry stands for."""
    return "exactly-once" if env.get("INFERQ_EXACTLY_ONCE") == "true" else "at-least-once"


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
    config = StackConfig.on_free_ports(tmp_path_factory.mktemp("fault-stack"))
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
    # The stack goes with the test: nothing to delete afterwards.
    async with topic_factory(bootstrap, delete_after=False) as create:
        return await asyncio.wait_for(
            make_deployment(
                bootstrap=bootstrap, redis_url=private_stack.config.redis_url,
                prefix=unique_prefix, models_dir=models_dir, make_topic=create,
            ),
            60,
        )  # fmt: skip


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
