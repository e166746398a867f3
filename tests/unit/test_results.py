"""The result writer against a scripted producer: errors land on the records they concern."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    UnknownTopicOrPartitionError,
)

from schemas.codec import ContentType, decode_result
from schemas.errors import ErrorCode
from schemas.topics import (
    HEADER_ERROR_CODE,
    HEADER_ORIGINAL_SHA256,
    HEADER_ORIGINAL_SIZE,
    TopicNames,
)
from workers.answers import Answers
from workers.catalog import TopicCatalog
from workers.metrics import WorkerMetrics
from workers.records import Addressee, Answer, RecordSource
from workers.results import ResultWriter

TOPICS = TopicNames(prefix="inferq")
BUILDER = Answers(topics=TOPICS, worker_id="w")


class Batch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []
        self.headers: list[dict[str, bytes]] = []

    def append(
        self, *, timestamp: object, key: bytes | None, value: bytes, headers: object
    ) -> object:
        self.records.append((key, value))
        self.headers.append(dict(headers))  # type: ignore[call-overload]
        return object()


class ScriptedProducer:
    """Acknowledges every batch, except as ``failures`` says: (topic, partition) -> errors."""

    def __init__(
        self,
        *,
        partitions: int = 4,
        failures: dict[tuple[str, int], list[Exception]],
        refuses_batches_over: int | None = None,
    ):
        """refuses_batches_over: the broker's real limit, which the catalog does not know."""
        self.partitions = partitions
        self.failures = failures
        self.refuses_batches_over = refuses_batches_over
        self.acked: list[tuple[str, int, list[tuple[bytes | None, bytes]]]] = []
        self.started = 0
        self.acked_headers: list[dict[str, bytes]] = []

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        if topic == "missing":
            raise UnknownTopicOrPartitionError()
        return set(range(self.partitions))

    def create_batch(self) -> Batch:
        return Batch()

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        errors = self.failures.get((topic, partition))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        size = sum(len(value) for _, value in batch.records)
        if self.refuses_batches_over is not None and size > self.refuses_batches_over:
            future.set_exception(MessageSizeTooLargeError())
        elif errors:
            error = errors.pop(0)
            if isinstance(error, KafkaTimeoutError):
                raise error  # as aiokafka does when the partition's queue stays full
            future.set_exception(error)
        else:
            self.acked.append((topic, partition, batch.records))
            self.acked_headers.extend(batch.headers)
            future.set_result(None)
        return future


class NoRedis:
    def register_script(self, script: str) -> object:
        return None


class Configs:
    """The DescribeConfigs answers of a cluster whose topics have the given limits."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits

    async def describe_configs(self, config_resources: list[Any]) -> list[Any]:
        (resource,) = config_resources
        limit = self.limits.get(resource.name)
        if limit is None:
            entry = (3, "unknown topic", 2, resource.name, [])
        else:
            entry = (0, "", 2, resource.name, [("max.message.bytes", str(limit), 0, 0, 0)])

        return [SimpleNamespace(resources=[entry])]


def answers(topic: str, count: int, *, value_bytes: int = 10, **fields: Any) -> list[Answer]:
    return [
        BUILDER.ok(
            Addressee(
                source=RecordSource(("requests", 0), offset),
                request_id=f"id-{offset}",
                model="mlp",
                topic=topic,
                content_type=ContentType.MSGPACK,
                digest=b"d",
                **fields,
            ),
            b"v" * value_bytes,
            version=1,
        )
        for offset in range(count)
    ]


def writer(
    producer: ScriptedProducer,
    limits: dict[str, int] | None = None,
    *,
    kind: type[ResultWriter] = ResultWriter,
    **options: Any,
) -> ResultWriter:
    """A started writer of ``kind`` (``options``: its own arguments) over ``producer``, no
    Redis, and topics whose `max.message.bytes` are ``limits``."""
    catalog = TopicCatalog(admin=Configs(limits or {"results": 1024 * 1024}))
    result_writer = kind(
        **options,
        producer_factory=lambda: producer,  # type: ignore[arg-type,return-value]
        redis=NoRedis(),  # type: ignore[arg-type]
        catalog=catalog,
        answers=BUILDER,
        result_ttl_s=60,
        metrics=WorkerMetrics(),
        max_backoff_s=0.01,
        max_record_bytes=64 * 1024 * 1024,
    )
    result_writer._producer = producer  # type: ignore[assignment]
    return result_writer


def acked_keys(producer: ScriptedProducer) -> list[bytes | None]:
    return sorted(key for _, _, records in producer.acked for key, _ in records)


def acked(producer: ScriptedProducer) -> dict[bytes | None, bytes]:
    return {key: value for _, _, records in producer.acked for key, value in records}


async def test_one_partitions_failure_is_retried_without_touching_the_others() -> None:
    producer = ScriptedProducer(
        failures={("results", 0): [NotLeaderForPartitionError(), KafkaTimeoutError()]}
    )
    sent = await writer(producer)._write_kafka(answers("results", 40))
    assert len(sent) == 40
    assert acked_keys(producer) == sorted(f"id-{i}".encode() for i in range(40))
    first_round = {partition for _, partition, _ in producer.acked[:3]}
    assert first_round == {1, 2, 3}, "partitions other than 0 were sent at the first try"


async def test_a_result_too_large_for_its_topic_is_replaced_before_it_is_sent() -> None:
    producer = ScriptedProducer(partitions=1, failures={})
    small = answers("results", 3)
    (large,) = answers("results", 1, value_bytes=300_000)
    large = dataclasses.replace(large, key=b"big", request_id="big")
    sent = await writer(producer, {"results": 200_000})._write_kafka([*small, large])
    assert len(sent) == 4
    assert producer.started == 0, "nothing was refused, so the producer was kept"
    values = acked(producer)
    assert all(values[f"id-{i}".encode()] == b"v" * 10 for i in range(3))
    result = decode_result(values[b"big"])
    assert result.error is not None
    assert result.error.code is ErrorCode.INTERNAL
    assert "inferq:result:big" in result.error.message
    assert all(sum(len(v) for _, v in records) <= 200_000 for _, _, records in producer.acked), (
        "no batch outgrows the topic's limit"
    )


async def test_batches_stay_within_a_small_topic_limit() -> None:
    producer = ScriptedProducer(partitions=1, failures={})
    sent = await writer(producer, {"results": 5_000})._write_kafka(
        answers("results", 100, value_bytes=1_000)
    )
    assert len(sent) == 100
    assert len(producer.acked) >= 20
    assert all(sum(len(v) for _, v in records) <= 5_000 for _, _, records in producer.acked)


async def test_a_refused_batch_is_split_and_only_the_record_at_fault_is_replaced() -> None:
    """The broker's limit is smaller than the catalog says (its config changed)."""
    producer = ScriptedProducer(partitions=1, failures={}, refuses_batches_over=50_000)
    small = answers("results", 20)
    (large,) = answers("results", 1, value_bytes=60_000)
    large = dataclasses.replace(large, key=b"big", request_id="big")
    sent = await writer(producer)._write_kafka([*small[:10], large, *small[10:]])
    assert len(sent) == 21
    values = acked(producer)
    assert all(values[f"id-{i}".encode()] == b"v" * 10 for i in range(20)), "innocents intact"
    result = decode_result(values[b"big"])
    assert result.error is not None
    assert result.error.code is ErrorCode.INTERNAL
    assert producer.started >= 1, "the refusal broke the producer's sequence: it was renewed"


