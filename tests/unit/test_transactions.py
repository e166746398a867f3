"""The exactly-once writer against a scripted transactional producer: what a read_committed
reader would see is each answer once, with the offsets its group completes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from aiokafka.errors import KafkaError, NotCoordinatorError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from schemas.codec import decode_result
from schemas.errors import ErrorCode
from tests.unit.test_results import ScriptedProducer, answers, writer
from workers.errors import ProducerFencedError
from workers.transactions import TransactionalResultWriter

GROUP = "inferq-workers"


class TransactionalProducer(ScriptedProducer):
    """A `ScriptedProducer` whose acknowledged batches count only once their transaction
    commits, as a read_committed reader sees them."""

    def __init__(self, *, commit_failures: list[Exception] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commit_failures = commit_failures or []
        self.in_transaction = False
        self.open_since = 0
        self.pending_offsets: dict[Any, int] = {}
        self.committed_records: list[tuple[bytes | None, bytes]] = []
        self.committed_offsets: dict[Any, int] = {}
        self.commits = 0
        self.aborts = 0

    async def start(self) -> None:
        await super().start()
        self._discard()  # a new InitProducerId aborts the open transaction of the id

    async def begin_transaction(self) -> None:
        assert not self.in_transaction, "a transaction begun inside another"
        self.in_transaction = True
        self.open_since = len(self.acked)

    async def send_offsets_to_transaction(
        self, offsets: dict[Any, OffsetAndMetadata], group_id: str
    ) -> None:
        assert self.in_transaction
        assert group_id == GROUP
        self.pending_offsets.update({tp: meta.offset for tp, meta in offsets.items()})

    async def commit_transaction(self) -> None:
        assert self.in_transaction
        if self.commit_failures:
            raise self.commit_failures.pop(0)
        for _, _, records in self.acked[self.open_since :]:
            self.committed_records.extend(records)
        self.committed_offsets.update(self.pending_offsets)
        self.commits += 1
        self._discard()

    async def abort_transaction(self) -> None:
        self.aborts += 1
        self._discard()

    def _discard(self) -> None:
        self.in_transaction = False
        self.pending_offsets = {}
        self.open_since = len(self.acked)


def transactional_writer(
    producer: TransactionalProducer, limits: dict[str, int] | None = None
) -> TransactionalResultWriter:
    built = writer(producer, limits, kind=TransactionalResultWriter, group_id=GROUP)
    assert isinstance(built, TransactionalResultWriter)
    return built


def committed_keys(producer: TransactionalProducer) -> list[bytes | None]:
    return sorted(key for key, _ in producer.committed_records)


async def test_a_group_and_the_offsets_it_completes_commit_in_one_transaction() -> None:
    producer = TransactionalProducer(failures={})
    calls: list[int] = []

    def offsets() -> dict[Any, int]:
        calls.append(len(producer.acked))
        return {("requests", 0): 40}

    sent = await transactional_writer(producer)._write_kafka(answers("results", 40), offsets)
    assert len(sent) == 40
    assert committed_keys(producer) == sorted(f"id-{i}".encode() for i in range(40))
    assert producer.committed_offsets == {("requests", 0): 40}
    assert producer.commits == 1
    assert calls == [len(producer.acked)], "offsets are read once every record is acked"


async def test_a_refused_batch_abandons_the_transaction_and_the_group_commits_once() -> None:
    producer = TransactionalProducer(partitions=1, failures={}, refuses_batches_over=50_000)
    small = answers("results", 20)
    (large,) = answers("results", 1, value_bytes=60_000)
    large = dataclasses.replace(large, key=b"big", request_id="big")
    writer = transactional_writer(producer)
    sent = await writer._write_kafka([*small[:10], large, *small[10:]], lambda: {"p": 21})
    assert len(sent) == 21
    assert producer.started >= 1, "the broken sequence renewed the producer (aborting)"
    keys = committed_keys(producer)
    assert keys == sorted([b"big", *(f"id-{i}".encode() for i in range(20))]), "each once"
    stand_in = dict(producer.committed_records)[b"big"]
    error = decode_result(stand_in).error
    assert error is not None
    assert error.code is ErrorCode.INTERNAL
    assert producer.committed_offsets == {"p": 21}
    assert len(producer.acked) > 1, "the aborted transaction's records were sent, not committed"


async def test_a_failed_commit_is_aborted_and_the_group_retried_whole() -> None:
    producer = TransactionalProducer(failures={}, commit_failures=[NotCoordinatorError()])
    sent = await transactional_writer(producer)._write_kafka(answers("results", 5), lambda: {})
    assert len(sent) == 5
    assert producer.aborts == 1
    assert producer.commits == 1
    assert committed_keys(producer) == [f"id-{i}".encode() for i in range(5)]


async def test_a_fenced_producer_stops_the_writer_with_nothing_committed() -> None:
    producer = TransactionalProducer(partitions=1, failures={("results", 0): [ProducerFenced()]})
    with pytest.raises(ProducerFencedError, match="transactional id"):
        await transactional_writer(producer)._write_kafka(answers("results", 3), lambda: {"p": 3})
    assert producer.committed_records == []
    assert producer.committed_offsets == {}


async def test_a_commit_refused_as_fenced_stops_the_writer() -> None:
    producer = TransactionalProducer(failures={}, commit_failures=[ProducerFenced()])
    with pytest.raises(ProducerFencedError):
        await transactional_writer(producer)._write_kafka(answers("results", 1), lambda: {})
    assert producer.commits == 0


async def test_a_producer_broken_beyond_renewing_stops_the_transactional_writer() -> None:
    producer = TransactionalProducer(
        partitions=1, failures={}, commit_failures=[KafkaError() for _ in range(40)]
    )

    async def failing_abort() -> None:
        raise KafkaError("abort failed")

    producer.abort_transaction = failing_abort  # type: ignore[method-assign]
    with pytest.raises(KafkaError, match="keeps failing"):
        await transactional_writer(producer)._write_kafka(answers("results", 1), lambda: {})
    assert producer.commits == 0


async def test_a_missing_reply_topic_falls_back_inside_the_same_transaction() -> None:
    producer = TransactionalProducer(partitions=1, failures={})
    group = answers("inferq.replies.gone", 2, fallback_topic="results")
    sent = await transactional_writer(producer)._write_kafka(group, lambda: {"p": 2})
    assert [answer.topic for answer in sent] == ["results", "results"]
    assert committed_keys(producer) == [b"id-0", b"id-1"]
    assert producer.commits == 1
    assert producer.committed_offsets == {"p": 2}
