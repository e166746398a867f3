"""`inferq-model`: add, validate and list the versions of a model repository.

    inferq-model add models fraud --factory mypkg.models:build --weights w.safetensors \\
        --example batch.npy                      # writes models/fraud/{next}/ atomically
    inferq-model validate models                 # loads and warms up every version
    inferq-model list models                     # what is on disk
    inferq-model list --worker http://host:9400  # what a running worker serves

From a checkout, `python -m workers.model_cli` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from schemas.names import model_name_argument
from workers.authoring import config_from_example, example_inputs, write_version
from workers.errors import ModelLoadError
from workers.formats import ModelFormat, build_from_factory, detect_format
from workers.models import CONFIG_FILENAME, LoadedModel, ModelConfig, torch_dtype
from workers.repository import (
    LoadedVersion,
    ModelManifest,
    VersionDir,
    VersionLoader,
    VersionPolicy,
    scan_repository,
)

console = Console(width=None if sys.stdout.isatty() else 240)
"""Rows are not wrapped when the output goes to a file or a pipe."""
WORKER_TIMEOUT_S = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="inferq-model", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add", help="write the next version of a model")
    add.add_argument("repository", type=Path)
    add.add_argument(
        "name", type=model_name_argument, help="model name (a letter or digit, then [A-Za-z0-9._-])"
    )
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--factory", help="package.module:callable that builds the nn.Module")
    source.add_argument("--file", type=Path, help="a torch.export program (.pt2) to re-export")
    add.add_argument("--weights", type=Path, help="state dict for --factory (.safetensors or .pth)")
    inputs = add.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--example", type=Path, help="an example batch (.npy), first dim = batch")
    inputs.add_argument(
        "--input",
        action="append",
        metavar="NAME:DATATYPE:DIMS",
        help="an input spec such as image:FP32:3,224,224 (repeat for more inputs)",
    )
    add.add_argument("--input-name", default="input", help="the --example input's name")
    add.add_argument("--output", action="append", help="output names, in order (default: output)")
    add.add_argument(
        "--dynamic", action="append", default=[], metavar="NAME:DIM",
        help="a dimension after the batch one that takes any size, as -1 (e.g. tokens:0)",
    )  # fmt: skip
    add.add_argument(
        "--format", choices=[f.value for f in ModelFormat], default=ModelFormat.TORCH_EXPORT.value
    )
    add.add_argument("--version", type=int, help="the version to write (default: the next)")
    add.add_argument("--max-batch-size", type=int, default=32)
    add.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    add.add_argument("--policy", help="write model.json's policy: latest:N, specific:1,3 or all")
    add.add_argument(
        "--quantization", choices=["int8_dynamic"],
        help="quantize the Linear layers at load (weights formats with a factory)",
    )  # fmt: skip
    add.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
        help="compute in this precision (outputs keep the example's datatypes)",
    )  # fmt: skip

    validate = commands.add_parser("validate", help="load and warm up every version")
    validate.add_argument("repository", type=Path)
    validate.add_argument("--device", default="cpu")

    listing = commands.add_parser("list", help="models and versions, on disk or in a worker")
    listing.add_argument("repository", type=Path, nargs="?")
    listing.add_argument("--worker", help="a worker's HTTP address, e.g. http://localhost:9400")

    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            return _add(args)
        if args.command == "validate":
            return _validate(args.repository, torch.device(args.device))
        if args.worker:
            return _list_worker(args.worker)
        if args.repository is None:
            parser.error("list needs a repository or --worker")
        return _list_repository(args.repository)
    except (ModelLoadError, ValueError, OSError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 1


def parse_policy(text: str) -> VersionPolicy:
    """`latest:2`, `specific:1,3` or `all`."""
    kind, _, value = text.partition(":")
    if kind == "all" and not value:
        return VersionPolicy(all=True)
    if kind == "latest":
        return VersionPolicy(latest=int(value))
    if kind == "specific":
        return VersionPolicy(specific=tuple(int(v) for v in value.split(",")))
    raise ValueError(f"policy {text!r}: expected latest:N, specific:1,3 or all")


def parse_input(text: str) -> tuple[str, torch.Tensor]:
    """`name:DATATYPE:d1,d2`: zeros of that input at 2 rows, for export."""
    try:
        name, datatype, dims = text.split(":")
        shape = tuple(int(d) for d in dims.split(",") if d)
    except ValueError:
        raise ValueError(
            f"input {text!r}: expected NAME:DATATYPE:DIMS such as x:FP32:784"
        ) from None
    return name, torch.zeros((2, *shape), dtype=torch_dtype(datatype))


def _module_of(args: argparse.Namespace) -> tuple[torch.nn.Module, str | None]:
    if args.file is not None:
        return torch.export.load(str(args.file)).module(), None
    module = build_from_factory(args.factory)
    if args.weights is not None:
        if args.weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(args.weights))
        else:
            state = torch.load(str(args.weights), map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    return module.eval(), args.factory


def _add(args: argparse.Namespace) -> int:
    module, factory = _module_of(args)
    if args.example is not None:
        inputs = [(args.input_name, torch.from_numpy(np.load(args.example)))]
    else:
        inputs = [parse_input(text) for text in args.input]
    dynamic = []
    for text in args.dynamic:
        name, _, dim = text.partition(":")
        dynamic.append((name, int(dim)))
    config = config_from_example(
        module,
        inputs,
        output_names=args.output,
        dynamic_dims=dynamic,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
    )
    config = config.model_copy(
        update={"precision": args.precision, "quantization": args.quantization}
    )
    fmt = ModelFormat(args.format)
    checked: list[LoadedVersion] = []
    manifest = (
        None if args.policy is None else ModelManifest(version_policy=parse_policy(args.policy))
    )
    version_dir = write_version(
        root=args.repository,
        name=args.name,
        module=module,
        config=config,
        fmt=fmt,
        version=args.version,
        factory=factory,
        manifest=manifest,
        check=lambda staging, version: checked.append(
            VersionLoader(device=torch.device("cpu"))(
                VersionDir.at(staging, name=args.name, version=version)
            )
        ),
    )
    console.print(
        f"wrote {version_dir} ({fmt.value}, checked first: it loads and warms up in "
        f"{checked[0].load_seconds:.2f} s)"
    )
    return 0


def _megabytes(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f} MiB"


def _validate(repository: Path, device: torch.device) -> int:
    loader = VersionLoader(device=device)
    table = Table("model", "version", "format", "state", "load s", "memory", "notes")
    failed = 0
    listings = scan_repository(repository)
    for name, listing in listings.items():
        if not listing.versions:
            table.add_row(name, "", "", "[red]failed[/red]", "", "", "no version directories")
            failed += 1
        for version, entry in listing.versions.items():
            try:
                loaded = loader(entry)
            except ModelLoadError as error:
                failed += 1
                note = f"{error.reason}: {error.message}"
                table.add_row(name, str(version), _format_on_disk(entry.path),
                              "[red]failed[/red]", "", "", note)  # fmt: skip
                continue
            served = version in listing.policy.select(listing.versions)
            notes = [] if served else [f"not served ({listing.policy.describe()})"]
            if loaded.model.config.quantization is not None:
                reference = VersionLoader(device=device, warmup=False, quantize=False)(entry)
                notes.append(compare_quantized(loaded.model, reference.model))
            table.add_row(
                name,
                str(version),
                loaded.model.format.value,
                "ok",
                f"{loaded.load_seconds:.2f}",
                _megabytes(loaded.memory_bytes),
                "; ".join(notes),
            )
    console.print(table)
    if not listings:
        console.print(f"[red]{repository} holds no models[/red]")
        return 1
    return 1 if failed else 0


def compare_quantized(model: LoadedModel, reference: LoadedModel, repeats: int = 20) -> str:
    """The quantized model against itself unquantized on one fixed batch: accuracy and speed."""
    rows = model.config.max_batch_size
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(example.shape, generator=generator).to(example.dtype)
        if example.is_floating_point() else torch.zeros_like(example)
        for example in example_inputs(model.config, rows)
    ]  # fmt: skip
    inputs = [tensor.to(model.device) for tensor in inputs]
    seconds = []
    outputs = []
    with torch.inference_mode():
        for candidate in (model, reference):
            candidate.forward(inputs, candidate.warm_up_parameters(), rows=rows)
            started = time.perf_counter()
            for _ in range(repeats):
                result = candidate.forward(inputs, candidate.warm_up_parameters(), rows=rows)
            seconds.append(time.perf_counter() - started)
            outputs.append(result)
    delta = max(float((q.double() - r.double()).abs().max()) for q, r in zip(*outputs, strict=True))
    return (
        f"{model.config.quantization}: max |delta| {delta:.4g} against "
        f"{model.config.precision}, {seconds[1] / seconds[0]:.2f}x its speed at batch {rows}"
    )


def _format_on_disk(version_dir: Path) -> str:
    try:
        config = ModelConfig.model_validate_json((version_dir / CONFIG_FILENAME).read_bytes())
        return (config.format or detect_format(version_dir)).value
    except Exception:
        return "?"


def _list_repository(repository: Path) -> int:
    table = Table("model", "version", "format", "policy", "served by the policy")
    for name, listing in scan_repository(repository).items():
        chosen = listing.policy.select(listing.versions)
        for version, entry in listing.versions.items():
            served = "yes" if version in chosen else "no"
            table.add_row(name, str(version), _format_on_disk(entry.path),
                          listing.policy.describe(), served)  # fmt: skip
    console.print(table)
    return 0


def _list_worker(url: str) -> int:
    with urllib.request.urlopen(f"{url.rstrip('/')}/models", timeout=WORKER_TIMEOUT_S) as reply:  # noqa: S310 - an operator's URL
        models = json.load(reply)["models"]
    table = Table("model", "version", "format", "state", "load s", "memory", "notes")
    for status in models:
        seconds = status.get("load_seconds")
        table.add_row(
            status["model"],
            str(status["version"]),
            status.get("format") or "",
            status["state"],
            "" if seconds is None else f"{seconds:.2f}",
            _megabytes(status.get("memory_bytes")),
            status.get("detail") or "",
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
