"""The worker's own Python per request: its real loop over in-memory Kafka and sinks.

    python bench/hotpath.py [--count 50000] [--model mlp] [--profile]

`Worker.serve(burst=True)` over `workers.memory` runs admission, batching, the runner,
answer encoding and offset tracking exactly as in production, with no broker and no Redis.
The figure that matters is the event-loop thread's CPU time per request (`time.thread_time`
on the loop thread): the model runs on the runner's thread and is not in it. `--profile`
adds cProfile's table of the loop thread's heaviest functions.

Writes bench/results/{date}-hotpath.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import cProfile
import io
import json
import logging
import pstats
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog
import torch

from schemas.codec import encode_request
from schemas.messages import InferenceRequest
from schemas.settings import KafkaSettings
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from workers.example_models import EXAMPLE_MODELS, write_example_models
from workers.memory import MemoryConsumer, MemoryPartition, MemoryRecord, MemoryWriter
from workers.metrics import WorkerMetrics
from workers.process import settle_garbage_collector
from workers.repository import DirectoryModelRepository
from workers.runner import ModelRunner
from workers.settings import WorkerSettings
from workers.worker import Worker

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFIX = "bench"
PARTITIONS = 8


def encoded_requests(model: str, count: int) -> list[bytes]:
    """``count`` single-row requests for ``model`` (version 1), msgpack-encoded."""
    (spec,) = next(e for e in EXAMPLE_MODELS if e.name == model).config.inputs
    rows = np.random.default_rng(0).standard_normal((count, 1, *spec.shape), dtype=np.float32)
    return [
        encode_request(
            InferenceRequest(
                id=f"h-{i}",
                model=model,
                version=1,
                created_ms=1,
                inputs=(Tensor.from_numpy(spec.name, row),),
            )
        )
        for i, row in enumerate(rows)
    ]


async def one_burst(
    models_dir: Path,
    values: list[bytes],
    *,
    model: str,
    profile: cProfile.Profile | None,
    metrics: WorkerMetrics | None = None,
) -> dict[str, Any]:
    settings = WorkerSettings(
        kafka=KafkaSettings(topic_prefix=PREFIX), models_dir=models_dir, worker_id="hotpath"
    )
    topic = TopicNames(prefix=PREFIX).requests(model)
    partitions = [MemoryPartition(topic, index) for index in range(PARTITIONS)]
    records: dict[MemoryPartition, list[MemoryRecord]] = {p: [] for p in partitions}
    for index, value in enumerate(values):
        records[partitions[index % PARTITIONS]].append(
            MemoryRecord(offset=len(records[partitions[index % PARTITIONS]]), value=value)
        )
    repository = DirectoryModelRepository(
        root=models_dir, device=torch.device("cpu"), names=[model]
    )
    repository.load()
    async with ModelRunner(device=torch.device("cpu"), num_threads=1) as runner:
        worker = Worker(
            settings=settings,
            repository=repository,
            runner=runner,
            metrics=metrics if metrics is not None else WorkerMetrics(),
        )
        writer = MemoryWriter(answers=worker._answer_builder)
        consumer = MemoryConsumer(records)
        settle_garbage_collector()  # as workers.process does after start-up
        started_cpu, started_wall = time.thread_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        await worker.serve(consumer=consumer, writer=writer, stop=asyncio.Event(), burst=True)
        if profile is not None:
            profile.disable()
        loop_cpu_s = time.thread_time() - started_cpu
        wall_s = time.perf_counter() - started_wall
    answered = len(writer.sent)
    assert answered == len(values), f"{answered} answers for {len(values)} requests"
    return {
        "requests": len(values),
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(values) / wall_s),
        "loop_cpu_us_per_request": round(loop_cpu_s / len(values) * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--model", default="mlp", choices=sorted({e.name for e in EXAMPLE_MODELS}))
    parser.add_argument("--runs", type=int, default=3, help="bursts; the best is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile the last burst")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    values = encoded_requests(args.model, args.count)
    runs = []
    with tempfile.TemporaryDirectory() as models:
        write_example_models(Path(models))
        for run in range(args.runs):
            profile = cProfile.Profile() if args.profile and run == args.runs - 1 else None
            runs.append(asyncio.run(one_burst(Path(models), values, model=args.model,
                                              profile=profile)))  # fmt: skip
            print(json.dumps(runs[-1]))
    best = min(runs, key=lambda r: r["loop_cpu_us_per_request"])
    print(f"\n{args.model}: {best['loop_cpu_us_per_request']} us of loop-thread CPU per request, "
          f"{best['requests_per_s']} requests/s in-process (best of {args.runs})")  # fmt: skip
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    path = RESULTS_DIR / f"{stamp}-hotpath.json"
    path.write_text(json.dumps({"model": args.model, "runs": runs, "best": best}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
