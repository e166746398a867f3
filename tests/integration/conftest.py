"""Fixtures of the integration tests: a deployment of inferq per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TopicFactory
from tests.integration.worker_harness import Deployment, make_deployment


@pytest.fixture
async def deployment(
    kafka_bootstrap: str,
    redis_url: str,
    unique_prefix: str,
    models_dir: Path,
    make_topic: TopicFactory,
) -> Deployment:
    """Example models and the topics of ``mlp`` and ``cnn`` (4 partitions) under a fresh
    prefix."""
    return await make_deployment(
        bootstrap=kafka_bootstrap, redis_url=redis_url, prefix=unique_prefix,
        models_dir=models_dir, make_topic=make_topic, models=("mlp", "cnn"),
    )  # fmt: skip
