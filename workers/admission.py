"""Admission: one consumed record becomes a request ready to batch, or an answer at once.

Pure logic over the codec and the model repository: no Kafka, no Redis, no clock reads.
Every bad input ends here as an error result (or a dead letter when it has no readable id),
so the partition keeps flowing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from schemas.codec import (
    CodecLimits,
    ContentType,
    content_type_of,
    decode_request,
    encode_result,
    encode_success,
)
from schemas.errors import ErrorCode, SchemaError
from schemas.messages import InferenceRequest, InferenceResult, Timing, now_ms
from schemas.tensors import Datatype, Tensor
from schemas.topics import (
    HEADER_CONTENT_TYPE,
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_SOURCE,
    TopicNames,
)
from workers.errors import WorkerError
from workers.metrics import Outcome
from workers.models import InputSignature, LoadedModel, ModelRepository
from workers.runner import RequestFailed, RequestOutcome

Headers = Sequence[tuple[str, bytes]]
log = structlog.get_logger(__name__)


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
class BatchKey:
    """Requests batch together only with the same model version and per-row input shapes."""

    model: str
    version: int
    signature: tuple[InputSignature, ...]
    """Each input's name, datatype and shape without the batch dimension."""


@dataclass(slots=True)
class PendingRequest:
    """A valid request waiting in the batcher."""

    request: InferenceRequest
    source: RecordSource
    content_type: ContentType
    model: LoadedModel
    tensors: dict[str, torch.Tensor]
    rows: int
    received_at: float
    """Monotonic seconds at receipt (the batcher's clock)."""
    received_ms: int
    """Unix milliseconds at receipt (for the result's queue time)."""
    result_topic: str
    key: BatchKey


def batch_key(model: LoadedModel, inputs: Sequence[Tensor]) -> BatchKey:
    """The key of the batch a request joins: its model version and per-row input shapes."""
    signature = tuple(sorted(InputSignature(t.name, t.datatype.value, t.shape[1:]) for t in inputs))
    return BatchKey(model.name, model.version, signature)


