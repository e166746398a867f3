"""``make demo``: the main job end to end on the local stack.

Starts Kafka and Redis (unless already up), writes the example models, starts a worker
(``inferq-worker``), publishes 10,000 requests for ``mlp``, waits for every result in Redis,
checks each against running the model directly, prints count, errors, throughput and
latency percentiles, then stops the worker (SIGTERM) and the stack it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deploy.local.stack import LocalStack, config_from_env, kafka_answers, redis_answers
from producers.client import InferenceClient
from producers.load import publish, random_requests
from producers.settings import ProducerSettings
from schemas.messages import InferenceRequest, InferenceResult, ResultStatus
from schemas.settings import KafkaSettings, RedisSettings
from schemas.topics import TopicNames
from workers.example_models import write_example_models
from workers.formats import ModelFormat
from workers.repository import open_version
from workers.topics import ensure_topics

console = Console(stderr=True)
DEMO_HTTP_PORT = 9400


def model_outputs(version_dir: Path, requests: Sequence[InferenceRequest]) -> np.ndarray:
    """The model version run directly on every request's (first) input, in order."""
    return forward_rows(version_dir, np.concatenate([r.inputs[0].to_numpy() for r in requests]))


def forward_rows(version_dir: Path, rows: np.ndarray) -> np.ndarray:
    """The model version's (first) output for ``rows``, run directly in batches it takes."""
    model = open_version(version_dir)
    step = model.config.max_batch_size  # an exported program takes no more rows at once
    parts = []
    with torch.inference_mode():
        for start in range(0, len(rows), step):
            batch = torch.from_numpy(np.ascontiguousarray(rows[start : start + step]))
            parts.append(model.forward([batch], {}, rows=len(batch))[0])
    outputs: np.ndarray = torch.cat(parts).numpy()
    return outputs


def check_against_model(
    version_dir: Path, requests: list[InferenceRequest], results: dict[str, InferenceResult]
) -> int:
    """How many ok results differ from running the model version directly."""
    expected = model_outputs(version_dir, requests)
    mismatches = 0
    for row, request in enumerate(requests):
        result = results[request.id]
        if result.status is ResultStatus.OK and not np.allclose(
            result.outputs[0].to_numpy(), expected[row : row + 1], rtol=1e-4, atol=1e-5
        ):
            mismatches += 1
    return mismatches


async def wait_until_ready(worker: subprocess.Popen[bytes], *, port: int, timeout_s: float) -> None:
    """Until the worker's /readyz answers 200 (it has joined its group)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode} before it was ready")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: demo\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the worker was not ready within {timeout_s:.0f}s")


async def run_demo(*, count: int, partitions: int, models_dir: Path, stack: LocalStack) -> int:
    config = stack.config
    kafka = KafkaSettings(bootstrap_servers=config.bootstrap_servers)
    topics = TopicNames(prefix=kafka.topic_prefix)
    # Made here (not left to the worker) to have the --partitions the demo asks for.
    await ensure_topics(
        kafka,
        [topics.requests("mlp"), topics.results("mlp")],
        partitions=partitions,
        replication_factor=1,
    )
    for version_dir in write_example_models(models_dir, ModelFormat.TORCH_EXPORT):
        console.print(f"wrote {version_dir} (a torch.export program, with its SHA256SUMS)")
    env = {
        **os.environ,
        "INFERQ_KAFKA__BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "INFERQ_REDIS__URL": config.redis_url,
        "INFERQ_MODELS_DIR": str(models_dir),
        "INFERQ_SERVED_MODELS": "mlp",
        "INFERQ_GROUP_ID": f"inferq-demo-{int(time.time())}",
        "INFERQ_LOG_JSON": "true",
        "INFERQ_HTTP_PORT": str(DEMO_HTTP_PORT),
        # The mlp is tiny: one torch thread leaves the other core to the event loop.
        "INFERQ_TORCH_THREADS": "1",
    }
    worker_log = config.run_dir / "demo-worker.log"
    console.print(f"starting the worker (log: {worker_log})")
    with worker_log.open("wb") as log_file:
        # Popen returns at once; the worker is awaited off the loop (asyncio.to_thread) below.
        worker = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "workers", "--procs", "1"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_until_ready(worker, port=DEMO_HTTP_PORT, timeout_s=120)
        settings = ProducerSettings(
            kafka=kafka, redis=RedisSettings(url=config.redis_url), result_poll_interval_ms=100
        )
        requests = random_requests(model="mlp", count=count, input_name="input", row_shape=[784])
        async with InferenceClient(settings=settings) as client:
            console.print(f"publishing {count} requests for mlp over {partitions} partitions")
            started = time.perf_counter()
            created_ms = await publish(client, requests)
            publish_s = time.perf_counter() - started
            results = await client.results([r.id for r in requests], timeout_s=300)
            elapsed_s = time.perf_counter() - started
        versions = {r.version for r in results.values()}
        mismatches = sum(
            check_against_model(
                models_dir / "mlp" / str(version),
                [q for q in requests if results[q.id].version == version],
                results,
            )
            for version in versions
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker_exit = await asyncio.to_thread(worker.wait, 60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker_exit = worker.wait()
    errors = sum(1 for r in results.values() if r.status is not ResultStatus.OK)
    latency_ms = np.array([results[i].created_ms - created_ms[i] for i in created_ms])
    batch_sizes = np.array([r.timing.batch_size for r in results.values() if r.timing])
    table = Table(title="inferq demo: mlp (784 -> 256 -> 10), 1x784 FP32 requests")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("requests", f"{count}"),
        ("results", f"{len(results)}"),
        ("errors", f"{errors}"),
        ("outputs differing from the model", f"{mismatches}"),
        ("publish time", f"{publish_s:.2f} s"),
        ("drain time (first send to last result)", f"{elapsed_s:.2f} s"),
        ("throughput", f"{count / elapsed_s:,.0f} requests/s"),
        ("latency p50 (created_ms to result)", f"{np.percentile(latency_ms, 50):.0f} ms"),
        ("latency p99", f"{np.percentile(latency_ms, 99):.0f} ms"),
        ("mean batch size", f"{batch_sizes.mean():.1f}"),
        ("worker exit code after SIGTERM", f"{worker_exit}"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    ok = len(results) == count and errors == 0 and mismatches == 0 and worker_exit == 0
    console.print("[green]demo passed[/green]" if ok else "[red]demo failed[/red]")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.demo", description=__doc__)
    parser.add_argument("--count", type=int, default=10_000, help="requests to publish")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the topic")
    args = parser.parse_args(argv)
    config = config_from_env()
    stack = LocalStack(config)
    already_up = redis_answers(config.host, config.redis_port) and kafka_answers(
        config.bootstrap_servers, timeout_s=3
    )
    if not already_up:
        console.print("starting the local stack (Kafka + Redis)")
        stack.up()
    try:
        return asyncio.run(
            run_demo(
                count=args.count,
                partitions=args.partitions,
                models_dir=config.run_dir / "models",
                stack=stack,
            )
        )
    finally:
        if not already_up:
            stack.down()


if __name__ == "__main__":
    sys.exit(main())
