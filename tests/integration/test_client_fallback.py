"""The client finds a result on its result topic when Redis does not have it."""

from __future__ import annotations

import numpy as np
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from deploy.local.stack import free_port
from producers.client import InferenceClient, ResultTimeoutError
from producers.load import publish, random_requests
from producers.settings import ProducerSettings
from schemas.codec import ContentType, content_type_header, encode_result
from schemas.messages import InferenceRequest, InferenceResult
from schemas.settings import KafkaSettings, RedisSettings
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import (
    Deployment,
    read_topic,
    running_worker,
    wait_until_ready,
)

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

FALLBACK_S = 0.5


def fallback_client(deployment: Deployment, *, redis_url: str | None = None) -> InferenceClient:
    """A client of the deployment that looks on result topics after half a second."""
    return InferenceClient(
        settings=ProducerSettings(
            kafka=KafkaSettings(
                bootstrap_servers=deployment.bootstrap, topic_prefix=deployment.prefix
            ),
            redis=RedisSettings(url=redis_url or deployment.redis_url, socket_timeout_s=2),
            result_poll_interval_ms=20,
            result_topic_fallback_s=FALLBACK_S,
        )
    )


def request_for(
    deployment: Deployment, suffix: str, *, reply_to: str | None = None
) -> InferenceRequest:
    return InferenceRequest(
        id=f"{deployment.prefix}-{suffix}",
        model="mlp",
        inputs=(Tensor.from_numpy("input", np.zeros((1, 784), dtype=np.float32)),),
        reply_to=reply_to,
    )


def ok_result(request: InferenceRequest, value: float) -> InferenceResult:
    return InferenceResult.success(
        request_id=request.id,
        model=request.model,
        version=1,
        outputs=(Tensor.from_numpy("logits", np.full((1, 10), value, dtype=np.float32)),),
        worker="written-by-the-test",
    )


async def write_results(
    bootstrap: str, topic: str, results: list[InferenceResult], content_type: ContentType
) -> None:
    """Results as a worker writes them: keyed by request id, encoding named in a header."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * 1024 * 1024)
    await bounded(producer.start(), what="producer start", timeout_s=20)
    try:
        for result in results:
            await bounded(
                producer.send_and_wait(
                    topic,
                    encode_result(result, content_type),
                    key=result.id.encode(),
                    headers=[content_type_header(content_type)],
                ),
                what="writing a result record",
                timeout_s=20,
            )
    finally:
        await producer.stop()


async def test_answers_deleted_from_redis_are_read_from_the_results_topic(
    deployment: Deployment, redis_client: aioredis.Redis
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    requests = random_requests(model="mlp", count=20, input_name="input", row_shape=[784])
    async with running_worker(deployment) as running, fallback_client(deployment) as client:
        await wait_until_ready(running)
        await bounded(publish(client, requests), what="publishing", timeout_s=60)
        records = await read_topic(deployment.bootstrap, topics.results("mlp"), expected=20)
        assert len(records) == 20, "the worker answered on the results topic"
        # As after a restart of a Redis without persistence: the answers are gone from Redis.
        await redis_client.delete(*[topics.result_key(r.id) for r in requests])

        results = await client.results([r.id for r in requests], timeout_s=60)

    assert sorted(results) == sorted(r.id for r in requests)
    assert all(result.ok and result.id == i for i, result in results.items())
    assert not await redis_client.exists(*[topics.result_key(r.id) for r in requests])


async def test_a_reply_to_result_is_found_while_redis_is_unreachable(
    deployment: Deployment, make_topic: TopicFactory
) -> None:
    reply_topic = await make_topic(f"{deployment.prefix}.replies.fallback", partitions=3)
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every MGET fails
    ours = request_for(deployment, "ours", reply_to=reply_topic)
    other = request_for(deployment, "other", reply_to=reply_topic)
    async with fallback_client(deployment, redis_url=nowhere) as client:
        await bounded(client.submit_request(ours), what="submit", timeout_s=20)
        await write_results(
            deployment.bootstrap,
            reply_topic,
            [ok_result(other, 1.0), ok_result(ours, 2.0)],
            ContentType.JSON,  # decoded by the record's content-type header
        )
        results = await client.results([ours.id], timeout_s=60)

    assert list(results) == [ours.id]
    assert results[ours.id].worker == "written-by-the-test"
    np.testing.assert_array_equal(results[ours.id].outputs[0].to_numpy(), np.full((1, 10), 2.0))


async def test_a_result_on_no_topic_still_times_out(deployment: Deployment) -> None:
    answered = request_for(deployment, "answered")
    unanswered = request_for(deployment, "unanswered")
    topics = TopicNames(prefix=deployment.prefix)
    async with fallback_client(deployment) as client:
        for request in (answered, unanswered):
            await bounded(client.submit_request(request), what="submit", timeout_s=20)
        await write_results(
            deployment.bootstrap,
            topics.results("mlp"),
            [ok_result(answered, 3.0)],
            ContentType.MSGPACK,
        )
        # Not `bounded`: ResultTimeoutError is a TimeoutError; pytest's timeout bounds the test.
        with pytest.raises(ResultTimeoutError) as timed_out:
            await client.results([answered.id, unanswered.id], timeout_s=3 * FALLBACK_S + 2)
    assert timed_out.value.request_ids == [unanswered.id]
