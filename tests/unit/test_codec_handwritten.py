"""Messages written by hand from docs/wire-format.md decode, without any inferq code."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import msgpack
import numpy as np

from schemas import (
    ContentType,
    Datatype,
    InferenceRequest,
    InferenceResult,
    Tensor,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)

DOC = Path(__file__).parents[2] / "docs" / "wire-format.md"


def test_a_request_packed_with_plain_msgpack_decodes() -> None:
    payload = msgpack.packb(
        {
            "id": "req-0001",
            "model": "mnist",
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "data": struct.pack("<4f", 0.0, 0.25, 0.5, 1.0),
                },
                {"name": "mask", "datatype": "BOOL", "shape": [2], "data": b"\x01\x00"},
            ],
            "deadline_ms": 1735689600500,
            "some_future_field": {"ignored": [1, 2, 3]},
        }
    )
    request = decode_request(payload)
    assert request.id == "req-0001"
    assert request.version is None
    assert request.deadline_ms == 1735689600500
    assert request.input("pixels").data.tolist() == [[0.0, 0.25, 0.5, 1.0]]
    assert request.input("mask").data.tolist() == [True, False]


def test_the_same_request_written_by_hand_in_json_gives_the_same_tensors() -> None:
    packed = msgpack.packb(
        {
            "id": "r",
            "model": "m",
            "inputs": [
                {
                    "name": "a",
                    "datatype": "INT64",
                    "shape": [2, 2],
                    "data": struct.pack("<4q", 1, -2, 3, 2**62),
                },
                {
                    "name": "b",
                    "datatype": "BF16",
                    "shape": [3],
                    "data": struct.pack("<3H", 0x3F80, 0xC040, 0x7FC0),
                },
                {"name": "c", "datatype": "FP16", "shape": [1], "data": struct.pack("<e", 0.5)},
            ],
        }
    )
    text = """
    {"id": "r", "model": "m", "inputs": [
      {"name": "a", "datatype": "INT64", "shape": [2, 2], "data": [1, -2, 3, 4611686018427387904]},
      {"name": "b", "datatype": "BF16", "shape": [3], "data": [1.0, -3.0, "NaN"]},
      {"name": "c", "datatype": "FP16", "shape": [1], "data": [0.5]}
    ]}
    """
    from_msgpack = decode_request(packed)
    from_json = decode_request(text.encode(), ContentType.JSON)
    assert from_msgpack == from_json
    assert from_json.input("b").datatype is Datatype.BF16


def test_a_result_unpacks_with_plain_msgpack_and_json() -> None:
    result = InferenceResult.success(
        "r", "m", 1, [Tensor.from_numpy("y", np.array([[1.0, 2.0]], dtype=np.float32))]
    )
    plain = msgpack.unpackb(encode_result(result))
    assert plain["status"] == "ok"
    assert plain["outputs"][0]["data"] == struct.pack("<2f", 1.0, 2.0)
    assert json.loads(encode_result(result, ContentType.JSON))["outputs"][0]["data"] == [1.0, 2.0]


def _fenced(marker: str) -> str:
    """The fenced block that follows `<!-- marker -->` in the document."""
    found = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert found, f"no block marked {marker} in {DOC}"
    return found.group(1)


def example_request() -> InferenceRequest:
    """The request the document's examples show."""
    pixels = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    return InferenceRequest(
        id="req-0001",
        model="mnist",
        version=2,
        inputs=[Tensor.from_numpy("pixels", pixels)],
        deadline_ms=1735689600500,
        created_ms=1735689600000,
    )


def hex_dump(payload: bytes) -> str:
    """16 bytes a line, as `xxd -r -p` reads back."""
    lines = [payload[i : i + 16].hex(" ") for i in range(0, len(payload), 16)]
    return "\n".join(lines) + "\n"


def test_the_documented_msgpack_example_is_current_and_decodes() -> None:
    documented = bytes.fromhex(_fenced("example:request.msgpack"))
    assert decode_request(documented) == example_request()
    assert f"msgpack ({len(documented)} bytes;" in DOC.read_text()
    assert hex_dump(encode_request(example_request())) == _fenced("example:request.msgpack")


def test_the_documented_json_example_decodes_to_the_same_request() -> None:
    documented = _fenced("example:request.json").encode()
    assert decode_request(documented, ContentType.JSON) == example_request()


def test_the_documented_result_examples_decode() -> None:
    ok = decode_result(_fenced("example:result.json").encode(), ContentType.JSON)
    assert ok.ok
    assert ok.output("probabilities").shape == (1, 3)
    failed = decode_result(_fenced("example:error.json").encode(), ContentType.JSON)
    assert failed.error is not None
    assert failed.error.message.startswith("inputs[0].shape")
