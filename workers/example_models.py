"""Deterministic example models written as a model repository, for demos and tests.

    python -m workers.example_models --out models

Weights come from fixed seeds, so the same version is byte-identical on every run.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.models import (
    CONFIG_FILENAME,
    MODEL_FILENAME,
    ModelConfig,
    TensorSpec,
    torchscript_deprecation_silenced,
)


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
    config: ModelConfig


def _fp32(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name=name, datatype="FP32", shape=shape)


_MLP_CONFIG = ModelConfig(inputs=(_fp32("input", 784),), outputs=(_fp32("logits", 10),))

EXAMPLE_MODELS: tuple[ExampleModel, ...] = (
    ExampleModel(name="mlp", version=1, seed=1, build=MLP, config=_MLP_CONFIG),
    ExampleModel(name="mlp", version=2, seed=2, build=MLP, config=_MLP_CONFIG),
    ExampleModel(
        name="cnn",
        version=1,
        seed=3,
        build=SmallCNN,
        config=ModelConfig(inputs=(_fp32("input", 3, 64, 64),), outputs=(_fp32("logits", 10),)),
    ),
)


def build_example(example: ExampleModel) -> torch.jit.ScriptModule:
    """The example's TorchScript module, its weights drawn from its seed (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(example.seed)
        module = example.build().eval()
    with torchscript_deprecation_silenced():
        scripted: torch.jit.ScriptModule = torch.jit.script(module)
    return scripted


def write_model(
    *, root: Path, name: str, version: int, module: torch.jit.ScriptModule, config: ModelConfig
) -> Path:
    """Write `{root}/{name}/{version}/` (model.pt, config.json with its sha256); return that dir."""
    version_dir = root / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    module_path = version_dir / MODEL_FILENAME
    module.save(str(module_path))
    digest = hashlib.sha256(module_path.read_bytes()).hexdigest()
    config = config.model_copy(update={"sha256": digest})
    (version_dir / CONFIG_FILENAME).write_text(config.model_dump_json(indent=2) + "\n")
    return version_dir


def write_example_models(root: Path) -> list[Path]:
    """Write every example model under `root`, replacing earlier copies; return the version dirs."""
    return [
        write_model(
            root=root,
            name=example.name,
            version=example.version,
            module=build_example(example),
            config=example.config,
        )
        for example in EXAMPLE_MODELS
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the example models into a repository directory."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.example_models",
        description="Write deterministic example TorchScript models and their config.json.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("models"), help="repository root (default: models)"
    )
    args = parser.parse_args(argv)
    for version_dir in write_example_models(args.out):
        print(version_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
