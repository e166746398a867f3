"""Hot reload against the real broker and Redis: a new version, a tampered one, a new model."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import pytest

from producers.load import publish, random_requests
from schemas.messages import InferenceRequest, ResultStatus
from schemas.topics import TopicNames
from tests.integration.kafka_helpers import bounded, topic_names, until
from tests.integration.metric_samples import metric_total
from tests.integration.worker_harness import (
    Deployment,
    assert_outputs_match,
    running_worker,
    spawn_worker_cli,
    stop_process,
    wait_until_ready,
)
from workers.example_models import EXAMPLE_MODELS, write_example

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

POLL_S = 0.5
MLP_V1, MLP_V2 = EXAMPLE_MODELS[0], EXAMPLE_MODELS[1]


def install(source: Path, models_dir: Path, name: str, version: int) -> Path:
    """Put a version in place as writers must: copy under a temporary name, then rename."""
    (models_dir / name).mkdir(parents=True, exist_ok=True)
    staging = models_dir / name / f".{version}.incoming"
    shutil.copytree(source, staging)
    final = models_dir / name / str(version)
    staging.rename(final)
    return final


async def wait_for_topic(deployment: Deployment, model: str) -> None:
    """Until the worker has created ``model``'s request topic."""
    topic = TopicNames(prefix=deployment.prefix).requests(model)
    while topic not in await topic_names(deployment.bootstrap):  # noqa: ASYNC110 - the broker
        await asyncio.sleep(0.2)


def requests_for(model: str, count: int, prefix: str) -> list[InferenceRequest]:
    requests = random_requests(model=model, count=count, input_name="input", row_shape=[784])
    return [r.model_copy(update={"id": f"{prefix}-{i}"}) for i, r in enumerate(requests)]


