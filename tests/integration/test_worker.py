"""The worker against the real broker and Redis: answers, bad input, groups, redelivery."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis
import torch
from aiokafka import AIOKafkaProducer

from deploy.local.stack import free_port, redis_answers
from producers.load import publish, random_requests
from schemas.codec import ContentType, decode_result, encode_request, encode_result
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest, InferenceResult, ResultStatus
from schemas.settings import RedisSettings
from schemas.tensors import Tensor
from schemas.topics import HEADER_CONTENT_TYPE, HEADER_ERROR_CODE, TopicNames
from tests.conftest import TopicFactory
from tests.integration.kafka_helpers import bounded
from tests.integration.metric_samples import metric_total
from tests.integration.worker_harness import (
    Deployment,
    assert_outputs_match,
    read_topic,
    running_worker,
    wait_until_ready,
)
from workers.authoring import write_version
from workers.formats import ModelFormat
from workers.models import ModelConfig, TensorSpec, torchscript_deprecation_silenced

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def batches_above_one(running_metrics_registry: object) -> float:
    """How many executed batches held more than one request (from the histogram)."""
    from prometheus_client import CollectorRegistry

    assert isinstance(running_metrics_registry, CollectorRegistry)
    total = metric_total(running_metrics_registry, "inferq_batch_size_count", model="mlp")
    singles = metric_total(
        running_metrics_registry, "inferq_batch_size_bucket", model="mlp", le="1.0"
    )
    return total - singles


async def test_every_request_is_answered_once_with_the_models_outputs(
    deployment: Deployment, redis_client: aioredis.Redis
) -> None:
    count = 5000
    requests = random_requests(model="mlp", count=count, input_name="input", row_shape=[784])
    requests = [r.model_copy(update={"version": 1}) for r in requests]
    topics = TopicNames(prefix=deployment.prefix)
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        await bounded(publish(client, requests), what="publishing", timeout_s=60)
        results = await client.results([r.id for r in requests], timeout_s=120)

    assert_outputs_match(deployment.models_dir / "mlp" / "1", requests, results)
    assert all(r.version == 1 and r.status is ResultStatus.OK for r in results.values())
    keys = [k async for k in redis_client.scan_iter(match=topics.result_key("*"), count=5000)]
    assert len(keys) == count
    records = await read_topic(deployment.bootstrap, topics.results("mlp"), expected=count)
    ids = [record.key.decode() for record in records]
    assert sorted(ids) == sorted(r.id for r in requests), "each result exactly once on Kafka"
    assert batches_above_one(running.metrics.registry) > 0, "dynamic batching formed batches"


async def test_a_result_is_addressed_to_reply_to_in_the_requests_encoding(
    deployment: Deployment, make_topic: TopicFactory
) -> None:
    reply_topic = await make_topic(f"{deployment.prefix}.replies.mine")
    request = InferenceRequest(
        id="json-1",
        model="cnn",
        inputs=(Tensor.from_numpy("input", np.ones((2, 3, 64, 64), dtype=np.float32)),),
        reply_to=reply_topic,
    )
    async with running_worker(deployment) as running:
        await wait_until_ready(running)
        producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                TopicNames(prefix=deployment.prefix).requests("cnn"),
                encode_request(request, ContentType.JSON),
                key=b"json-1",
                headers=[(HEADER_CONTENT_TYPE, b"application/json")],
            )
        finally:
            await producer.stop()
        (record,) = await read_topic(deployment.bootstrap, reply_topic, expected=1)
    assert record.value.startswith(b"{")
    result = decode_result(record.value, ContentType.JSON)
    assert result.ok
    assert result.outputs[0].shape == (2, 10)
    assert result.timing is not None
    assert result.timing.batch_size == 1


def malformed_records(prefix: str) -> list[tuple[bytes | None, bytes, list, ErrorCode, bool]]:
    """(key, value, headers, expected code, has a readable id) for each kind of bad input."""
    good = np.zeros((1, 784), dtype=np.float32)
    cases: list[tuple[bytes | None, bytes, list, ErrorCode, bool]] = []

    def request_map(i: int, kind: str, **fields: object) -> dict:
        base: dict = {
            "id": f"bad-{kind}-{i}",
            "model": "mlp",
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 784], "data": good.tobytes()}
            ],
        }
        base.update(fields)
        return base

    for i in range(20):
        packed = msgpack.packb
        cases += [
            (None, b"\xc1 not msgpack " + bytes([i]), [], ErrorCode.DECODE_ERROR, False),
            (None, packed({"no": "id"}), [], ErrorCode.VALIDATION_ERROR, False),
            (
                None,
                packed(request_map(i, "type")),
                [(HEADER_CONTENT_TYPE, b"text/csv")],
                ErrorCode.DECODE_ERROR,
                False,
            ),
            (
                None,
                packed(request_map(i, "noinputs", inputs=[])),
                [],
                ErrorCode.VALIDATION_ERROR,
                True,
            ),
            (
                None,
                packed(request_map(i, "huge", inputs=[
                    {"name": "input", "datatype": "FP32", "shape": [1 << 20, 1 << 20], "data": b""}
                ])),
                [],
                ErrorCode.PAYLOAD_TOO_LARGE,
                True,
            ),
            (None, packed(request_map(i, "model", model="x")), [], ErrorCode.UNKNOWN_MODEL, True),
            (None, packed(request_map(i, "v", version=9)), [], ErrorCode.UNKNOWN_VERSION, True),
            (
                None,
                packed(request_map(i, "shape", inputs=[
                    {"name": "input", "datatype": "FP32", "shape": [1, 783],
                     "data": np.zeros(783, np.float32).tobytes()}
                ])),
                [],
                ErrorCode.SHAPE_MISMATCH,
                True,
            ),
            (
                None,
                packed(request_map(i, "dtype", inputs=[
                    {"name": "input", "datatype": "FP64", "shape": [1, 784],
                     "data": np.zeros(784, np.float64).tobytes()}
                ])),
                [],
                ErrorCode.DTYPE_MISMATCH,
                True,
            ),
            (
                None,
                packed(request_map(i, "deadline", deadline_ms=1_000)),
                [],
                ErrorCode.DEADLINE_EXCEEDED,
                True,
            ),
        ]  # fmt: skip
    return cases


async def test_bad_input_is_answered_with_its_code_and_never_stops_consumption(
    deployment: Deployment,
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    good = random_requests(model="mlp", count=2000, input_name="input", row_shape=[784])
    bad = malformed_records(deployment.prefix)
    assert len(bad) == 200
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap)
        await producer.start()
        try:
            # Interleave: a bad record after every ten good ones.
            for index, request in enumerate(good):
                await client.enqueue(request)
                if index % 10 == 0:
                    key, value, headers, _, _ = bad[index // 10]
                    await producer.send(topics.requests("mlp"), value, key=key, headers=headers)
            await producer.flush()
        finally:
            await producer.stop()
        await client._producer.flush()
        good_results = await client.results([r.id for r in good], timeout_s=120)
        with_id = [
            (msgpack.unpackb(value)["id"], code)
            for _, value, headers, code, has_id in bad
            if has_id
        ]
        bad_results = await client.results([i for i, _ in with_id], timeout_s=60)

    assert all(result.ok for result in good_results.values())
    for request_id, code in with_id:
        result = bad_results[request_id]
        assert result.error is not None, request_id
        assert result.error.code is code, (request_id, result)
        expected_status = (
            ResultStatus.EXPIRED if code is ErrorCode.DEADLINE_EXCEEDED else ResultStatus.ERROR
        )
        assert result.status is expected_status
    dead = [case for case in bad if not case[4]]
    letters = await read_topic(deployment.bootstrap, topics.dead_letters, expected=len(dead))
    assert len(letters) == len(dead)
    codes = sorted(dict(letter.headers)[HEADER_ERROR_CODE].decode() for letter in letters)
    assert codes == sorted(case[3].value for case in dead)
    assert {letter.value for letter in letters} == {case[1] for case in dead}


async def test_a_redelivered_request_is_answered_from_the_cache_without_running(
    deployment: Deployment, redis_client: aioredis.Redis
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    (request,) = random_requests(model="mlp", count=1, input_name="input", row_shape=[784])
    earlier = InferenceResult.success(
        request.id, "mlp", 1, [Tensor.from_numpy("logits", np.full((1, 10), 7, np.float32))]
    )
    await redis_client.set(topics.result_key(request.id), encode_result(earlier), ex=60)
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        await client.submit_request(request)
        (record,) = await read_topic(deployment.bootstrap, topics.results("mlp"), expected=1)
    assert record.key == request.id.encode()
    resent = decode_result(record.value)
    assert resent.outputs[0].to_numpy().tolist() == [[7.0] * 10]
    assert metric_total(running.metrics.registry, "inferq_batch_size_count", model="mlp") == 0
    assert metric_total(running.metrics.registry, "inferq_requests_total", outcome="cached") == 1


async def test_two_workers_split_the_partitions_and_the_survivor_finishes(
    deployment: Deployment,
) -> None:
    requests = random_requests(model="mlp", count=4000, input_name="input", row_shape=[784])
    async with deployment.client() as client, running_worker(deployment) as first:
        await wait_until_ready(first)
        async with running_worker(deployment) as second:
            await wait_until_ready(second)
            async with asyncio.timeout(30):
                while len(first.worker.assignment) != 4 or len(second.worker.assignment) != 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # 8 partitions (mlp and cnn) split in two
            await publish(client, requests[:2000])
            await client.results([r.id for r in requests[:2000]], timeout_s=120)
            first_batches = metric_total(
                first.metrics.registry, "inferq_batch_size_count", model="mlp"
            )
            second_batches = metric_total(
                second.metrics.registry, "inferq_batch_size_count", model="mlp"
            )
            assert first_batches, "the first worker served part of the load"
            assert second_batches, "the second worker served part of the load"
            sending = asyncio.create_task(publish(client, requests[2000:]))
            await asyncio.sleep(0.2)
        # `second` has left the group mid-load; `first` takes over its partitions.
        await sending
        results = await client.results([r.id for r in requests], timeout_s=120)
    assert len(results) == len(requests)
    assert all(result.ok for result in results.values())


class Poisonable(torch.nn.Module):
    """Doubles its input, and raises for any row holding a negative value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("poison row")
        return x * 2


