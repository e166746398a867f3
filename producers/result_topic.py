"""Finding results on their Kafka topics, for when Redis no longer holds them.

Redis is a cache (a TTL, and without persistence a restart empties it); the result topic is the
record of truth. A client that waited too long for a result in Redis reads the topic instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from schemas.codec import content_type_of, decode_result
from schemas.errors import SchemaError
from schemas.kafka import client_options
from schemas.messages import InferenceResult
from schemas.settings import KafkaSettings

CLOCK_SKEW_ALLOWANCE_MS: Final = 30_000
"""Topics are read from this long before a request's submit time: a worker whose clock runs
behind this client's stamps its results earlier than the client sent the request."""

PartitionsFor = Callable[[str], Awaitable[set[int]]]
"""A topic's partition ids, from cluster metadata (`AIOKafkaProducer.partitions_for`)."""


@dataclass(frozen=True, slots=True)
class Submission:
    """Where the result of a published request goes, and when the request was published."""

    result_topic: str
    """`reply_to`, or the model's results topic."""
    submitted_ms: int
    """Unix time of the publication on this client's clock, in milliseconds."""
    submitted_monotonic_s: float
    """`time.monotonic()` at the publication, in seconds."""


class ResultTopicScan:
    """Reads result topics from the submit times of some requests onward, for their results.

    A scan covers the submissions it is given: each topic from the earliest submit time among
    them (less `CLOCK_SKEW_ALLOWANCE_MS`) to its end and on, as records arrive. It has no
    consumer group and commits nothing. Use as ``async with ResultTopicScan(...) as scan``.
    """

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        submissions: Mapping[str, Submission],
        partitions_for: PartitionsFor,
    ) -> None:
        """kafka: where the topics are. submissions: the requests to cover, by id.
        partitions_for: how to learn a topic's partitions.
        """
        self._since_ms: dict[str, int] = {}
        for submission in submissions.values():
            topic = submission.result_topic
            self._since_ms[topic] = min(
                submission.submitted_ms, self._since_ms.get(topic, submission.submitted_ms)
            )
        self._partitions_for = partitions_for
        self._consumer = AIOKafkaConsumer(
            **client_options(kafka),
            client_id=f"{kafka.client_id}-result-scan",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level="read_committed",  # see producers/replies.py
        )

    async def __aenter__(self) -> ResultTopicScan:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, and position every partition of the topics at the covered time."""
        await self._consumer.start()
        try:
            start_offsets: dict[TopicPartition, int] = {}
            for topic, since_ms in self._since_ms.items():
                partitions = [TopicPartition(topic, p) for p in await self._partitions_for(topic)]
                since = max(0, since_ms - CLOCK_SKEW_ALLOWANCE_MS)
                by_time = await self._consumer.offsets_for_times(dict.fromkeys(partitions, since))
                # No record that recent yet: start at the end, where the result will come.
                no_newer = [tp for tp in partitions if by_time.get(tp) is None]
                ends = await self._consumer.end_offsets(no_newer) if no_newer else {}
                for tp in partitions:
                    found = by_time.get(tp)
                    start_offsets[tp] = found.offset if found is not None else ends[tp]
            # Assign and seek with no await between: the fetcher never starts anywhere else.
            self._consumer.assign(list(start_offsets))
            for tp, offset in start_offsets.items():
                self._consumer.seek(tp, offset)
        except BaseException:
            await self._consumer.stop()
            raise

    async def close(self) -> None:
        """Disconnect."""
        await self._consumer.stop()

    async def read(self, wanted: Container[str], *, timeout_ms: int) -> dict[str, InferenceResult]:
        """The results keyed by a ``wanted`` id among the records fetched next.

        Waits up to ``timeout_ms`` for records. Per id, the first record that decodes; records
        with no key, no value or an undecodable value are passed over.
        """
        found: dict[str, InferenceResult] = {}
        fetched = await self._consumer.getmany(timeout_ms=timeout_ms)
        for records in fetched.values():
            for record in records:
                if record.key is None or record.value is None:
                    continue
                request_id = record.key.decode("utf-8", "replace")
                if request_id not in wanted or request_id in found:
                    continue
                try:
                    content_type = content_type_of(record.headers)
                    found[request_id] = decode_result(record.value, content_type)
                except SchemaError:
                    continue
        return found
