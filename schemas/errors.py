"""Wire error codes and the typed errors the codec raises."""

from __future__ import annotations

from enum import StrEnum


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
    INFERENCE_ERROR = "INFERENCE_ERROR"
    """The model raised while running this request, alone as well as in its batch."""
    INTERNAL = "INTERNAL"
    """A fault of inferq itself; the request may be retried."""
