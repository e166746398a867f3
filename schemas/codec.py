"""Encode and decode requests and results, in msgpack (the default) or JSON.

Decoding arbitrary bytes raises only `SchemaError` subclasses. msgpack tensors decode as
read-only numpy views on the payload (no copy) from `CodecLimits.zero_copy_min_bytes` up;
encoding copies each tensor's bytes once, into the message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Final, NoReturn

import msgpack
from numpy.typing import NDArray

from schemas.errors import DecodeError, PayloadTooLargeError
from schemas.limits import DEFAULT_LIMITS, CodecLimits
from schemas.messages import InferenceRequest, InferenceResult, Timing
from schemas.tensors import Datatype, Tensor
from schemas.topics import HEADER_CONTENT_TYPE
from schemas.wire import request_from_wire, request_to_wire, result_from_wire, result_to_wire
from schemas.zerocopy import pack_spliced, unpack_views

__all__ = [
    "DEFAULT_LIMITS",
    "CodecLimits",
    "ContentType",
    "content_type_header",
    "content_type_of",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
]

SPLICE_MIN_BYTES: Final = 256 * 1024
"""Messages with at least this many tensor bytes are packed piecewise: `msgpack.packb` grows
its buffer by reallocation, which costs more than one join from there up."""


class ContentType(StrEnum):
    """The encodings of a record value, as named by its `content-type` header."""

    MSGPACK = "application/msgpack"
    """The default: compact, tensors as raw bytes."""
    JSON = "application/json"
    """For humans and tools: tensors as flat lists of numbers."""


def content_type_of(headers: Sequence[tuple[str, bytes]] | None) -> ContentType:
    """The encoding named by a record's headers; msgpack when none is named.

    The header name is matched case-insensitively and the last one wins; media-type
    parameters (`; charset=utf-8`) are ignored. An unknown type raises `DecodeError`.
    """
    value: bytes | None = None
    for name, header_value in headers or ():
        if name.lower() == HEADER_CONTENT_TYPE:
            value = header_value
    if not value:
        return ContentType.MSGPACK
    try:
        media_type = value.decode("ascii").partition(";")[0].strip().lower()
        return ContentType(media_type)
    except (UnicodeDecodeError, ValueError):
        raise DecodeError(
            f"{HEADER_CONTENT_TYPE}: unknown content type {value[:64]!r}; "
            f"use {ContentType.MSGPACK} or {ContentType.JSON}"
        ) from None


def content_type_header(content_type: ContentType) -> tuple[str, bytes]:
    """The record header that names `content_type`."""
    return (HEADER_CONTENT_TYPE, content_type.value.encode("ascii"))


def decode_request(
    payload: bytes,
    content_type: ContentType = ContentType.MSGPACK,
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> InferenceRequest:
    """The request encoded in `payload`; raises only `SchemaError` subclasses."""
    message = _unpack(payload, content_type, limits)
    return request_from_wire(message, from_json=content_type is ContentType.JSON, limits=limits)


def decode_result(
    payload: bytes,
    content_type: ContentType = ContentType.MSGPACK,
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> InferenceResult:
    """The result encoded in `payload`; raises only `SchemaError` subclasses."""
    message = _unpack(payload, content_type, limits)
    return result_from_wire(message, from_json=content_type is ContentType.JSON, limits=limits)


def encode_request(
    request: InferenceRequest, content_type: ContentType = ContentType.MSGPACK
) -> bytes:
    """The bytes of `request` in `content_type`."""
    return _pack(request_to_wire(request, to_json=content_type is ContentType.JSON), content_type)


def encode_result(
    result: InferenceResult, content_type: ContentType = ContentType.MSGPACK
) -> bytes:
    """The bytes of `result` in `content_type` (a result uses the encoding of its request)."""
    return _pack(result_to_wire(result, to_json=content_type is ContentType.JSON), content_type)


def encode_success(
    *,
    request_id: str,
    model: str,
    version: int,
    outputs: Sequence[tuple[str, Datatype, NDArray[Any]]],
    timing: Timing,
    worker: str | None,
    created_ms: int,
    content_type: ContentType = ContentType.MSGPACK,
    trace: str | None = None,
) -> bytes:
    """An `ok` result's bytes straight from output arrays: the worker's per-request hot path.

    The same bytes as `encode_result(InferenceResult.success(...))` (a test pins that), but
    without building and validating the models, which would cost several times the packing.
    `outputs` are (name, datatype, C-contiguous little-endian array) with the batch dim first;
    a BF16 array holds the raw uint16 bits.
    """
    if content_type is ContentType.JSON:
        tensors = [
            Tensor(name=name, datatype=datatype, data=data) for name, datatype, data in outputs
        ]
        result = InferenceResult.success(
            request_id, model, version, tensors, timing=timing, worker=worker,
            created_ms=created_ms, trace=trace,
        )  # fmt: skip
        return encode_result(result, content_type)
    message: dict[str, Any] = {
        "id": request_id,
        "model": model,
        "version": version,
        "status": "ok",
        "outputs": [
            {"name": name, "datatype": datatype.value, "shape": list(data.shape), "data": data.data}
            for name, datatype, data in outputs
        ],
        "timing": {
            "queue_ms": timing.queue_ms,
            "infer_ms": timing.infer_ms,
            "batch_size": timing.batch_size,
        },
    }
    if worker is not None:
        message["worker"] = worker
    message["created_ms"] = created_ms
    if trace is not None:
        message["trace"] = trace
    return _pack(message, content_type)


def _pack(message: dict[str, Any], content_type: ContentType) -> bytes:
    if content_type is ContentType.JSON:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    tensor_bytes = 0
    for tensor in message.get("inputs") or message.get("outputs") or ():
        tensor_bytes += tensor["data"].nbytes
    if tensor_bytes >= SPLICE_MIN_BYTES:
        return pack_spliced(message)
    packed: bytes = msgpack.packb(message)
    return packed


def _unpack(payload: bytes, content_type: ContentType, limits: CodecLimits) -> object:
    if not isinstance(payload, bytes):
        raise DecodeError(f"payload: must be bytes, got {type(payload).__name__}")
    if len(payload) > limits.max_message_bytes:
        raise PayloadTooLargeError(
            f"message: {len(payload)} bytes, max_message_bytes is {limits.max_message_bytes}"
        )
    if content_type is ContentType.JSON:
        return _unpack_json(payload)
    if content_type is not ContentType.MSGPACK:
        raise DecodeError(f"content type: {content_type!r} is not a ContentType")
    if len(payload) >= limits.zero_copy_min_bytes:
        return unpack_views(payload, max_nesting=limits.max_nesting)
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except msgpack.StackError:
        _too_deep()
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        # ExtraData, FormatError, OutOfData and UnicodeDecodeError are all ValueErrors.
        raise DecodeError(f"msgpack: {_reason(error)}") from None


def _unpack_json(payload: bytes) -> object:
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        _too_deep()
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise DecodeError(f"JSON: {_reason(error)}") from None


def _refuse_constant(word: str) -> NoReturn:
    raise ValueError(f'{word} is not JSON; write it as the string "{word}" in tensor data')


def _too_deep() -> NoReturn:
    raise PayloadTooLargeError("message: nested too deep") from None


def _reason(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 200 else text[:197] + "..."
