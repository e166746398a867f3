"""Where a real worker's event-loop thread spends its time, by py-spy, against the real stack.

    python bench/profile_worker.py [--count 100000] [--seconds 20]

Starts a private stack, pre-publishes ``count`` mlp requests, runs ``python -m workers
--procs 1`` and, from its first result on, ``py-spy record --subprocesses --threads`` for
``seconds``; then prints
the share of the loop thread's samples by stage (which of the worker's functions is on the
stack) and its heaviest leaf functions. Needs the bench extra (py-spy).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter

from bench.e2e import INFERQ_KEYS_PER_ANSWER, SCENARIOS, Bench
from workers.example_models import write_example_models

STAGES = (
    ("admission", ("workers/admission.py", "workers/fastpath.py")),
    ("redelivery check", ("settled (workers/results.py",)),
    ("batcher", ("workers/batcher.py",)),
    ("answers", ("workers/answers.py", "schemas/templates.py")),
    ("redis write", ("_write_redis (workers/results.py",)),
    ("kafka write", ("_write_kafka (workers/results.py",)),
    ("aiokafka fetch and parse", ("aiokafka/consumer",)),
    ("aiokafka produce", ("aiokafka/producer",)),
    ("dispatch", ("_run (workers/worker.py", "_run_and_queue (workers/worker.py")),
    ("offsets and commit", ("workers/offsets.py", "_commit (workers/worker.py")),
    ("intake, other", ("_intake_loop (workers/worker.py",)),
)
"""Stages by the frames that mark them; a sample counts for the first stage that matches."""


def stage_of(stack: str) -> str:
    for name, markers in STAGES:
        if any(marker in stack for marker in markers):
            return name
    return "event loop and other"


async def profile(count: int, seconds: float, out: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="inferq-profile-"))
    bench = Bench(root=root, threads=1)
    scenario = SCENARIOS["overhead"]
    scenario = type(scenario)(**{**scenario.__dict__, "count": count})
    write_example_models(bench.models_dir)
    await asyncio.to_thread(bench.stack.up)
    try:
        prefix = f"p{uuid.uuid4().hex[:8]}"
        await bench.prepare(scenario, prefix)
        env = bench.worker_env(prefix, f"profile-{uuid.uuid4().hex[:6]}", 0)
        env["INFERQ_SERVED_MODELS"] = scenario.model
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        worker = subprocess.Popen(  # noqa: ASYNC220 - returns at once; awaited off the loop
            [sys.executable, "-m", "workers", "--procs", "1"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await wait_for_first_result(bench)  # start-up is not the hot path
            record = [
                spy, "record", "--pid", str(worker.pid), "--subprocesses", "--threads",
                "--format", "raw", "--rate", "200", "--duration", str(int(seconds)),
                "--output", str(out), "--nonblocking",
            ]  # fmt: skip
            before = await bench.redis.dbsize()
            started = time.perf_counter()
            await asyncio.to_thread(subprocess.run, record, check=True, stdout=subprocess.DEVNULL)
            answered = (await bench.redis.dbsize() - before) // INFERQ_KEYS_PER_ANSWER
            rate = answered / (time.perf_counter() - started)
            print(f"answered while recording: {answered:,} ({rate:,.0f}/s)")
        finally:
            worker.terminate()
            await asyncio.to_thread(worker.wait, 60)
    finally:
        await asyncio.to_thread(bench.stack.down)
        await bench.redis.aclose()
        shutil.rmtree(root, ignore_errors=True)
    return out


async def wait_for_first_result(bench: Bench) -> None:
    for _ in range(2400):  # two minutes
        if await bench.redis.dbsize():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the worker gave no result within two minutes")


def report(raw: Path) -> None:
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "thread (" not in stack or ": MainThread;" not in stack:
            continue  # the runner thread and the supervisor are not the loop
        samples = int(count_text)
        stages[stage_of(stack)] += samples
        leaves[stack.rsplit(";", 1)[-1]] += samples
    total = sum(stages.values()) or 1
    print(f"\nloop thread: {total} samples")
    for name, samples in stages.most_common():
        print(f"  {samples / total:6.1%}  {name}")
    print("\nheaviest leaf functions:")
    for name, samples in leaves.most_common(20):
        print(f"  {samples / total:6.1%}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "inferq.spy")
    args = parser.parse_args()
    report(asyncio.run(profile(args.count, args.seconds, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
