"""The worker's record types: where a request came from (`RecordSource`), who its answer
goes to (`Addressee`), a request waiting to run (`PendingRequest`, under its `BatchKey`) and
what leaves the worker for it (`Answer`).

One or more of these is built per request, so they are plain slotted dataclasses, not
frozen ones (which cost about 1 µs more per construction here): treat them as values and
use `dataclasses.replace` to change one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from schemas.codec import ContentType
from workers.metrics import Outcome
from workers.models import InputSignature, LoadedModel, ResolvedParameters
from workers.offsets import PartitionOffsets


@dataclass(slots=True)
class RecordSource:
    """Where a request came from: its partition (a ``TopicPartition``) and offset."""

    partition: Any
    offset: int
    lease: PartitionOffsets[Any] | None = None
    """The assignment of the partition the record was consumed under (None outside a worker):
    its answer completes the offset there, unless the partition was revoked meanwhile."""

    @property
    def topic(self) -> str:
        return str(getattr(self.partition, "topic", ""))

    def __str__(self) -> str:
        return f"{self.topic}/{getattr(self.partition, 'partition', '?')}/{self.offset}"


@dataclass(slots=True)
class Addressee:
    """Everything an answer to one request needs: who asked, in which encoding, and where
    the result goes (resolved once, at admission)."""

    source: RecordSource
    request_id: str
    model: str
    topic: str
    content_type: ContentType
    digest: bytes
    fallback_topic: str | None = None
    """The model's results topic when ``topic`` is the request's `reply_to`."""
    trace: str | None = None
    """The request's `trace`, copied into its result."""

    @classmethod
    def of(cls, answer: Answer) -> Addressee:
        """The addressee of an existing result answer."""
        assert answer.request_id is not None, "a dead letter has no addressee"
        return cls(
            source=answer.source,
            request_id=answer.request_id,
            model=answer.model,
            topic=answer.topic,
            content_type=answer.content_type,
            digest=answer.digest,
            fallback_topic=answer.fallback_topic,
        )


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Requests batch together only with the same model version and per-row input shapes."""

    model: str
    version: int
    signature: tuple[InputSignature, ...]
    """Each input's name, datatype and shape without the batch dimension."""
    served: LoadedModel
    """The loaded version (compared by identity): one loaded again batches apart."""
    parameters: ResolvedParameters = ()
    """The requests' parameters, defaults filled in: only equal ones batch together."""


@dataclass(eq=False, slots=True, kw_only=True)
class PendingRequest:
    """A valid request waiting in the batcher: its inputs as arrays, nothing else decoded."""

    to: Addressee
    model: LoadedModel
    key: BatchKey
    inputs: tuple[NDArray[Any], ...]
    """One C-contiguous array per model input, in `config.inputs` order, dim 0 its rows;
    BF16 as its raw uint16 bits. Often a view on the consumed record's bytes."""
    rows: int
    received_at: float
    """Monotonic seconds at receipt (the batcher's clock)."""
    received_ms: int
    """Unix milliseconds at receipt."""
    created_ms: int | None = None
    """The producer's `created_ms`: queue time is measured from it when present."""
    deadline_ms: int | None = None
    priority: int = 0

    @property
    def source(self) -> RecordSource:
        """Where the request was read."""
        return self.to.source


@dataclass(slots=True)
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
    version: str = ""
    """The model version that answered, as the `version` metric label; "" when none ran
    or it is not known (dead letters, answers re-sent from the cache, duplicate ids)."""
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
    requested_ms: int | None = None
    """The request's `created_ms`, for an ok result: end-to-end latency is measured from it."""

    @property
    def is_dead_letter(self) -> bool:
        """Whether this is the original record bound for the dead-letter topic."""
        return self.request_id is None
