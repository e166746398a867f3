"""The wire contract of inferq: messages, tensors, topics and the codec (see docs/wire-format.md).

Importing this package does not import torch.
"""

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
