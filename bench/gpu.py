"""GPU benchmark: the worker's batcher and executor in-process, against the raw forward.

    python bench/gpu.py                      # CUDA, FP16: the CNN and a ResNet-50-sized net
    python bench/gpu.py --device cpu --dtype fp32 --requests 512   # the same path on a CPU

No Kafka here: single-row requests are fed to `workers.batcher.Batcher` as fast as it takes
them and run through `workers.runner.ModelRunner` (pinned host buffers, non-blocking copies,
one executor thread), the way a worker does once requests are decoded. The reference is the
model's batched forward at the same batch size on inputs already on the device. Prints a
table and writes bench/results/{date}-gpu.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from workers.batcher import Batcher, BatchPolicy
from workers.example_models import SmallCNN
from workers.models import LoadedModel, ModelConfig, TensorSpec
from workers.runner import ModelRunner

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
DTYPES = {"fp16": (torch.float16, "FP16"), "fp32": (torch.float32, "FP32")}
console = Console()


class Bottleneck(nn.Module):
    """ResNet's bottleneck block: 1x1 reduce, 3x3, 1x1 expand, with a projection when needed."""

    def __init__(self, channels_in: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out),
        )  # fmt: skip
        self.project = (
            nn.Sequential(nn.Conv2d(channels_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or channels_in != out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.project(x))


def resnet50_sized(classes: int = 1000) -> nn.Module:
    """ResNet-50's layout (3-4-6-3 bottlenecks, ~25.6M parameters) on 3x224x224 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    channels = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(channels, width, stride if index == 0 else 1))
            channels = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


@dataclass
class Row:
    model: str
    batch_size: int
    requests: int
    raw_samples_per_s: float
    inferq_samples_per_s: float
    ratio: float
    mean_batch: float


def loaded(
    name: str,
    module: nn.Module,
    row_shape: tuple[int, ...],
    classes: int,
    device: torch.device,
    dtype: torch.dtype,
    datatype: str,
    batch: int,
) -> LoadedModel:
    module = module.eval().to(device=device, dtype=dtype)
    config = ModelConfig(
        inputs=(TensorSpec(name="input", datatype=datatype, shape=row_shape),),
        outputs=(TensorSpec(name="logits", datatype=datatype, shape=(classes,)),),
        max_batch_size=batch,
        max_batch_delay_ms=2.0,
    )
    return LoadedModel(name=name, version=1, config=config, module=module, device=device)


def raw_rate(
    model: LoadedModel, row_shape: tuple[int, ...], batch: int, dtype: torch.dtype, seconds: float
) -> float:
    """Samples/s of the batched forward on device-resident inputs."""
    inputs = torch.randn((batch, *row_shape), device=model.device).to(dtype)
    with torch.inference_mode():
        for _ in range(5):
            model.module(inputs)
        synchronize(model.device)
        started = time.perf_counter()
        batches = 0
        while time.perf_counter() - started < seconds:
            model.module(inputs)
            batches += 1
            if batches % 10 == 0:
                synchronize(model.device)
        synchronize(model.device)
        return batches * batch / (time.perf_counter() - started)


async def inferq_rate(
    model: LoadedModel, row_shape: tuple[int, ...], requests: int, dtype: torch.dtype
) -> tuple[float, float]:
    """Samples/s through the batcher and the runner; and the mean batch size."""
    policy = BatchPolicy(
        max_batch_size=model.config.max_batch_size,
        max_batch_delay_ms=model.config.max_batch_delay_ms,
    )
    batcher: Batcher[str, tuple[np.ndarray, ...]] = Batcher(policy_for=lambda _key: policy)
    rows = [wire_array(torch.randn((1, *row_shape)).to(dtype)) for _ in range(64)]
    async with ModelRunner(device=model.device) as runner:
        await runner.run_batch(model, [(rows[0],)])  # warm-up
        started = time.perf_counter()
        for index in range(requests):
            batcher.add("k", (rows[index % len(rows)],), rows=1, received_at=started)
        done = batches = 0
        while done < requests:
            batch = batcher.pop_due(time.monotonic() + 3600)
            assert batch is not None
            outcome = await runner.run_batch(model, list(batch.items))
            done += len(outcome.outcomes)
            batches += 1
        return requests / (time.perf_counter() - started), requests / batches


def wire_array(tensor: torch.Tensor) -> np.ndarray:
    """A request row as the worker holds it after admission (BF16 as its raw uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def main_async(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]no CUDA device here: run `make bench-gpu` on a GPU machine[/red]")
        return 2
    dtype, datatype = DTYPES[args.dtype]
    cases = [
        ("cnn", SmallCNN(), (3, 64, 64), 10, args.batch),
        ("resnet50-sized", resnet50_sized(), (3, 224, 224), 1000, args.batch),
    ]
    table = Table(title=f"inferq batcher + runner vs raw forward ({device}, {args.dtype})")
    for column in ("model", "batch", "raw samples/s", "inferq samples/s", "ratio", "mean batch"):
        table.add_column(column, justify="right" if column != "model" else "left")
    rows: list[Row] = []
    for name, module, shape, classes, batch in cases:
        model = loaded(name, module, shape, classes, device, dtype, datatype, batch)
        raw = raw_rate(model, shape, batch, dtype, args.seconds)
        rate, mean_batch = await inferq_rate(model, shape, args.requests, dtype)
        row = Row(name, batch, args.requests, raw, rate, rate / raw, mean_batch)
        rows.append(row)
        table.add_row(name, str(batch), f"{raw:,.0f}", f"{rate:,.0f}", f"{row.ratio:.2f}",
                      f"{mean_batch:.1f}")  # fmt: skip
    console.print(table)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "rows": [asdict(row) for row in rows],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{report['when'][:10]}-gpu-{device.type}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
