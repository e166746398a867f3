"""Codec throughput against plain msgpack on the same message, measured in the same run.

    python bench/codec.py [--seconds 0.5]

For a 1x784 and a 32x3x224x224 FP32 request: requests/s of `encode_request` and
`decode_request` next to `msgpack.packb`/`msgpack.unpackb` of the same wire dict (the
reference: no validation, no tensor objects), and the ratio. Prints a table and writes
`bench/results/codec-{date}.json`.
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
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from rich.console import Console
from rich.table import Table

from schemas import ContentType, InferenceRequest, Tensor, decode_request, encode_request

RESULTS = Path(__file__).parent / "results"
SHAPES = {"1x784": (1, 784), "32x3x224x224": (32, 3, 224, 224)}


def rate(operation: Callable[[], object], seconds: float, repeats: int = 5) -> float:
    """Calls per second: the best of `repeats` runs of about `seconds` each."""
    calls = 1
    while True:  # grow the batch until one batch takes a tenth of the budget
        start = time.perf_counter()
        for _ in range(calls):
            operation()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 10:
            break
        calls *= 2
    per_run = max(1, int(calls * seconds / elapsed / 10) * 10 // 10)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_run):
            operation()
        best = max(best, per_run / (time.perf_counter() - start))
    return best


def measure(label: str, shape: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    request = InferenceRequest(
        id="req-0001",
        model="bench",
        inputs=[Tensor.from_numpy("input", array)],
        created_ms=1735689600000,
        deadline_ms=1735689605000,
    )
    payload = encode_request(request)
    wire = msgpack.unpackb(payload)  # the same dict, tensor data as bytes
    json_payload = encode_request(request, ContentType.JSON) if array.size < 10_000 else None
    rows = [
        {
            "message": label,
            "operation": "encode",
            "inferq_per_s": rate(lambda: encode_request(request), seconds),
            "msgpack_per_s": rate(lambda: msgpack.packb(wire), seconds),
        },
        {
            "message": label,
            "operation": "decode",
            "inferq_per_s": rate(lambda: decode_request(payload), seconds),
            "msgpack_per_s": rate(lambda: msgpack.unpackb(payload), seconds),
        },
        {
            "message": label,
            "operation": "decode + to_torch",
            "inferq_per_s": rate(lambda: decode_request(payload).inputs[0].to_torch(), seconds),
            "msgpack_per_s": rate(lambda: msgpack.unpackb(payload), seconds),
        },
    ]
    if json_payload is not None:
        rows.append(
            {
                "message": label,
                "operation": "decode JSON",
                "inferq_per_s": rate(
                    lambda: decode_request(json_payload, ContentType.JSON), seconds
                ),
                "msgpack_per_s": rate(lambda: json.loads(json_payload), seconds),
            }
        )
    for row in rows:
        row["ratio"] = row["inferq_per_s"] / row["msgpack_per_s"]
        row["payload_bytes"] = len(payload)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement, s")
    seconds = parser.parse_args().seconds
    rows = [row for label, shape in SHAPES.items() for row in measure(label, shape, seconds)]

    table = Table(title="inferq codec vs plain msgpack (requests/s; JSON rows vs json.loads)")
    for column in ("message", "operation", "inferq", "reference", "ratio"):
        table.add_column(column, justify="left" if column in {"message", "operation"} else "right")
    for row in rows:
        table.add_row(
            row["message"],
            row["operation"],
            f"{row['inferq_per_s']:,.0f}",
            f"{row['msgpack_per_s']:,.0f}",
            f"{row['ratio']:.2f}",
        )
    Console().print(table)

    RESULTS.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    target = RESULTS / f"codec-{now:%Y-%m-%d}.json"
    report = {
        "benchmark": "codec",
        "when": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "numpy": np.__version__,
        "seconds_per_measurement": seconds,
        "rows": rows,
    }
    target.write_text(json.dumps(report, indent=2) + "\n")
    Console().print(f"wrote {target}")


if __name__ == "__main__":
    main()
