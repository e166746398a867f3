"""Faults of what the workers depend on: the broker killed for 20 s, Redis frozen
(SIGSTOP) for 20 s, Redis stopped and restarted. Each on a broker or redis-server of its own,
so that no other test sees the fault."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from deploy.local.redis_server import RedisServer
from deploy.local.stack import LocalStack
from tests.faults.harness import WORKLOAD, fault_run, mlp_workload
from tests.integration.worker_harness import Deployment

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

OUTAGE_S = 20.0
"""How long the broker or Redis is away (the issue's 20 s)."""


@pytest.mark.timeout(480)
async def test_the_broker_killed_for_20_seconds_loses_nothing(
    private_stack: LocalStack, broker_fault_deployment: Deployment, tmp_path: Path
) -> None:
    requests = mlp_workload(seed=3)
    async with fault_run(
        broker_fault_deployment, tmp_path, requests, per_second=None, publish_first=True
    ) as run:
        await run.watcher.wait_answered(WORKLOAD // 10, timeout_s=120)
        await asyncio.to_thread(private_stack.kill_kafka)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(private_stack.start_kafka)
        run.end_fault()
        row = await run.finish(fault="broker SIGKILLed for 20 s, restarted", answer_timeout_s=240)
    row.report()
    row.assert_holds()


@pytest.mark.timeout(420)
async def test_redis_frozen_for_20_seconds_loses_nothing(
    private_redis: RedisServer, redis_fault_deployment: Deployment, tmp_path: Path
) -> None:
    requests = mlp_workload(seed=4)
    pid = private_redis.process_id()
    assert pid is not None
    async with fault_run(redis_fault_deployment, tmp_path, requests, per_second=400) as run:
        await run.watcher.wait_answered(WORKLOAD // 10, timeout_s=120)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(OUTAGE_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        run.end_fault()
        row = await run.finish(fault="Redis SIGSTOPped for 20 s", answer_timeout_s=240)
    row.report()
    row.assert_holds()


@pytest.mark.timeout(420)
async def test_redis_stopped_and_restarted_loses_nothing(
    private_redis: RedisServer, redis_fault_deployment: Deployment, tmp_path: Path
) -> None:
    requests = mlp_workload(seed=5)
    async with fault_run(redis_fault_deployment, tmp_path, requests, per_second=400) as run:
        await run.watcher.wait_answered(WORKLOAD // 10, timeout_s=120)
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(OUTAGE_S / 2)
        await asyncio.to_thread(private_redis.start)
        run.end_fault()
        row = await run.finish(fault="Redis stopped 10 s and restarted", answer_timeout_s=240)
    row.report()
    row.assert_holds()
