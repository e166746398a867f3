"""The prebuilt ok-result encoder gives exactly the bytes of the full encoder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import decode_result, encode_result, encode_success
from schemas.messages import InferenceResult, Timing
from schemas.templates import OkResultTemplate
from schemas.tensors import Datatype, Tensor

OUTPUTS = [("logits", Datatype.FP32), ("class", Datatype.INT64), ("half", Datatype.BF16)]


def arrays(rows: int) -> list[np.ndarray]:
    return [
        np.arange(rows * 10, dtype=np.float32).reshape(rows, 10) / 7,
        np.arange(rows, dtype=np.int64).reshape(rows, 1) - 3,
        np.arange(rows * 2, dtype=np.uint16).reshape(rows, 2) + 16256,
    ]


@pytest.mark.parametrize("worker", ["worker-1", None])
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=40),
    queue_ms=st.floats(min_value=0, max_value=1e9),
    infer_ms=st.floats(min_value=0, max_value=1e6),
    batch_size=st.integers(min_value=1, max_value=4096),
    created_ms=st.integers(min_value=0, max_value=2**63 - 1),
    request_id=st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z"),
    trace=st.none() | st.text(max_size=256),
)
def test_template_bytes_equal_the_full_encoders(
    worker: str | None,
    rows: int,
    queue_ms: float,
    infer_ms: float,
    batch_size: int,
    created_ms: int,
    request_id: str,
    trace: str | None,
) -> None:
    template = OkResultTemplate(model="mlp", version=3, outputs=OUTPUTS, worker=worker)
    outputs = arrays(rows)
    timing = Timing(queue_ms=queue_ms, infer_ms=infer_ms, batch_size=batch_size)
    fast = template.encode(
        request_id=request_id, outputs=outputs, queue_ms=queue_ms, infer_ms=infer_ms,
        batch_size=batch_size, created_ms=created_ms, trace=trace,
    )  # fmt: skip
    named = [
        (name, datatype, array) for (name, datatype), array in zip(OUTPUTS, outputs, strict=True)
    ]
    direct = encode_success(
        request_id=request_id, model="mlp", version=3, outputs=named,
        timing=timing, worker=worker, created_ms=created_ms, trace=trace,
    )  # fmt: skip
    tensors = [Tensor(name=name, datatype=datatype, data=array) for name, datatype, array in named]
    full = encode_result(
        InferenceResult.success(
            request_id,
            "mlp",
            3,
            tensors,
            timing=timing,
            worker=worker,
            created_ms=created_ms,
            trace=trace,
        )
    )
    assert fast == direct == full
    decoded = decode_result(fast)
    assert decoded.outputs[0].shape == (rows, 10)
    assert decoded.trace == trace


def test_a_row_view_of_a_larger_output_encodes_only_its_rows() -> None:
    template = OkResultTemplate(model="m", version=1, outputs=OUTPUTS[:1], worker="w")
    batch = np.arange(40, dtype=np.float32).reshape(4, 10)
    value = template.encode(request_id="r", outputs=[batch[2:3]], queue_ms=1.0, infer_ms=2.0,
                            batch_size=4, created_ms=5)  # fmt: skip
    np.testing.assert_array_equal(decode_result(value).outputs[0].to_numpy(), batch[2:3])
