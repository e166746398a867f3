"""The README's three producer snippets, run as written against the stack and a worker."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from producers.load import publish, random_requests
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(name: str) -> str:
    """The fenced block after `<!-- snippet: name -->` in the README."""
    match = re.search(
        rf"<!-- snippet: {name} -->\n```\w+\n(.*?)```", README.read_text(), flags=re.DOTALL
    )
    assert match is not None, f"README has no snippet {name!r}"
    return match.group(1)


def test_every_snippet_is_under_15_lines() -> None:
    for name in ("client", "stream", "backfill"):
        lines = [line for line in snippet(name).splitlines() if line.strip()]
        assert len(lines) < 15, f"{name}: {len(lines)} lines"


async def run(deployment: Deployment, cwd: Path, *command: str) -> asyncio.subprocess.Process:
    env = {**deployment.worker_env(), "PYTHONPATH": str(README.parent)}
    return await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE
    )


async def test_the_client_snippet_prints_a_prediction(
    deployment: Deployment, tmp_path: Path
) -> None:
    (tmp_path / "client.py").write_text(snippet("client"))
    async with running_worker(deployment) as running:
        await wait_until_ready(running)
        process = await run(deployment, tmp_path, sys.executable, "client.py")
        out, _ = await bounded(process.communicate(), what="the snippet", timeout_s=120)
    assert process.returncode == 0
    version, label = out.decode().split()
    assert version == "2"  # mlp serves versions 1 and 2; no version asked: the newest
    assert 0 <= int(label) < 10


async def test_the_stream_snippet_prints_every_result_of_the_model(
    deployment: Deployment, tmp_path: Path
) -> None:
    (tmp_path / "stream.py").write_text(snippet("stream"))
    requests = random_requests(model="mlp", count=50, input_name="input", row_shape=[784])
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        await bounded(publish(client, requests), what="publishing", timeout_s=60)
        await client.results([r.id for r in requests], timeout_s=60)
    process = await run(deployment, tmp_path, sys.executable, "stream.py")
    assert process.stdout is not None
    seen: set[str] = set()
    try:
        async with asyncio.timeout(60):
            while not {r.id for r in requests} <= seen:
                request_id, status = (await process.stdout.readline()).decode().split()
                assert status == "ok"
                seen.add(request_id)
    finally:
        process.terminate()
        await process.wait()


async def test_the_backfill_snippet_answers_every_row_in_order(
    deployment: Deployment, tmp_path: Path
) -> None:
    # From a checkout: the environment's Python, and `python -m producers` for the script.
    script = (
        snippet("backfill")
        .replace("inferq-produce", f"{sys.executable} -m producers")
        .replace("python -c", f"{sys.executable} -c")
    )
    async with running_worker(deployment) as running:
        await wait_until_ready(running)
        process = await run(deployment, tmp_path, "bash", "-euo", "pipefail", "-c", script)
        out, _ = await bounded(process.communicate(), what="the snippet", timeout_s=180)
    assert process.returncode == 0, out.decode()
    written = np.load(tmp_path / "rows.results.npz")
    assert list(written["status"]) == ["ok"] * 1000
    assert written["logits"].shape == (1000, 10)
    same = np.repeat(written["logits"][:1], 1000, 0)  # every row is the same input
    np.testing.assert_allclose(written["logits"], same, rtol=1e-4, atol=1e-5)
    assert "logits FP32 [1, 10]" in out.decode()  # the one request's result, printed
