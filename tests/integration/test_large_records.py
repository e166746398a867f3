"""Many 60 MiB requests at once: every one acknowledged, and the broker keeps answering."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner

from deploy.local.stack import LocalStack
from producers.client import InferenceClient
from producers.settings import ProducerSettings
from schemas.messages import InferenceRequest
from schemas.settings import KafkaSettings, RedisSettings
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.integration.kafka_helpers import bounded

pytestmark = [pytest.mark.kafka]

MIB = 1024 * 1024
CLIENTS = 3
RECORDS_PER_CLIENT = 2
PARTITIONS = 8


def keys_on_distinct_partitions(prefix: str, count: int) -> list[bytes]:
    """Record keys that the default partitioner puts on ``count`` different partitions."""
    partitioner = DefaultPartitioner()
    partitions = list(range(PARTITIONS))
    by_partition: dict[int, bytes] = {}
    candidate = 0
    while len(by_partition) < count:
        key = f"{prefix}-{candidate}".encode()
        by_partition.setdefault(partitioner(key, partitions, partitions), key)
        candidate += 1
    return list(by_partition.values())


def new_text(log: Path, offset: int) -> str:
    """What the broker logged from ``offset`` on."""
    with log.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


async def test_large_records_sent_at_once_are_all_acknowledged(
    local_stack: LocalStack, make_topic: TopicFactory, unique_prefix: str
) -> None:
    """Before: aiokafka put one client's 60 MiB records into one request over the broker's
    100 MiB limit and retried it forever; several clients' requests exhausted the broker's
    direct memory (`OutOfMemoryError`) and it timed out every large request after."""
    topics = TopicNames(prefix=unique_prefix)
    await make_topic(topics.requests("big"), partitions=PARTITIONS)
    log_offset = local_stack.kafka_log.stat().st_size
    settings = ProducerSettings(
        kafka=KafkaSettings(
            bootstrap_servers=local_stack.config.bootstrap_servers, topic_prefix=unique_prefix
        ),
        redis=RedisSettings(url=local_stack.config.redis_url),
    )
    payload = Tensor.from_numpy("input", np.zeros((1, 60 * MIB), dtype=np.uint8))
    keys = keys_on_distinct_partitions(unique_prefix, CLIENTS * RECORDS_PER_CLIENT)

    async def send_all(client: InferenceClient, client_keys: list[bytes]) -> None:
        deliveries = []
        for key in client_keys:
            request = InferenceRequest(id=key.decode(), model="big", inputs=(payload,))
            deliveries.append(await client.enqueue(request, key=key))
        await asyncio.gather(*deliveries)

    clients = [InferenceClient(settings=settings) for _ in range(CLIENTS)]
    for client in clients:
        await bounded(client.start(), what="client start", timeout_s=20)
    try:
        await bounded(
            asyncio.gather(
                *(send_all(client, keys[i :: len(clients)]) for i, client in enumerate(clients))
            ),
            what=f"acknowledging {len(keys)} records of 60 MiB",
            timeout_s=60,
        )
        small = InferenceRequest(
            id=f"{unique_prefix}-small",
            model="big",
            inputs=(Tensor.from_numpy("input", np.zeros((1, 16), dtype=np.uint8)),),
        )
        await bounded(clients[0].submit_request(small), what="a small produce after", timeout_s=20)
    except BaseException:
        for client in clients:  # a client that cannot flush must not hide why
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 10)
        raise
    for client in clients:
        await bounded(client.close(), what="client close", timeout_s=30)

    logged = new_text(local_stack.kafka_log, log_offset)
    assert "OutOfMemoryError" not in logged, "the broker ran out of memory"
    assert "InvalidReceiveException" not in logged, "a request exceeded socket.request.max.bytes"
