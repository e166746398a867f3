"""Writing answers: Redis first, then Kafka, retried until both hold them.

Redis is written first, by one Lua call per group (on a Redis Cluster, one per hash slot of
the group, pipelined): the first result of a request id wins and is stored with the digest
of the request it answers. A worker that finds one already
there sends those exact bytes to Kafka instead of its own (a redelivery after a crash, a
rebalance race), so a request never gets two different results; a request that reuses an
id with other inputs is answered `DUPLICATE_ID`, never with another request's output.

Kafka takes each answer only once it fits its topic: every record is sized against the
topic's `max.message.bytes` before it joins a batch (an oversized one is replaced by a
small stand-in), batches never outgrow the topic's limit, and a batch the broker still
refuses is split so that only the record at fault is replaced. A refusal also breaks the
idempotent producer's sequence for that partition, so the producer is renewed after one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from schemas.redis import RedisClient, is_redis_failure, is_refusal, mget, slot_groups
from schemas.topics import TopicNames
from workers.answers import Answers
from workers.catalog import TopicCatalog
from workers.metrics import Sink, WorkerMetrics
from workers.records import Addressee, Answer

log = structlog.get_logger(__name__)

INITIAL_BACKOFF_S = 0.05
CACHE_READ_ATTEMPTS = 3
MAX_BATCH_BYTES = 512 * 1024
"""Largest record batch the writer builds, unless a single record needs more."""
BATCH_OVERHEAD_BYTES = 128
"""A record batch's header (61 bytes) plus slack, on top of its records."""
REQUEST_BUDGET_BYTES = 16 * 1024 * 1024
"""Bytes of batches in flight at once: aiokafka puts one batch per partition of a broker
into one produce request with no cap of its own, and the broker drops a connection whose
request exceeds `socket.request.max.bytes` (100 MiB by default), which aiokafka retries
forever. A batch larger than this goes alone."""
MISSING_TOPIC_ROUNDS = 5
"""Rounds a record waits for a missing topic before it is given up (or sent elsewhere)."""
PRODUCER_RENEWALS_PER_MINUTE = 10
"""More renewals than this in a minute means the producer is broken beyond renewing."""

SET_FIRST_WINS = """
local out = {}
for i = 1, #KEYS / 2 do
  local digest = ARGV[2 * i + 1]
  local earlier = redis.call('SET', KEYS[2 * i - 1], ARGV[2 * i], 'EX', ARGV[1], 'NX', 'GET')
  if not earlier then
    redis.call('SET', KEYS[2 * i], digest, 'EX', ARGV[1])
    out[2 * i - 1] = 0
    out[2 * i] = ''
  else
    local held = redis.call('GET', KEYS[2 * i])
    if held and held ~= digest then
      out[2 * i - 1] = 2
      out[2 * i] = ''
    else
      out[2 * i - 1] = 1
      out[2 * i] = earlier
    end
  end
end
return out
"""
"""For each pair (result key, digest key) in KEYS with (value, digest) in ARGV[2i, 2i+1]
and the TTL in ARGV[1]: store both if the result key is free (0); else return the earlier
result (1), or 2 when the id is held by a request of another digest."""
_STORED, _EARLIER, _TAKEN = 0, 1, 2
_PARTITIONER = DefaultPartitioner()

ProducerFactory = Callable[[], AIOKafkaProducer]
OffsetsToCommit = Callable[[], Mapping[Any, int]]
"""Called by a transactional writer just before it commits: the consumer offsets (per
partition, the next record to read) to commit atomically with the group's records."""


class Backoff:
    """Exponential backoff with full jitter, capped at ``max_s`` seconds."""

    def __init__(self, *, max_s: float, initial_s: float = INITIAL_BACKOFF_S) -> None:
        self._max_s = max_s
        self._next_s = initial_s

    async def sleep(self) -> None:
        await asyncio.sleep(random.uniform(0, self._next_s))
        self._next_s = min(self._next_s * 2, self._max_s)


