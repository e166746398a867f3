"""Writing answers: Redis first, then Kafka, retried until both hold them.

Redis is written first with ``SET NX GET``: the first result of a request id wins, and a
worker that finds one already there (a redelivery after a crash, or a rebalance race)
sends those exact bytes to Kafka instead of its own. So a request never gets two
different results, whichever worker answers and however often.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner
from redis.exceptions import RedisError, ResponseError

from schemas.codec import content_type_of, encode_result
from schemas.errors import ErrorCode
from schemas.messages import InferenceResult
from workers.admission import Answer
from workers.metrics import Outcome, Sink, WorkerMetrics

log = structlog.get_logger(__name__)

INITIAL_BACKOFF_S = 0.05
CACHE_READ_ATTEMPTS = 3

SET_FIRST_WINS = """
local earlier = {}
for i = 1, #KEYS do
  earlier[i] = redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1], 'NX', 'GET')
end
return earlier
"""
"""SET NX GET of each KEYS[i] to ARGV[i + 1] with TTL ARGV[1]; the values already there."""
_PARTITIONER = DefaultPartitioner()


class Backoff:
    """Exponential backoff with full jitter, capped at ``max_s`` seconds."""

    def __init__(self, *, max_s: float, initial_s: float = INITIAL_BACKOFF_S) -> None:
        self._max_s = max_s
        self._next_s = initial_s

    async def sleep(self) -> None:
        await asyncio.sleep(random.uniform(0, self._next_s))
        self._next_s = min(self._next_s * 2, self._max_s)


class ResultWriter:
    """Writes a group of answers durably: cached in Redis, then acknowledged by Kafka."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        redis: aioredis.Redis,
        result_ttl_s: int,
        metrics: WorkerMetrics,
        max_backoff_s: float,
    ) -> None:
        """result_ttl_s: lifetime of cached results, in seconds.

        max_backoff_s: the longest pause between retries of a failed write.
        """
        self._producer = producer
        self._redis = redis
        self._ttl_s = result_ttl_s
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        # One round trip and one command for a whole group, instead of a SET per result.
        self._set_first_wins = redis.register_script(SET_FIRST_WINS)

    async def cached(self, keys: Sequence[str]) -> list[bytes | None]:
        """The cached results under ``keys`` (None where absent or while Redis is down).

        Tried a few times only: this runs on the intake path, which must keep polling Kafka.
        Reading "absent" by mistake costs a model run, never a second result, since the
        write keeps the first result of an id and re-sends it.
        """
        if not keys:
            return []
        backoff = Backoff(max_s=self._max_backoff_s)
        for attempt in range(1, CACHE_READ_ATTEMPTS + 1):
            try:
                values = await self._redis.mget(list(keys))
                return [v.encode() if isinstance(v, str) else v for v in values]
            except (RedisError, OSError) as error:
                self._metrics.write_retries.labels(sink=Sink.REDIS.value).inc()
                log.warning("redis_read_failed", error=repr(error), attempt=attempt)
                if attempt < CACHE_READ_ATTEMPTS:
                    await backoff.sleep()
        return [None] * len(keys)

    async def write(self, answers: Sequence[Answer]) -> list[Answer]:
        """Write every answer; returns them as sent (with values replaced by earlier winners).

        Raises when the producer is broken beyond retrying: the worker then stops without
        committing, and the records are delivered again.
        """
        answers = await self._write_redis(answers)
        return await self._write_kafka(answers)

    async def _write_redis(self, answers: Sequence[Answer]) -> list[Answer]:
        cached = [(answer, answer.cache_key) for answer in answers if answer.cache_key is not None]
        if not cached:
            return list(answers)
        backoff = Backoff(max_s=self._max_backoff_s)
        keys = [key for _, key in cached]
        values = [answer.value for answer, _ in cached]
        while True:
            try:
                earlier: list[bytes | None] = await self._set_first_wins(
                    keys=keys, args=[self._ttl_s, *values]
                )
                break
            except ResponseError as error:
                # Redis refused the command itself (a key of another type, keys in several
                # cluster slots): retrying the group cannot help, so go key by key.
                log.warning("redis_script_refused", error=repr(error), answers=len(cached))
                earlier = await self._set_each(keys, values)
                break
            except (RedisError, OSError) as error:
                self._metrics.write_retries.labels(sink=Sink.REDIS.value).inc()
                log.warning("redis_write_failed", error=repr(error), answers=len(cached))
                await backoff.sleep()
        winners = {
            id(answer): value
            for (answer, _), value in zip(cached, earlier, strict=True)
            if value is not None and value != answer.value
        }
        if not winners:
            return list(answers)
        return [
            dataclasses.replace(answer, value=winners[id(answer)])
            if id(answer) in winners
            else answer
            for answer in answers
        ]

    async def _set_each(self, keys: Sequence[str], values: Sequence[bytes]) -> list[bytes | None]:
        """First-result-wins per key; a key Redis refuses is logged and left uncached."""
        backoff = Backoff(max_s=self._max_backoff_s)
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, value in zip(keys, values, strict=True):
                        pipe.set(key, value, ex=self._ttl_s, nx=True, get=True)
                    replies = await pipe.execute(raise_on_error=False)
                break
            except (RedisError, OSError) as error:
                if isinstance(error, ResponseError):
                    raise
                self._metrics.write_retries.labels(sink=Sink.REDIS.value).inc()
                await backoff.sleep()
        earlier: list[bytes | None] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                log.error("redis_key_refused", key=key, error=repr(reply))
                earlier.append(None)
            else:
                earlier.append(reply)
        return earlier

    async def _write_kafka(self, answers: Sequence[Answer]) -> list[Answer]:
        """Send until acknowledged; returns the answers that reached Kafka (or gave up)."""
        pending = list(answers)
        delivered: list[Answer] = []
        rounds: dict[int, int] = {}
        backoff = Backoff(max_s=self._max_backoff_s)
        while pending:
            outcomes = await self._send_all(pending)
            failed: list[Answer] = []
            first_error: BaseException | None = None
            for answer, outcome in zip(pending, outcomes, strict=True):
                if outcome is None:
                    delivered.append(answer)
                    continue
                if not isinstance(outcome, KafkaError | OSError):
                    raise outcome
                if isinstance(outcome, UNDELIVERABLE) or (
                    isinstance(outcome, UnknownTopicOrPartitionError)
                    and rounds.get(id(answer), 0) >= MISSING_TOPIC_ROUNDS
                ):
                    replacement = _undeliverable(answer, outcome)
                    if replacement is None:
                        # Even the stand-in cannot be sent (its topic is invalid or missing).
                        # The result is in Redis; holding the partition would block all
                        # the requests behind this one, so its offset moves on.
                        log.error("kafka_write_abandoned", topic=answer.topic,
                                  source=str(answer.source), error=repr(outcome))  # fmt: skip
                        delivered.append(answer)
                        continue
                    answer = replacement
                elif isinstance(outcome, KafkaError) and not _retriable(outcome):
                    raise outcome  # the producer itself is broken: restart, commit nothing
                rounds[id(answer)] = rounds.get(id(answer), 0) + 1
                failed.append(answer)
                first_error = first_error or outcome
            if failed:
                self._metrics.write_retries.labels(sink=Sink.KAFKA.value).inc(len(failed))
                log.warning("kafka_write_failed", answers=len(failed), error=repr(first_error))
                await backoff.sleep()
            pending = failed
        return delivered

    async def _send_all(self, answers: Sequence[Answer]) -> list[BaseException | None]:
        """Send every answer and wait for the acks: None where acknowledged, else the error.

        Records are appended to one batch per topic partition (the key's murmur2 partition,
        as every Kafka client computes it) and submitted whole: a per-record ``send`` costs
        a future and a trip through the accumulator each, which dominates at small records.
        An error is charged only to the records it concerns.
        """
        outcomes: list[BaseException | None] = [None] * len(answers)
        by_topic: dict[str, list[int]] = {}
        for index, answer in enumerate(answers):
            by_topic.setdefault(answer.topic, []).append(index)
        deliveries: list[tuple[list[int], asyncio.Future[object]]] = []
        for topic, indices in by_topic.items():
            try:
                partitions = sorted(await self._producer.partitions_for(topic))
                if not partitions:
                    raise UnknownTopicOrPartitionError(f"no partitions known for {topic}")
            except KafkaError as error:
                for index in indices:
                    outcomes[index] = error
                continue
            by_partition: dict[int, list[int]] = {}
            for index in indices:
                partition = _PARTITIONER(answers[index].key, partitions, partitions)
                by_partition.setdefault(partition, []).append(index)
            for partition, members in by_partition.items():
                builder, batch = self._producer.create_batch(), list[int]()
                for index in members:
                    if not _append(builder, answers[index]):
                        await self._submit(builder, batch, topic, partition, deliveries, outcomes)
                        builder, batch = self._producer.create_batch(), list[int]()
                        _append(builder, answers[index])  # an empty batch takes any record
                    batch.append(index)
                await self._submit(builder, batch, topic, partition, deliveries, outcomes)
        acks = await asyncio.gather(*(future for _, future in deliveries), return_exceptions=True)
        for (members, _), ack in zip(deliveries, acks, strict=True):
            if isinstance(ack, BaseException):
                for index in members:
                    outcomes[index] = ack
        return outcomes

    async def _submit(
        self,
        builder: Any,
        members: list[int],
        topic: str,
        partition: int,
        deliveries: list[tuple[list[int], asyncio.Future[object]]],
        outcomes: list[BaseException | None],
    ) -> None:
        if not members:
            return
        try:
            future = await self._producer.send_batch(builder, topic, partition=partition)
        except KafkaError as error:
            for index in members:
                outcomes[index] = error
        else:
            deliveries.append((members, future))


