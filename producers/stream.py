"""Consuming predictions in a pipeline: results as an async iterator, committed on ack.

    async with ResultStream(settings, models=["fraud"], group_id="scoring") as stream:
        async for delivery in stream:
            handle(delivery.result)
            delivery.ack()

The stream reads the models' result topics (or any topics, such as a reply topic) in the
consumer group the caller names, and commits, per partition, only up to the first result
the caller has not acknowledged: at-least-once, as the worker itself consumes. A pipeline
killed and restarted in the same group therefore sees again what it had not acknowledged,
never less; results it acknowledged out of order are committed once the gap before them is
acknowledged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from producers.settings import ProducerSettings
from schemas.codec import content_type_of, decode_result
from schemas.errors import SchemaError
from schemas.kafka import check_access, client_options
from schemas.messages import InferenceResult
from schemas.topics import TopicNames

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S: Final = 1.0
"""How often acknowledged offsets are committed (and at close, and before a rebalance)."""


@dataclass(slots=True)
class _Acks:
    """One partition's deliveries not yet acknowledged, and where its deliveries reached."""

    next_offset: int = 0
    """One past the highest offset delivered."""
    pending: set[int] = field(default_factory=set)

    def deliver(self, offset: int) -> None:
        self.pending.add(offset)
        self.next_offset = max(self.next_offset, offset + 1)

    def ack(self, offset: int) -> None:
        self.pending.discard(offset)

    @property
    def floor(self) -> int:
        """The offset to commit: everything delivered below it is acknowledged (offsets
        Kafka never delivered, such as gaps, count as done)."""
        return min(self.pending) if self.pending else self.next_offset


@dataclass(frozen=True, slots=True)
class Delivery:
    """One result read from its topic; `ack()` once it is handled."""

    result: InferenceResult
    partition: TopicPartition
    offset: int
    _stream: ResultStream = field(repr=False)

    def ack(self) -> None:
        """Mark the result handled: it will not be delivered to this group again."""
        self._stream.ack(self)


class ResultStream:
    """An async iterator over the results on some topics, in a consumer group."""

    def __init__(
        self,
        settings: ProducerSettings,
        *,
        group_id: str,
        models: Sequence[str] = (),
        topics: Sequence[str] = (),
        from_beginning: bool = True,
    ) -> None:
        """models: read `{prefix}.results.{model}` of each; topics: read these too.
        from_beginning: where a group with no committed offset starts (else at the end)."""
        names = TopicNames(prefix=settings.kafka.topic_prefix)
        self.topics = [*(names.results(model) for model in models), *topics]
        if not self.topics:
            raise ValueError("give the models (or the topics) whose results to read")
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            **client_options(settings.kafka),
            client_id=f"{settings.kafka.client_id}-results",
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            isolation_level="read_committed",  # see producers/replies.py
        )
        self._acks: dict[TopicPartition, _Acks] = {}
        self._committer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResultStream:
        try:
            await self._consumer.start()
        except KafkaError:
            await self._consumer.stop()
            await check_access(self._settings.kafka)  # KafkaAccessError when refused
            raise
        self._consumer.subscribe(self.topics, listener=_CommitOnRevoke(self))
        self._committer = asyncio.create_task(self._commit_loop(), name="inferq-stream-commit")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit what is acknowledged and leave the group."""
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        with contextlib.suppress(KafkaError):
            await self.commit()
        await self._consumer.stop()

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self._deliveries()

    async def _deliveries(self) -> AsyncIterator[Delivery]:
        consumer = self._consumer
        while True:
            polled = await consumer.getmany(timeout_ms=500, max_records=1000)
            for partition, records in polled.items():
                for record in records:
                    if partition not in consumer.assignment():
                        break  # revoked while the caller held the batch: its owner reads it
                    acks = self._acks.get(partition)
                    if acks is None:
                        acks = self._acks[partition] = _Acks()
                    acks.deliver(record.offset)
                    result = self._decode(record.value, record.headers)
                    if result is None:  # not a result: nothing to hand over, nothing to keep
                        acks.ack(record.offset)
                        continue
                    yield Delivery(result=result, partition=partition, offset=record.offset,
                                   _stream=self)  # fmt: skip

    @staticmethod
    def _decode(value: bytes | None, headers: Any) -> InferenceResult | None:
        if value is None:
            return None
        try:
            return decode_result(value, content_type_of(headers))
        except SchemaError as error:
            log.warning("skipping a record that is not a result: %s", error)
            return None

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge one delivery (see `Delivery.ack`)."""
        acks = self._acks.get(delivery.partition)
        if acks is not None:
            acks.ack(delivery.offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset below which everything delivered is acknowledged."""
        return {partition: acks.floor for partition, acks in self._acks.items()}

    async def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the acknowledged offsets (of ``partitions``, or all) now."""
        assigned = self._consumer.assignment()
        offsets = {
            partition: OffsetAndMetadata(floor, "")
            for partition, floor in self.committable().items()
            if (partitions is None or partition in partitions) and partition in assigned
        }
        if offsets:
            await self._consumer.commit(offsets)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Drop what is tracked of partitions this stream no longer owns."""
        for partition in partitions:
            self._acks.pop(partition, None)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            try:
                await self.commit()
            except (CommitFailedError, KafkaError) as error:
                log.warning("result stream commit failed: %r", error)


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stream: ResultStream) -> None:
        self._stream = stream

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        with contextlib.suppress(CommitFailedError, KafkaError):
            await self._stream.commit(list(revoked))
        self._stream.forget(list(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass
