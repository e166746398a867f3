"""Records a topic refuses as too large: replaced, isolated, never a crash or a blank answer.

Kafka judges size per record batch against the topic's `max.message.bytes`, and an
idempotent producer whose batch is refused fails every later send to that partition. These
tests shrink the limits of the results and dead-letter topics and feed the worker records
that cross them.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from producers.load import random_requests
from schemas.codec import content_type_of, decode_result, encode_request
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest, InferenceResult
from schemas.tensors import Tensor
from schemas.topics import (
    HEADER_ERROR_CODE,
    HEADER_ORIGINAL_SHA256,
    HEADER_ORIGINAL_SIZE,
    HEADER_SOURCE,
    TopicNames,
)
from tests.integration.kafka_helpers import bounded, set_topic_configs
from tests.integration.worker_harness import (
    Deployment,
    read_topic,
    running_worker,
    wait_until_ready,
)

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

RESULT_TOPIC_LIMIT = 200_000
KAFKA_DEFAULT_LIMIT = 1_048_588
"""Kafka's default `message.max.bytes`, which a dead-letter topic usually keeps."""


async def publish_raw(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Send (key, value) records as they are, in order, before any worker reads them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=32 * 1024 * 1024, linger_ms=5
    )
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def decoded(records: list) -> dict[str, list[InferenceResult]]:
    """Each id's results in topic order; every record must hold a decodable result."""
    by_id: dict[str, list[InferenceResult]] = {}
    for record in records:
        assert record.value, f"an empty value on the results topic for {record.key!r}"
        result = decode_result(record.value, content_type_of(record.headers))
        by_id.setdefault(result.id, []).append(result)
    return by_id


async def test_a_result_too_large_for_its_topic_is_replaced_and_no_other_answer_pays(
    deployment: Deployment,
) -> None:
    """300 small requests, one whose result is 240 KB, 300 more; results topic at 200 KB.

    Then a second group reads the same requests again: all are answered from the cache,
    the large one among them, which must not blank its batch mates.
    """
    topics = TopicNames(prefix=deployment.prefix)
    results_topic = topics.results("mlp")
    await set_topic_configs(
        deployment.bootstrap, results_topic, {"max.message.bytes": str(RESULT_TOPIC_LIMIT)}
    )
    small = random_requests(model="mlp", count=600, input_name="input", row_shape=[784])
    large = InferenceRequest(
        id="large-1",
        model="mlp",
        inputs=(Tensor.from_numpy("input", np.ones((6000, 784), np.float32)),),
    )
    requests = [*small[:300], large, *small[300:]]
    await publish_raw(
        deployment.bootstrap,
        topics.requests("mlp"),
        [(r.id.encode(), encode_request(r)) for r in requests],
    )
    ids = [r.id for r in requests]

    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        cached = await client.results(ids, timeout_s=120)
        first = await read_topic(deployment.bootstrap, results_topic, expected=len(requests))
        assert not running.task.done(), "the worker kept serving"
    assert cached[large.id].ok, "the full result is in Redis"
    assert cached[large.id].outputs[0].shape == (6000, 10)

    second_group = dataclasses.replace(deployment, group_id=f"{deployment.group_id}-again")
    async with running_worker(second_group) as running:
        await wait_until_ready(running)
        records = await read_topic(
            deployment.bootstrap, results_topic, expected=2 * len(requests), timeout_s=120
        )
        assert not running.task.done(), "the worker kept serving the redeliveries"

    assert len(first) == len(requests)
    by_id = decoded(records)
    assert sorted(by_id) == sorted(ids)
    for request in small:
        answers = by_id[request.id]
        assert len(answers) == 2
        assert all(answer.ok for answer in answers), f"{request.id}: {answers[-1].error}"
        assert answers[0] == answers[1], "the cached answer is the same result"
    for answer in by_id[large.id]:
        assert answer.error is not None
        assert answer.error.code is ErrorCode.INTERNAL
        assert topics.result_key(large.id) in answer.error.message


async def test_a_dead_letter_too_large_for_its_topic_keeps_its_size_and_digest(
    deployment: Deployment,
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    await set_topic_configs(
        deployment.bootstrap,
        topics.dead_letters,
        {"max.message.bytes": str(KAFKA_DEFAULT_LIMIT)},
    )
    undecodable = b"\xc1" + bytes(2 * 1024 * 1024)
    good = random_requests(model="mlp", count=50, input_name="input", row_shape=[784])
    await publish_raw(
        deployment.bootstrap,
        topics.requests("mlp"),
        [(b"junk", undecodable), *((r.id.encode(), encode_request(r)) for r in good)],
    )
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        results = await client.results([r.id for r in good], timeout_s=60)
        (dead,) = await bounded(
            read_topic(deployment.bootstrap, topics.dead_letters, expected=1),
            what="reading the dead letter",
            timeout_s=90,
        )
        assert not running.task.done(), "the worker kept serving"
    assert all(result.ok for result in results.values())
    headers = dict(dead.headers)
    assert dead.key == b"junk"
    assert dead.value in (b"", None)
    assert headers[HEADER_ERROR_CODE] == ErrorCode.DECODE_ERROR.value.encode()
    assert headers[HEADER_ORIGINAL_SIZE] == str(len(undecodable)).encode()
    assert headers[HEADER_ORIGINAL_SHA256] == hashlib.sha256(undecodable).hexdigest().encode()
    assert headers[HEADER_SOURCE].startswith(topics.requests("mlp").encode())
