"""The client library against the real stack and a worker: infer at scale, errors, inputs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.local.demo import model_outputs
from producers.client import (
    BrokerUnavailableError,
    InferenceClient,
    InferenceFailedError,
    ModelTopicMissingError,
)
from producers.load import publish, random_requests
from producers.settings import ProducerSettings
from producers.sync import SyncInferenceClient
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest
from schemas.settings import KafkaSettings
from schemas.tensors import Tensor
from tests.integration.kafka_helpers import bounded, until
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


async def test_ten_thousand_concurrent_infer_calls_each_get_their_own_result(
    deployment: Deployment,
) -> None:
    count = 10_000
    rows = np.random.default_rng(7).standard_normal((count, 1, 784), dtype=np.float32)
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        started, cpu = time.perf_counter(), time.process_time()
        predictions = await bounded(
            asyncio.gather(
                *(client.infer("mlp", {"input": row}, version=1, timeout_s=120) for row in rows)
            ),
            what="10,000 infer calls",
            timeout_s=180,
        )
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"{count / elapsed:,.0f} calls/s; {cpu / count * 1e6:.0f} us of CPU per call "
          "(worker included: it runs in this process)")  # fmt: skip
    requests = [
        InferenceRequest(id=str(i), model="mlp", inputs=(Tensor.from_numpy("input", row),))
        for i, row in enumerate(rows)
    ]
    expected = model_outputs(deployment.models_dir / "mlp" / "1", requests)
    got = np.concatenate([prediction.outputs["logits"] for prediction in predictions])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert {prediction.version for prediction in predictions} == {1}


async def test_an_error_result_raises_or_returns_as_the_caller_chooses(
    deployment: Deployment,
) -> None:
    bad = {"input": np.zeros((1, 3), np.float32)}
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        with pytest.raises(InferenceFailedError, match="SHAPE_MISMATCH") as raised:
            await client.infer("mlp", bad, timeout_s=60)
        assert raised.value.result.error is not None
        returned = await client.infer("mlp", bad, timeout_s=60, raise_on_error=False)
        assert not returned.ok
        assert returned.error is not None
        assert returned.error.code is ErrorCode.SHAPE_MISMATCH
        # A torch tensor is an input like any other; outputs come back as numpy.
        prediction = await client.infer("mlp", {"input": torch.zeros(2, 784)}, timeout_s=60)
        assert isinstance(prediction.output, np.ndarray)
        assert prediction.output.shape == (2, 10)


async def test_a_model_without_a_request_topic_is_a_clear_error(deployment: Deployment) -> None:
    async with deployment.client() as client:
        with pytest.raises(ModelTopicMissingError, match=r"request topic .*nope.* does not exist"):
            await client.submit("nope", {"input": np.zeros((1, 784), np.float32)})


async def test_a_broker_that_does_not_answer_is_a_clear_error() -> None:
    settings = ProducerSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=2000)
    )
    client = InferenceClient(settings=settings)
    with pytest.raises(BrokerUnavailableError, match="does not answer"):
        await client.start()
    await client.close()


async def test_the_sync_facade_serves_eight_threads_at_once(deployment: Deployment) -> None:
    rows = np.random.default_rng(11).standard_normal((8, 25, 1, 784), dtype=np.float32)

    def one_thread(client: SyncInferenceClient, thread_rows: np.ndarray) -> list[np.ndarray]:
        return [client.infer("mlp", {"input": row}, version=1, timeout_s=60).output
                for row in thread_rows]  # fmt: skip

    async with running_worker(deployment) as running:
        await wait_until_ready(running)
        client = await asyncio.to_thread(SyncInferenceClient, deployment.producer_settings())
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                futures = [pool.submit(one_thread, client, rows[t]) for t in range(8)]
                outputs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            await asyncio.to_thread(client.close)
    for thread_rows, thread_outputs in zip(rows, outputs, strict=True):
        requests = [
            InferenceRequest(id=str(i), model="mlp", inputs=(Tensor.from_numpy("input", row),))
            for i, row in enumerate(thread_rows)
        ]
        expected = model_outputs(deployment.models_dir / "mlp" / "1", requests)
        np.testing.assert_allclose(np.concatenate(thread_outputs), expected, rtol=1e-4, atol=1e-5)


def handled_ids(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_a_pipeline_killed_mid_stream_and_restarted_misses_no_result(
    deployment: Deployment, tmp_path: Path
) -> None:
    count = 3000
    requests = random_requests(model="mlp", count=count, input_name="input", row_shape=[784])
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        await bounded(publish(client, requests), what="publishing", timeout_s=60)
        await client.results([r.id for r in requests], timeout_s=120)
    out = tmp_path / "handled.txt"
    env = {**deployment.worker_env(), "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, "-m", "tests.integration.pipeline_consumer", str(out), "mlp",
               f"{deployment.prefix}-pipeline"]  # fmt: skip
    first = subprocess.Popen(command, env=env)  # noqa: ASYNC220 - started, never waited on here
    try:
        await until(lambda: len(handled_ids(out)) >= count // 3, what="a third", timeout_s=60)
    finally:
        first.kill()  # SIGKILL: no commit, no goodbye
        first.wait()
    handled_before = len(handled_ids(out))
    assert handled_before < count, "the stage finished before it was killed"
    second = subprocess.Popen(command, env=env)  # noqa: ASYNC220
    try:
        wanted = {r.id for r in requests}
        await until(lambda: wanted <= set(handled_ids(out)), what="every result", timeout_s=90)
    finally:
        second.terminate()
        second.wait()
    print(f"handled {handled_before} before the kill; {len(handled_ids(out)) - count} "
          "handled twice (at-least-once)")  # fmt: skip
