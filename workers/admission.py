"""Admission: one consumed record becomes a request ready to batch, or an answer at once.

Pure logic over the codec and the model repository: no Kafka, no Redis, no clock reads.
Every bad input ends here as an error result (or a dead letter when it has no readable id),
so the partition keeps flowing. Answers themselves are built by `workers.answers.Answers`.
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
    encode_success,
)
from schemas.errors import ErrorCode, SchemaError
from schemas.messages import InferenceRequest, Timing, now_ms
from schemas.tensors import Datatype, Tensor
from schemas.topics import TopicNames
from workers.answers import Addressee, Answers
from workers.errors import WorkerError
from workers.fingerprint import record_digest, request_digest
from workers.models import InputSignature, LoadedModel, ModelRepository
from workers.records import Answer, RecordSource
from workers.runner import RequestFailed, RequestOutcome

Headers = Sequence[tuple[str, bytes]]
log = structlog.get_logger(__name__)

__all__ = ["Admission", "Answer", "BatchKey", "PendingRequest", "RecordSource", "batch_key"]


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
    to: Addressee
    model: LoadedModel
    tensors: dict[str, torch.Tensor]
    rows: int
    received_at: float
    """Monotonic seconds at receipt (the batcher's clock)."""
    received_ms: int
    """Unix milliseconds at receipt (for the result's queue time)."""
    key: BatchKey

    @property
    def source(self) -> RecordSource:
        """Where the request was read."""
        return self.to.source


def batch_key(model: LoadedModel, inputs: Sequence[Tensor]) -> BatchKey:
    """The key of the batch a request joins: its model version and per-row input shapes."""
    signature = tuple(sorted(InputSignature(t.name, t.datatype.value, t.shape[1:]) for t in inputs))
    return BatchKey(model.name, model.version, signature)


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """Turns consumed records into pending requests or immediate answers."""

    repository: ModelRepository
    answers: Answers
    limits: CodecLimits
    reply_topic_prefixes: Sequence[str]
    """A request's `reply_to` must start with one of these (and name no reserved topic)."""
    accepted: set[BatchKey] = field(default_factory=set)
    """Signatures that passed the model's checks once: later requests skip them."""

    @property
    def topics(self) -> TopicNames:
        return self.answers.topics

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
            return self.answers.dead_letter(
                source, key, value, headers, ErrorCode.INTERNAL, message
            )

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
                return self.answers.dead_letter(
                    source, key, value, headers, error.code, error.message
                )
            to, _ = self._addressee(
                source, error.request_id, error.model or topic_model, error.reply_to,
                _content_type_or_default(headers), record_digest(value or b""), topic_model,
            )  # fmt: skip
            return self.answers.failed(to, error.code, error.message)
        to, refusal = self._addressee(
            source, request.id, request.model, request.reply_to, content_type,
            request_digest(request), topic_model,
        )  # fmt: skip
        if refusal is not None:
            return self.answers.failed(to, ErrorCode.VALIDATION_ERROR, refusal)
        try:
            model = self.repository.get(request.model, request.version)
            signature = batch_key(model, request.inputs)
            tensors = {tensor.name: tensor.to_torch() for tensor in request.inputs}
            rows = self._rows(model, signature, request.inputs, tensors)
        except WorkerError as error:
            return self.answers.failed(to, error.code, error.message, version=request.version)
        if request.deadline_ms is not None and request.deadline_ms <= received_ms:
            return self.answers.expired(to, deadline_ms=request.deadline_ms, version=model.version)
        return PendingRequest(
            request=request,
            to=to,
            model=model,
            tensors=tensors,
            rows=rows,
            received_at=received_at,
            received_ms=received_ms,
            key=signature,
        )

    def _addressee(
        self,
        source: RecordSource,
        request_id: str,
        model: str,
        reply_to: str | None,
        content_type: ContentType,
        digest: bytes,
        topic_model: str,
    ) -> tuple[Addressee, str | None]:
        """Where the answer goes, and why `reply_to` was refused (None when it was not).

        A refused `reply_to` is answered on the model's results topic: a request must not
        be able to write into a topic of its choosing.
        """
        results = self.topics.results(topic_model)
        refusal = None if reply_to is None else self._reply_to_refusal(reply_to)
        if reply_to is None or refusal is not None:
            return Addressee(source, request_id, model, results, content_type, digest), refusal
        to = Addressee(source, request_id, model, reply_to, content_type, digest, results)
        return to, None

    def _reply_to_refusal(self, reply_to: str) -> str | None:
        if self.topics.is_reserved(reply_to):
            return (
                f"reply_to: {reply_to!r} is a request, result, dead-letter or internal "
                "topic; results are never sent there"
            )
        if not any(reply_to.startswith(prefix) for prefix in self.reply_topic_prefixes):
            allowed = ", ".join(repr(f"{p}<name>") for p in self.reply_topic_prefixes)
            return f"reply_to: {reply_to!r} is not an allowed reply topic (allowed: {allowed})"
        return None

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

    def outcome(self, pending: PendingRequest, result: RequestOutcome, timing: Timing) -> Answer:
        """The answer of a request that ran: its outputs, or the error the runner gave it."""
        model = pending.model
        if isinstance(result, RequestFailed):
            return self.answers.failed(
                pending.to, result.error.code, result.error.message,
                version=model.version, timing=timing,
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
            worker=self.answers.worker_id,
            created_ms=now_ms(),
            content_type=pending.to.content_type,
        )
        return self.answers.ok(pending.to, value)


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
