"""Fixtures of the integration tests: a deployment of inferq per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.integration.worker_harness import Deployment
from workers.example_models import write_example_models


@pytest.fixture
async def deployment(
    kafka_bootstrap: str,
    redis_url: str,
    unique_prefix: str,
    models_dir: Path,
    make_topic: TopicFactory,
) -> Deployment:
    """Example models and the topics of ``mlp`` (4 partitions) under a fresh prefix."""
    write_example_models(models_dir)
    topics = TopicNames(prefix=unique_prefix)
    for name in ("mlp", "cnn"):
        await make_topic(topics.requests(name), partitions=4)
        await make_topic(topics.results(name), partitions=1)
    await make_topic(topics.dead_letters, partitions=1)
    return Deployment(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        prefix=unique_prefix,
        models_dir=models_dir,
        group_id=f"{unique_prefix}-workers",
    )
