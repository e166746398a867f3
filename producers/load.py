"""Load generation: many seeded requests, published as fast as Kafka takes them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import numpy as np

from producers.client import InferenceClient
from schemas.messages import InferenceRequest, now_ms
from schemas.tensors import Tensor


def random_requests(
    *,
    model: str,
    count: int,
    input_name: str,
    row_shape: Sequence[int],
    seed: int = 0,
    version: int | None = None,
) -> list[InferenceRequest]:
    """``count`` single-row FP32 requests with seeded normal inputs and unique ids."""
    rng = np.random.default_rng(seed)
    run = uuid.uuid4().hex[:8]
    data = rng.standard_normal((count, 1, *row_shape), dtype=np.float32)
    return [
        InferenceRequest(
            id=f"{run}-{i}",
            model=model,
            version=version,
            inputs=(Tensor.from_numpy(input_name, data[i]),),
        )
        for i in range(count)
    ]


async def publish(client: InferenceClient, requests: Sequence[InferenceRequest]) -> dict[str, int]:
    """Publish every request, stamping ``created_ms`` at send, and wait for all acks.

    Returns each request id's ``created_ms`` (Unix ms), for end-to-end latency.
    """
    created: dict[str, int] = {}
    deliveries = []
    for request in requests:
        stamped = request.model_copy(update={"created_ms": now_ms()})
        created[stamped.id] = stamped.created_ms or 0
        deliveries.append(await client.enqueue(stamped))
    await asyncio.gather(*deliveries)
    return created
