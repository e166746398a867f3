"""`inferq-topics` against the real broker: create what is missing, report what drifted."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.settings import KafkaSettings
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from workers.settings import WorkerSettings
from workers.topics_cli import run

pytestmark = [pytest.mark.kafka]
BOX = {ord(c): " " for c in "│┃┏━┳┓┡╇┩└─┴┘"}


def settings(bootstrap: str, prefix: str, models_dir: Path) -> WorkerSettings:
    return WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix),
        models_dir=models_dir, topic_partitions=3, topic_retention_ms=3_600_000,
    )  # fmt: skip


async def test_create_is_idempotent_and_check_reports_drift(
    kafka_bootstrap: str,
    unique_prefix: str,
    tmp_path: Path,
    make_topic: TopicFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for model in ("alpha", "beta"):
        (tmp_path / model / "1").mkdir(parents=True)
    (tmp_path / "not-a-model").mkdir()  # no version directory
    topics = TopicNames(prefix=unique_prefix)
    await make_topic(topics.results("beta"), partitions=1)  # drifted: 1 partition, not 3
    wanted = settings(kafka_bootstrap, unique_prefix, tmp_path)
    assert await run("check", wanted) == 1
    out = capsys.readouterr().out
    assert "missing" in out
    assert await run("create", wanted) == 1  # created the rest; beta's results still drift
    out = " ".join(
        capsys.readouterr().out.translate({ord(c): " " for c in "│┃┏━┳┓┡╇┩└─┴┘"}).split()
    )
    assert f"created {topics.requests('alpha')}" in out
    assert f"{topics.results('beta')} partitions 3 1" in out
    assert f"{topics.results('beta')} retention.ms 3600000 604800000" in out
    assert "not-a-model" not in out
    assert await run("create", wanted) == 1  # idempotent: nothing created twice
    assert "created" not in capsys.readouterr().out
    fixed = wanted.model_copy(update={"served_models": "alpha"})
    assert await run("check", fixed) == 0
