"""In-memory stand-ins for Kafka and the answer sinks, to drive the worker without either.

`MemoryConsumer` serves records from lists, one per partition, like a consumer assigned to
all of them; `MemoryWriter` keeps answers as Redis and the result topics would, first
result of an id winning. `Worker.serve(..., burst=True)` over them runs the real loop
(admission, batching, the runner, answers, offsets) to the end of the records: for tests,
and for the hot-path benchmark, which measures the worker's own Python per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from workers.answers import Answers
from workers.records import Addressee, Answer


class MemoryPartition(NamedTuple):
    """Shaped like aiokafka's `TopicPartition`."""

    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """A consumed record: the fields of aiokafka's `ConsumerRecord` the worker reads."""

    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = -1
    """Unix ms; negative: unknown."""


class MemoryConsumer:
    """A consumer assigned every partition it was given records for, reading from offset 0."""

    def __init__(self, records: Mapping[MemoryPartition, Sequence[MemoryRecord]]) -> None:
        self._records = {partition: list(values) for partition, values in records.items()}
        self._positions = dict.fromkeys(self._records, 0)
        self._paused: set[MemoryPartition] = set()
        self.committed: dict[MemoryPartition, int] = {}
        """The last offset committed for each partition."""
        self.polls = 0

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[MemoryPartition, list[MemoryRecord]]:
        """Up to ``max_records`` records of the partitions not paused, in partition order."""
        self.polls += 1
        budget = max_records if max_records is not None else 1 << 30
        polled: dict[MemoryPartition, list[MemoryRecord]] = {}
        for partition, records in self._records.items():
            position = self._positions[partition]
            if partition in self._paused or position >= len(records) or budget <= 0:
                continue
            taken = records[position : position + budget]
            self._positions[partition] = position + len(taken)
            budget -= len(taken)
            polled[partition] = taken
        if not polled:
            await asyncio.sleep(0)  # a real poll yields to the loop, even an empty one
        return polled

    def assignment(self) -> set[MemoryPartition]:
        return set(self._records)

    def paused(self) -> set[MemoryPartition]:
        return set(self._paused)

    def pause(self, *partitions: Any) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: Any) -> None:
        self._paused.difference_update(partitions)

    async def commit(self, offsets: Mapping[Any, int]) -> None:
        self.committed.update(offsets)


@dataclass
class MemoryWriter:
    """Answers kept as Redis and Kafka would keep them: first result of an id wins."""

    answers: Answers
    results: dict[str, bytes] = field(default_factory=dict)
    """Each request id's cached result (Redis)."""
    digests: dict[str, bytes] = field(default_factory=dict)
    sent: list[Answer] = field(default_factory=list)
    """Every record written, in order (the result and dead-letter topics)."""
    committed: dict[Any, int] = field(default_factory=dict)
    """Offsets committed with the answers (exactly-once), per partition."""
    transactions: int = 0
    """Writes that committed offsets with their answers."""

    async def settled(self, addressees: Sequence[Addressee]) -> list[Answer | None]:
        settled: list[Answer | None] = []
        for to in addressees:
            value = self.results.get(to.request_id)
            if value is None:
                settled.append(None)
            elif self.digests.get(to.request_id) != to.digest:
                settled.append(self.answers.duplicate_id(to))
            else:
                settled.append(self.answers.cached(to, value))
        return settled

    async def write(
        self,
        answers: Sequence[Answer],
        *,
        offsets: Callable[[], Mapping[Any, int]] | None = None,
    ) -> list[Answer]:
        """Keep the answers; with ``offsets``, commit them with the answers, as a
        transaction would."""
        written = []
        for answer in answers:
            request_id = answer.request_id
            if answer.cache_key is not None and request_id is not None:
                earlier = self.results.setdefault(request_id, answer.value)
                held = self.digests.setdefault(request_id, answer.digest)
                if held != answer.digest:
                    answer = self.answers.duplicate_id(Addressee.of(answer))
                elif earlier is not answer.value:
                    answer = self.answers.cached(Addressee.of(answer), earlier)
            written.append(answer)
        self.sent.extend(written)
        if offsets is not None:
            self.transactions += 1
            self.committed.update(offsets())
        return written
