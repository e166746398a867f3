"""Where a request came from and what leaves the worker for it: `RecordSource` and `Answer`."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.codec import ContentType
from workers.metrics import Outcome


@dataclass(frozen=True, slots=True)
class RecordSource:
    """Where a request came from: its partition (a ``TopicPartition``) and offset."""

    partition: object
    offset: int

    @property
    def topic(self) -> str:
        return str(getattr(self.partition, "topic", ""))

    def __str__(self) -> str:
        return f"{self.topic}/{getattr(self.partition, 'partition', '?')}/{self.offset}"


@dataclass(frozen=True, slots=True)
class Answer:
    """One record to write: a result (cached in Redis first) or a dead letter (Kafka only).

    Built only by `workers.answers.Answers`.
    """

    source: RecordSource
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    model: str
    outcome: Outcome
    code: str = ""
    request_id: str | None = None
    """The request's id; None for a dead letter."""
    content_type: ContentType = ContentType.MSGPACK
    """The encoding of the request, and so of its result."""
    cache_key: str | None = None
    """Redis key of the result when it is still to be cached (first result wins); None for
    dead letters, for results re-sent from the cache and for `DUPLICATE_ID` answers."""
    digest: bytes = b""
    """Digest of the request the result answers, stored beside it under the id."""
    fallback_topic: str | None = None
    """Where the result goes when ``topic`` (a request's `reply_to`) does not exist."""

    @property
    def is_dead_letter(self) -> bool:
        """Whether this is the original record bound for the dead-letter topic."""
        return self.request_id is None