async def test_a_version_written_while_requests_flow_takes_the_traffic_and_loses_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    # `swap` starts with mlp's version 1 weights; version 2 (mlp's v2 weights) arrives mid-run.
    first = write_example(tmp_path / "staged", MLP_V1, name="swap", version=1)
    second = write_example(tmp_path / "staged", MLP_V2, name="swap", version=2)
    install(first, deployment.models_dir, "swap", 1)
    count = 20_000
    requests = requests_for("swap", count, "flow")
    async with (
        running_worker(deployment, model_poll_interval_s=POLL_S) as running,
        deployment.client() as client,
    ):
        await wait_until_ready(running)

        def answered() -> float:
            registry = running.metrics.registry
            return metric_total(registry, "inferq_requests_total", model="swap", outcome="ok")

        async def write_the_new_version() -> tuple[float, float]:
            await until(lambda: answered() >= count // 4, what="a quarter answered", timeout_s=120)
            install(second, deployment.models_dir, "swap", 2)
            written_at = time.time()
            await until(lambda: running.repository.get("swap").version == 2,
                        what="the swap", timeout_s=60, interval_s=0.005)  # fmt: skip
            return written_at, time.time()

        writer = asyncio.create_task(write_the_new_version())
        await bounded(publish(client, requests), what="publishing", timeout_s=120)
        written_at, swapped_at = await bounded(writer, what="the new version", timeout_s=120)
        results = await client.results([r.id for r in requests], timeout_s=180)
        # Whatever is sent once the new version serves runs on it.
        late = requests_for("swap", 200, "late")
        await bounded(publish(client, late), what="publishing", timeout_s=60)
        late_results = await client.results([r.id for r in late], timeout_s=60)
    assert all(r.status is ResultStatus.OK for r in results.values())
    versions = {r.version for r in results.values()}
    assert versions == {1, 2}, "the run ended before the new version served"
    assert {r.version for r in late_results.values()} == {2}
    for version, source in ((1, first), (2, second)):
        ran = [q for q in requests if results[q.id].version == version]
        assert_outputs_match(source, ran, results)
    switched = min(r.created_ms or 0 for r in results.values() if r.version == 2)
    print(
        f"swapped in {swapped_at - written_at:.2f} s after the rename (polling every {POLL_S} s); "
        f"first version-2 result {switched / 1000 - written_at:.2f} s after it"
    )


async def test_a_version_with_one_changed_byte_is_refused_and_traffic_stays(
    deployment: Deployment, tmp_path: Path
) -> None:
    first = write_example(tmp_path / "staged", MLP_V1, name="guarded", version=1)
    install(first, deployment.models_dir, "guarded", 1)
    async with running_worker(deployment, model_poll_interval_s=POLL_S) as running:
        await wait_until_ready(running)
        tampered = tmp_path / "tampered"
        shutil.copytree(write_example(tmp_path / "staged", MLP_V2, name="guarded", version=2),
                        tampered)  # fmt: skip
        data = bytearray((tampered / "model.pt2").read_bytes())
        data[len(data) // 3] ^= 0x40
        (tampered / "model.pt2").write_bytes(bytes(data))
        reloads = running.reloader.reloads
        install(tampered, deployment.models_dir, "guarded", 2)
        await until(lambda: running.reloader.reloads >= reloads + 2, what="2 scans", timeout_s=30)
        failures = running.metrics.registry.get_sample_value(
            "inferq_model_load_failures_total",
            {"model": "guarded", "version": "2", "reason": "checksums"},
        )
        assert failures == 1
        requests = requests_for("guarded", 200, "after")
        async with deployment.client() as client:
            await bounded(publish(client, requests), what="publishing", timeout_s=60)
            results = await client.results([r.id for r in requests], timeout_s=60)
    assert {r.version for r in results.values()} == {1}
    assert_outputs_match(first, requests, results)


async def test_a_model_added_while_serving_is_served_without_a_restart(
    deployment: Deployment, tmp_path: Path
) -> None:
    async with running_worker(deployment, model_poll_interval_s=POLL_S) as running:
        await wait_until_ready(running)
        assert "late" not in running.repository.names()
        source = write_example(tmp_path / "staged", MLP_V2, name="late", version=1)
        install(source, deployment.models_dir, "late", 1)
        await until(lambda: "late" in running.repository.names(), what="loading", timeout_s=30)
        await bounded(wait_for_topic(deployment, "late"), what="its topic", timeout_s=30)
        requests = requests_for("late", 100, "new")
        async with deployment.client() as client:
            await bounded(publish(client, requests), what="publishing", timeout_s=60)
            results = await client.results([r.id for r in requests], timeout_s=90)
    assert_outputs_match(source, requests, results)


@pytest.mark.slow
async def test_sighup_to_the_supervisor_reloads_its_children(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Polling is off: only the signal can make the workers see version 2.
    first = write_example(tmp_path / "staged", MLP_V1, name="hup", version=1)
    second = write_example(tmp_path / "staged", MLP_V2, name="hup", version=2)
    install(first, deployment.models_dir, "hup", 1)
    supervisor = spawn_worker_cli(
        deployment, tmp_path / "worker.log", "--procs", "1", INFERQ_MODEL_POLL_INTERVAL_S="0"
    )
    try:
        await bounded(wait_for_topic(deployment, "hup"), what="the worker's topics", timeout_s=120)
        async with deployment.client() as client:
            probe = requests_for("hup", 5, "before")
            await bounded(publish(client, probe), what="publishing", timeout_s=60)
            before = await client.results([r.id for r in probe], timeout_s=120)
            assert {r.version for r in before.values()} == {1}
            install(second, deployment.models_dir, "hup", 2)
            supervisor.send_signal(signal.SIGHUP)
            seen: set[int | None] = set()
            for attempt in range(60):
                probe = requests_for("hup", 5, f"after-{attempt}")
                await bounded(publish(client, probe), what="publishing", timeout_s=60)
                after = await client.results([r.id for r in probe], timeout_s=60)
                seen = {r.version for r in after.values()}
                if seen == {2}:
                    break
                await asyncio.sleep(0.5)
            assert seen == {2}
            assert_outputs_match(second, probe, after)
        assert supervisor.poll() is None, "SIGHUP must not stop the supervisor"
    finally:
        assert stop_process(supervisor) == 0
