"""1,000 adversarial records mixed into 20,000 good requests: every bad record gets an error
result or a dead letter, and the good traffic is answered as if they were not there."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from schemas.codec import decode_result
from schemas.messages import ResultStatus
from schemas.topics import TopicNames
from tests.conftest import TopicFactory
from tests.faults.adversarial import Poisonable, adversarial_records
from tests.faults.harness import WORKLOAD, fault_run, mlp_workload
from tests.integration.worker_harness import Deployment
from workers.authoring import write_version
from workers.formats import ModelFormat
from workers.models import ModelConfig, TensorSpec

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

BAD = 1000
MAX_MESSAGE_BYTES = 1024 * 1024
"""The workers' record limit in this test (small, so that oversized records stay cheap)."""


@pytest.mark.timeout(420)
async def test_adversarial_records_are_answered_and_good_traffic_unaffected(
    deployment: Deployment, tmp_path: Path, make_topic: TopicFactory
) -> None:
    topics = TopicNames(prefix=deployment.prefix)
    write_version(
        root=deployment.models_dir,
        name="poison",
        module=Poisonable(),
        config=ModelConfig(
            inputs=(TensorSpec(name="input", datatype="FP32", shape=(4,)),),
            outputs=(TensorSpec(name="y", datatype="FP32", shape=(4,)),),
        ),
        fmt=ModelFormat.TORCHSCRIPT,
    )
    await make_topic(topics.requests("poison"), partitions=1)
    await make_topic(topics.results("poison"), partitions=1)
    bad = list(adversarial_records(BAD, max_message_bytes=MAX_MESSAGE_BYTES))
    requests = mlp_workload(seed=6)
    async with fault_run(
        deployment, tmp_path, requests, workers=("w1",), per_second=2000,
        also_watch=(topics.results("poison"), topics.dead_letters),
        INFERQ_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
    ) as run:  # fmt: skip
        await run.watcher.wait_answered(WORKLOAD // 10, timeout_s=120)
        producer = AIOKafkaProducer(
            bootstrap_servers=deployment.bootstrap, max_request_size=4 * MAX_MESSAGE_BYTES
        )
        await producer.start()
        try:
            sends = []
            for kind, key, value in bad:
                topic = topics.requests("poison" if kind == "poison" else "mlp")
                sends.append(await producer.send(topic, value, key=key.encode()))
                if len(sends) % 50 == 0:
                    await asyncio.sleep(0.05)  # spread among the good traffic
            await asyncio.gather(*sends)
        finally:
            await producer.stop()
        run.end_fault()
        ok = await run.watcher.wait_for_ids([key for _, key, _ in bad], timeout_s=120)
        row = await run.finish(fault="1,000 adversarial records mixed in")

    kinds = {key: kind for kind, key, _ in bad}
    answered: Counter[str] = Counter()
    wrongly_ok = []
    for key, kind in kinds.items():
        values = run.watcher.records.get(key, [])
        if not values:
            continue
        try:
            result = decode_result(values[0])
        except Exception:  # the original record, dead-lettered
            answered[f"{kind}: dead letter"] += 1
            continue
        answered[f"{kind}: {result.error.code.value if result.error else 'ok'}"] += 1
        if result.status is ResultStatus.OK:
            wrongly_ok.append(key)
    row.extra["bad_answered"] = dict(sorted(answered.items()))
    row.extra["bad_unanswered"] = BAD - sum(answered.values())
    row.report()
    row.assert_holds()
    assert ok, row.extra
    assert sum(answered.values()) == BAD
    assert not wrongly_ok