UNDELIVERABLE = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError)
"""Errors no retry can fix: the record is too large or its topic can never exist."""
MISSING_TOPIC_ROUNDS = 5
"""Rounds a record waits for a missing topic (a `reply_to` nobody created) before giving up."""


def _retriable(error: KafkaError) -> bool:
    # aiokafka marks a send that timed out waiting for buffer space as not retriable;
    # for us it is back-pressure from the broker, so it is retried like the others.
    return bool(error.retriable) or isinstance(error, KafkaTimeoutError | OSError)


def _undeliverable(answer: Answer, error: BaseException) -> Answer | None:
    """A small stand-in for an answer Kafka refuses, or None when the topic is the problem.

    A result too large for the broker becomes an INTERNAL error result (the full result
    stays in Redis); a dead letter too large keeps its headers and loses its value.
    """
    if isinstance(error, InvalidTopicError | UnknownTopicOrPartitionError):
        return None
    if answer.cache_key is None:
        if not answer.value:
            return None
        return dataclasses.replace(answer, value=b"")
    if answer.outcome is Outcome.ERROR and answer.code == ErrorCode.INTERNAL.value:
        return None  # already the stand-in
    reason = type(error).__name__
    stand_in = encode_result(
        InferenceResult.failure(
            answer.key.decode() if answer.key else "",
            answer.model,
            None,
            ErrorCode.INTERNAL,
            f"the result could not be written to Kafka ({reason}); it is in Redis",
        ),
        content_type_of(list(answer.headers)),
    )
    return dataclasses.replace(
        answer, value=stand_in, outcome=Outcome.ERROR, code=ErrorCode.INTERNAL.value
    )


def _append(builder: Any, answer: Answer) -> bool:
    """Add ``answer`` to an aiokafka BatchBuilder; False when the batch is full."""
    metadata = builder.append(
        timestamp=None, key=answer.key, value=answer.value, headers=list(answer.headers)
    )
    return metadata is not None
