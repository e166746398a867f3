"""A worker and a client against a 3-node Redis Cluster: every request answered once, each
result on the node that owns its slot, first result wins, the client reads them back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from deploy.local.processes import free_ports
from deploy.local.redis_cluster import LocalRedisCluster, running_redis_cluster
from producers.load import publish, random_requests
from schemas.codec import content_type_of, decode_result
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest, InferenceResult
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import (
    Deployment,
    assert_outputs_match,
    read_topic,
    running_worker,
    wait_until_ready,
)

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

DISTINCT = 3000
RESENT_AT_ONCE = 100
"""Ids sent twice, the copy right behind the original: often in one batch, one script call."""
RESENT_LATER = 50
"""Ids sent again once answered: the worker's redelivery check finds them (MGET by slot)."""
REUSED_LATER = 50
"""Ids sent again with other inputs once answered: `DUPLICATE_ID`, never the first's output."""
OUTAGE_S = 7.0
"""How long a node stays down: beyond the node timeout (5 s), so the cluster fails too."""


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """Three cluster-enabled redis-servers on free loopback ports, stopped after this module."""
    ports = free_ports(6)
    with running_redis_cluster(
        run_dir=tmp_path_factory.mktemp("redis-cluster"), ports=ports[:3], bus_ports=ports[3:]
    ) as cluster:
        yield cluster


@pytest.fixture
def on_cluster(deployment: Deployment, redis_cluster: LocalRedisCluster) -> Deployment:
    """The test's deployment, with Redis Cluster for its Redis."""
    return dataclasses.replace(deployment, redis_url=redis_cluster.url, redis_cluster=True)


def answers_by_id(records: Sequence[object]) -> dict[str, list[tuple[bytes, InferenceResult]]]:
    """Each id's answers on the result topic, in topic order: (record value, decoded)."""
    by_id: dict[str, list[tuple[bytes, InferenceResult]]] = {}
    for record in records:
        value: bytes = record.value  # type: ignore[attr-defined]
        result = decode_result(value, content_type_of(record.headers))  # type: ignore[attr-defined]
        by_id.setdefault(result.id, []).append((value, result))
    return by_id


async def keys_by_node(cluster: LocalRedisCluster, prefix: str) -> dict[int, dict[bytes, bytes]]:
    """Every key under ``prefix`` on each node (by port) with its value, and a check that the
    node serves the key's slot."""
    found: dict[int, dict[bytes, bytes]] = {}
    for node in cluster.nodes:
        client = aioredis.Redis.from_url(node.url, socket_timeout=5)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            node_slots = await node_owned_slots(client)
            for key in keys:
                assert key_slot(key) in node_slots, f"{key!r} on node {node.port} off its slots"
            pipeline = client.pipeline(transaction=False)
            for key in keys:
                pipeline.get(key)  # one MGET would span slots: refused even on one node
            values: list[bytes] = await pipeline.execute()
            found[node.port] = dict(zip(keys, values, strict=True))
        finally:
            await client.aclose()
    return found


async def node_owned_slots(client: aioredis.Redis) -> set[int]:
    """The slots the node behind ``client`` serves itself."""
    my_id = (await client.execute_command("CLUSTER", "MYID")).decode()
    owned: set[int] = set()
    for start, end, primary, *_ in await client.execute_command("CLUSTER", "SLOTS"):
        if primary[2].decode() == my_id:
            owned.update(range(int(start), int(end) + 1))
    return owned


def other_inputs(request: InferenceRequest) -> InferenceRequest:
    """The same id, model and version with other inputs."""
    other = Tensor.from_numpy("input", np.full((1, 784), 7.0, np.float32))
    return request.model_copy(update={"inputs": (other,)})


