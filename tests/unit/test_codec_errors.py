"""Decode failures: the error type, the field the message names, what the error still knows."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from schemas import (
    DEFAULT_LIMITS,
    CodecLimits,
    ContentType,
    DecodeError,
    ErrorCode,
    PayloadTooLargeError,
    RequestValidationError,
    SchemaError,
    content_type_header,
    content_type_of,
    decode_request,
    decode_result,
)

ZERO_COPY = CodecLimits(zero_copy_min_bytes=0)
PATHS = [pytest.param(CodecLimits(), id="c-unpacker"), pytest.param(ZERO_COPY, id="zero-copy")]


def wire_request(**overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": "req-1",
        "model": "mnist",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": bytes(8)}],
    }
    message.update(overrides)
    return message


def tensor(**overrides: Any) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": bytes(8)}
    fields.update(overrides)
    return [fields]


def decode(message: object, limits: CodecLimits = DEFAULT_LIMITS) -> Any:
    return decode_request(msgpack.packb(message), limits=limits)


@pytest.mark.parametrize("limits", PATHS)
@pytest.mark.parametrize(
    ("message", "error", "text"),
    [
        ([1, 2], RequestValidationError, "message: must be a map, got a list"),
        (wire_request(id=None), RequestValidationError, "id: Field required"),
        (wire_request(id="bad id"), RequestValidationError, "id: String should match pattern"),
        (wire_request(id=7), RequestValidationError, "id: Input should be a valid string"),
        (wire_request(model=""), RequestValidationError, "model: String should match"),
        (wire_request(version="2"), RequestValidationError, "version: Input should be a valid int"),
        (wire_request(version=1.0), RequestValidationError, "version: Input should be a valid int"),
        (wire_request(inputs=None), RequestValidationError, "inputs: Field required"),
        (wire_request(inputs=[]), RequestValidationError, "inputs: Tuple should have at least 1"),
        (wire_request(inputs={}), RequestValidationError, "inputs: must be a list of tensors"),
        (wire_request(inputs=[1]), RequestValidationError, "inputs[0]: must be a map, got int"),
        (wire_request(inputs=tensor(name="")), RequestValidationError, "inputs[0].name: "),
        (wire_request(inputs=tensor(datatype="FP8")), RequestValidationError,
         "inputs[0].datatype: must be one of BOOL, "),
        (wire_request(inputs=tensor(shape=[1, -2])), RequestValidationError,
         "inputs[0].shape[1]: must be a non-negative int, got -2"),
        (wire_request(inputs=tensor(shape=[1, 2.0])), RequestValidationError,
         "inputs[0].shape[1]: must be a non-negative int, got 2.0"),
        (wire_request(inputs=tensor(shape="1x2")), RequestValidationError,
         "inputs[0].shape: must be a list of ints, got a str"),
        (wire_request(inputs=tensor(data=bytes(7))), RequestValidationError,
         "inputs[0].data: 7 bytes, expected 8 (2 elements of 4 bytes)"),
        (wire_request(inputs=tensor(data=[0.0, 1.0])), RequestValidationError,
         "inputs[0].data: must be bin (raw bytes), got a list"),
        (wire_request(inputs=tensor(datatype="BOOL", shape=[2], data=b"\x01\x02")),
         RequestValidationError, "inputs[0].data: BOOL bytes must be 0 or 1"),
        (wire_request(inputs=tensor() + tensor()), RequestValidationError,
         "inputs: repeated tensor names ['x']"),
        (wire_request(parameters={"k": [1]}), RequestValidationError, "parameters.k"),
        (wire_request(reply_to="no spaces"), RequestValidationError, "reply_to: String should"),
        (wire_request(deadline_ms=-5), RequestValidationError, "deadline_ms: Input should be"),
        (wire_request(priority=True), RequestValidationError, "priority: Input should be a valid"),
        (wire_request(inputs=tensor(shape=[1] * 9, data=bytes(4))), PayloadTooLargeError,
         "inputs[0].shape: rank 9, max_tensor_rank is 8"),
        (wire_request(inputs=tensor(shape=[2**40, 2**40])), PayloadTooLargeError,
         "inputs[0].shape: more than max_tensor_elements"),
        (wire_request(inputs=tensor(shape=[0, 2**40], data=b"")), PayloadTooLargeError,
         "inputs[0].shape: more than max_tensor_elements"),
        (wire_request(inputs=tensor() * 65), PayloadTooLargeError,
         "inputs: 65 tensors, max_inputs is 64"),
        (wire_request(parameters={str(i): i for i in range(65)}), PayloadTooLargeError,
         "parameters: 65 entries, max_parameters is 64"),
    ],
)  # fmt: skip
def test_error_names_the_field(
    message: object, error: type[SchemaError], text: str, limits: CodecLimits
) -> None:
    if isinstance(message, dict):
        message = {key: value for key, value in message.items() if value is not None}
    with pytest.raises(error) as caught:
        decode(message, limits)
    assert caught.value.message.startswith(text), caught.value.message
    assert str(caught.value) == caught.value.message
    assert caught.value.code is error.code


def test_error_codes_of_the_error_types() -> None:
    assert DecodeError.code is ErrorCode.DECODE_ERROR
    assert RequestValidationError.code is ErrorCode.VALIDATION_ERROR
    assert PayloadTooLargeError.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert not SchemaError.retriable


@pytest.mark.parametrize("limits", PATHS)
def test_an_error_keeps_the_fields_it_could_read(limits: CodecLimits) -> None:
    message = wire_request(reply_to="replies", inputs=tensor(shape=[-1]))
    with pytest.raises(RequestValidationError) as caught:
        decode(message, limits)
    assert (caught.value.request_id, caught.value.model, caught.value.reply_to) == (
        "req-1",
        "mnist",
        "replies",
    )


def test_an_error_drops_fields_that_are_themselves_invalid() -> None:
    with pytest.raises(RequestValidationError) as caught:
        decode(wire_request(id="bad id!", model="a/b", reply_to=".."))
    assert (caught.value.request_id, caught.value.model, caught.value.reply_to) == (None,) * 3


def test_unreadable_bytes_have_no_request_id() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_request(b"\xc1")
    assert caught.value.request_id is None


def test_message_size_is_checked_before_parsing() -> None:
    payload = msgpack.packb(wire_request())
    with pytest.raises(PayloadTooLargeError, match=r"^message: \d+ bytes, max_message_bytes is 10"):
        decode_request(payload, limits=CodecLimits(max_message_bytes=10))


@pytest.mark.parametrize("limits", PATHS)
def test_deep_nesting_is_refused_even_in_unknown_fields(limits: CodecLimits) -> None:
    deep: Any = 0
    for _ in range(40):
        deep = [deep]
    with pytest.raises(PayloadTooLargeError, match="nested"):
        decode(wire_request(extra=deep), limits)
    with pytest.raises(PayloadTooLargeError, match="nested"):
        decode_request(b"\x91" * 100_000 + b"\xc0", limits=limits)
    assert decode(wire_request(extra=[[[1]]]), limits).id == "req-1"


def test_deep_json_is_refused() -> None:
    text = '{"id": "r", "model": "m", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(PayloadTooLargeError, match="nested"):
        decode_request(text.encode(), ContentType.JSON)
    shallow = '{"id": "r", "extra": ' + "[" * 40 + "]" * 40 + "}"
    with pytest.raises(PayloadTooLargeError, match=r"^extra: nested deeper than max_nesting"):
        decode_request(shallow.encode(), ContentType.JSON)


@pytest.mark.parametrize(
    ("text", "error", "start"),
    [
        (b'{"id": "r"', DecodeError, "JSON: "),
        (b"\xff\xfe", DecodeError, "JSON: "),
        (b'{"id": NaN}', DecodeError, "JSON: NaN is not JSON"),
        (b'{"id": 1' + b"1" * 5000 + b"}", DecodeError, "JSON: "),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2],'
         b' "data": [1, "one"]}]}', RequestValidationError, "inputs[0].data: the only strings"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "INT32", "shape": [2],'
         b' "data": [1, 1.5]}]}', RequestValidationError,
         "inputs[0].data: INT32 values must be integers"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1],'
         b' "data": [256]}]}', RequestValidationError, "inputs[0].data: a value is out of range"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "INT64", "shape": [1],'
         b' "data": [true]}]}', RequestValidationError, "inputs[0].data: INT64 values must be"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "BOOL", "shape": [1],'
         b' "data": [1]}]}', RequestValidationError, "inputs[0].data: BOOL values must be"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "FP64", "shape": [2],'
         b' "data": [1]}]}', RequestValidationError, "inputs[0].data: 1 values, expected 2"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "FP64", "shape": [1],'
         b' "data": [[1]]}]}', RequestValidationError, "inputs[0].data: FP64 values must be"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "\\ud800", "datatype": "FP64",'
         b' "shape": [], "data": [1]}]}', RequestValidationError, "inputs[0].name: contains"),
        (b'{"id": "r", "model": "m", "inputs": [{"name": "x", "datatype": "FP64", "shape": [1],'
         b' "data": [1e999999]}]}', None, ""),
    ],
)  # fmt: skip
def test_json_errors(text: bytes, error: type[SchemaError] | None, start: str) -> None:
    if error is None:
        assert decode_request(text, ContentType.JSON).inputs[0].data.tolist() == [float("inf")]
        return
    with pytest.raises(error) as caught:
        decode_request(text, ContentType.JSON)
    assert caught.value.message.startswith(start), caught.value.message


def test_result_errors_name_the_field() -> None:
    message = {"id": "r", "model": "m", "status": "error", "error": {"code": "NOPE", "message": ""}}
    with pytest.raises(RequestValidationError, match=r"^error\.code: Input should be"):
        decode_result(msgpack.packb(message))
    with pytest.raises(RequestValidationError, match=r"^status: "):
        decode_result(json.dumps({"id": "r", "model": "m"}).encode(), ContentType.JSON)


def test_trailing_bytes_are_refused() -> None:
    payload = msgpack.packb(wire_request()) + b"\x00"
    for limits in (CodecLimits(), ZERO_COPY):
        with pytest.raises(DecodeError, match=r"^msgpack: "):
            decode_request(payload, limits=limits)


def test_content_type_of_headers() -> None:
    assert content_type_of(None) is ContentType.MSGPACK
    assert content_type_of([]) is ContentType.MSGPACK
    assert content_type_of([("other", b"x")]) is ContentType.MSGPACK
    assert content_type_of([("content-type", b"application/json")]) is ContentType.JSON
    assert content_type_of([("Content-Type", b"Application/JSON; charset=utf-8")]) is (
        ContentType.JSON
    )
    assert content_type_of([content_type_header(ContentType.MSGPACK)]) is ContentType.MSGPACK
    repeated = [("content-type", b"application/json"), ("content-type", b"application/msgpack")]
    assert content_type_of(repeated) is ContentType.MSGPACK
    for value in (b"text/plain", b"\xff"):
        with pytest.raises(DecodeError, match=r"^content-type: unknown content type"):
            content_type_of([("content-type", value)])


@pytest.mark.parametrize(
    "field", ["max_message_bytes", "max_tensor_rank", "max_inputs", "zero_copy_min_bytes"]
)
def test_limits_must_be_non_negative_ints(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        CodecLimits(**{field: -1})
    with pytest.raises(ValueError, match=r"^max_nesting: "):
        CodecLimits(max_nesting=3)
    with pytest.raises(ValueError, match=r"^max_nesting: "):
        CodecLimits(max_nesting=129)