async def test_a_dead_letter_too_large_keeps_its_size_and_digest_not_its_bytes() -> None:
    producer = ScriptedProducer(partitions=1, failures={})
    original = b"x" * 300_000
    dead = BUILDER.dead_letter(
        RecordSource(("inferq.requests.mlp", 0), 7), b"key", original,
        [("trace", b"t")], ErrorCode.DECODE_ERROR, "not msgpack",
    )  # fmt: skip
    (sent,) = await writer(producer, {TOPICS.dead_letters: 200_000})._write_kafka([dead])
    assert sent.is_dead_letter
    ((topic, _, [(key, value)]),) = producer.acked
    assert (topic, key, value) == (TOPICS.dead_letters, b"key", b"")
    (headers,) = producer.acked_headers
    assert headers[HEADER_ORIGINAL_SIZE] == b"300000"
    assert headers[HEADER_ORIGINAL_SHA256] == hashlib.sha256(original).hexdigest().encode()
    assert headers[HEADER_ERROR_CODE] == b"DECODE_ERROR"
    assert headers["trace"] == b"t", "the original headers are kept"


async def test_a_missing_reply_topic_sends_the_result_to_the_models_results_topic() -> None:
    producer = ScriptedProducer(partitions=1, failures={})
    sent = await writer(producer)._write_kafka(
        answers("inferq.replies.gone", 2, fallback_topic="results")
    )
    assert [answer.topic for answer in sent] == ["results", "results"]
    assert acked_keys(producer) == [b"id-0", b"id-1"]


async def test_a_missing_topic_without_fallback_is_given_up_after_some_rounds() -> None:
    producer = ScriptedProducer(failures={})
    sent = await writer(producer)._write_kafka(answers("missing", 2))
    assert len(sent) == 2, "the offsets move on; the results stay in Redis"
    assert producer.acked == []


async def test_a_broken_sequence_renews_the_producer_and_loses_nothing() -> None:
    producer = ScriptedProducer(
        partitions=1, failures={("results", 0): [OutOfOrderSequenceNumber()]}
    )
    sent = await writer(producer)._write_kafka(answers("results", 3))
    assert len(sent) == 3
    assert producer.started == 1
    assert acked_keys(producer) == [b"id-0", b"id-1", b"id-2"]


async def test_a_producer_broken_beyond_renewing_stops_the_writer() -> None:
    failures: list[Exception] = [OutOfOrderSequenceNumber() for _ in range(40)]
    producer = ScriptedProducer(partitions=1, failures={("results", 0): failures})
    with pytest.raises(KafkaError, match="keeps failing"):
        await writer(producer)._write_kafka(answers("results", 1))
