"""Where answers go and whose they are: `reply_to` is held to an allow-list, and an id
reused by another request never returns that request's output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from producers.load import random_requests
from schemas.codec import content_type_of, decode_result, encode_request
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest, InferenceResult
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.integration.kafka_helpers import record_count, topic_names
from tests.integration.worker_harness import (
    Deployment,
    assert_outputs_match,
    read_topic,
    running_worker,
    wait_until_ready,
)
from workers.errors import MissingTopicsError

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


async def publish(bootstrap: str, topic: str, requests: list[InferenceRequest]) -> None:
    """Send each request keyed by its id, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for request in requests:
            await producer.send_and_wait(topic, encode_request(request), key=request.id.encode())
    finally:
        await producer.stop()


def results_by_id(records: list) -> dict[str, list[InferenceResult]]:
    by_id: dict[str, list[InferenceResult]] = {}
    for record in records:
        result = decode_result(record.value, content_type_of(record.headers))
        by_id.setdefault(result.id, []).append(result)
    return by_id


async def test_reply_to_outside_the_allow_list_is_answered_on_the_results_topic(
    deployment: Deployment, make_topic: TopicFactory
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    allowed = await make_topic(f"{deployment.prefix}.replies.mine")
    missing = f"{deployment.prefix}.replies.nobody-made-this"
    stray = f"{deployment.prefix}.somewhere-else"
    refused = {
        "into-requests": topics.requests("mlp"),
        "into-offsets": "__consumer_offsets",
        "into-dlq": topics.dead_letters,
        "into-other-results": topics.results("cnn"),
        "into-stray": stray,
    }
    (template,) = random_requests(model="mlp", count=1, input_name="input", row_shape=[784])
    requests = [
        template.model_copy(update={"id": request_id, "reply_to": topic})
        for request_id, topic in {**refused, "allowed": allowed, "allowed-missing": missing}.items()
    ]
    before = await topic_names(deployment.bootstrap)
    await publish(deployment.bootstrap, topics.requests("mlp"), requests)

    async with running_worker(deployment) as running:
        await wait_until_ready(running)
        on_results = await read_topic(
            deployment.bootstrap, topics.results("mlp"), expected=len(refused) + 1
        )
        (on_reply,) = await read_topic(deployment.bootstrap, allowed, expected=1)

    by_id = results_by_id(on_results)
    assert sorted(by_id) == sorted([*refused, "allowed-missing"])
    for request_id in refused:
        (result,) = by_id[request_id]
        assert result.error is not None, request_id
        assert result.error.code is ErrorCode.VALIDATION_ERROR
        assert "reply_to" in result.error.message
    (fallback,) = by_id["allowed-missing"]
    assert fallback.ok, "a missing reply topic's result goes to the model's results topic"
    assert decode_result(on_reply.value).ok
    # Kafka itself creates __consumer_offsets when the first group commits.
    created = {t for t in await topic_names(deployment.bootstrap) - before if t[:2] != "__"}
    assert not created, f"the worker created topics: {sorted(created)}"
    assert await record_count(deployment.bootstrap, topics.requests("mlp")) == len(requests)
    assert await record_count(deployment.bootstrap, topics.dead_letters) == 0


async def test_an_id_reused_with_other_inputs_is_refused_never_given_anothers_output(
    deployment: Deployment,
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    firsts = random_requests(model="mlp", count=15, input_name="input", row_shape=[784])
    seconds = [
        first.model_copy(
            update={"inputs": (Tensor.from_numpy("input", np.full((1, 784), 7.0, np.float32)),)}
        )
        for first in firsts
    ]
    (resent,) = random_requests(model="mlp", count=1, input_name="input", row_shape=[784])
    retried = resent.model_copy(update={"created_ms": (resent.created_ms or 0) + 1})
    await publish(
        deployment.bootstrap, topics.requests("mlp"), [*firsts, *seconds, resent, retried]
    )

    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        records = await read_topic(deployment.bootstrap, topics.results("mlp"), expected=32)
        cached = await client.results([r.id for r in [*firsts, resent]], timeout_s=60)

    by_id = results_by_id(records)
    (version,) = {by_id[r.id][0].version for r in firsts}
    model_file = deployment.models_dir / "mlp" / str(version)
    assert_outputs_match(model_file, firsts, {r.id: by_id[r.id][0] for r in firsts})
    for first in firsts:
        answers = by_id[first.id]
        assert len(answers) == 2
        duplicate = answers[1]
        assert duplicate.error is not None, "the second request got the first one's output"
        assert duplicate.error.code is ErrorCode.DUPLICATE_ID
        assert cached[first.id] == answers[0], "Redis keeps the first request's result"
    same = by_id[resent.id]
    assert len(same) == 2
    assert same[0].ok
    assert same[0] == same[1], "the same request sent again gets the same result"


async def test_a_worker_told_not_to_create_topics_refuses_to_start_without_them(
    deployment: Deployment,
) -> None:
    elsewhere = dataclasses.replace(deployment, prefix=f"{deployment.prefix}-none")
    before = await topic_names(deployment.bootstrap)
    with pytest.raises(MissingTopicsError, match="INFERQ_CREATE_TOPICS"):
        async with running_worker(elsewhere, create_topics=False) as running:
            await running.task
    created = {t for t in await topic_names(deployment.bootstrap) - before if t[:2] != "__"}
    assert not created, f"subscribing created topics: {sorted(created)}"
