"""Decoding hostile bytes raises `SchemaError` and nothing else (over 10,000 examples a run).

Anything that does decode must survive a round trip, so a lenient decoder cannot hide
behind "no exception".
"""

from __future__ import annotations

import json
import random
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    CodecLimits,
    ContentType,
    SchemaError,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)
from schemas.errors import PayloadTooLargeError
from schemas.zerocopy import unpack_views

LIMITS = (CodecLimits(), CodecLimits(zero_copy_min_bytes=0))


def fuzz(max_examples: int) -> settings:
    """Settings for a fuzz test: no per-example deadline, generation may be slow."""
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def survives(payload: bytes, content_type: ContentType = ContentType.MSGPACK) -> None:
    """Decode as a request and as a result, on both msgpack paths; only SchemaError may escape."""
    for limits in LIMITS if content_type is ContentType.MSGPACK else LIMITS[:1]:
        try:
            request = decode_request(payload, content_type, limits=limits)
        except SchemaError:
            pass
        else:
            again = decode_request(encode_request(request, content_type), content_type)
            assert content_type is ContentType.JSON or again == request
        try:
            result = decode_result(payload, content_type, limits=limits)
        except SchemaError:
            pass
        else:
            again_result = decode_result(encode_result(result, content_type), content_type)
            assert content_type is ContentType.JSON or again_result == result


def seed_messages() -> list[dict[str, Any]]:
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": bytes(range(16))}
    return [
        {"id": "req-1", "model": "mnist", "inputs": [tensor]},
        {
            "id": "a:b",
            "model": "m",
            "version": 3,
            "inputs": [tensor, {"name": "b", "datatype": "BOOL", "shape": [3], "data": b"\1\0\1"}],
            "parameters": {"temperature": 0.5, "greedy": True, "n": 3, "mode": "fast"},
            "reply_to": "replies",
            "deadline_ms": 1735689600500,
            "created_ms": 1735689600000,
            "priority": -4,
            "trace": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        {"id": "r", "model": "m", "status": "ok", "outputs": [tensor], "worker": "w"},
        {
            "id": "r",
            "model": "m",
            "status": "error",
            "error": {"code": "INTERNAL", "message": "boom"},
            "timing": {"queue_ms": 1.5, "infer_ms": 0.0, "batch_size": 0},
        },
    ]


SEEDS = [msgpack.packb(message) for message in seed_messages()]
JSON_SEEDS = [
    json.dumps(message, default=lambda data: list(data)).encode() for message in seed_messages()
]


@fuzz(1500)
@given(st.binary(max_size=300))
def test_random_bytes(payload: bytes) -> None:
    survives(payload)


@fuzz(700)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_random_json_text(payload: bytes) -> None:
    survives(payload, ContentType.JSON)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    payload = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(payload) - 1, 0)))
        if kind == "truncate":
            del payload[at:]
        elif kind == "insert":
            payload[at:at] = draw(st.binary(min_size=1, max_size=9))
        elif kind == "delete":
            del payload[at : at + draw(st.integers(1, 4))]
        elif payload:
            value = draw(st.integers(0, 255))
            payload[at] = payload[at] ^ (1 << (value % 8)) if kind == "flip" else value
    return bytes(payload)


@fuzz(2000)
@given(mutated(SEEDS))
def test_mutated_msgpack_messages(payload: bytes) -> None:
    survives(payload)


@fuzz(700)
@given(mutated(JSON_SEEDS))
def test_mutated_json_messages(payload: bytes) -> None:
    survives(payload, ContentType.JSON)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=40)
    | st.sampled_from([-1, 0, 2**40, 2**63 - 1, "FP32", "BF16", "ok", "error", "", "x"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def wrong_fields(draw: st.DrawFn) -> dict[str, Any]:
    """A seed message with one field, or one tensor field, replaced by anything."""
    message = draw(st.sampled_from(seed_messages()))
    tensors = message.get("inputs") or message.get("outputs")
    if tensors and draw(st.booleans()):
        target = draw(st.sampled_from(tensors))
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "extra"]))
    else:
        target = message
        key = draw(st.sampled_from([*message, "extra"]))
    target[key] = draw(values)
    return message


@fuzz(1500)
@given(wrong_fields())
def test_fields_of_the_wrong_type_or_value(message: dict[str, Any]) -> None:
    survives(msgpack.packb(message))
    text = json.dumps(message, default=lambda data: data.hex())  # NaN tokens included
    survives(text.encode(), ContentType.JSON)


@fuzz(800)
@given(st.binary(max_size=200) | mutated(SEEDS))
def test_zero_copy_reader_agrees_with_msgpack(payload: bytes) -> None:
    try:
        expected = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError):
        expected = SchemaError
    try:
        found = unpack_views(payload, max_nesting=100)
    except PayloadTooLargeError:
        return  # msgpack's own stack limit differs
    except SchemaError:
        found = SchemaError
    assert _materialized(found) == _materialized(expected)


def _materialized(value: Any) -> Any:
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, list):
        return [_materialized(item) for item in value]
    if isinstance(value, dict):
        return {key: _materialized(item) for key, item in value.items()}
    if isinstance(value, float) and value != value:
        return "NaN"
    return value


def test_many_seeded_mutations() -> None:
    """Cheap volume: 3,000 random byte mutations of the seeds, deterministic."""
    chance = random.Random(20240601)
    for _ in range(3000):
        payload = bytearray(chance.choice(SEEDS))
        for _ in range(chance.randint(1, 3)):
            payload[chance.randrange(len(payload))] = chance.randrange(256)
        survives(bytes(payload))


def test_huge_declared_sizes_with_small_data() -> None:
    headers = [
        b"\xdd\xff\xff\xff\xff",  # array of 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map of 4 billion entries
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
        b"\xc9\xff\xff\xff\xff\x01",  # ext of 4 GiB
    ]
    for header in headers:
        survives(header + b"\x00" * 8)
        survives(b"\x81\xa6inputs" + header + b"\x00" * 8)