async def test_a_poison_request_fails_alone_and_its_batch_mates_succeed(
    deployment: Deployment, make_topic: TopicFactory
) -> None:
    with torchscript_deprecation_silenced():
        module = torch.jit.script(Poisonable())
    spec = TensorSpec(name="input", datatype="FP32", shape=(4,))
    write_version(
        fmt=ModelFormat.TORCHSCRIPT,
        root=deployment.models_dir,
        name="poison",
        version=1,
        module=module,
        config=ModelConfig(
            inputs=[spec],
            outputs=[spec.model_copy(update={"name": "output"})],
            max_batch_size=16,
            max_batch_delay_ms=200,
        ),
    )
    # No topic is made for `poison`: the worker creates its topics when they are missing.
    values = np.ones((16, 1, 4), dtype=np.float32)
    values[5] = -1
    requests = [
        InferenceRequest(id=f"p-{i}", model="poison", inputs=(Tensor.from_numpy("input", v),))
        for i, v in enumerate(values)
    ]
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        await asyncio.gather(*[await client.enqueue(r) for r in requests])
        results = await client.results([r.id for r in requests], timeout_s=60)
        served = running.worker.ready
    assert served
    poisoned = results["p-5"]
    assert poisoned.error is not None
    assert poisoned.error.code is ErrorCode.INFERENCE_ERROR
    assert "poison row" in poisoned.error.message
    for i, request in enumerate(requests):
        if i != 5:
            assert results[request.id].ok
            np.testing.assert_array_equal(results[request.id].outputs[0].to_numpy(), values[i] * 2)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own, which it may stall; its URL and process."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not redis_answers("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(10)


