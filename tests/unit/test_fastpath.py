"""Admission's fast path reads plain requests exactly as the full codec does, and never
accepts what the full codec refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import CodecLimits, decode_request, encode_request
from schemas.errors import SchemaError
from schemas.messages import InferenceRequest
from schemas.tensors import Tensor
from workers.errors import WorkerError
from workers.example_models import write_example_models
from workers.fastpath import FastReader
from workers.fingerprint import request_digest
from workers.models import LoadedModel
from workers.repository import DirectoryModelRepository

READER = FastReader(limits=CodecLimits())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> DirectoryModelRepository:
    root = tmp_path_factory.mktemp("models")
    write_example_models(root)
    models = DirectoryModelRepository(root=root, device=torch.device("cpu"))
    models.load()
    return models


def resolver(repository: DirectoryModelRepository):  # type: ignore[no-untyped-def]
    def resolve(name: str, version: int | None) -> LoadedModel | None:
        try:
            return repository.get(name, version)
        except WorkerError:
            return None

    return resolve


def plain_message(**fields: Any) -> dict[str, Any]:
    row = np.arange(784, dtype=np.float32).reshape(1, 784)
    message: dict[str, Any] = {
        "id": "req-1",
        "model": "mlp",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": row.tobytes()}],
    }
    message.update(fields)
    return {key: value for key, value in message.items() if value is not ...}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"version": 2},
        {"deadline_ms": 10**13, "created_ms": 10**12, "priority": -3, "trace": "00-ab-cd-01"},
        {"reply_to": "x.replies.me", "parameters": {}, "version": None},
    ],
)
def test_a_plain_request_reads_as_the_full_codec_reads_it(
    repository: DirectoryModelRepository, fields: dict[str, Any]
) -> None:
    value = msgpack.packb(plain_message(**fields))
    plain = READER.read(value, resolver(repository))
    full = decode_request(value)
    assert plain is not None
    assert plain.request_id == full.id
    assert plain.model.version == repository.get(full.model, full.version).version
    assert plain.rows == full.inputs[0].shape[0]
    assert np.array_equal(plain.inputs[0], full.inputs[0].data)
    assert (plain.deadline_ms, plain.created_ms, plain.priority, plain.reply_to) == (
        full.deadline_ms, full.created_ms, full.priority, full.reply_to,
    )  # fmt: skip
    assert plain.digest == request_digest(full)


def test_encoded_requests_take_the_fast_path(repository: DirectoryModelRepository) -> None:
    request = InferenceRequest(
        id="r", model="mlp", inputs=(Tensor.from_numpy("input", np.ones((3, 784), "f4")),)
    )
    plain = READER.read(encode_request(request), resolver(repository))
    assert plain is not None
    assert plain.rows == 3


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "bad id with spaces"},
        {"id": 7},
        {"model": "not-served"},
        {"version": 0},
        {"version": True},
        {"version": 9},
        {"deadline_ms": -1},
        {"created_ms": 1.5},
        {"priority": 2**63},
        {"trace": "t" * 257},
        {"reply_to": "bad topic!"},
        {"parameters": {"k": 1}},
        {"unknown": 1},
        {"inputs": []},
        {
            "inputs": [
                {"name": "input", "datatype": "FP64", "shape": [1, 784], "data": b"\0" * 6272}
            ]
        },
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 10], "data": b"\0" * 40}]},
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [True, 784], "data": b"\0" * 3136}
            ]
        },
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [2, 784], "data": b"\0" * 3136}
            ]
        },
        {
            "inputs": [
                {"name": "other", "datatype": "FP32", "shape": [1, 784], "data": b"\0" * 3136}
            ]
        },
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 784], "data": b""}]},
    ],
)
def test_anything_unusual_goes_to_the_full_codec(
    repository: DirectoryModelRepository, fields: dict[str, Any]
) -> None:
    assert READER.read(msgpack.packb(plain_message(**fields)), resolver(repository)) is None


def test_bytes_that_are_not_a_request_go_to_the_full_codec(
    repository: DirectoryModelRepository,
) -> None:
    for value in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb(plain_message())[:-1]):
        assert READER.read(value, resolver(repository)) is None


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64), st.floats(),
    st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=3),
)  # fmt: skip
_FIELDS = st.sampled_from(
    ["id", "model", "version", "deadline_ms", "created_ms", "priority", "trace", "reply_to",
     "parameters", "inputs"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_FIELDS, _VALUES, max_size=3))
def test_the_fast_path_never_accepts_what_the_full_codec_refuses(
    repository: DirectoryModelRepository, changes: dict[str, Any]
) -> None:
    try:
        value = msgpack.packb(plain_message(**changes))
    except (OverflowError, ValueError):
        return  # msgpack cannot hold it: nothing a producer could send
    plain = READER.read(value, resolver(repository))
    if plain is None:
        return
    try:
        full = decode_request(value)
        repository.get(full.model, full.version)
    except (SchemaError, WorkerError) as error:
        pytest.fail(f"the fast path accepted {changes!r}, which the codec refuses: {error}")
    assert plain.digest == request_digest(full)
