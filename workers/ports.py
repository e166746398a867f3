"""What the worker's loop needs of Kafka and of the answer sinks, as small protocols.

`Worker.serve` runs against these, so a test drives the whole loop with an in-memory
consumer and writer (as arq runs its worker in burst mode); `Worker.run` plugs in aiokafka's
consumer and the Redis-then-Kafka `ResultWriter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from workers.records import Addressee, Answer


class ConsumedRecord(Protocol):
    """The parts of a consumed Kafka record the worker reads (aiokafka's `ConsumerRecord`)."""

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...

    @property
    def timestamp(self) -> int:
        """Unix ms of the record (its producer's CreateTime, or the broker's LogAppendTime)."""
        ...


class RecordConsumer(Protocol):
    """The consumer calls the worker makes (a subset of aiokafka's `AIOKafkaConsumer`).

    Partitions are opaque hashable values (aiokafka's `TopicPartition`).
    """

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[Any, Sequence[ConsumedRecord]]: ...

    def assignment(self) -> set[Any]: ...

    def paused(self) -> set[Any]: ...

    def pause(self, *partitions: Any) -> None: ...

    def resume(self, *partitions: Any) -> None: ...

    async def commit(self, offsets: Mapping[Any, int]) -> None: ...


class AnswerWriter(Protocol):
    """Where answers go (`workers.results.ResultWriter`: Redis first, then Kafka)."""

    async def settled(self, addressees: Sequence[Addressee]) -> list[Answer | None]:
        """For each request, the answer it gets without running (its id is settled), or None."""
        ...

    async def write(
        self,
        answers: Sequence[Answer],
        *,
        offsets: Callable[[], Mapping[Any, int]] | None = None,
    ) -> list[Answer]:
        """Write every answer durably; return them as sent (earlier winners, stand-ins).

        offsets: a writer that commits transactionally (exactly-once) calls it just before
        committing, for the consumer offsets to commit atomically with the answers; the
        others ignore it, and the worker commits through the consumer.
        """
        ...