@dataclass(frozen=True, slots=True)
class Answer:
    """One record to write: a result (also cached in Redis) or a dead letter (Kafka only)."""

    source: RecordSource
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    model: str
    outcome: Outcome
    code: str = ""
    cache_key: str | None = None
    """Redis key of the result; None for dead letters."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """Turns consumed records into pending requests or immediate answers."""

    repository: ModelRepository
    topics: TopicNames
    limits: CodecLimits
    worker_id: str
    accepted: set[BatchKey] = field(default_factory=set)
    """Signatures that passed the model's checks once: later requests skip them."""

    def admit(
        self,
        *,
        source: RecordSource,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        received_at: float,
        received_ms: int,
    ) -> PendingRequest | Answer:
        """Decode and validate one record: a request to batch, or the answer it gets now.

        Never raises: a fault of our own becomes an INTERNAL dead letter, so one record
        cannot crash the worker again and again on every redelivery.
        """
        try:
            return self._admit(
                source=source, key=key, value=value, headers=headers,
                received_at=received_at, received_ms=received_ms,
            )  # fmt: skip
        except Exception as error:
            log.exception("admission_failed", source=str(source))
            message = f"inferq failed to admit this record: {type(error).__name__}: {error}"
            return self.dead_letter(source, key, value, headers, ErrorCode.INTERNAL, message)

    def _admit(
        self,
        *,
        source: RecordSource,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        received_at: float,
        received_ms: int,
    ) -> PendingRequest | Answer:
        topic_model = self.topics.model_of_request_topic(source.topic) or "unknown"
        try:
            content_type = content_type_of(headers)
            request = decode_request(value or b"", content_type, limits=self.limits)
        except SchemaError as error:
            if error.request_id is None:
                return self.dead_letter(source, key, value, headers, error.code, error.message)
            return self._failure(
                source=source,
                request_id=error.request_id,
                model=error.model or topic_model,
                reply_to=error.reply_to,
                content_type=_content_type_or_default(headers),
                code=error.code,
                message=error.message,
                topic_model=topic_model,
            )
        result_topic = request.reply_to or self.topics.results(topic_model)
        try:
            model = self.repository.get(request.model, request.version)
            signature = batch_key(model, request.inputs)
            tensors = {tensor.name: tensor.to_torch() for tensor in request.inputs}
            rows = self._rows(model, signature, request.inputs, tensors)
        except WorkerError as error:
            return self.failed(
                source, request, content_type, request.version, error.code, error.message
            )
        if request.deadline_ms is not None and request.deadline_ms <= received_ms:
            return self.expired(source, request, content_type, version=model.version)
        return PendingRequest(
            request=request,
            source=source,
            content_type=content_type,
            model=model,
            tensors=tensors,
            rows=rows,
            received_at=received_at,
            received_ms=received_ms,
            result_topic=result_topic,
            key=signature,
        )

    def _rows(
        self,
        model: LoadedModel,
        key: BatchKey,
        inputs: Sequence[Tensor],
        tensors: dict[str, torch.Tensor],
    ) -> int:
        """The request's batch rows, checking its inputs against the model on first sight."""
        if key in self.accepted and all(tensor.shape for tensor in inputs):
            rows = {tensor.shape[0] for tensor in inputs}
            (count,) = rows if len(rows) == 1 else (0,)
            if count >= 1:
                return count
        count = model.check_tensors(tensors)
        self.accepted.add(key)
        return count

    def reply(
        self,
        source: RecordSource,
        request: InferenceRequest,
        content_type: ContentType,
        result: InferenceResult,
        outcome: Outcome,
    ) -> Answer:
        """The answer carrying ``result`` for ``request``."""
        topic = request.reply_to or self.topics.results(
            self.topics.model_of_request_topic(source.topic) or request.model
        )
        code = result.error.code.value if result.error is not None else ""
        return Answer(
            source=source,
            topic=topic,
            key=request.id.encode(),
            value=encode_result(result, content_type),
            headers=((HEADER_CONTENT_TYPE, content_type.value.encode()),),
            model=request.model,
            outcome=outcome,
            code=code,
            cache_key=self.topics.result_key(request.id),
        )

    def outcome(self, pending: PendingRequest, result: RequestOutcome, timing: Timing) -> Answer:
        """The answer of a request that ran: its outputs, or the error the runner gave it."""
        model = pending.model
        if isinstance(result, RequestFailed):
            return self.failed(
                pending.source, pending.request, pending.content_type, model.version,
                result.error.code, result.error.message, timing=timing,
            )  # fmt: skip
        outputs = []
        for spec, tensor in zip(model.config.outputs, result.outputs, strict=True):
            datatype = Datatype(spec.datatype)
            outputs.append((spec.name, datatype, _wire_array(tensor, datatype)))
        value = encode_success(
            request_id=pending.request.id,
            model=model.name,
            version=model.version,
            outputs=outputs,
            timing=timing,
            worker=self.worker_id,
            created_ms=now_ms(),
            content_type=pending.content_type,
        )
        return self.answer(pending, value)

    def failed(
        self,
        source: RecordSource,
        request: InferenceRequest,
        content_type: ContentType,
        version: int | None,
        code: ErrorCode,
        message: str,
        *,
        timing: Timing | None = None,
    ) -> Answer:
        """The error answer of a request that was read: its code and message."""
        result = InferenceResult.failure(
            request_id=request.id,
            model=request.model,
            version=version,
            code=code,
            message=message,
            worker=self.worker_id,
            timing=timing,
        )
        return self.reply(source, request, content_type, result, Outcome.ERROR)

    def answer(self, pending: PendingRequest, value: bytes) -> Answer:
        """The ok answer of a request that ran: ``value`` is its encoded result."""
        return Answer(
            source=pending.source,
            topic=pending.result_topic,
            key=pending.request.id.encode(),
            value=value,
            headers=((HEADER_CONTENT_TYPE, pending.content_type.value.encode()),),
            model=pending.request.model,
            outcome=Outcome.OK,
            cache_key=self.topics.result_key(pending.request.id),
        )

    def expired(
        self,
        source: RecordSource,
        request: InferenceRequest,
        content_type: ContentType,
        *,
        version: int | None,
        timing: Timing | None = None,
    ) -> Answer:
        """The `expired` answer of a request whose deadline passed before it ran."""
        result = InferenceResult.expired(
            request_id=request.id,
            model=request.model,
            version=version,
            message=f"deadline_ms {request.deadline_ms} passed before the model ran",
            worker=self.worker_id,
            timing=timing,
        )
        return self.reply(source, request, content_type, result, Outcome.EXPIRED)

    def dead_letter(
        self,
        source: RecordSource,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        code: ErrorCode,
        message: str,
    ) -> Answer:
        """The original record, with the error in headers, for the dead-letter topic."""
        error_headers = (
            (HEADER_ERROR_CODE, code.value.encode()),
            (HEADER_ERROR_MESSAGE, message.encode()[:4096]),
            (HEADER_SOURCE, str(source).encode()),
        )
        return Answer(
            source=source,
            topic=self.topics.dead_letters,
            key=key,
            value=value or b"",
            headers=(*tuple(headers), *error_headers),
            model=self.topics.model_of_request_topic(source.topic) or "unknown",
            outcome=Outcome.DEAD_LETTER,
            code=code.value,
        )

    def _failure(
        self,
        *,
        source: RecordSource,
        request_id: str,
        model: str,
        reply_to: str | None,
        content_type: ContentType,
        code: ErrorCode,
        message: str,
        topic_model: str,
    ) -> Answer:
        result = InferenceResult.failure(
            request_id=request_id,
            model=model,
            version=None,
            code=code,
            message=message,
            worker=self.worker_id,
        )
        return Answer(
            source=source,
            topic=reply_to or self.topics.results(topic_model),
            key=request_id.encode(),
            value=encode_result(result, content_type),
            headers=((HEADER_CONTENT_TYPE, content_type.value.encode()),),
            model=model,
            outcome=Outcome.ERROR,
            code=code.value,
            cache_key=self.topics.result_key(request_id),
        )


def _content_type_or_default(headers: Headers) -> ContentType:
    try:
        return content_type_of(headers)
    except SchemaError:
        return ContentType.MSGPACK


def _wire_array(tensor: torch.Tensor, datatype: Datatype) -> NDArray[Any]:
    """A CPU output tensor as the array the wire carries (BF16 as its raw uint16 bits)."""
    if datatype is Datatype.BF16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    array: NDArray[Any] = tensor.numpy()
    return array
