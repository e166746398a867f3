"""Overload with large tensors: requests arrive far faster than the workers answer them, and
the worker's memory stays bounded by `INFERQ_MAX_IN_FLIGHT_BYTES`, not only by the request
count (which alone would let 4,096 large records in at once)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from producers.client import InferenceClient
from schemas.codec import decode_result
from schemas.messages import InferenceRequest, ResultStatus
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.faults.harness import MIB, fault_run, mlp_workload
from tests.integration.worker_harness import Deployment
from workers.authoring import write_version
from workers.models import ModelConfig, TensorSpec

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

ROW = 512 * 512
"""Elements of one large request: 1 MiB of FP32."""
BUDGET_BYTES = 32 * MIB
"""The workers' INFERQ_MAX_IN_FLIGHT_BYTES in this test."""
RSS_BUDGETS = 5
"""Peak RSS may exceed the warm baseline by this many byte budgets."""
WARM_UP = 24
"""Large requests answered before the baseline RSS is sampled."""


OVERLOAD = 10
"""In the timed run, requests arrive this many times faster than the workers answer them."""


class Wide(nn.Module):
    """A slow model of large inputs: each 1 MiB row as a 512x512 matrix, times a fixed one
    ``passes`` times (tens of ms a row at 8, so that intake outruns it many times over)."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.passes = passes
        generator = torch.Generator().manual_seed(7)
        self.weight = nn.Parameter(torch.randn(512, 512, generator=generator) / 512**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.reshape(x.shape[0], 512, 512)
        for _ in range(self.passes):
            squares = squares @ self.weight
        return squares.mean(dim=(1, 2)).unsqueeze(1)


def large_requests(count: int) -> list[InferenceRequest]:
    rng = np.random.default_rng(8)
    return [
        InferenceRequest(
            id=f"large-{i}",
            model="wide",
            inputs=(Tensor.from_numpy("x", rng.standard_normal((1, ROW), dtype=np.float32)),),
        )
        for i in range(count)
    ]


async def publish_for(
    client: InferenceClient, requests: list[InferenceRequest], *, duration_s: float
) -> None:
    """Publish ``requests`` spread evenly over ``duration_s`` (0: at once); wait for every
    ack."""
    started = time.monotonic()
    deliveries = []
    for index, request in enumerate(requests):
        ahead_s = started + index * duration_s / len(requests) - time.monotonic()
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)
        deliveries.append(await client.enqueue(request))
    await asyncio.gather(*deliveries)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    ("large", "duration_s", "passes"),
    [
        pytest.param(300, 0.0, 8, id="burst"),
        # None: OVERLOAD times what the workers answer per second (measured after the warm-up)
        # for duration_s; a slower model keeps that to a few GB through the broker.
        pytest.param(None, 60.0, 64, id="10x-60s", marks=pytest.mark.soak),
    ],
)
async def test_overload_with_large_tensors_keeps_memory_bounded_by_bytes_in_flight(
    deployment: Deployment,
    tmp_path: Path,
    make_topic: TopicFactory,
    large: int | None,
    duration_s: float,
    passes: int,
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    module = Wide(passes).eval()
    write_version(
        root=deployment.models_dir,
        name="wide",
        module=module,
        config=ModelConfig(
            inputs=(TensorSpec(name="x", datatype="FP32", shape=(ROW,)),),
            outputs=(TensorSpec(name="y", datatype="FP32", shape=(1,)),),
            max_batch_size=8,
        ),
    )
    await make_topic(topics.requests("wide"), partitions=2)
    await make_topic(topics.results("wide"), partitions=1)
    warm_ups = large_requests(2 * WARM_UP)
    requests = mlp_workload(seed=9)
    async with fault_run(
        deployment, tmp_path, requests, per_second=len(requests) / max(duration_s, 10.0),
        also_watch=(topics.results("wide"),),
        INFERQ_MAX_IN_FLIGHT_BYTES=str(BUDGET_BYTES),
    ) as run:  # fmt: skip
        async with deployment.client() as client:
            # Warm up first: the baseline includes the model's working memory for full
            # batches, which is not memory held for requests in flight.
            warm, timed = warm_ups[:WARM_UP], warm_ups[WARM_UP:]
            await publish_for(client, warm, duration_s=0)
            await run.watcher.wait_for_ids([r.id for r in warm], timeout_s=300)
            baseline_bytes = run.rss.sample()
            started = time.monotonic()
            await publish_for(client, timed, duration_s=0)
            await run.watcher.wait_for_ids([r.id for r in timed], timeout_s=300)
            capacity_per_s = WARM_UP / (time.monotonic() - started)
            if large is None:
                large = 2 * WARM_UP + round(OVERLOAD * capacity_per_s * duration_s)
            big = large_requests(large)
            await publish_for(client, big[2 * WARM_UP :], duration_s=duration_s)
        large_answered = sum(1 for r in big if r.id in run.watcher.records)
        run.end_fault()
        ok = await run.watcher.wait_for_ids([r.id for r in big], timeout_s=1200)
        row = await run.finish(
            fault=f"overload: {large} x 1 MiB tensors in {duration_s:.0f} s + 20,000 small"
        )

    wrong = 0
    with torch.inference_mode():
        for request in big:
            values = run.watcher.records.get(request.id, [])
            result = decode_result(values[0]) if values else None
            if result is None or result.status is not ResultStatus.OK:
                wrong += 1
                continue
            expected = module(torch.from_numpy(request.inputs[0].to_numpy())).numpy()
            if not np.allclose(result.outputs[0].to_numpy(), expected, rtol=1e-3, atol=1e-2):
                wrong += 1
    # Held records, their copies in the consumer's fetch buffers and in a batch, allocator
    # slack: a few budgets (measured: about 4; a worker bounded by count alone held 9 here).
    bound_bytes = baseline_bytes + RSS_BUDGETS * BUDGET_BYTES
    row.extra.update(
        large_requests=large, large_wrong=wrong, budget_mib=BUDGET_BYTES / MIB,
        baseline_rss_mib=round(baseline_bytes / MIB), rss_bound_mib=round(bound_bytes / MIB),
        large_mib_sent=large * ROW * 4 / MIB, large_answered_when_all_sent=large_answered,
        capacity_per_s=round(capacity_per_s, 2),
        overload=round((large - 2 * WARM_UP) / max(duration_s, 1e-9) / capacity_per_s, 1)
        if duration_s else None,
    )  # fmt: skip
    row.report()
    row.assert_holds()
    assert ok
    assert wrong == 0
    assert run.rss.peak_bytes <= bound_bytes, row.extra
