"""A worker's /metrics after a known load: counts equal what was sent; lag rises and falls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producers.load import publish, random_requests
from schemas.messages import InferenceRequest
from schemas.tensors import Tensor
from tests.integration.kafka_helpers import bounded, until
from tests.integration.worker_harness import Deployment, RunningWorker, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def scrape(running: RunningWorker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics text, by name and labels."""
    text = generate_latest(running.metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def test_the_metrics_count_what_was_sent_and_lag_falls_to_zero(
    deployment: Deployment,
) -> None:
    good = random_requests(model="cnn", count=1000, input_name="input", row_shape=[3, 64, 64])
    bad = [
        InferenceRequest(id=f"bad-{i}", model="cnn",
                         inputs=(Tensor.from_numpy("input", np.zeros((1, 3), np.float32)),))
        for i in range(20)
    ]  # fmt: skip
    async with deployment.client() as client:  # queued before any worker runs: a backlog
        await bounded(publish(client, good + bad), what="publishing", timeout_s=120)
    lags: list[float] = []
    lag_seconds: list[float] = []
    async with running_worker(
        deployment, lag_interval_s=0.2, max_in_flight=64, served_models="cnn"
    ) as running:

        async def sample_lag() -> None:
            while True:
                samples = scrape(running)
                lags.append(total(samples, "inferq_consumer_lag_records"))
                lag_seconds.append(total(samples, "inferq_consumer_lag_seconds"))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample_lag())
        try:
            answered = lambda: total(scrape(running), "inferq_requests_total", model="cnn")  # noqa: E731
            await until(lambda: answered() >= 1020, what="every answer", timeout_s=180)
            await until(lambda: lags[-1] == 0, what="lag back to zero", timeout_s=30)
        finally:
            sampler.cancel()
        samples = scrape(running)
    assert max(lags) > 0, "lag never showed the backlog"
    assert total(samples, "inferq_requests_total", model="cnn", outcome="ok") == 1000
    assert total(samples, "inferq_requests_total", outcome="error", code="SHAPE_MISMATCH") == 20
    assert total(samples, "inferq_batch_size_sum", model="cnn") == 1000
    assert total(samples, "inferq_end_to_end_seconds_count", model="cnn") == 1000
    assert total(samples, "inferq_result_write_seconds_count", sink="redis") >= 1
    assert total(samples, "inferq_result_write_seconds_count", sink="kafka") >= 1
    assert total(samples, "inferq_rebalances_total") >= 1
    assert total(samples, "inferq_consumer_pauses_total") >= 1
    assert total(samples, "inferq_model_ready", model="cnn", version="1") == 1
    assert total(samples, "inferq_errors_total", code="SHAPE_MISMATCH") == 20
    assert total(samples, "inferq_consumer_lag_seconds") == 0  # nothing waits any more
    assert max(lag_seconds) > 0
