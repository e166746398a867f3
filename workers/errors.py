"""The worker's error tree: every error carries its wire code and whether a retry may help."""

from __future__ import annotations

from typing import ClassVar

from schemas.errors import ErrorCode


class WorkerError(Exception):
    """Base of every error the worker raises on purpose.

    `code` is what travels in `result.error.code`; `retriable` says whether the same request
    may succeed if sent again (to this or another worker). The loop decides by type, never
    by message text.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retriable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, model: str | None = None, version: int | None = None
    ) -> None:
        """`message` says what went wrong; `model` and `version` name the model involved."""
        super().__init__(message)
        self.message = message
        self.model = model
        self.version = version

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class UnknownModelError(WorkerError):
    """No model of that name is loaded by this worker."""

    code = ErrorCode.UNKNOWN_MODEL


class UnknownVersionError(WorkerError):
    """The model is loaded, but not the requested version."""

    code = ErrorCode.UNKNOWN_VERSION


class InputNameMismatchError(WorkerError):
    """The request's input names differ from the model's (missing, unexpected or repeated)."""

    code = ErrorCode.VALIDATION_ERROR


class ParameterError(WorkerError):
    """A request's parameters do not fit what the model's config declares."""

    code = ErrorCode.VALIDATION_ERROR


class ShapeMismatchError(WorkerError):
    """An input's shape after the batch dimension, or its batch dimension, is not acceptable."""

    code = ErrorCode.SHAPE_MISMATCH


class DtypeMismatchError(WorkerError):
    """An input's datatype differs from the model's signature."""

    code = ErrorCode.DTYPE_MISMATCH


class InferenceFailedError(WorkerError):
    """The model raised (or returned something unusable) for this request, alone as well."""

    code = ErrorCode.INFERENCE_ERROR


class InferenceOutOfMemoryError(InferenceFailedError):
    """The device ran out of memory for this request even when it ran alone."""


class DeadlineExceededError(WorkerError):
    """The request's deadline had passed before the model ran it."""

    code = ErrorCode.DEADLINE_EXCEEDED


class InternalError(WorkerError):
    """A fault of inferq itself, not of the request; sending it again may succeed."""

    code = ErrorCode.INTERNAL
    retriable = True


class RunnerClosedError(InternalError):
    """A batch was submitted to a runner that is closed (the worker is shutting down)."""


class ModelLoadError(WorkerError):
    """A model version cannot be served (layout, config, checksums, module, warm-up)."""

    code = ErrorCode.INTERNAL
    reason: ClassVar[str] = "load"
    """The `reason` label of `inferq_model_load_failures_total`."""


class ModelConfigError(ModelLoadError):
    """A version's `config.json` (or its model's `model.json`) is missing or invalid."""

    reason = "config"


class WarmUpError(ModelLoadError):
    """A version loaded, but its warm-up forward failed or disagreed with its config."""

    reason = "warm_up"


class DeviceUnavailableError(WorkerError):
    """The configured device does not exist on this machine or is not supported."""

    code = ErrorCode.INTERNAL


class MissingTopicsError(WorkerError):
    """Topics the worker needs do not exist, and it was told not to create them."""


class ProducerFencedError(WorkerError):
    """Another producer took this worker's transactional id (a successor with the same
    static member id), or the broker aborted a transaction that stayed open too long: this
    worker must stop, uncommitted, and its records are answered by whoever owns them now."""

    code = ErrorCode.INTERNAL
