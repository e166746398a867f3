"""What exactly-once mode costs: one worker process draining the same requests in
at-least-once and in exactly-once mode (INFERQ_EXACTLY_ONCE), alternately, in one run.

    python bench/exactly_once.py [--count 50000] [--rounds 2] [--model mlp|cnn]

On a private real stack (Kafka + Redis on free ports), each run pre-publishes ``--count``
requests under a fresh prefix and drains them with ``inferq-worker --procs 1`` (closed
loop: from the worker's start to the last result in Redis, and its steady rate from the
first result to the last). Modes alternate, so a machine that drifts shows in both. Then
the results topic of each run is read with read_committed: its records, and its offsets
beyond them (transaction markers).

Prints a table and writes bench/results/{date}-exactly-once.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import statistics
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.table import Table

from bench.e2e import (
    INFERQ_KEYS_PER_ANSWER,
    RESULTS_DIR,
    SCENARIOS,
    Bench,
    Drain,
    Scenario,
    console,
    machine_facts,
)
from workers.example_models import write_example_models

MODES = {"at-least-once": "false", "exactly-once": "true"}


@dataclass
class Run:
    """One drain in one mode, and what its results topic holds."""

    mode: str
    drain: Drain
    result_records: int
    result_offsets: int
    """Sum of the results topic's end offsets: records plus transaction markers."""


@dataclass
class Report:
    when: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


async def results_topic_counts(bootstrap: str, topic: str, partitions: int) -> tuple[int, int]:
    """(committed records, sum of end offsets) of ``topic``, read with read_committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed",
    )  # fmt: skip
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        records = 0
        behind = set(assigned)
        while behind:
            for batch in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                records += len(batch)
            behind = {tp for tp in behind if await consumer.position(tp) < ends[tp]}
        return records, sum(ends.values())
    finally:
        await consumer.stop()


async def measure(bench: Bench, scenario: Scenario, mode: str) -> Run:
    prefix = f"eos{uuid.uuid4().hex[:8]}"
    keys = await bench.prepare(scenario, prefix)
    env = bench.worker_env(prefix, f"{prefix}-workers", http_port=0)
    env["INFERQ_SERVED_MODELS"] = scenario.model
    env["INFERQ_EXACTLY_ONCE"] = MODES[mode]
    drain = await bench.drain(
        f"{mode}", [sys.executable, "-m", "workers", "--procs", "1"], env=env,
        expected=len(keys), cap_s=600, keys_per_answer=INFERQ_KEYS_PER_ANSWER,
    )  # fmt: skip
    records, offsets = await results_topic_counts(
        bench.bootstrap, f"{prefix}.results.{scenario.model}", scenario.partitions
    )
    return Run(mode=mode, drain=drain, result_records=records, result_offsets=offsets)


def summarise(report: Report) -> None:
    for mode in MODES:
        runs = [run for run in report.runs if run.mode == mode]
        report.summary[f"{mode} rate /s"] = statistics.median(r.drain.rate_per_s for r in runs)
        report.summary[f"{mode} steady /s"] = statistics.median(
            r.drain.steady_rate_per_s for r in runs
        )
    for kind in ("rate", "steady"):
        at_least, exactly = (report.summary[f"{mode} {kind} /s"] for mode in MODES)
        report.summary[f"exactly-once / at-least-once ({kind})"] = exactly / at_least


def print_report(report: Report) -> None:
    table = Table(title=f"exactly-once cost ({report.machine['cores']} cores)")
    for column in ("mode", "rate /s", "steady /s", "answered", "seconds", "records", "markers"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for run in report.runs:
        table.add_row(
            run.mode, f"{run.drain.rate_per_s:,.0f}", f"{run.drain.steady_rate_per_s:,.0f}",
            f"{run.drain.answered:,}", f"{run.drain.seconds_from_start:.1f}",
            f"{run.result_records:,}", f"{run.result_offsets - run.result_records:,}",
        )  # fmt: skip
    console.print(table)
    for name, value in report.summary.items():
        console.print(f"  {name}: {value:,.2f}")


async def main_async(args: argparse.Namespace) -> int:
    base = SCENARIOS["overhead" if args.model == "mlp" else "compute"]
    scenario = Scenario(**{**asdict(base), "count": args.count})
    report = Report(
        when=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_facts(),
        settings={"model": scenario.model, "count": scenario.count, "rounds": args.rounds,
                  "partitions": scenario.partitions, "threads": args.threads,
                  "worker_processes": 1},
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="inferq-bench-eos-") as tmp:
        bench = Bench(root=Path(tmp), threads=args.threads)
        await asyncio.to_thread(bench.stack.up)
        try:
            write_example_models(bench.models_dir)
            for _ in range(args.rounds):
                for mode in MODES:
                    report.runs.append(await measure(bench, scenario, mode))
        finally:
            await bench.redis.aclose()
            await asyncio.to_thread(bench.stack.down)
    summarise(report)
    print_report(report)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{report.when[:10]}-exactly-once.json"
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/exactly_once.py", description=__doc__)
    parser.add_argument("--count", type=int, default=50_000, help="requests per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