@dataclass(eq=False, slots=True)
class Outgoing:
    """An answer on its way to Kafka, and what its earlier rounds taught."""

    answer: Answer
    alone: bool = False
    """Sent in a batch of its own: a batch that held it was refused."""
    missing_rounds: int = 0
    size: int = 0
    """`_record_bytes` of the answer, as last sized by `_fit`."""


@dataclass(slots=True)
class _Round:
    """The batches of one sending round and their outcomes."""

    items: list[Outgoing]
    errors: list[BaseException | None] = field(default_factory=list)


class ResultWriter:
    """Writes groups of answers durably: cached in Redis, then acknowledged by Kafka.

    Owns the Kafka producer: `start` builds it, `close` stops it, and a producer that a
    refused batch left with a broken sequence is replaced by a fresh one.
    """

    def __init__(
        self,
        *,
        producer_factory: ProducerFactory,
        redis: RedisClient,
        catalog: TopicCatalog,
        answers: Answers,
        result_ttl_s: int,
        metrics: WorkerMetrics,
        max_backoff_s: float,
        max_record_bytes: int,
    ) -> None:
        """producer_factory: builds an unstarted producer (idempotent, acks=all).

        redis: one server, or a `RedisCluster` (each group is then written slot by slot).

        result_ttl_s: lifetime of cached results, in seconds.
        max_backoff_s: the longest pause between retries of a failed write.
        max_record_bytes: the producer's `max_request_size`: no record is sent above it.
        """
        self._producer_factory = producer_factory
        self._producer: AIOKafkaProducer | None = None
        self._renewals: deque[float] = deque()
        self._redis = redis
        self._cluster = redis if isinstance(redis, RedisCluster) else None
        self._catalog = catalog
        self._answers = answers
        self._topics: TopicNames = answers.topics
        self._ttl_s = result_ttl_s
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._max_record_bytes = max_record_bytes
        # One round trip and one command for a whole group, instead of a SET per result.
        self._set_first_wins = redis.register_script(SET_FIRST_WINS)

    async def start(self) -> None:
        """Build and start the producer."""
        producer = self._producer_factory()
        await producer.start()
        self._producer = producer

    async def close(self) -> None:
        """Flush and stop the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    # --- the redelivery check ---------------------------------------------------------------

    async def settled(self, addressees: Sequence[Addressee]) -> list[Answer | None]:
        """For each request, its answer if its id is settled already, else None.

        Settled: a result of the same request is cached (it is sent again as it is), or the
        id is held by a request with other inputs (`DUPLICATE_ID`). Tried a few times only:
        this runs on the intake path, which must keep polling Kafka. Reading "absent" by
        mistake costs a model run, never a second result, since the write keeps the first.
        """
        if not addressees:
            return []
        keys = [self._topics.result_key(to.request_id) for to in addressees]
        keys += [self._topics.digest_key(to.request_id) for to in addressees]
        backoff = Backoff(max_s=self._max_backoff_s)
        for attempt in range(1, CACHE_READ_ATTEMPTS + 1):
            try:
                values = await mget(self._redis, keys)
                break
            except Exception as error:
                if not is_redis_failure(error):
                    raise
                self._metrics.write_retries.labels(sink=Sink.REDIS.value).inc()
                log.warning("redis_read_failed", error=repr(error), attempt=attempt)
                if attempt < CACHE_READ_ATTEMPTS:
                    await backoff.sleep()
        else:
            return [None] * len(addressees)
        count = len(addressees)
        settled: list[Answer | None] = []
        for to, value, digest in zip(addressees, values[:count], values[count:], strict=True):
            if value is None:
                settled.append(None)
            elif digest is not None and digest != to.digest:
                settled.append(self._answers.duplicate_id(to))
            else:
                settled.append(self._answers.cached(to, value))
        return settled

    # --- writing ------------------------------------------------------------------------------

    async def write(
        self, answers: Sequence[Answer], *, offsets: OffsetsToCommit | None = None
    ) -> list[Answer]:
        """Write every answer; returns them as sent (earlier winners' values, stand-ins).

        offsets: ignored here, where the consumer commits offsets itself; a
            `workers.transactions.TransactionalResultWriter` commits them with the records.

        Raises when the producer is broken beyond renewing: the worker then stops without
        committing, and the records are delivered again.
        """
        started = time.perf_counter()
        answers = await self._write_redis(answers)
        written = time.perf_counter()
        self._metrics.result_write_seconds.labels(sink=Sink.REDIS.value).observe(written - started)
        sent = await self._write_kafka(answers, offsets)
        self._metrics.result_write_seconds.labels(sink=Sink.KAFKA.value).observe(
            time.perf_counter() - written
        )
        return sent

    async def _write_redis(self, answers: Sequence[Answer]) -> list[Answer]:
        cached = [answer for answer in answers if answer.cache_key is not None]
        if not cached:
            return list(answers)
        backoff = Backoff(max_s=self._max_backoff_s)
        while True:
            try:
                replies = await self._store(cached)
                break
            except Exception as error:
                if not is_redis_failure(error):
                    raise
                if is_refusal(error):
                    # Redis refused the command itself (a key of another type, keys in several
                    # cluster slots): retrying the group cannot help, so go key by key.
                    log.warning("redis_script_refused", error=repr(error), answers=len(cached))
                    replies = await self._store_each(cached)
                    break
                # Down, timed out, failing over, moving a slot, a torn connection: again.
                self._metrics.write_retries.labels(sink=Sink.REDIS.value).inc()
                log.warning("redis_write_failed", error=repr(error), answers=len(cached))
                await backoff.sleep()
        replaced: dict[int, Answer] = {}
        for answer, (status, earlier) in zip(cached, replies, strict=True):
            if status == _TAKEN:
                log.warning("duplicate_request_id", request_id=answer.request_id)
                replaced[id(answer)] = self._answers.duplicate_id(Addressee.of(answer))
            elif status == _EARLIER and earlier != answer.value:
                replaced[id(answer)] = self._answers.cached(Addressee.of(answer), earlier)
        return [replaced.get(id(answer), answer) for answer in answers]

    async def _store(self, answers: Sequence[Answer]) -> list[tuple[int, bytes]]:
        """First-result-wins for each answer: (status, earlier result) in their order."""
        if self._cluster is not None and len(answers) > 1:
            return await self._store_by_slot(self._cluster, answers)
        keys, args = self._script_arguments(answers)
        flat: list[Any] = await self._set_first_wins(keys=keys, args=args)
        return _replies(flat)

    async def _store_by_slot(
        self, cluster: RedisCluster, answers: Sequence[Answer]
    ) -> list[tuple[int, bytes]]:
        """`_store` on a Redis Cluster: one script call per hash slot of the answers' keys,
        all in one pipeline (a round trip per node). Raises the first error of any call: a
        retry of the whole is safe, since calls that did land find their own results."""
        groups = slot_groups([answer.cache_key or "" for answer in answers])
        loaded = False
        while True:
            pipeline = cluster.pipeline()
            for group in groups:
                keys, args = self._script_arguments([answers[i] for i in group])
                # The raw command: redis-py refuses `evalsha` by name in cluster pipelines.
                pipeline.execute_command(
                    "EVALSHA", self._set_first_wins.sha, len(keys), *keys, *args
                )
            try:
                results: list[Any] = await pipeline.execute()
                break
            except NoScriptError:
                if loaded:
                    raise
                await cluster.script_load(SET_FIRST_WINS)  # on every primary
                loaded = True
        replies: list[tuple[int, bytes]] = [(_STORED, b"")] * len(answers)
        for group, flat in zip(groups, results, strict=True):
            for position, reply in zip(group, _replies(flat), strict=True):
                replies[position] = reply
        return replies

    def _script_arguments(self, answers: Sequence[Answer]) -> tuple[list[str], list[bytes | int]]:
        """SET_FIRST_WINS's KEYS and ARGV for ``answers``."""
        keys: list[str] = []
        args: list[bytes | int] = [self._ttl_s]
        for answer in answers:
            assert answer.cache_key is not None
            assert answer.request_id is not None
            keys += [answer.cache_key, self._topics.digest_key(answer.request_id)]
            args += [answer.value, answer.digest]
        return keys, args

    async def _store_each(self, answers: Sequence[Answer]) -> list[tuple[int, bytes]]:
        """First-result-wins per answer; a key Redis refuses is logged and left uncached."""
        replies: list[tuple[int, bytes]] = []
        for answer in answers:
            backoff = Backoff(max_s=self._max_backoff_s)
            while True:
                try:
                    replies += await self._store([answer])
                    break
                except Exception as error:
                    if not is_redis_failure(error):
                        raise
                    if is_refusal(error):
                        log.error("redis_key_refused", key=answer.cache_key, error=repr(error))
                        replies.append((_STORED, b""))
                        break
                    self._metrics.write_retries.labels(sink=Sink.REDIS.value).inc()
                    await backoff.sleep()
        return replies

    async def _write_kafka(
        self, answers: Sequence[Answer], offsets: OffsetsToCommit | None = None
    ) -> list[Answer]:
        """Send until acknowledged; returns the answers as they reached Kafka (or gave up)."""
        return await self._deliver([Outgoing(answer) for answer in answers])

    async def _deliver(self, pending: list[Outgoing]) -> list[Answer]:
        """Send ``pending`` until each is acknowledged or given up, learning on the items
        (stand-ins, batches of their own, rounds waited for a topic) as refusals come."""
        delivered: list[Answer] = []
        backoff = Backoff(max_s=self._max_backoff_s)
        while pending:
            ready, retry = await self._fit(pending, delivered)
            outcome = await self._send_round(ready)
            renew = False
            first_error: BaseException | None = None
            for item, error in zip(outcome.items, outcome.errors, strict=True):
                if error is None:
                    delivered.append(item.answer)
                    continue
                if not isinstance(error, KafkaError | OSError):
                    raise error
                first_error = first_error or error
                if isinstance(error, TOO_LARGE):
                    # The broker judges a whole batch: find the record at fault alone. Its
                    # refusal also left a gap in this partition's producer sequence.
                    renew = True
                    self._catalog.forget(item.answer.topic)
                    if item.alone and not self._shrink(item, reason=type(error).__name__):
                        self._give_up(item, delivered, reason="too_large")
                        continue
                    item.alone = True
                elif isinstance(error, UnknownTopicOrPartitionError | InvalidTopicError):
                    self._catalog.forget(item.answer.topic)
                    item.missing_rounds += 1
                elif not _retriable(error):
                    # OutOfOrderSequenceNumber, a fenced producer, a record the broker calls
                    # invalid: the producer's sequence is broken, so renew it and retry.
                    renew = True
                    item.alone = True
                retry.append(item)
            if renew:
                await self._sequence_broken(
                    [error for error in outcome.errors if error is not None]
                )
            if retry:
                self._metrics.write_retries.labels(sink=Sink.KAFKA.value).inc(len(retry))
                log.warning("kafka_write_failed", answers=len(retry), error=repr(first_error))
                await backoff.sleep()
            pending = retry
        return delivered

    async def _fit(
        self, pending: list[Outgoing], delivered: list[Answer]
    ) -> tuple[list[Outgoing], list[Outgoing]]:
        """The records to send this round and those waiting for their topic to exist.

        Each record sent is addressed to an existing topic and small enough for it; a record
        that cannot be is given up (a result is in Redis still).
        """
        ready: list[Outgoing] = []
        waiting: list[Outgoing] = []
        limits: dict[str, int | None] = {}
        for item in pending:
            while True:
                answer = item.answer
                if answer.topic in limits:
                    limit = limits[answer.topic]
                else:
                    limit = limits[answer.topic] = await self._limit(answer.topic)
                if limit is None and answer.fallback_topic is not None:
                    log.warning(
                        "reply_topic_missing", topic=answer.topic,
                        sent_to=answer.fallback_topic, request_id=answer.request_id,
                    )  # fmt: skip
                    item.answer = dataclasses.replace(
                        answer, topic=answer.fallback_topic, fallback_topic=None
                    )
                    continue
                if limit is None or item.missing_rounds >= MISSING_TOPIC_ROUNDS:
                    if limit is None and item.missing_rounds < MISSING_TOPIC_ROUNDS:
                        item.missing_rounds += 1
                        waiting.append(item)
                    else:
                        self._give_up(item, delivered, reason="missing_topic")
                    break
                size = item.size = _record_bytes(answer)
                capacity = min(limit, self._max_record_bytes) - BATCH_OVERHEAD_BYTES
                if size <= capacity:
                    ready.append(item)
                    break
                if not self._shrink(item, reason=f"{size} bytes; {answer.topic} takes {limit}"):
                    self._give_up(item, delivered, reason="too_large")
                    break
        return ready, waiting

    async def _limit(self, topic: str) -> int | None:
        backoff = Backoff(max_s=self._max_backoff_s)
        while True:
            try:
                return await self._catalog.max_message_bytes(topic)
            except (KafkaError, OSError) as error:
                self._metrics.write_retries.labels(sink=Sink.KAFKA.value).inc()
                log.warning("topic_config_read_failed", topic=topic, error=repr(error))
                await backoff.sleep()

    def _shrink(self, item: Outgoing, *, reason: str) -> bool:
        """Replace the item's answer by its smaller stand-in; False when there is none."""
        original = item.answer
        smaller = self._answers.shrunk(original, reason=reason)
        log.warning("answer_too_large", topic=original.topic, source=str(original.source),
                    bytes=len(original.value), reason=reason,
                    replaced=smaller is not None)  # fmt: skip
        if smaller is None:
            return False
        item.answer = smaller
        return True

    def _give_up(self, item: Outgoing, delivered: list[Answer], *, reason: str) -> None:
        """Move the partition on past a record Kafka can never take: a result is in Redis
        still; a dead letter's loss is logged with where it was read."""
        answer = item.answer
        log.error("kafka_write_abandoned", topic=answer.topic, source=str(answer.source),
                  request_id=answer.request_id, reason=reason)  # fmt: skip
        self._metrics.undeliverable.labels(reason=reason).inc()
        delivered.append(answer)

    async def _sequence_broken(self, errors: list[BaseException]) -> None:
        """A refused batch broke the producer's sequence: renew the producer, then retry."""
        await self._renew_producer(errors[0] if errors else None)

    async def _renew_producer(self, cause: BaseException | None) -> None:
        """Replace the producer by a fresh one (a new producer id, sequences from zero)."""
        now = time.monotonic()
        self._renewals.append(now)
        while self._renewals and self._renewals[0] <= now - 60:
            self._renewals.popleft()
        if len(self._renewals) > PRODUCER_RENEWALS_PER_MINUTE:
            raise KafkaError(f"the Kafka producer keeps failing: {cause!r}")
        log.warning("kafka_producer_renewed", cause=repr(cause))
        old, self._producer = self._producer, None
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), 10)
        backoff = Backoff(max_s=self._max_backoff_s)
        while self._producer is None:
            producer = self._producer_factory()
            try:
                await producer.start()
            except (KafkaError, OSError) as error:
                log.warning("kafka_producer_start_failed", error=repr(error))
                with contextlib.suppress(Exception):
                    await producer.stop()
                await backoff.sleep()
            else:
                self._producer = producer

    async def _send_round(self, items: list[Outgoing]) -> _Round:
        """Send every item and wait for the acks; an error is charged only to the records of
        the batch it concerns.

        Records are appended to batches per topic partition (the key's murmur2 partition, as
        every Kafka client computes it), each batch within its topic's limit, and submitted
        whole: a per-record ``send`` costs a future and a trip through the accumulator each.
        """
        producer = self._producer
        assert producer is not None, "start() the writer first"
        round_ = _Round(items=items, errors=[None] * len(items))
        by_topic: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_topic.setdefault(item.answer.topic, []).append(index)
        flight = _Flight(round_)
        for topic, indices in by_topic.items():
            try:
                partitions = sorted(await producer.partitions_for(topic))
                if not partitions:
                    raise UnknownTopicOrPartitionError(f"no partitions known for {topic}")
                limit = await self._limit(topic) or MAX_BATCH_BYTES
            except KafkaError as error:
                flight.fail(indices, error)
                continue
            capacity = min(limit, self._max_record_bytes, MAX_BATCH_BYTES) - BATCH_OVERHEAD_BYTES
            by_partition: dict[int, list[int]] = {}
            for index in indices:
                partition = _PARTITIONER(items[index].answer.key, partitions, partitions)
                by_partition.setdefault(partition, []).append(index)
            for partition, members in by_partition.items():
                batch = _BatchInProgress(producer.create_batch())
                for index in members:
                    answer = items[index].answer
                    size = items[index].size
                    if batch.members and (items[index].alone or batch.full_for(size, capacity)):
                        await flight.submit(producer, batch, topic, partition)
                        batch = _BatchInProgress(producer.create_batch())
                    batch.append(index, answer, size)
                    if items[index].alone:
                        await flight.submit(producer, batch, topic, partition)
                        batch = _BatchInProgress(producer.create_batch())
                await flight.submit(producer, batch, topic, partition)
        await flight.land()
        return round_


