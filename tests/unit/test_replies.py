"""The reply listener's bookkeeping of waiting calls (no Kafka needed)."""

from __future__ import annotations

import asyncio

from producers.replies import ReplyListener
from schemas.messages import InferenceResult, ResultStatus
from schemas.settings import KafkaSettings


async def no_sweep(ids: object) -> dict[str, InferenceResult]:
    return {}


async def test_callers_sharing_an_id_each_get_the_result_and_one_giving_up_cancels_nothing() -> (
    None
):
    listener = ReplyListener(kafka=KafkaSettings(), topic="t.replies.x", partitions=1,
                             sweep=no_sweep, sweep_after_s=1.0)  # fmt: skip
    first = listener.expect("r1")
    second = listener.expect("r1")
    listener.forget("r1")  # the first caller timed out
    assert not second.cancelled()
    result = InferenceResult(id="r1", model="m", status=ResultStatus.OK)
    listener._resolve(result)
    assert await asyncio.wait_for(second, 1) is result
    assert first is second
    listener.forget("r1")
    assert listener.waiting == 0
