"""A client's own reply topic: one consumer resolves every waiting call by request id.

`infer` sends its request with `reply_to` set to this client's reply topic and waits on a
future; one consumer reads the topic and completes the future of each result it reads. A
thousand waiting calls cost one fetch loop, not a thousand Redis polls. The consumer is
assigned every partition (no consumer group, so no rebalance can take a partition away) and
starts at the end of the topic, before any request is sent. Calls still waiting after
`sweep_after_s` are looked up in Redis, all in one `MGET`: a result the worker could not send
to the reply topic (it was deleted, say, and the worker fell back to the model's results
topic) is found there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from schemas.codec import content_type_of, decode_result
from schemas.errors import ErrorCode, SchemaError
from schemas.kafka import client_options
from schemas.messages import InferenceResult
from schemas.settings import KafkaSettings
from schemas.topics import raise_topic_errors

log = logging.getLogger(__name__)

FETCH_WAIT_MS: Final = 50
"""Longest the broker holds an empty fetch of the reply topic."""
RETENTION_MS: Final = 60 * 60 * 1000
"""Replies are read within seconds; an hour of them is plenty to keep."""

Sweep = Callable[[Sequence[str]], Awaitable[dict[str, InferenceResult]]]
"""Looks results up elsewhere (Redis) by id; returns those it found."""


class ReplyListener:
    """Owns the reply topic's consumer and the futures of the calls waiting on it."""

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        topic: str,
        partitions: int,
        sweep: Sweep,
        sweep_after_s: float,
        max_message_bytes: int | None = None,
        replication_factor: int = 1,
    ) -> None:
        """max_message_bytes: the `max.message.bytes` of the topic, when it is created here
        (results larger than the broker's default otherwise arrive as stand-ins)."""
        self._max_message_bytes = max_message_bytes
        self._replication_factor = replication_factor
        self._kafka = kafka
        self.topic = topic
        self._partitions = partitions
        self._sweep = sweep
        self._sweep_after_s = sweep_after_s
        self._waiting: dict[str, _Waiting] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_lookups: set[asyncio.Task[None]] = set()
        self.created_topic = False

    @property
    def waiting(self) -> int:
        """Calls waiting for their result."""
        return len(self._waiting)

    async def start(self) -> None:
        """Create the reply topic if it is missing, and read it from its end on."""
        admin = AIOKafkaAdminClient(
            **client_options(self._kafka), client_id=f"{self._kafka.client_id}-replies-admin"
        )
        await admin.start()
        try:
            if self.topic not in set(await admin.list_topics()):
                configs = {"retention.ms": str(RETENTION_MS)}
                if self._max_message_bytes is not None:
                    configs["max.message.bytes"] = str(self._max_message_bytes)
                response = await admin.create_topics([NewTopic(
                    self.topic, num_partitions=self._partitions,
                    replication_factor=self._replication_factor, topic_configs=configs,
                )])  # fmt: skip
                self.created_topic = raise_topic_errors(response)
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(
            **client_options(self._kafka),
            client_id=f"{self._kafka.client_id}-replies",
            group_id=None,
            enable_auto_commit=False,
            # Results of exactly-once workers count once their transaction commits (an
            # aborted one's are never seen); without transactions this reads the same.
            isolation_level="read_committed",
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        await consumer.start()
        self._consumer = consumer
        try:
            partitions = await self._partitions_of(consumer)
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for partition in partitions:  # resolve "end" now, before any request is sent
                await consumer.position(partition)
        except BaseException:
            await consumer.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._read(consumer), name="inferq-replies"),
            asyncio.create_task(self._sweep_loop(), name="inferq-replies-sweep"),
        ]

    async def _partitions_of(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        deadline = time.monotonic() + self._kafka.request_timeout_ms / 1000
        while True:
            ids = consumer.partitions_for_topic(self.topic)
            if ids:
                return [TopicPartition(self.topic, p) for p in sorted(ids)]
            if time.monotonic() > deadline:
                raise KafkaError(f"reply topic {self.topic} has no partitions in the metadata")
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.05)

    def expect(self, request_id: str) -> asyncio.Future[InferenceResult]:
        """The future of ``request_id``'s result; register it before sending the request.

        Callers waiting on the same id share the future; each must `forget` it once.
        """
        entry = self._waiting.get(request_id)
        if entry is None:
            future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
            entry = self._waiting[request_id] = _Waiting(future, time.monotonic())
        entry.callers += 1
        return entry.future

    def forget(self, request_id: str) -> None:
        """One caller stops waiting for ``request_id``; the last one drops the future."""
        entry = self._waiting.get(request_id)
        if entry is None:
            return
        entry.callers -= 1
        if entry.callers <= 0:
            del self._waiting[request_id]
            if not entry.future.done():
                entry.future.cancel()

    def _resolve(self, result: InferenceResult) -> None:
        entry = self._waiting.get(result.id)
        if entry is not None and not entry.future.done():
            entry.future.set_result(result)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                polled = await consumer.getmany(timeout_ms=200, max_records=4096)
            except KafkaError as error:
                log.warning("reply topic read failed, retrying: %r", error)
                await asyncio.sleep(0.5)
                continue
            for records in polled.values():
                for record in records:
                    if record.value is None:
                        continue
                    try:
                        content_type = content_type_of(record.headers)
                        result = decode_result(record.value, content_type)
                    except SchemaError:
                        continue  # not ours to understand; its caller finds it in Redis
                    if result.error is not None and result.error.code is ErrorCode.INTERNAL:
                        # Maybe the stand-in of a result too large for this topic: the
                        # result itself is in Redis, which has the final word.
                        self._pending_lookups.add(asyncio.create_task(self._prefer_redis(result)))
                        continue
                    self._resolve(result)

    async def _prefer_redis(self, result: InferenceResult) -> None:
        try:
            found = await self._sweep([result.id])
        except Exception:
            found = {}
        self._resolve(found.get(result.id, result))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_after_s)
            now = time.monotonic()
            overdue = [i for i, entry in self._waiting.items()
                       if now - entry.since >= self._sweep_after_s]  # fmt: skip
            if not overdue:
                continue
            try:
                found = await self._sweep(overdue)
            except Exception as error:  # Redis down: the topic may still answer
                log.warning("reply sweep failed: %r", error)
                continue
            for result in found.values():
                self._resolve(result)

    async def close(self) -> None:
        """Stop reading; calls still waiting are cancelled."""
        for task in [*self._tasks, *self._pending_lookups]:
            task.cancel()
        for task in [*self._tasks, *self._pending_lookups]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for entry in self._waiting.values():
            entry.future.cancel()
        self._waiting.clear()
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass(slots=True)
class _Waiting:
    future: asyncio.Future[InferenceResult]
    since: float
    callers: int = 0