async def test_a_stalled_redis_delays_answers_but_loses_none(
    deployment: Deployment, private_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """Writes retry with backoff while Redis does not answer; nothing is dropped."""
    redis_url, redis_server = private_redis
    private = dataclasses.replace(deployment, redis_url=redis_url)
    requests = random_requests(model="mlp", count=600, input_name="input", row_shape=[784])
    overrides = {"redis": RedisSettings(url=redis_url, socket_timeout_s=0.5),
                 "write_retry_max_backoff_s": 0.5}  # fmt: skip
    async with running_worker(private, **overrides) as running, private.client() as client:
        await wait_until_ready(running)
        await publish(client, requests[:200])
        await client.results([r.id for r in requests[:200]], timeout_s=60)
        redis_server.send_signal(signal.SIGSTOP)  # Redis hangs: its commands time out
        try:
            await publish(client, requests[200:])
            await asyncio.sleep(3)
        finally:
            redis_server.send_signal(signal.SIGCONT)
        results = await client.results([r.id for r in requests], timeout_s=60)
    retries = running.metrics.registry.get_sample_value(
        "inferq_write_retries_total", {"sink": "redis"}
    )
    assert len(results) == len(requests)
    assert all(result.ok for result in results.values())
    assert retries, "the stalled Redis made the writer retry"


async def test_a_key_redis_refuses_does_not_stall_the_others(
    deployment: Deployment, redis_client: aioredis.Redis
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    requests = random_requests(model="mlp", count=20, input_name="input", row_shape=[784])
    blocked = requests[7].id
    await redis_client.rpush(topics.result_key(blocked), b"not a string")  # WRONGTYPE for SET
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        await publish(client, requests)
        records = await read_topic(deployment.bootstrap, topics.results("mlp"), expected=20)
        cached = await client.results([r.id for r in requests if r.id != blocked], timeout_s=30)
    assert sorted(record.key.decode() for record in records) == sorted(r.id for r in requests)
    assert len(cached) == 19
    assert await redis_client.type(topics.result_key(blocked)) == b"list"
