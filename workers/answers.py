"""The one place answers are built: results (ok, error, expired, cached, duplicate id),
dead letters, and the stand-ins for records Kafka will not take."""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from schemas.codec import ContentType, encode_result, encode_success
from schemas.errors import ErrorCode
from schemas.messages import InferenceResult, Timing
from schemas.templates import OkResultTemplate
from schemas.topics import (
    HEADER_CONTENT_TYPE,
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_ORIGINAL_SHA256,
    HEADER_ORIGINAL_SIZE,
    HEADER_SOURCE,
    HEADERS_DROPPED,
    TopicNames,
)
from workers.metrics import Outcome
from workers.models import LoadedModel
from workers.records import Addressee, Answer, PendingRequest, RecordSource

Headers = Sequence[tuple[str, bytes]]
MAX_ERROR_MESSAGE_BYTES = 4096
_CONTENT_TYPE_HEADERS = {
    content_type: ((HEADER_CONTENT_TYPE, content_type.value.encode()),)
    for content_type in ContentType
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Answers:
    """Builds every `Answer` a worker sends."""

    topics: TopicNames
    worker_id: str
    _templates: dict[int, tuple[weakref.ref[LoadedModel], OkResultTemplate]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """The ok-result encoder of each loaded model version (by identity: a version loaded
    again may have other outputs), built on first use; it holds no model alive."""

    def forget_models(self) -> None:
        """Drop the encoders built per model version: the repository has changed."""
        self._templates.clear()

    def result(self, to: Addressee, result: InferenceResult, outcome: Outcome) -> Answer:
        """The answer carrying ``result``, cached in Redis under the request id."""
        code = result.error.code.value if result.error is not None else ""
        value = encode_result(result, to.content_type)
        return self._answer(to, value, outcome, code, cache=True, version=result.version)

    def ok(
        self, to: Addressee, value: bytes, *, version: int, requested_ms: int | None = None
    ) -> Answer:
        """The ok answer of a request that ran: ``value`` is its encoded result."""
        return self._answer(
            to, value, Outcome.OK, "", cache=True, version=version, requested_ms=requested_ms
        )

    def succeeded(
        self,
        pending: PendingRequest,
        outputs: Sequence[NDArray[Any]],
        *,
        queue_ms: float,
        infer_ms: float,
        batch_size: int,
        created_ms: int,
    ) -> Answer:
        """The ok answer of a request that ran: its rows of each output, in config order."""
        model = pending.model
        if pending.to.content_type is ContentType.MSGPACK:
            cached = self._templates.get(id(model))
            template = cached[1] if cached is not None and cached[0]() is model else None
            if template is None:
                template = OkResultTemplate(
                    model=model.name,
                    version=model.version,
                    outputs=[
                        (spec.name, datatype)
                        for spec, datatype in zip(
                            model.config.outputs, model.output_datatypes, strict=True
                        )
                    ],
                    worker=self.worker_id,
                )
                self._templates[id(model)] = (weakref.ref(model), template)
            value = template.encode(
                request_id=pending.to.request_id, outputs=outputs, queue_ms=queue_ms,
                infer_ms=infer_ms, batch_size=batch_size, created_ms=created_ms,
                trace=pending.to.trace,
            )  # fmt: skip
            return self.ok(
                pending.to, value, version=model.version, requested_ms=pending.created_ms
            )
        value = encode_success(
            request_id=pending.to.request_id,
            model=model.name,
            version=model.version,
            outputs=[
                (spec.name, datatype, array)
                for spec, datatype, array in zip(
                    model.config.outputs, model.output_datatypes, outputs, strict=True
                )
            ],
            timing=Timing(queue_ms=queue_ms, infer_ms=infer_ms, batch_size=batch_size),
            worker=self.worker_id,
            created_ms=created_ms,
            content_type=pending.to.content_type,
            trace=pending.to.trace,
        )
        return self.ok(pending.to, value, version=model.version, requested_ms=pending.created_ms)

    def failed(
        self,
        to: Addressee,
        code: ErrorCode,
        message: str,
        *,
        version: int | None = None,
        timing: Timing | None = None,
    ) -> Answer:
        """The error answer of a request: its code and message."""
        result = InferenceResult.failure(
            request_id=to.request_id, model=to.model, version=version, code=code,
            message=message, worker=self.worker_id, timing=timing, trace=to.trace,
        )  # fmt: skip
        return self.result(to, result, Outcome.ERROR)

    def expired(
        self,
        to: Addressee,
        *,
        deadline_ms: int | None,
        version: int | None,
        timing: Timing | None = None,
    ) -> Answer:
        """The `expired` answer of a request whose deadline passed before it ran."""
        result = InferenceResult.expired(
            request_id=to.request_id, model=to.model, version=version,
            message=f"deadline_ms {deadline_ms} passed before the model ran",
            worker=self.worker_id, timing=timing, trace=to.trace,
        )  # fmt: skip
        return self.result(to, result, Outcome.EXPIRED)

    def cached(self, to: Addressee, value: bytes) -> Answer:
        """A redelivered request's answer: the result already cached, sent again as it is."""
        return self._answer(to, value, Outcome.CACHED, "", cache=False)

    def duplicate_id(self, to: Addressee) -> Answer:
        """The answer of a request whose id another request with other inputs holds.

        Not cached: the id's cached result belongs to the request that used it first.
        """
        result = InferenceResult.failure(
            request_id=to.request_id, model=to.model, version=None,
            code=ErrorCode.DUPLICATE_ID,
            message=f"id {to.request_id!r} was already used by a request with other "
            "inputs; nothing ran: send this request with a new id",
            worker=self.worker_id, trace=to.trace,
        )  # fmt: skip
        value = encode_result(result, to.content_type)
        return self._answer(to, value, Outcome.ERROR, ErrorCode.DUPLICATE_ID.value, cache=False)

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
            (HEADER_ERROR_MESSAGE, message.encode()[:MAX_ERROR_MESSAGE_BYTES]),
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

    def shrunk(self, answer: Answer, *, reason: str) -> Answer | None:
        """A smaller stand-in for an answer its topic refuses as too large; None if none.

        A result becomes an INTERNAL error result (the full result stays in Redis). A dead
        letter loses its value, keeping its size and SHA-256 in headers; one that is
        already without its value loses the original record's headers too.
        """
        if answer.is_dead_letter:
            return self._shrunk_dead_letter(answer)
        if answer.outcome is Outcome.ERROR and answer.code == ErrorCode.INTERNAL.value:
            return None  # already the stand-in
        assert answer.request_id is not None
        where = f"Redis key {self.topics.result_key(answer.request_id)}"
        result = InferenceResult.failure(
            request_id=answer.request_id, model=answer.model, version=None,
            code=ErrorCode.INTERNAL,
            message=f"the result could not be written to {answer.topic} ({reason}); "
            f"it is in {where} until it expires",
            worker=self.worker_id,
        )  # fmt: skip
        return dataclasses.replace(
            answer,
            value=encode_result(result, answer.content_type),
            outcome=Outcome.ERROR,
            code=ErrorCode.INTERNAL.value,
            cache_key=None,
        )

    def _shrunk_dead_letter(self, answer: Answer) -> Answer | None:
        if answer.value:
            kept = (
                (HEADER_ORIGINAL_SIZE, str(len(answer.value)).encode()),
                (HEADER_ORIGINAL_SHA256, hashlib.sha256(answer.value).hexdigest().encode()),
            )
            return dataclasses.replace(answer, value=b"", headers=(*answer.headers, *kept))
        ours = {HEADER_ERROR_CODE, HEADER_ERROR_MESSAGE, HEADER_SOURCE,
                HEADER_ORIGINAL_SIZE, HEADER_ORIGINAL_SHA256}  # fmt: skip
        headers = tuple((name, value) for name, value in answer.headers if name in ours)
        if len(headers) == len(answer.headers):
            return None
        dropped = (HEADERS_DROPPED, str(len(answer.headers) - len(headers)).encode())
        return dataclasses.replace(answer, key=None, headers=(*headers, dropped))

    def _answer(
        self,
        to: Addressee,
        value: bytes,
        outcome: Outcome,
        code: str,
        *,
        cache: bool,
        version: int | None = None,
        requested_ms: int | None = None,
    ) -> Answer:
        return Answer(
            source=to.source,
            topic=to.topic,
            key=to.request_id.encode(),
            value=value,
            headers=_CONTENT_TYPE_HEADERS[to.content_type],
            model=to.model,
            outcome=outcome,
            code=code,
            version="" if version is None else str(version),
            request_id=to.request_id,
            content_type=to.content_type,
            cache_key=self.topics.result_key(to.request_id) if cache else None,
            digest=to.digest,
            fallback_topic=to.fallback_topic,
            requested_ms=requested_ms,
        )
