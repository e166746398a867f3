"""What metrics and logging cost the worker at full load: the same bursts with them on and off.

    python bench/observability.py [--count 30000] [--rounds 5] [--model mlp]

Each round runs `bench/hotpath.py`'s burst (the real loop over in-memory Kafka and sinks, the
model on the runner's thread) twice in this one process, in alternating order:

- **on**: as in production: `WorkerMetrics` on a registry, structlog configured by
  `workers.logging.configure_logging` at `info` with JSON lines (sent to /dev/null);
- **off**: every metric call a no-op (`NullMetrics`), and logging filtered above `critical`.

The figures are the medians over rounds of the loop thread's CPU per request and of requests
per second; the cost is on's over off's, minus one. Writes
bench/results/{date}-observability.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from datetime import UTC, datetime
from typing import Any

import torch

from bench.hotpath import RESULTS_DIR, encoded_requests, one_burst
from workers.example_models import EXAMPLE_MODELS, write_example_models
from workers.logging import configure_logging
from workers.metrics import WorkerMetrics


class _NoOp:
    """Stands in for a metric, or a labelled child of one: every call does nothing."""

    def labels(self, *args: object, **kwargs: object) -> _NoOp:
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class NullMetrics(WorkerMetrics):
    """`WorkerMetrics` with every metric replaced by a no-op: the worker's code unchanged."""

    def __init__(self) -> None:
        super().__init__()
        for name in list(vars(self)):
            if name != "registry":
                setattr(self, name, _NoOp())

    def answered_many(self, counts: Any) -> None:
        pass


def quiet_stderr() -> None:
    """Send stderr (where the logs go) to /dev/null, so the terminal is not the cost."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="mlp", choices=sorted({e.name for e in EXAMPLE_MODELS}))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    values = encoded_requests(args.model, args.count)
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    real_stdout = sys.stdout
    quiet_stderr()
    with tempfile.TemporaryDirectory() as models:
        write_example_models(Path(models))
        for round_ in range(args.rounds):
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for mode in order:
                configure_logging(level="info" if mode == "on" else "critical", json=True)
                metrics = WorkerMetrics() if mode == "on" else NullMetrics()
                run = asyncio.run(
                    one_burst(Path(models), values, model=args.model, profile=None,
                              metrics=metrics)
                )  # fmt: skip
                runs[mode].append(run)
                print(json.dumps({"round": round_, "mode": mode, **run}), file=real_stdout)
    summary: dict[str, Any] = {}
    for mode, mode_runs in runs.items():
        summary[mode] = {
            "loop_cpu_us_per_request": statistics.median(
                r["loop_cpu_us_per_request"] for r in mode_runs
            ),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in mode_runs),
        }
    on, off = summary["on"], summary["off"]
    summary["loop_cpu_cost_pct"] = round(
        (on["loop_cpu_us_per_request"] / off["loop_cpu_us_per_request"] - 1) * 100, 2
    )
    summary["throughput_cost_pct"] = round(
        (off["requests_per_s"] / on["requests_per_s"] - 1) * 100, 2
    )
    print(
        f"\n{args.model}, {args.count} requests, median of {args.rounds} rounds: loop CPU per "
        f"request {on['loop_cpu_us_per_request']} us on, {off['loop_cpu_us_per_request']} us "
        f"off ({summary['loop_cpu_cost_pct']:+}%); {on['requests_per_s']} vs "
        f"{off['requests_per_s']} requests/s ({summary['throughput_cost_pct']:+}%)",
        file=real_stdout,
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    path = RESULTS_DIR / f"{stamp}-observability.json"
    record = {"model": args.model, "count": args.count, "runs": runs, **summary}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=real_stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
