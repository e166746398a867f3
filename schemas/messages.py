"""The request and result messages: what producers send and what workers answer.

Pydantic models, frozen and strict (no `"1"` for an int). Objects built in code are fully
validated; the codec checks wire data itself and then validates through the same models,
so the constraints below are the single source of truth for both.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Final, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from schemas.errors import ErrorCode
from schemas.names import INT64_MAX as INT64_MAX
from schemas.names import MODEL_NAME_PATTERN as MODEL_NAME_PATTERN
from schemas.tensors import Tensor
from schemas.topics import TOPIC_NAME_PATTERN

REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}$"
"""A request id: 1 to 128 of `[A-Za-z0-9._:-]` (safe in Kafka keys, Redis keys and logs)."""
MAX_TRACE_LENGTH: Final = 256
"""The longest `trace` accepted; a W3C traceparent is 55 characters."""
INT64_MIN: Final = -(2**63)


def _not_dots(topic: str) -> str:
    if topic in {".", ".."}:
        raise ValueError("Kafka refuses the topic names . and ..")
    return topic


RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
TopicName = Annotated[str, Field(pattern=TOPIC_NAME_PATTERN), AfterValidator(_not_dots)]
ModelVersion = Annotated[int, Field(ge=1, le=INT64_MAX)]
UnixMillis = Annotated[int, Field(ge=0, le=INT64_MAX)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Scalar = bool | Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | FiniteFloat | str
"""A parameter value: bool, int64, finite float or str."""


def now_ms() -> int:
    """The current Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class ResultStatus(StrEnum):
    """How a request ended."""

    OK = "ok"
    """The model ran; `outputs` holds its answer."""
    ERROR = "error"
    """The request was not answered; `error` says why."""
    EXPIRED = "expired"
    """`deadline_ms` passed before the model ran; `error.code` is DEADLINE_EXCEEDED."""


class _WireModel(BaseModel):
    model_config = ConfigDict(
        frozen=True, strict=True, extra="forbid", arbitrary_types_allowed=True
    )


def _check_unique_names(tensors: Sequence[Tensor], field: str) -> None:
    repeated = sorted(name for name, n in Counter(t.name for t in tensors).items() if n > 1)
    if repeated:
        raise ValueError(f"{field}: repeated tensor names {repeated}")


class InferenceRequest(_WireModel):
    """One inference request: which model, on which inputs, and how to answer."""

    id: RequestId
    """Chosen by the producer; the result carries it, and it keys the result in Kafka and Redis."""
    model: ModelName
    """The model to run, as served by the workers."""
    version: ModelVersion | None = None
    """The model version to run; None for the latest loaded."""
    inputs: Annotated[tuple[Tensor, ...], Field(min_length=1, strict=False)]
    """The input tensors, by distinct names."""
    parameters: dict[str, Scalar] = Field(default_factory=dict)
    """Keyword arguments of the model, as its config declares them (`parameters` in its
    `config.json`); any other name is refused with VALIDATION_ERROR."""
    reply_to: TopicName | None = None
    """The topic to send the result to; None for `{prefix}.results.{model}`."""
    deadline_ms: UnixMillis | None = None
    """Unix ms after which the request is answered `expired` without running."""
    created_ms: UnixMillis | None = None
    """Unix ms when the producer created the request (producer clock)."""
    priority: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] = 0
    """Larger runs sooner where the worker orders by priority."""
    trace: Annotated[str, Field(max_length=MAX_TRACE_LENGTH)] | None = None
    """A W3C `traceparent`, passed through to the result's logs and spans."""

    @model_validator(mode="after")
    def _unique_input_names(self) -> Self:
        _check_unique_names(self.inputs, "inputs")
        return self

    def input(self, name: str) -> Tensor:
        """The input called `name`; KeyError if there is none."""
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)


class ErrorInfo(_WireModel):
    """Why a request was not answered with outputs."""

    code: Annotated[ErrorCode, Field(strict=False)]
    """The machine-readable reason."""
    message: str
    """The human-readable reason, naming the field at fault where there is one."""