@pytest.mark.timeout(240)
async def test_every_request_is_answered_once_through_a_redis_cluster(
    on_cluster: Deployment, redis_cluster: LocalRedisCluster
) -> None:
    topics = TopicNames(prefix=on_cluster.prefix)
    originals = random_requests(model="mlp", count=DISTINCT, input_name="input", row_shape=[784])
    first_wave: list[InferenceRequest] = []
    for index, request in enumerate(originals):
        first_wave.append(request)
        if index < RESENT_AT_ONCE:
            first_wave.append(request)
    resent_later = originals[RESENT_AT_ONCE : RESENT_AT_ONCE + RESENT_LATER]
    reused = originals[-REUSED_LATER:]
    second_wave = [*resent_later, *(other_inputs(r) for r in reused)]
    ids = [r.id for r in originals]

    async with running_worker(on_cluster) as running, on_cluster.client() as client:
        await wait_until_ready(running)
        await bounded(publish(client, first_wave), what="publishing", timeout_s=60)
        cached = await client.results(ids, timeout_s=120)
        await bounded(publish(client, second_wave), what="publishing again", timeout_s=60)
        records = await read_topic(
            on_cluster.bootstrap,
            topics.results("mlp"),
            expected=len(first_wave) + len(second_wave),
            timeout_s=120,
        )
        cached_again = await client.cached_results(ids)

    by_id = answers_by_id(records)
    assert sorted(by_id) == sorted(ids), "every request answered, no stray id"
    assert len(records) == len(first_wave) + len(second_wave), "no request answered twice"
    reused_ids = {r.id for r in reused}
    for request_id, answers in by_id.items():
        (first_value, first), *others = answers
        assert first.ok, f"{request_id}: {first.error}"
        for value, answer in others:
            if request_id in reused_ids and answer.error is not None:
                assert answer.error.code is ErrorCode.DUPLICATE_ID
            else:
                assert value == first_value, f"{request_id} answered twice, differently"
        assert cached[request_id] == first, "the client reads the first result from the cluster"
        assert cached_again[request_id] == first
    for request in reused:
        codes = [a.error.code for _, a in by_id[request.id] if a.error is not None]
        assert codes == [ErrorCode.DUPLICATE_ID], "the reused id is refused, once"
    version = by_id[ids[0]][0][1].version
    assert_outputs_match(
        on_cluster.models_dir / "mlp" / str(version),
        originals,
        {request_id: answers[0][1] for request_id, answers in by_id.items()},
    )

    stored = await keys_by_node(redis_cluster, on_cluster.prefix)
    assert all(stored.values()), f"keys on every node: {[len(k) for k in stored.values()]}"
    merged = {key: value for keys in stored.values() for key, value in keys.items()}
    for request_id, answers in by_id.items():
        assert merged[topics.result_key(request_id).encode()] == answers[0][0]
        assert topics.digest_key(request_id).encode() in merged
    assert len(merged) == 2 * DISTINCT, "a result key and a digest key per id, nothing else"


async def test_writes_wait_out_a_node_that_is_down_and_lose_nothing(
    on_cluster: Deployment, redis_cluster: LocalRedisCluster
) -> None:
    """A node stopped for longer than the node timeout: its slots refuse connections, then the
    whole cluster says CLUSTERDOWN; every write is retried until the node is back."""
    topics = TopicNames(prefix=on_cluster.prefix)
    requests = random_requests(model="mlp", count=600, input_name="input", row_shape=[784])
    ids = [r.id for r in requests]
    node = redis_cluster.nodes[1]
    overrides = {"write_retry_max_backoff_s": 0.5}
    async with running_worker(on_cluster, **overrides) as running, on_cluster.client() as client:
        await wait_until_ready(running)
        await asyncio.to_thread(node.stop)
        try:
            await bounded(publish(client, requests), what="publishing", timeout_s=60)
            await asyncio.sleep(OUTAGE_S)
        finally:
            await asyncio.to_thread(node.start)
            await asyncio.to_thread(redis_cluster.wait_ok)
        records = await read_topic(
            on_cluster.bootstrap, topics.results("mlp"), expected=len(requests), timeout_s=120
        )
        cached = await client.results(ids, timeout_s=60)
    retries = running.metrics.registry.get_sample_value(
        "inferq_write_retries_total", {"sink": "redis"}
    )
    assert retries, "the stopped node made the writer retry"
    by_id = answers_by_id(records)
    assert sorted(by_id) == sorted(ids)
    assert all(len(answers) == 1 for answers in by_id.values()), "no request answered twice"
    assert all(answers[0][1].ok for answers in by_id.values())
    stored = await keys_by_node(redis_cluster, on_cluster.prefix)
    assert stored[node.port], "the stopped node holds its share once back"
    merged = {key: value for keys in stored.values() for key, value in keys.items()}
    for request_id, answers in by_id.items():
        assert merged[topics.result_key(request_id).encode()] == answers[0][0]
        assert cached[request_id] == answers[0][1]


async def test_a_key_the_cluster_refuses_does_not_stall_the_others(
    on_cluster: Deployment, redis_cluster: LocalRedisCluster
) -> None:
    topics = TopicNames(prefix=on_cluster.prefix)
    requests = random_requests(model="mlp", count=40, input_name="input", row_shape=[784])
    blocked = requests[7].id
    cluster = RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    try:
        await cluster.rpush(topics.result_key(blocked), b"not a string")  # WRONGTYPE for SET
        async with running_worker(on_cluster) as running, on_cluster.client() as client:
            await wait_until_ready(running)
            await bounded(publish(client, requests), what="publishing", timeout_s=60)
            records = await read_topic(on_cluster.bootstrap, topics.results("mlp"), expected=40)
            others = [r.id for r in requests if r.id != blocked]
            cached = await client.results(others, timeout_s=30)
        assert await cluster.type(topics.result_key(blocked)) == b"list"
    finally:
        await cluster.aclose()
    assert sorted(record.key.decode() for record in records) == sorted(r.id for r in requests)
    assert len(cached) == len(others)
