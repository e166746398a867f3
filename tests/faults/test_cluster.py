"""A three-node KRaft cluster (replication factor 3, min.insync.replicas 2) whose leader of a
request partition is SIGKILLed mid-run: nothing acknowledged is lost, nothing is lost.

Three JVMs beside the workers are too much for `make test` on two cores: `make soak` runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient

from deploy.local.kafka_cluster import ClusterConfig, KafkaCluster
from deploy.local.processes import running
from deploy.local.redis_server import RedisServer
from schemas.topics import TopicNames
from tests.conftest import topic_factory
from tests.faults.harness import WORKLOAD, fault_run, mlp_workload
from tests.integration.worker_harness import make_deployment

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow, pytest.mark.soak]


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    config = ClusterConfig(run_dir=tmp_path_factory.mktemp("cluster"))
    with running(KafkaCluster(config)) as started:
        yield started


async def leader_of(bootstrap: str, partition: TopicPartition) -> int:
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        metadata = await client.fetch_all_metadata()
        leader = metadata.leader_for_partition(partition)
    finally:
        await client.close()
    assert leader is not None, partition
    assert leader >= 0, partition
    return int(leader)


@pytest.mark.timeout(600)
async def test_the_leaders_broker_killed_in_a_three_node_cluster_loses_nothing(
    cluster: KafkaCluster,
    private_redis: RedisServer,
    unique_prefix: str,
    models_dir: Path,
    tmp_path: Path,
) -> None:
    bootstrap = cluster.bootstrap_servers
    async with topic_factory(bootstrap, replication_factor=3, delete_after=False) as create:
        deployment = await make_deployment(
            bootstrap=bootstrap, redis_url=private_redis.url, prefix=unique_prefix,
            models_dir=models_dir, make_topic=create,
        )  # fmt: skip
    request_partition = TopicPartition(TopicNames(prefix=unique_prefix).requests("mlp"), 0)
    requests = mlp_workload(seed=10)
    async with fault_run(
        deployment, tmp_path, requests, per_second=None, publish_first=True,
        INFERQ_TOPIC_REPLICATION_FACTOR="3",
    ) as run:  # fmt: skip
        await run.watcher.wait_answered(WORKLOAD // 10, timeout_s=180)
        leader = await leader_of(bootstrap, request_partition)
        await asyncio.to_thread(cluster.kill, leader)
        run.end_fault()
        row = await run.finish(
            fault="3-node KRaft cluster, a request partition's leader SIGKILLed",
            answer_timeout_s=300,
        )
    row.extra["killed_node"] = leader
    row.report()
    row.assert_holds()
