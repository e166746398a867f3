"""Exactly-once writing: each group's Kafka records and the offsets they complete, in one
Kafka transaction.

`TransactionalResultWriter` writes Redis first, as `ResultWriter` does (first result wins,
so a retried group finds its own results there), then opens a transaction on its producer
(`transactional_id`), sends the group's result and dead-letter records, adds the consumer
offsets that the group completes (`send_offsets_to_transaction`) and commits. A reader with
``isolation_level="read_committed"`` sees a group's records only once its offsets are
committed too, so a crash anywhere means redelivery of records whose results no such reader
saw: no duplicates on the results topic.

A round that fails aborts the whole transaction and retries the group from the start,
keeping what it learned (stand-ins for records too large, batches of their own). A refused
batch breaks the producer's sequence, and an abort that cannot finish leaves it unusable:
then the producer is renewed instead, and its new `InitProducerId` with the same
transactional id aborts the open transaction on the coordinator. `ProducerFenced` (another
producer took the id: a successor of this static member) stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from schemas.redis import RedisClient
from workers.answers import Answers
from workers.catalog import TopicCatalog
from workers.errors import ProducerFencedError
from workers.metrics import Sink, WorkerMetrics
from workers.records import Answer
from workers.results import Backoff, OffsetsToCommit, Outgoing, ProducerFactory, ResultWriter

log = structlog.get_logger(__name__)

ABORT_TIMEOUT_S = 10.0
"""Bound on an abort; past it the producer is renewed, which aborts on the coordinator."""


class _TransactionDoomed(Exception):
    """A round broke the producer's sequence: the transaction can only be thrown away."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(repr(errors[0]) if errors else "sequence broken")
        self.errors = errors


class TransactionalResultWriter(ResultWriter):
    """A `ResultWriter` whose Kafka writes are transactions that commit consumer offsets.

    The producer factory must build producers with a ``transactional_id``: the same one for
    every producer this writer builds, so that each renewal fences the one before it.
    """

    def __init__(
        self,
        *,
        group_id: str,
        producer_factory: ProducerFactory,
        redis: RedisClient,
        catalog: TopicCatalog,
        answers: Answers,
        result_ttl_s: int,
        metrics: WorkerMetrics,
        max_backoff_s: float,
        max_record_bytes: int,
    ) -> None:
        """group_id: the consumer group whose offsets the transactions commit.

        producer_factory: builds an unstarted producer with this worker's transactional id.
        The other arguments are `ResultWriter`'s.
        """
        super().__init__(
            producer_factory=producer_factory, redis=redis, catalog=catalog, answers=answers,
            result_ttl_s=result_ttl_s, metrics=metrics, max_backoff_s=max_backoff_s,
            max_record_bytes=max_record_bytes,
        )  # fmt: skip
        if not group_id:
            raise ValueError("group_id must name the consumer group whose offsets commit")
        self._group_id = group_id

    async def _write_kafka(
        self, answers: Sequence[Answer], offsets: OffsetsToCommit | None = None
    ) -> list[Answer]:
        pending = [Outgoing(answer) for answer in answers]
        backoff = Backoff(max_s=self._max_backoff_s)
        while True:
            producer = self._producer
            assert producer is not None, "start() the writer first"
            try:
                await producer.begin_transaction()
                delivered = await self._deliver(pending)
                committing = dict(offsets()) if offsets is not None else {}
                if committing:
                    await producer.send_offsets_to_transaction(
                        {tp: OffsetAndMetadata(offset, "") for tp, offset in committing.items()},
                        self._group_id,
                    )
                await producer.commit_transaction()
                return delivered
            except ProducerFenced as error:
                raise self._fenced(error) from error
            except (_TransactionDoomed, KafkaError, OSError) as error:
                self._metrics.write_retries.labels(sink=Sink.KAFKA.value).inc(len(pending))
                log.warning("kafka_transaction_aborted", answers=len(pending), error=repr(error))
                await self._abort(producer, error)
                await backoff.sleep()
            except BaseException:
                # Cancelled (shutdown) or a bug: leave no transaction open behind us.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.abort_transaction(), ABORT_TIMEOUT_S)
                raise

    async def _sequence_broken(self, errors: list[BaseException]) -> None:
        for error in errors:
            if isinstance(error, ProducerFenced):
                raise self._fenced(error)
        raise _TransactionDoomed(errors)

    async def _abort(self, producer: AIOKafkaProducer, error: BaseException) -> None:
        """Throw the open transaction away, renewing the producer when it cannot abort."""
        if not isinstance(error, _TransactionDoomed):
            try:
                await asyncio.wait_for(producer.abort_transaction(), ABORT_TIMEOUT_S)
            except ProducerFenced as fenced:
                raise self._fenced(fenced) from fenced
            except Exception as abort_error:  # any failure (a fatal state too) means: renew
                log.warning("kafka_transaction_abort_failed", error=repr(abort_error))
            else:
                return
        await self._renew_producer(error)

    def _fenced(self, error: BaseException) -> ProducerFencedError:
        log.error("kafka_producer_fenced", error=repr(error))
        return ProducerFencedError(
            "another producer took this worker's transactional id (a newer process with the "
            "same INFERQ_GROUP_INSTANCE_ID), or a transaction outlived "
            f"INFERQ_TRANSACTION_TIMEOUT_MS: stopping uncommitted ({error!r})"
        )
