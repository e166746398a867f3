"""Static group membership: a restarted child takes its partitions back at once, and a
cleanly stopped static member hands its partitions over at once.

Both tests run with a session timeout far longer than the behaviour needs, so that waiting for
the session timeout (what dynamic members, or a static member that never leaves, would cost)
shows as a failure rather than as a slower pass.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from producers.client import ResultTimeoutError
from producers.load import publish, random_requests
from tests.integration.test_worker_process import children_of, wait_for
from tests.integration.worker_harness import (
    Deployment,
    RunningWorker,
    running_worker,
    spawn_worker_cli,
    stop_process,
    wait_until_ready,
)

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

PARTITIONS = 4
"""Request partitions of ``mlp`` in the test deployment."""


async def group_member_ids(deployment: Deployment) -> list[str]:
    """Member ids of the deployment's consumer group, as the coordinator lists them now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([deployment.group_id])
    finally:
        await admin.close()
    (group,) = response.to_object()["groups"]
    return sorted(member["member_id"] for member in group["members"])


def is_instance(member_id: str, group_instance_id: str) -> bool:
    # The coordinator names a static member "{group.instance.id}-{uuid}" (a dynamic one
    # "{client.id}-{uuid}"); DescribeGroups below v4 does not return the instance id itself.
    return member_id.startswith(f"{group_instance_id}-")


@pytest.mark.timeout(240)
async def test_a_killed_child_takes_its_partitions_back_without_waiting_for_the_session_timeout(
    deployment: Deployment, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # With dynamic membership the restarted child's join waits for the dead member to be
    # dropped: its session (120 s) or the rebalance timeout (shutdown bound + 10 s = 120 s).
    answered_within_s = 40.0
    log = tmp_path / "worker.log"
    supervisor = spawn_worker_cli(
        deployment,
        log,
        "--procs",
        "1",
        INFERQ_SESSION_TIMEOUT_MS="120000",
        INFERQ_SHUTDOWN_TIMEOUT_S="110",
    )
    instance_id = f"{socket.gethostname()}-{supervisor.pid}-0"
    exit_code: int | None = None
    try:
        async with deployment.client() as client:
            before = random_requests(model="mlp", count=200, input_name="input", row_shape=[784])
            await publish(client, before)
            await client.results([r.id for r in before], timeout_s=120)
            members = await group_member_ids(deployment)
            assert [is_instance(m, instance_id) for m in members] == [True], members

            (child,) = children_of(supervisor.pid)
            os.kill(child, signal.SIGKILL)
            killed = time.monotonic()

            async def restarted() -> bool:
                alive = children_of(supervisor.pid)
                return bool(alive) and alive != [child]

            await wait_for(restarted, what="the supervisor restarting the child", timeout_s=30)
            after = random_requests(
                model="mlp", count=200, input_name="input", row_shape=[784], seed=1
            )
            await publish(client, after)
            try:
                await client.results(
                    [r.id for r in after],
                    timeout_s=max(answered_within_s - (time.monotonic() - killed), 1.0),
                )
            except ResultTimeoutError as error:
                raise AssertionError(
                    f"{len(error.request_ids)} requests unanswered {answered_within_s:.0f}s "
                    "after the kill: the restarted child did not get its partitions back"
                ) from None
        members = await group_member_ids(deployment)
        # The restart replaced the dead member under the same instance id.
        assert [is_instance(m, instance_id) for m in members] == [True], members
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            exit_code = stop_process(supervisor, timeout_s=60)
    assert exit_code == 0, log.read_text()[-3000:]


def partitions_of(running: RunningWorker) -> set[int]:
    return {tp.partition for tp in running.worker.assignment}


@pytest.mark.timeout(180)
async def test_a_static_member_stopped_cleanly_hands_its_partitions_over_at_once(
    deployment: Deployment,
) -> None:
    # Without a LeaveGroup the group keeps the stopped member's partitions until its session
    # times out, 45 to 60 s after the stop (heartbeats every 15 s). The survivor learns of the
    # rebalance at its next heartbeat, so it has everything within about 15 s of the leave.
    session_timeout_ms = 60_000
    handed_over_within_s = 30.0
    staying_id, leaving_id = f"{deployment.prefix}-stays", f"{deployment.prefix}-leaves"
    async with running_worker(
        deployment, group_instance_id=staying_id, session_timeout_ms=session_timeout_ms
    ) as staying:
        await wait_until_ready(staying)
        async with running_worker(
            deployment, group_instance_id=leaving_id, session_timeout_ms=session_timeout_ms
        ) as leaving:
            await wait_until_ready(leaving)

            async def split() -> bool:
                return bool(partitions_of(staying)) and bool(partitions_of(leaving))

            await wait_for(split, what="both workers owning partitions", timeout_s=60)
            members = await group_member_ids(deployment)
            assert sorted(is_instance(m, leaving_id) for m in members) == [False, True]
        # `running_worker` has stopped the leaving worker gracefully (SIGTERM's path).
        members = await group_member_ids(deployment)
        assert [is_instance(m, staying_id) for m in members] == [True], (
            f"the stopped static member is still in the group: {members}"
        )

        async def has_everything() -> bool:
            return partitions_of(staying) == set(range(PARTITIONS))

        await wait_for(
            has_everything,
            what="the remaining worker owning every partition",
            timeout_s=handed_over_within_s,
        )
