"""Faults of the workers themselves: SIGKILLs, a rolling restart, a rebalance storm.

Each runs 20,000 requests through real worker processes on the session's stack, injects the
fault mid-run (requests keep arriving until it is over) and checks the suite's invariant.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.faults.conftest import MODES, mode_name
from tests.faults.harness import WORKLOAD, fault_run, mlp_workload
from tests.integration.worker_harness import Deployment

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "kills", [pytest.param(3, id="3-kills"), pytest.param(8, id="8-kills", marks=pytest.mark.soak)]
)
async def test_a_worker_sigkilled_repeatedly_loses_nothing(
    deployment: Deployment, tmp_path: Path, mode: dict[str, str], kills: int
) -> None:
    async with fault_run(deployment, tmp_path, mlp_workload(), per_second=1000, **mode) as run:
        for kill in range(kills):
            await run.watcher.wait_answered((kill + 1) * WORKLOAD // (kills + 7), timeout_s=120)
            await run.fleet.kill_child("w1")
        run.end_fault()
        row = await run.finish(fault=f"worker SIGKILL x{kills}", mode=mode_name(mode))
        log = run.fleet.workers["w1"].log.read_text().splitlines()
    row.report()
    exactly_once = mode_name(mode) == "exactly-once"
    row.assert_holds(exactly_once=exactly_once)
    # Every child the supervisor (re)started served, in the mode asked for.
    started = [json.loads(line) for line in log if '"event": "worker_started"' in line]
    assert [event["exactly_once"] for event in started] == [exactly_once] * (kills + 1)


@pytest.mark.timeout(420)
async def test_a_rolling_restart_of_two_workers_loses_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    requests = mlp_workload(seed=1)
    async with fault_run(deployment, tmp_path, requests, workers=("w1", "w2")) as run:
        await run.watcher.wait_answered(WORKLOAD // 10, timeout_s=120)
        exit_codes = []
        for name in ("w1", "w2"):  # one at a time, the other serving meanwhile
            exit_codes.append(await asyncio.to_thread(run.fleet.stop, name))
            run.fleet.start(name)
            await run.fleet.wait_ready(name)
        run.end_fault()
        row = await run.finish(fault="rolling restart of 2 workers")
    row.extra["exit_codes"] = exit_codes
    row.report()
    row.assert_holds()
    assert exit_codes == [0, 0]


@pytest.mark.timeout(480)
async def test_a_rebalance_storm_loses_nothing(deployment: Deployment, tmp_path: Path) -> None:
    """A third worker joins and leaves five times while two serve."""
    requests = mlp_workload(seed=2)
    async with fault_run(
        deployment, tmp_path, requests, workers=("w1", "w2"), per_second=150
    ) as run:
        await run.watcher.wait_answered(WORKLOAD // 40, timeout_s=120)
        exit_codes = []
        for _ in range(5):
            run.fleet.start("w3")
            await run.fleet.wait_ready("w3")
            exit_codes.append(await asyncio.to_thread(run.fleet.stop, "w3"))
        run.end_fault()
        row = await run.finish(fault="rebalance storm (3rd worker joins and leaves x5)")
    row.extra["exit_codes"] = exit_codes
    row.report()
    row.assert_holds()
    assert exit_codes == [0] * 5
