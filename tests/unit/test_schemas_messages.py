"""The message models: what they accept, what they refuse, the result constructors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    ErrorCode,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    ResultStatus,
    Tensor,
    Timing,
)
from schemas.wire import _construct, _plainly_valid

X = Tensor.from_numpy("x", np.zeros((1, 2), dtype=np.float32))


def request(**overrides: Any) -> InferenceRequest:
    fields: dict[str, Any] = {"id": "req-1", "model": "mnist", "inputs": [X]}
    fields.update(overrides)
    return InferenceRequest(**fields)


def test_a_minimal_request_has_the_documented_defaults() -> None:
    minimal = request()
    assert minimal.version is None
    assert minimal.parameters == {}
    assert (minimal.reply_to, minimal.deadline_ms, minimal.created_ms, minimal.trace) == (
        None,
        None,
        None,
        None,
    )
    assert minimal.priority == 0
    assert minimal.input("x") is X
    with pytest.raises(KeyError):
        minimal.input("y")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": ""}, "id"),
        ({"id": "a" * 129}, "id"),
        ({"id": "has space"}, "id"),
        ({"id": "a/b"}, "id"),
        ({"model": "a/b"}, "model"),
        ({"version": 0}, "version"),
        ({"version": "1"}, "version"),
        ({"version": True}, "version"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [X, X]}, "inputs"),
        ({"parameters": {"k": None}}, "parameters"),
        ({"parameters": {"k": float("nan")}}, "parameters"),
        ({"parameters": {"k": [1]}}, "parameters"),
        ({"reply_to": "bad topic"}, "reply_to"),
        ({"reply_to": ".."}, "reply_to"),
        ({"deadline_ms": -1}, "deadline_ms"),
        ({"created_ms": 2**63}, "created_ms"),
        ({"priority": 2**63}, "priority"),
        ({"trace": "t" * 257}, "trace"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_request_refuses(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        request(**overrides)
    assert field in str(caught.value)


def test_request_ids_may_use_the_documented_characters() -> None:
    assert request(id="Az09._:-").id == "Az09._:-"


def test_requests_are_frozen() -> None:
    with pytest.raises(ValidationError):
        request().id = "other"  # type: ignore[misc]


def test_success_result() -> None:
    timing = Timing(queue_ms=1.5, infer_ms=2, batch_size=4)
    result = InferenceResult.success("r", "m", 3, [X], timing=timing, worker="w-1", created_ms=5)
    assert result.ok
    assert result.status is ResultStatus.OK
    assert result.output("x") is X
    assert (result.version, result.error, result.created_ms) == (3, None, 5)


def test_failure_and_expired_results() -> None:
    failed = InferenceResult.failure("r", "m", None, ErrorCode.UNKNOWN_MODEL, "no model m")
    assert failed.status is ResultStatus.ERROR
    assert failed.error == ErrorInfo(code=ErrorCode.UNKNOWN_MODEL, message="no model m")
    assert failed.created_ms is not None
    assert failed.created_ms > 1_600_000_000_000
    expired = InferenceResult.expired("r", "m")
    assert expired.status is ResultStatus.EXPIRED
    assert expired.error is not None
    assert expired.error.code is ErrorCode.DEADLINE_EXCEEDED
    assert InferenceResult.failure("r", "m", 1, ErrorCode.DEADLINE_EXCEEDED, "late").status == (
        ResultStatus.EXPIRED
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": "ok", "error": {"code": "INTERNAL", "message": "x"}}, "error: must be absent"),
        ({"status": "error"}, "error: required"),
        (
            {"status": "error", "error": {"code": "INTERNAL", "message": "x"}, "outputs": [X]},
            "outputs: must be empty",
        ),
        (
            {"status": "expired", "error": {"code": "INTERNAL", "message": "x"}},
            "DEADLINE_EXCEEDED goes with status expired",
        ),
        ({"status": "ok", "outputs": [X, X]}, "repeated tensor names"),
        ({"status": "done"}, "status"),
    ],
)
def test_result_status_must_match_its_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InferenceResult(id="r", model="m", **fields)


def test_fast_construction_matches_model_construct() -> None:
    fields = {"id": "r", "model": "m", "inputs": (X,), "priority": 3}
    defaults = {
        name: f.get_default(call_default_factory=True)
        for name, f in InferenceRequest.model_fields.items()
        if not f.is_required()
    }
    fast = _construct(InferenceRequest, {**defaults, **fields}, fields_set=set(fields))
    slow = InferenceRequest.model_construct(**fields)  # type: ignore[arg-type]
    assert fast == slow == InferenceRequest.model_validate(fields)
    for name in (
        "__dict__",
        "__pydantic_fields_set__",
        "__pydantic_extra__",
        "__pydantic_private__",
    ):
        assert getattr(fast, name) == getattr(slow, name), name
    assert fast.model_dump(exclude_unset=True) == slow.model_dump(exclude_unset=True)


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=4),
    st.text("abc.:-_", min_size=1, max_size=3),
    st.just(""),
    st.just("."),
    st.just("a" * 129),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(
        st.text(max_size=3), st.one_of(st.integers(), st.floats(), st.none()), max_size=2
    ),
    st.just((X,)),
    st.just((X, X)),
    st.just(()),
)


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(list(InferenceRequest.model_fields)), anything))
def test_the_hand_checks_never_accept_what_the_model_refuses(fields: dict[str, Any]) -> None:
    fields = {key: value for key, value in fields.items() if value is not None}
    if _plainly_valid(fields):
        InferenceRequest.model_validate(fields)  # raises if the hand checks were too lenient
