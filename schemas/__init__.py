"""The wire contract of inferq: messages, tensors, topics and the codec (see docs/wire-format.md).

Importing this package does not import torch, nor numpy until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.codec import (
        ContentType,
        content_type_header,
        content_type_of,
        decode_request,
        decode_result,
        encode_request,
        encode_result,
        encode_success,
    )
    from schemas.errors import (
        DecodeError,
        ErrorCode,
        PayloadTooLargeError,
        RequestValidationError,
        SchemaError,
    )
    from schemas.limits import DEFAULT_LIMITS, CodecLimits
    from schemas.messages import (
        ErrorInfo,
        InferenceRequest,
        InferenceResult,
        ResultStatus,
        Timing,
        now_ms,
    )
    from schemas.tensors import Datatype, Tensor, bfloat16_bits, bfloat16_to_float32
    from schemas.topics import (
        DEFAULT_PREFIX,
        HEADER_CONTENT_TYPE,
        HEADER_ERROR_CODE,
        HEADER_ERROR_MESSAGE,
        HEADER_SOURCE,
        TopicNames,
    )

_EXPORTS: dict[str, str] = {
    "ContentType": "schemas.codec",
    "content_type_header": "schemas.codec",
    "content_type_of": "schemas.codec",
    "decode_request": "schemas.codec",
    "decode_result": "schemas.codec",
    "encode_request": "schemas.codec",
    "encode_result": "schemas.codec",
    "encode_success": "schemas.codec",
    "DecodeError": "schemas.errors",
    "ErrorCode": "schemas.errors",
    "PayloadTooLargeError": "schemas.errors",
    "RequestValidationError": "schemas.errors",
    "SchemaError": "schemas.errors",
    "DEFAULT_LIMITS": "schemas.limits",
    "CodecLimits": "schemas.limits",
    "ErrorInfo": "schemas.messages",
    "InferenceRequest": "schemas.messages",
    "InferenceResult": "schemas.messages",
    "ResultStatus": "schemas.messages",
    "Timing": "schemas.messages",
    "now_ms": "schemas.messages",
    "Datatype": "schemas.tensors",
    "Tensor": "schemas.tensors",
    "bfloat16_bits": "schemas.tensors",
    "bfloat16_to_float32": "schemas.tensors",
    "DEFAULT_PREFIX": "schemas.topics",
    "HEADER_CONTENT_TYPE": "schemas.topics",
    "HEADER_ERROR_CODE": "schemas.topics",
    "HEADER_ERROR_MESSAGE": "schemas.topics",
    "HEADER_SOURCE": "schemas.topics",
    "TopicNames": "schemas.topics",
}
"""Each public name and the module that defines it, imported on first use."""


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one submodule (schemas.settings, say) does not load numpy:
    # the worker supervisor imports settings and nothing heavier.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PREFIX",
    "HEADER_CONTENT_TYPE",
    "HEADER_ERROR_CODE",
    "HEADER_ERROR_MESSAGE",
    "HEADER_SOURCE",
    "CodecLimits",
    "ContentType",
    "Datatype",
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResult",
    "PayloadTooLargeError",
    "RequestValidationError",
    "ResultStatus",
    "SchemaError",
    "Tensor",
    "Timing",
    "TopicNames",
    "bfloat16_bits",
    "bfloat16_to_float32",
    "content_type_header",
    "content_type_of",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
    "encode_success",
    "now_ms",
]
