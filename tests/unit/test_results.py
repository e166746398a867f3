"""The result writer against a scripted producer: errors land on the records they concern."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerClosed,
    UnknownTopicOrPartitionError,
)

from schemas.codec import decode_result
from schemas.errors import ErrorCode
from workers.admission import Answer, RecordSource
from workers.metrics import Outcome, WorkerMetrics
from workers.results import ResultWriter


class Batch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(
        self, *, timestamp: object, key: bytes | None, value: bytes, headers: object
    ) -> object:
        self.records.append((key, value))
        return object()


class ScriptedProducer:
    """Acknowledges every batch, except as ``failures`` says: (topic, partition) -> errors."""

    def __init__(self, *, partitions: int = 4, failures: dict[tuple[str, int], list[Exception]]):
        self.partitions = partitions
        self.failures = failures
        self.acked: list[tuple[str, int, list[tuple[bytes | None, bytes]]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        if topic == "missing":
            raise UnknownTopicOrPartitionError()
        return set(range(self.partitions))

    def create_batch(self) -> Batch:
        return Batch()

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        errors = self.failures.get((topic, partition))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if errors:
            error = errors.pop(0)
            if isinstance(error, KafkaTimeoutError):
                raise error  # as aiokafka does when the partition's queue stays full
            future.set_exception(error)
        else:
            self.acked.append((topic, partition, batch.records))
            future.set_result(None)
        return future


class NoRedis:
    def register_script(self, script: str) -> object:
        return None


def answers(topic: str, count: int) -> list[Answer]:
    return [
        Answer(
            source=RecordSource(("requests", 0), offset),
            topic=topic,
            key=f"id-{offset}".encode(),
            value=b"v" * 10,
            headers=(("content-type", b"application/msgpack"),),
            model="mlp",
            outcome=Outcome.OK,
            cache_key=f"inferq:result:id-{offset}",
        )
        for offset in range(count)
    ]


def writer(producer: ScriptedProducer) -> ResultWriter:
    return ResultWriter(
        producer=producer,  # type: ignore[arg-type]
        redis=NoRedis(),  # type: ignore[arg-type]
        result_ttl_s=60,
        metrics=WorkerMetrics(),
        max_backoff_s=0.01,
    )


def acked_keys(producer: ScriptedProducer) -> list[bytes | None]:
    return sorted(key for _, _, records in producer.acked for key, _ in records)


async def test_one_partitions_failure_is_retried_without_touching_the_others() -> None:
    producer = ScriptedProducer(
        failures={("results", 0): [NotLeaderForPartitionError(), KafkaTimeoutError()]}
    )
    sent = await writer(producer)._write_kafka(answers("results", 40))
    assert len(sent) == 40
    assert acked_keys(producer) == sorted(f"id-{i}".encode() for i in range(40))
    first_round = {partition for _, partition, _ in producer.acked[:3]}
    assert first_round == {1, 2, 3}, "partitions other than 0 were sent at the first try"


async def test_a_result_too_large_is_replaced_by_an_internal_error_result() -> None:
    producer = ScriptedProducer(
        partitions=1, failures={("results", 0): [MessageSizeTooLargeError()]}
    )
    (sent,) = await writer(producer)._write_kafka(answers("results", 1))
    assert sent.code == ErrorCode.INTERNAL.value
    (_, _, records) = producer.acked[0]
    result = decode_result(records[0][1])
    assert result.error is not None
    assert result.error.code is ErrorCode.INTERNAL
    assert "in Redis" in result.error.message


async def test_a_missing_reply_topic_is_given_up_after_some_rounds() -> None:
    producer = ScriptedProducer(failures={})
    sent = await writer(producer)._write_kafka(answers("missing", 2))
    assert len(sent) == 2, "the offsets move on; the results stay in Redis"
    assert producer.acked == []


async def test_a_broken_producer_stops_the_writer() -> None:
    producer = ScriptedProducer(partitions=1, failures={("results", 0): [ProducerClosed()]})
    with pytest.raises(ProducerClosed):
        await writer(producer)._write_kafka(answers("results", 3))
