"""Deterministic example models written as a model repository, for demos and tests.

    python -m workers.example_models --out models [--format torch_export]

Weights come from fixed seeds, so a version has the same weights in every format and run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.authoring import write_version
from workers.formats import ModelFormat
from workers.models import ModelConfig, TensorSpec
from workers.repository import ModelManifest, VersionPolicy


class MLP(nn.Module):
    """784 → 256 → ReLU → 10: a classifier of flattened 28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(784, 256)
        self.output = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.output(torch.relu(self.hidden(x)))
        return logits


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (the last two strided), average pooling, linear: 3x64x64 → 10.

    About 41 M multiply-adds a sample: small, yet enough that on a CPU the model, not Kafka,
    bounds the throughput (the compute-bound benchmark scenario).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        logits: torch.Tensor = self.classifier(torch.flatten(self.pool(x), 1))
        return logits


@dataclass(frozen=True, kw_only=True, slots=True)
class ExampleModel:
    """One example model version: how to build it, its seed and its signature."""

    name: str
    version: int
    seed: int
    """Seed of torch's generator while the weights are initialised."""
    build: Callable[[], nn.Module]
    factory: str
    """The same builder as `package.module:callable`, for the weights-only formats."""
    config: ModelConfig


def _fp32(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name=name, datatype="FP32", shape=shape)


_MLP_CONFIG = ModelConfig(inputs=(_fp32("input", 784),), outputs=(_fp32("logits", 10),))
_MLP_FACTORY = "workers.example_models:MLP"

EXAMPLE_MODELS: tuple[ExampleModel, ...] = (
    ExampleModel(
        name="mlp", version=1, seed=1, build=MLP, factory=_MLP_FACTORY, config=_MLP_CONFIG
    ),
    ExampleModel(
        name="mlp", version=2, seed=2, build=MLP, factory=_MLP_FACTORY, config=_MLP_CONFIG
    ),
    ExampleModel(
        name="cnn",
        version=1,
        seed=3,
        build=SmallCNN,
        factory="workers.example_models:SmallCNN",
        config=ModelConfig(inputs=(_fp32("input", 3, 64, 64),), outputs=(_fp32("logits", 10),)),
    ),
)

EXAMPLE_MANIFESTS = {"mlp": ModelManifest(version_policy=VersionPolicy(latest=2))}
"""Both mlp versions serve (requests may name either); cnn keeps the default, latest: 1."""


def build_example(example: ExampleModel) -> nn.Module:
    """The example's module in eval mode, its weights drawn from its seed (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(example.seed)
        return example.build().eval()


def write_example(
    root: Path,
    example: ExampleModel,
    fmt: ModelFormat = ModelFormat.TORCH_EXPORT,
    *,
    name: str | None = None,
    version: int | None = None,
) -> Path:
    """Write one example version in ``fmt`` (as ``name``/``version`` when given); its dir."""
    name = name or example.name
    return write_version(
        root=root,
        name=name,
        module=build_example(example),
        config=example.config,
        fmt=fmt,
        version=version or example.version,
        factory=example.factory,
        manifest=EXAMPLE_MANIFESTS.get(name),
    )


def write_example_models(root: Path, fmt: ModelFormat = ModelFormat.TORCH_EXPORT) -> list[Path]:
    """Write every example model under ``root`` in ``fmt``, replacing earlier copies."""
    return [write_example(root, example, fmt) for example in EXAMPLE_MODELS]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the example models into a repository directory."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.example_models",
        description="Write the deterministic example models (config.json, SHA256SUMS).",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("models"), help="repository root (default: models)"
    )
    parser.add_argument(
        "--format",
        choices=[fmt.value for fmt in ModelFormat],
        default=ModelFormat.TORCH_EXPORT.value,
        help="model file format (default: torch_export)",
    )
    args = parser.parse_args(argv)
    for version_dir in write_example_models(args.out, ModelFormat(args.format)):
        print(version_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
