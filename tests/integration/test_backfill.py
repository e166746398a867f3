"""`inferq-produce backfill` against the real stack and a worker: killed, resumed, in order."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.local.demo import forward_rows
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

ROWS = 50_000


async def start_backfill(deployment: Deployment, *args: str) -> asyncio.subprocess.Process:
    env = {**deployment.worker_env(), "PYTHONPATH": str(Path.cwd())}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producers", "backfill", *args,
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def events(process: asyncio.subprocess.Process) -> list[dict[str, object]]:
    assert process.stdout is not None
    return [json.loads(line) async for line in process.stdout]


@pytest.mark.timeout(600)
async def test_a_backfill_killed_half_way_resumes_and_writes_every_row_once_in_order(
    deployment: Deployment, tmp_path: Path
) -> None:
    inputs = np.random.default_rng(5).standard_normal((ROWS, 784), dtype=np.float32)
    dataset = tmp_path / "rows.npy"
    np.save(dataset, inputs)
    output = tmp_path / "rows.results.npz"
    args = ("--model", "mlp", "--version", "1", "--input", str(dataset), "--run", "bf-1",
            "--output", str(output))  # fmt: skip
    async with running_worker(deployment) as running:
        await wait_until_ready(running)
        first = await start_backfill(deployment, *args)
        assert first.stdout is not None
        done_at_kill = 0
        async with asyncio.timeout(300):
            async for line in first.stdout:
                done_at_kill = int(json.loads(line)["done"])
                if done_at_kill >= ROWS // 2:
                    break
        first.kill()  # SIGKILL, half-way
        await first.wait()
        assert done_at_kill < ROWS
        assert not output.exists()
        second = await start_backfill(deployment, *args)
        lines = await bounded(events(second), what="the resumed backfill", timeout_s=400)
        assert await second.wait() == 0
    summary = lines[-1]
    assert summary["event"] == "backfill_done"
    assert summary["resumed"] >= done_at_kill  # nothing answered before the kill is sent again
    assert summary["resumed"] + summary["published"] == ROWS
    print(f"resumed {summary['resumed']}, published {summary['published']} more, "
          f"{summary['rows_per_s']} rows/s in the second run")  # fmt: skip
    written = np.load(output)
    assert list(written["status"]) == ["ok"] * ROWS
    assert set(written["version"]) == {1}
    expected = forward_rows(deployment.models_dir / "mlp" / "1", inputs)
    np.testing.assert_allclose(written["logits"], expected, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "rows.results.npz.bf-1.progress").exists()
