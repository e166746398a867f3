"""Load time and steady throughput of the example CNN in each model format, on CPU.

    python bench/formats.py [--seconds 5] [--batch-size 32] [--threads 1]

Each format is written into a fresh repository (AOTInductor packages compile once per machine
and are cached) and loaded as a worker loads it (`VersionLoader`: checksums, load, warm-up at
batch 1, 2 and 32); the load is timed without the warm-up too. Throughput is the batched
forward on random FP32 inputs for `--seconds`, after a few untimed batches, each format as a
ratio to the raw eager module's forward measured in the same run. Prints a table and writes
`bench/results/formats-{date}.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from workers.example_models import EXAMPLE_MODELS, build_example, write_example
from workers.formats import ModelFormat
from workers.repository import VersionDir, VersionLoader

RESULTS = Path(__file__).parent / "results"
CNN = next(example for example in EXAMPLE_MODELS if example.name == "cnn")
FORMATS = (
    ModelFormat.TORCHSCRIPT,
    ModelFormat.TORCH_EXPORT,
    ModelFormat.AOT_INDUCTOR,
    ModelFormat.SAFETENSORS,
)
WARMUP_BATCHES = 5


def throughput(
    forward: Callable[..., object], batches: list[torch.Tensor], seconds: float
) -> float:
    """Rows per second of ``forward`` over ``batches`` in turn, for ``seconds``."""
    with torch.inference_mode():
        for batch in batches[:WARMUP_BATCHES]:
            forward(batch)
        done = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            forward(batches[done % len(batches)])
            done += 1
    return done * batches[0].shape[0] / elapsed


def load_seconds(entry: VersionDir, *, warmup: bool) -> float:
    started = time.perf_counter()
    VersionLoader(device=torch.device("cpu"), warmup=warmup)(entry)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, 64, 64, generator=generator) for _ in range(4)]
    raw = build_example(CNN)
    rows: list[dict[str, object]] = []
    raw_rate = throughput(raw, batches, args.seconds)
    rows.append({"format": "raw eager module", "rows_per_s": raw_rate, "ratio": 1.0})
    with tempfile.TemporaryDirectory() as scratch:
        for fmt in FORMATS:
            started = time.perf_counter()
            version_dir = write_example(Path(scratch), CNN, fmt, name=f"cnn-{fmt.value}")
            write_s = time.perf_counter() - started
            entry = VersionDir.at(version_dir)
            cold = load_seconds(entry, warmup=False)
            warm = load_seconds(entry, warmup=True)
            module = VersionLoader(device=torch.device("cpu"))(entry).model.module
            rate = throughput(module, batches, args.seconds)
            rows.append({
                "format": fmt.value, "write_s": write_s, "load_s": cold,
                "load_with_warmup_s": warm, "rows_per_s": rate, "ratio": rate / raw_rate,
            })  # fmt: skip
    # The raw forward again, last: the machine's speed drifts within a run.
    raw_again = throughput(raw, batches, args.seconds)
    table = Table(title=f"cnn on CPU, batch {args.batch_size}, {args.threads} thread(s)")
    for column in ("format", "load s", "load + warm-up s", "rows/s", "/ raw forward"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for row in rows:
        table.add_row(
            str(row["format"]),
            f"{row['load_s']:.3f}" if "load_s" in row else "",
            f"{row['load_with_warmup_s']:.3f}" if "load_s" in row else "",
            f"{row['rows_per_s']:,.0f}",
            f"{row['ratio']:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(f"raw forward again at the end: {raw_again:,.0f} rows/s "
                  f"({raw_again / raw_rate:.2f} of the first)")  # fmt: skip
    path = args.json or RESULTS / f"formats-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine": platform.platform(), "torch": torch.__version__, "batch_size": args.batch_size,
        "threads": args.threads, "seconds": args.seconds, "rows": rows,
        "raw_again_rows_per_s": raw_again,
    }, indent=2) + "\n")  # fmt: skip
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
