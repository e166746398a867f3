"""Wire error codes and the typed errors the codec raises."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    """Why a request was not answered with outputs; travels in `result.error.code`."""

    DECODE_ERROR = "DECODE_ERROR"
    """The record is not valid msgpack/JSON, or its content type is unknown."""
    VALIDATION_ERROR = "VALIDATION_ERROR"
    """The record decodes but breaks the request schema (missing field, bad id, bad shape)."""
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    """The record, a tensor's rank or element count exceeds the configured limits."""
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    """No model of that name is served by the worker that read the request."""
    UNKNOWN_VERSION = "UNKNOWN_VERSION"
    """The model exists but the requested version is not loaded."""
    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    """An input's shape (without the batch dimension) differs from the model's signature."""
    DTYPE_MISMATCH = "DTYPE_MISMATCH"
    """An input's datatype differs from the model's signature."""
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    """`deadline_ms` had passed before the model ran; the result status is `expired`."""
    DUPLICATE_ID = "DUPLICATE_ID"
    """The request id was already used by a request with other inputs; nothing ran."""
    INFERENCE_ERROR = "INFERENCE_ERROR"
    """The model raised while running this request, alone as well as in its batch."""
    INTERNAL = "INTERNAL"
    """A fault of inferq itself; the request may be retried."""


class SchemaError(Exception):
    """Base of every error the codec and the message models raise on purpose.

    `code` is the wire code the worker answers with. `request_id`, `model` and `reply_to`
    are what the decoder managed to read before it failed (None when unreadable), so that
    the worker can still address an error result instead of dead-lettering the record.
    """

    code: ClassVar[ErrorCode] = ErrorCode.DECODE_ERROR
    retriable: ClassVar[bool] = False
    """Whether sending the same bytes again may succeed: never, for a schema error."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        model: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        """`message` names the field at fault first, as in `inputs[0].shape: ...`."""
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.model = model
        self.reply_to = reply_to

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class DecodeError(SchemaError):
    """The bytes are not msgpack/JSON inferq can read, or the content type is unknown."""

    code = ErrorCode.DECODE_ERROR


class RequestValidationError(SchemaError):
    """The message decodes but breaks the schema: a missing field, a bad id, a bad tensor."""

    code = ErrorCode.VALIDATION_ERROR


class InvalidModelNameError(RequestValidationError, ValueError):
    """A model name or version that is not one: a name must not be able to name a path
    (`..`, `a/b`, `.hidden`, `%2e%2e`), and a version is a positive integer."""


class PayloadTooLargeError(SchemaError):
    """The message, a tensor's rank or element count, or a count of items exceeds the limits."""

    code = ErrorCode.PAYLOAD_TOO_LARGE