class _BatchInProgress:
    """An aiokafka BatchBuilder being filled, with the items it holds."""

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.members: list[int] = []
        self.bytes = 0

    def full_for(self, size: int, capacity: int) -> bool:
        return self.bytes + size > capacity

    def append(self, index: int, answer: Answer, size: int) -> None:
        metadata = self.builder.append(
            timestamp=None, key=answer.key, value=answer.value, headers=list(answer.headers)
        )
        if metadata is None:  # aiokafka's own size cap; an empty batch takes any record
            raise AssertionError("record batch refused a record it had room for")
        self.members.append(index)
        self.bytes += size


class _Flight:
    """The batches of a round in flight, within the request budget."""

    def __init__(self, round_: _Round) -> None:
        self._round = round_
        self._deliveries: list[tuple[list[int], asyncio.Future[object]]] = []
        self._bytes = 0

    def fail(self, indices: list[int], error: BaseException) -> None:
        for index in indices:
            self._round.errors[index] = error

    async def submit(
        self, producer: AIOKafkaProducer, batch: _BatchInProgress, topic: str, partition: int
    ) -> None:
        if not batch.members:
            return
        if self._deliveries and self._bytes + batch.bytes > REQUEST_BUDGET_BYTES:
            await self.land()
        try:
            future = await producer.send_batch(batch.builder, topic, partition=partition)
        except KafkaError as error:
            self.fail(batch.members, error)
        else:
            self._deliveries.append((batch.members, future))
            self._bytes += batch.bytes

    async def land(self) -> None:
        """Wait for every batch in flight; charge each failure to its batch's members."""
        deliveries, self._deliveries, self._bytes = self._deliveries, [], 0
        acks = await asyncio.gather(*(future for _, future in deliveries), return_exceptions=True)
        for (members, _), ack in zip(deliveries, acks, strict=True):
            if isinstance(ack, BaseException):
                self.fail(members, ack)


TOO_LARGE = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
)
"""Refusals of a batch's content: one of its records is too large (or the broker says it is
corrupt), so the batch is split and the record at fault replaced."""


def _retriable(error: KafkaError | OSError) -> bool:
    # aiokafka marks a send that timed out waiting for buffer space as not retriable;
    # for us it is back-pressure from the broker, so it is retried like the others.
    if isinstance(error, OSError | KafkaTimeoutError):
        return True
    return bool(error.retriable)


def _record_bytes(answer: Answer) -> int:
    """An upper bound of the answer's size inside a record batch."""
    headers: list[tuple[str, bytes | None]] = list(answer.headers)
    return int(DefaultRecordBatchBuilder.size_of(answer.key, answer.value, headers)) + 32


def _replies(flat: list[Any]) -> list[tuple[int, bytes]]:
    """SET_FIRST_WINS's flat reply as (status, earlier result) pairs."""
    return [(int(flat[i]), bytes(flat[i + 1])) for i in range(0, len(flat), 2)]
