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
from numpy.typing import NDArray

from schemas.codec import CodecLimits, ContentType, content_type_of, decode_request
from schemas.errors import ErrorCode, SchemaError
from schemas.messages import InferenceRequest
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from workers.answers import Answers
from workers.errors import WorkerError
from workers.fastpath import FastReader, PlainRequest
from workers.fingerprint import record_digest, request_digest
from workers.models import InputSignature, LoadedModel, ResolvedParameters
from workers.records import Addressee, Answer, BatchKey, PendingRequest, RecordSource
from workers.repository import ModelRepository

Headers = Sequence[tuple[str, bytes]]
log = structlog.get_logger(__name__)

__all__ = ["Admission", "Answer", "BatchKey", "PendingRequest", "RecordSource", "batch_key"]


def batch_key(
    model: LoadedModel, inputs: Sequence[InputSignature], parameters: ResolvedParameters = ()
) -> BatchKey:
    """The key of the batch a request joins: its model version, per-row input shapes and
    parameters."""
    signature = tuple(sorted(InputSignature(s.name, s.datatype, s.shape[1:]) for s in inputs))
    return BatchKey(model.name, model.version, signature, model, parameters)


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """Turns consumed records into pending requests or immediate answers."""

    repository: ModelRepository
    answers: Answers
    limits: CodecLimits
    reply_topic_prefixes: Sequence[str]
    """A request's `reply_to` must start with one of these (and name no reserved topic)."""
    fast: FastReader = field(init=False)
    """The fast path for plain msgpack requests."""
    _keys: dict[LoadedModel, BatchKey] = field(init=False, default_factory=dict)
    """Each model version's batch key for requests of its exact signature."""
    _routes: dict[str, tuple[str, str]] = field(init=False, default_factory=dict)
    """Each request topic's model name and results topic."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fast", FastReader(limits=self.limits))

    def forget_models(self) -> None:
        """Drop what is cached per model version: the repository has changed."""
        self._keys.clear()
        self.fast.forget_models()
        self.answers.forget_models()

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
        topic = source.topic
        route = self._routes.get(topic)
        if route is None:
            topic_model = self.topics.model_of_request_topic(topic) or "unknown"
            route = self._routes[topic] = (topic_model, self.topics.results(topic_model))
        topic_model, results = route
        if value is not None and (not headers or _names_msgpack(headers)):
            plain = self.fast.read(value, self._served)
            if plain is not None:
                return self._admit_plain(plain, source, results, received_at, received_ms)
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
                _content_type_or_default(headers), record_digest(value or b""), results,
            )  # fmt: skip
            return self.answers.failed(to, error.code, error.message)
        to, refusal = self._addressee(
            source, request.id, request.model, request.reply_to, content_type,
            request_digest(request), results, trace=request.trace,
        )  # fmt: skip
        if refusal is not None:
            return self.answers.failed(to, ErrorCode.VALIDATION_ERROR, refusal)
        try:
            model = self.repository.get(request.model, request.version)
        except WorkerError as error:
            return self.answers.failed(to, error.code, error.message)
        try:
            signatures = [InputSignature(t.name, t.datatype.value, t.shape) for t in request.inputs]
            rows = model.check_inputs(signatures)
            parameters = model.resolve_parameters(request.parameters)
        except WorkerError as error:  # the version that refused the inputs is in the result
            return self.answers.failed(to, error.code, error.message, version=model.version)
        if request.deadline_ms is not None and request.deadline_ms <= received_ms:
            return self.answers.expired(to, deadline_ms=request.deadline_ms, version=model.version)
        return PendingRequest(
            to=to,
            model=model,
            key=batch_key(model, signatures, parameters),
            inputs=_inputs_in_model_order(model, request),
            rows=rows,
            received_at=received_at,
            received_ms=received_ms,
            created_ms=request.created_ms,
            deadline_ms=request.deadline_ms,
            priority=request.priority,
        )

    def _admit_plain(
        self,
        plain: PlainRequest,
        source: RecordSource,
        results: str,
        received_at: float,
        received_ms: int,
    ) -> PendingRequest | Answer:
        model = plain.model
        to, refusal = self._addressee(
            source, plain.request_id, model.name, plain.reply_to, ContentType.MSGPACK,
            plain.digest, results, trace=plain.trace,
        )  # fmt: skip
        if refusal is not None:
            return self.answers.failed(to, ErrorCode.VALIDATION_ERROR, refusal)
        deadline_ms = plain.deadline_ms
        if deadline_ms is not None and deadline_ms <= received_ms:
            return self.answers.expired(to, deadline_ms=deadline_ms, version=model.version)
        key = self._keys.get(model)
        if key is None:
            signatures = [
                InputSignature(spec.name, spec.datatype, (1, *spec.shape))
                for spec in model.config.inputs
            ]
            # The fast path takes no parameters: only models whose every one has a default.
            defaults = model.default_parameters or ()
            key = self._keys[model] = batch_key(model, signatures, defaults)
        return PendingRequest(
            to=to,
            model=model,
            key=key,
            inputs=plain.inputs,
            rows=plain.rows,
            received_at=received_at,
            received_ms=received_ms,
            created_ms=plain.created_ms,
            deadline_ms=deadline_ms,
            priority=plain.priority,
        )

    def _served(self, name: str, version: int | None) -> LoadedModel | None:
        try:
            return self.repository.get(name, version)
        except WorkerError:
            return None

    def _addressee(
        self,
        source: RecordSource,
        request_id: str,
        model: str,
        reply_to: str | None,
        content_type: ContentType,
        digest: bytes,
        results: str,
        *,
        trace: str | None = None,
    ) -> tuple[Addressee, str | None]:
        """Where the answer goes, and why `reply_to` was refused (None when it was not).

        A refused `reply_to` is answered on the model's results topic: a request must not
        be able to write into a topic of its choosing. ``results``: the model's results topic.
        """
        refusal = None if reply_to is None else self._reply_to_refusal(reply_to)
        if reply_to is None or refusal is not None:
            to = Addressee(source, request_id, model, results, content_type, digest, trace=trace)
            return to, refusal
        to = Addressee(source, request_id, model, reply_to, content_type, digest, results, trace)
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


def _names_msgpack(headers: Headers) -> bool:
    try:
        return content_type_of(headers) is ContentType.MSGPACK
    except SchemaError:
        return False


def _content_type_or_default(headers: Headers) -> ContentType:
    try:
        return content_type_of(headers)
    except SchemaError:
        return ContentType.MSGPACK


def _inputs_in_model_order(
    model: LoadedModel, request: InferenceRequest
) -> tuple[NDArray[Any], ...]:
    """A decoded request's input arrays in `config.inputs` order, each C-contiguous."""
    by_name: dict[str, Tensor] = {tensor.name: tensor for tensor in request.inputs}
    return tuple(np.ascontiguousarray(by_name[spec.name].data) for spec in model.config.inputs)
