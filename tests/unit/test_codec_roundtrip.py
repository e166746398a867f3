"""Encode then decode gives back the same message, for every datatype and both encodings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import (
    CodecLimits,
    ContentType,
    Datatype,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    Tensor,
    Timing,
    bfloat16_to_float32,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
    encode_success,
)

ZERO_COPY = CodecLimits(zero_copy_min_bytes=0)
"""Forces the Python zero-copy reader on messages of any size."""

names = st.text("abcxyz_0123456789:/.", min_size=1, max_size=12)
ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z")
models = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,39}\Z")
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def tensors(draw: st.DrawFn, name: str | None = None) -> Tensor:
    datatype = draw(st.sampled_from(list(Datatype)))
    array = draw(hnp.arrays(datatype.numpy_dtype, shapes))
    return Tensor(name=name or draw(names), datatype=datatype, data=array)


@st.composite
def tensor_lists(draw: st.DrawFn, min_size: int) -> tuple[Tensor, ...]:
    count = draw(st.integers(min_size, 3))
    unique = draw(st.lists(names, min_size=count, max_size=count, unique=True))
    return tuple(draw(tensors(name)) for name in unique)


scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
millis = st.integers(0, 2**63 - 1)


@st.composite
def requests(draw: st.DrawFn) -> InferenceRequest:
    optional = {
        "version": st.integers(1, 2**63 - 1),
        "parameters": st.dictionaries(st.text(max_size=6), scalars, max_size=3),
        "reply_to": st.from_regex(r"\A[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}\Z"),
        "deadline_ms": millis,
        "created_ms": millis,
        "priority": st.integers(-(2**63), 2**63 - 1),
        "trace": st.text(max_size=60),
    }
    fields: dict[str, Any] = {
        key: draw(strategy) for key, strategy in optional.items() if draw(st.booleans())
    }
    return InferenceRequest(
        id=draw(ids), model=draw(models), inputs=draw(tensor_lists(1)), **fields
    )


@st.composite
def results(draw: st.DrawFn) -> InferenceResult:
    timing = draw(
        st.none()
        | st.builds(
            Timing,
            queue_ms=st.floats(-1e6, 1e9),
            infer_ms=st.floats(0, 1e9),
            batch_size=st.integers(0, 1024),
        )
    )
    common: dict[str, Any] = {
        "timing": timing,
        "worker": draw(st.none() | st.text(max_size=20)),
        "created_ms": draw(millis),
    }
    request_id, model = draw(ids), draw(models)
    version = draw(st.none() | st.integers(1, 1000))
    kind = draw(st.sampled_from(["ok", "error", "expired"]))
    if kind == "ok":
        return InferenceResult.success(request_id, model, version, draw(tensor_lists(0)), **common)
    if kind == "expired":
        return InferenceResult.expired(request_id, model, version, **common)
    code = draw(st.sampled_from([c for c in ErrorCode if c is not ErrorCode.DEADLINE_EXCEEDED]))
    return InferenceResult.failure(request_id, model, version, code, draw(st.text()), **common)


def same_values(decoded: Tensor, original: Tensor) -> bool:
    """Equal values; NaN equals NaN (JSON keeps that a value is NaN, not its bits)."""
    if (decoded.name, decoded.datatype, decoded.shape) != (
        original.name,
        original.datatype,
        original.shape,
    ):
        return False
    left, right = decoded.to_numpy(), original.to_numpy()
    if original.datatype is Datatype.BF16:
        left, right = bfloat16_to_float32(left), bfloat16_to_float32(right)
    return bool(np.array_equal(left, right, equal_nan=left.dtype.kind == "f"))


@settings(max_examples=300, deadline=None)
@given(requests())
def test_request_round_trips_through_msgpack_bit_for_bit(request: InferenceRequest) -> None:
    payload = encode_request(request)
    assert decode_request(payload) == request
    assert decode_request(payload, limits=ZERO_COPY) == request


@settings(max_examples=300, deadline=None)
@given(requests())
def test_request_round_trips_through_json(request: InferenceRequest) -> None:
    decoded = decode_request(encode_request(request, ContentType.JSON), ContentType.JSON)
    assert decoded.model_dump(exclude={"inputs"}) == request.model_dump(exclude={"inputs"})
    assert len(decoded.inputs) == len(request.inputs)
    assert all(map(same_values, decoded.inputs, request.inputs))


@settings(max_examples=200, deadline=None)
@given(results())
def test_result_round_trips_through_both_encodings(result: InferenceResult) -> None:
    assert decode_result(encode_result(result)) == result
    assert decode_result(encode_result(result), limits=ZERO_COPY) == result
    decoded = decode_result(encode_result(result, ContentType.JSON), ContentType.JSON)
    assert decoded.model_dump(exclude={"outputs"}) == result.model_dump(exclude={"outputs"})
    assert all(map(same_values, decoded.outputs, result.outputs))


def test_decoded_tensors_view_the_payload_without_copying() -> None:
    array = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    request = InferenceRequest(id="r", model="m", inputs=[Tensor.from_numpy("x", array)])
    payload = encode_request(request)
    start = np.frombuffer(payload, np.uint8).ctypes.data
    data = decode_request(payload).inputs[0].data
    assert start <= data.ctypes.data < start + len(payload)
    assert not data.flags.writeable
    shared = decode_request(payload).inputs[0].to_torch()
    assert start <= shared.data_ptr() < start + len(payload)


def test_large_messages_are_packed_like_msgpack_does() -> None:
    import msgpack

    array = np.arange(1 << 17, dtype=np.float32).reshape(2, -1)
    request = InferenceRequest(id="r", model="m", inputs=[Tensor.from_numpy("x", array)])
    payload = encode_request(request)
    message = msgpack.unpackb(payload)
    assert message["inputs"][0]["data"] == array.tobytes()
    assert msgpack.packb(message) == payload


def test_zero_size_and_scalar_tensors_round_trip() -> None:
    inputs = [
        Tensor.from_numpy("empty", np.zeros((0, 3), dtype=np.float32)),
        Tensor.from_numpy("scalar", np.float64(2.5)),
        Tensor.from_numpy("bf", np.zeros((2, 0), dtype=np.uint16), Datatype.BF16),
    ]
    request = InferenceRequest(id="r", model="m", inputs=inputs)
    for content_type in ContentType:
        decoded = decode_request(encode_request(request, content_type), content_type)
        assert decoded == request


def test_json_carries_non_finite_floats_as_words() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    request = InferenceRequest(id="r", model="m", inputs=[Tensor.from_numpy("x", values)])
    payload = encode_request(request, ContentType.JSON)
    assert b'"data":["NaN","Infinity","-Infinity",1.5]' in payload
    decoded = decode_request(payload, ContentType.JSON).inputs[0].data
    assert np.array_equal(decoded, values, equal_nan=True)


@pytest.mark.parametrize("content_type", list(ContentType))
def test_encode_success_writes_the_bytes_of_an_ok_result(content_type: ContentType) -> None:
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    flags = np.array([[True, False]])
    timing = Timing(queue_ms=1.5, infer_ms=0.25, batch_size=7)
    fast = encode_success(
        request_id="r-1",
        model="mlp",
        version=3,
        outputs=[("logits", Datatype.FP32, logits), ("flags", Datatype.BOOL, flags)],
        timing=timing,
        worker="host-1-0",
        created_ms=1_700_000_000_000,
        content_type=content_type,
    )
    slow = encode_result(
        InferenceResult.success(
            "r-1",
            "mlp",
            3,
            [Tensor.from_numpy("logits", logits), Tensor.from_numpy("flags", flags)],
            timing=timing,
            worker="host-1-0",
            created_ms=1_700_000_000_000,
        ),
        content_type,
    )
    assert fast == slow