class Timing(_WireModel):
    """Where a request's time went, measured by the worker."""

    queue_ms: FiniteFloat
    """From `created_ms` (or the record timestamp) until its batch started; skewed clocks
    can make it slightly negative."""
    infer_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """Running the batch that held this request."""
    batch_size: Annotated[int, Field(ge=0, le=INT64_MAX)]
    """Requests in that batch (0 when it never ran)."""


class InferenceResult(_WireModel):
    """The answer to one request: outputs when `ok`, an error otherwise."""

    id: RequestId
    """The request's id."""
    model: ModelName
    """The request's model."""
    version: ModelVersion | None = None
    """The version that actually ran; None when none did."""
    status: Annotated[ResultStatus, Field(strict=False)]
    """How the request ended."""
    outputs: Annotated[tuple[Tensor, ...], Field(strict=False)] = ()
    """The output tensors, when `ok`; empty otherwise."""
    error: ErrorInfo | None = None
    """Why, when not `ok`."""
    timing: Timing | None = None
    """Where the time went, when the worker measured it."""
    worker: Annotated[str, Field(max_length=256)] | None = None
    """The id of the worker process that answered."""
    created_ms: UnixMillis | None = None
    """Unix ms when the worker made the result (worker clock)."""
    trace: Annotated[str, Field(max_length=MAX_TRACE_LENGTH)] | None = None
    """The request's `trace`, copied as it came."""

    @model_validator(mode="after")
    def _status_matches_fields(self) -> Self:
        if self.status is ResultStatus.OK:
            if self.error is not None:
                raise ValueError("error: must be absent when status is ok")
            _check_unique_names(self.outputs, "outputs")
            return self
        if self.error is None:
            raise ValueError(f"error: required when status is {self.status}")
        if self.outputs:
            raise ValueError(f"outputs: must be empty when status is {self.status}")
        expired = self.status is ResultStatus.EXPIRED
        if expired != (self.error.code is ErrorCode.DEADLINE_EXCEEDED):
            raise ValueError("error.code: DEADLINE_EXCEEDED goes with status expired, only")
        return self

    @property
    def ok(self) -> bool:
        """Whether the model ran and `outputs` holds its answer."""
        return self.status is ResultStatus.OK

    def output(self, name: str) -> Tensor:
        """The output called `name`; KeyError if there is none."""
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    @classmethod
    def success(
        cls,
        request_id: str,
        model: str,
        version: int | None,
        outputs: Sequence[Tensor],
        *,
        timing: Timing | None = None,
        worker: str | None = None,
        created_ms: int | None = None,
        trace: str | None = None,
    ) -> InferenceResult:
        """An `ok` result; `created_ms` defaults to now."""
        return cls(
            id=request_id,
            model=model,
            version=version,
            status=ResultStatus.OK,
            outputs=tuple(outputs),
            timing=timing,
            worker=worker,
            created_ms=now_ms() if created_ms is None else created_ms,
            trace=trace,
        )

    @classmethod
    def failure(
        cls,
        request_id: str,
        model: str,
        version: int | None,
        code: ErrorCode,
        message: str,
        *,
        timing: Timing | None = None,
        worker: str | None = None,
        created_ms: int | None = None,
        trace: str | None = None,
    ) -> InferenceResult:
        """An `error` result (`expired` for DEADLINE_EXCEEDED); `created_ms` defaults to now."""
        status = ResultStatus.EXPIRED if code is ErrorCode.DEADLINE_EXCEEDED else ResultStatus.ERROR
        return cls(
            id=request_id,
            model=model,
            version=version,
            status=status,
            error=ErrorInfo(code=code, message=message),
            timing=timing,
            worker=worker,
            created_ms=now_ms() if created_ms is None else created_ms,
            trace=trace,
        )

    @classmethod
    def expired(
        cls,
        request_id: str,
        model: str,
        version: int | None = None,
        *,
        message: str = "deadline_ms passed before the model ran",
        timing: Timing | None = None,
        worker: str | None = None,
        created_ms: int | None = None,
        trace: str | None = None,
    ) -> InferenceResult:
        """An `expired` result (error code DEADLINE_EXCEEDED); `created_ms` defaults to now."""
        return cls.failure(
            request_id,
            model,
            version,
            ErrorCode.DEADLINE_EXCEEDED,
            message,
            timing=timing,
            worker=worker,
            created_ms=created_ms,
            trace=trace,
        )
