"""Concurrent `infer` calls from one client: the reply topic against Redis polling, one run.

    python bench/client.py [--calls 10000] [--rounds 2]

Starts a private stack and one worker process (mlp, 1 torch thread), then, alternating, makes
`--calls` concurrent calls each way: `infer` (the client's reply topic) and the client as it
was before (publish, then poll Redis for that one id every `result_poll_interval_ms`, 5 ms).
Reports calls/s and the client process's CPU time per call (the worker runs elsewhere), and
writes `bench/results/client-{date}.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from deploy.local.demo import wait_until_ready
from deploy.local.stack import StackConfig, free_port, running_stack
from producers.client import InferenceClient
from producers.settings import ProducerSettings
from schemas.settings import KafkaSettings, RedisSettings
from workers.example_models import write_example_models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
console = Console()


async def one_round(
    client: InferenceClient, mode: str, calls: int, timeout_s: float
) -> dict[str, float]:
    rows = np.random.default_rng(calls).standard_normal((calls, 1, 784), dtype=np.float32)

    async def polled(row: np.ndarray) -> None:
        request = client.request("mlp", {"input": row}, version=1)
        await client.submit_request(request)
        await client.results([request.id], timeout_s=timeout_s)

    async def replied(row: np.ndarray) -> None:
        await client.infer("mlp", {"input": row}, version=1, timeout_s=timeout_s)

    call = replied if mode == "reply topic" else polled
    started, cpu = time.perf_counter(), time.process_time()
    outcomes = await asyncio.gather(*(call(row) for row in rows), return_exceptions=True)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    answered = sum(1 for outcome in outcomes if not isinstance(outcome, BaseException))
    return {
        "answered": answered,
        "seconds": elapsed,
        "calls_per_s": answered / elapsed,
        "cpu_us_per_call": cpu / max(answered, 1) * 1e6,
    }


async def measure(args: argparse.Namespace, settings: ProducerSettings) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    async with InferenceClient(settings=settings) as client:
        await client.infer("mlp", {"input": np.zeros((1, 784), np.float32)}, timeout_s=120)
        for round_number in range(args.rounds):
            for mode in ("reply topic", "redis polling"):
                figures = await one_round(client, mode, args.calls, args.timeout)
                console.print(
                    f"round {round_number + 1}, {mode}: {figures['answered']:,.0f} answered in "
                    f"{figures['seconds']:.1f} s, {figures['calls_per_s']:,.0f} calls/s, "
                    f"{figures['cpu_us_per_call']:,.0f} us CPU/call"
                )
                rows.append({"round": round_number + 1, "mode": mode, **figures})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = StackConfig.on_free_ports(root / "stack")
        write_example_models(root / "models")
        with running_stack(config) as stack:
            port = free_port()
            env = {
                **os.environ,
                "INFERQ_KAFKA__BOOTSTRAP_SERVERS": stack.config.bootstrap_servers,
                "INFERQ_REDIS__URL": stack.config.redis_url,
                "INFERQ_MODELS_DIR": str(root / "models"),
                "INFERQ_SERVED_MODELS": "mlp",
                "INFERQ_HTTP_PORT": str(port),
                "INFERQ_TORCH_THREADS": "1",
                "INFERQ_DEVICE": "cpu",
                "INFERQ_LOG_LEVEL": "warning",
            }
            command = [sys.executable, "-m", "workers", "--procs", "1"]
            with (root / "worker.log").open("wb") as log:
                worker = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            try:
                asyncio.run(wait_until_ready(worker, port=port, timeout_s=120))
                settings = ProducerSettings(
                    kafka=KafkaSettings(bootstrap_servers=stack.config.bootstrap_servers),
                    redis=RedisSettings(url=stack.config.redis_url),
                )
                rows = asyncio.run(measure(args, settings))
            finally:
                worker.terminate()
                worker.wait(timeout=60)
    table = Table(title=f"{args.calls:,} concurrent infer calls from one client")
    for column in ("round", "mode", "answered", "seconds", "calls/s", "client CPU us/call"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["round"]), str(row["mode"]), f"{row['answered']:,.0f}",
                      f"{row['seconds']:.1f}", f"{row['calls_per_s']:,.0f}",
                      f"{row['cpu_us_per_call']:,.0f}")  # fmt: skip
    console.print(table)
    path = RESULTS / f"client-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"calls": args.calls, "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
