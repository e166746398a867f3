"""A worker's /metrics after a known load: counts equal what was sent; lag rises and falls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from producers.load import publish, random_requests
from schemas.messages import InferenceRequest
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.integration.kafka_helpers import bounded, until
from tests.integration.metric_samples import Samples, total
from tests.integration.metric_samples import scrape as scrape_registry
from tests.integration.worker_harness import Deployment, RunningWorker, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def scrape(running: RunningWorker) -> Samples:
    return scrape_registry(running.metrics.registry)


async def test_the_metrics_count_what_was_sent_and_lag_falls_to_zero(
    deployment: Deployment,
) -> None:
    """2,000 requests over two models and three versions, 400 of them bad in four ways.

    They are queued before the worker starts, and it takes them with `max_in_flight` low, so
    its intake pauses again and again while the backlog shows as lag.
    """
    mlp_row = [784]
    sent = {
        ("cnn", "1"): random_requests(
            model="cnn", count=600, input_name="input", row_shape=[3, 64, 64], seed=1
        ),
        ("mlp", "1"): random_requests(
            model="mlp", count=500, input_name="input", row_shape=mlp_row, seed=2, version=1
        ),
        ("mlp", "2"): random_requests(
            model="mlp", count=500, input_name="input", row_shape=mlp_row, seed=3, version=2
        ),
    }
    shape_mismatch = [
        InferenceRequest(id=f"shape-{i}", model="cnn",
                         inputs=(Tensor.from_numpy("input", np.zeros((1, 3), np.float32)),))
        for i in range(100)
    ]  # fmt: skip
    unknown_version = random_requests(
        model="mlp", count=100, input_name="input", row_shape=mlp_row, seed=4, version=7
    )
    expired = [
        request.model_copy(update={"deadline_ms": 1})
        for request in random_requests(
            model="mlp", count=100, input_name="input", row_shape=mlp_row, seed=5, version=2
        )
    ]
    undecodable = [b"\xc1 not msgpack %d" % i for i in range(100)]
    async with deployment.client() as client:  # queued before any worker runs: a backlog
        everything = [r for group in sent.values() for r in group]
        everything += shape_mismatch + unknown_version + expired
        await bounded(publish(client, everything), what="publishing", timeout_s=120)
    producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap)
    await producer.start()
    try:
        topic = TopicNames(prefix=deployment.prefix).requests("mlp")
        for value in undecodable:
            await producer.send(topic, value=value)
        await producer.flush()
    finally:
        await producer.stop()

    lags: list[float] = []
    lags_while_paused: list[float] = []
    lag_seconds: list[float] = []
    async with running_worker(deployment, lag_interval_s=0.2, max_in_flight=64) as running:

        async def sample_lag() -> None:
            while True:
                samples = scrape(running)
                lags.append(total(samples, "inferq_consumer_lag_records"))
                if total(samples, "inferq_consumer_paused") == 1:
                    lags_while_paused.append(lags[-1])
                lag_seconds.append(total(samples, "inferq_consumer_lag_seconds"))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample_lag())
        try:
            answered = lambda: total(scrape(running), "inferq_requests_total")  # noqa: E731
            await until(lambda: answered() >= 2000, what="every answer", timeout_s=240)
            await until(lambda: lags[-1] == 0, what="lag back to zero", timeout_s=30)
        finally:
            sampler.cancel()
        samples = scrape(running)

    assert max(lags_while_paused, default=0) > 0, "lag never showed while intake was paused"
    assert total(samples, "inferq_requests_total") == 2000
    for (model, version), requests in sent.items():
        labels = {"model": model, "version": version}
        assert total(samples, "inferq_requests_total", outcome="ok", **labels) == len(requests)
        assert total(samples, "inferq_end_to_end_seconds_count", **labels) == len(requests)
        assert total(samples, "inferq_queue_seconds_count", **labels) >= len(requests)
        assert total(samples, "inferq_batch_size_count", **labels) >= 1
        assert total(samples, "inferq_inference_seconds_count", **labels) >= 1
        assert total(samples, "inferq_model_ready", **labels) == 1
    # Each batch that ran counts its requests once; bad inputs are refused before batching.
    assert total(samples, "inferq_batch_size_sum", model="cnn", version="1") == 600
    assert total(samples, "inferq_batch_size_sum", model="mlp") == 1000
    errors = {
        ("cnn", "1", "SHAPE_MISMATCH"): 100,
        ("mlp", "", "UNKNOWN_VERSION"): 100,
        ("mlp", "2", "DEADLINE_EXCEEDED"): 100,
    }
    for (model, version, code), count in errors.items():
        labels = {"model": model, "version": version, "code": code}
        outcome = "expired" if code == "DEADLINE_EXCEEDED" else "error"
        assert total(samples, "inferq_requests_total", outcome=outcome, **labels) == count
        assert total(samples, "inferq_errors_total", code=code) == count
    assert total(samples, "inferq_requests_total", outcome="dead_letter", model="mlp") == 100
    assert total(samples, "inferq_errors_total", code="DECODE_ERROR") == 100
    assert total(samples, "inferq_dead_letters_total") == 100
    assert total(samples, "inferq_result_write_seconds_count", sink="redis") >= 1
    assert total(samples, "inferq_result_write_seconds_count", sink="kafka") >= 1
    assert total(samples, "inferq_rebalances_total") >= 1
    assert total(samples, "inferq_consumer_pauses_total") >= 1
    assert total(samples, "inferq_consumer_lag_seconds") == 0  # nothing waits any more
    assert max(lag_seconds) > 0
