"""Writing model versions into a repository: export, save in a format, checksum, rename.

A version is written under a temporary name in its model's directory, its `SHA256SUMS` last,
and renamed into place in one step; a worker polling the repository never sees half of one.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from schemas.names import check_model_name, check_model_version
from workers.checksums import write_checksums
from workers.formats import ModelFormat
from workers.models import (
    CONFIG_FILENAME,
    PARAMETER_DATATYPES,
    VARIABLE_DIM,
    ModelConfig,
    TensorSpec,
    datatype_of,
    torch_dtype,
)
from workers.repository import MANIFEST_FILENAME, ModelManifest, parse_version

EXPORT_EXAMPLE_ROWS = 2
"""Rows of the example batch given to torch.export: with 1, the batch dimension is fixed."""


def example_inputs(
    config: ModelConfig, rows: int = EXPORT_EXAMPLE_ROWS
) -> tuple[torch.Tensor, ...]:
    """Zeros of the config's inputs at ``rows`` rows (variable dims as 2), for export."""
    return tuple(
        torch.zeros(
            (rows, *(2 if dim == VARIABLE_DIM else dim for dim in spec.shape)),
            dtype=torch_dtype(spec.datatype),
        )
        for spec in config.inputs
    )


def export_program(module: torch.nn.Module, config: ModelConfig) -> torch.export.ExportedProgram:
    """``module`` exported with a dynamic batch dimension of 1 to `max_batch_size`.

    Variable dimensions of the config (-1) are exported dynamic too; the config's parameters
    are keyword arguments taking 0-d tensors.
    """
    # A Dim needs min < max: a model of one row at a time is exported at batch 1, static.
    batch = (
        torch.export.Dim("batch", min=1, max=config.max_batch_size)
        if config.max_batch_size > 1
        else None
    )
    dynamic: list[dict[int, object] | None] = []
    for index, spec in enumerate(config.inputs):
        dims: dict[int, object] = {} if batch is None else {0: batch}
        for position, dim in enumerate(spec.shape, start=1):
            if dim == VARIABLE_DIM:
                dims[position] = torch.export.Dim(f"{spec.name}_{position}_{index}")
        dynamic.append(dims or None)
    kwargs = {
        spec.name: torch.tensor(
            spec.default if spec.default is not None else spec.zero(),
            dtype=PARAMETER_DATATYPES[spec.datatype],
        )
        for spec in config.parameters
    }
    return torch.export.export(
        module.eval(),
        example_inputs(config, rows=min(EXPORT_EXAMPLE_ROWS, config.max_batch_size)),
        kwargs=kwargs,
        dynamic_shapes=(*dynamic, *(None for _ in kwargs)),
        strict=False,
    )


def config_from_example(
    module: torch.nn.Module,
    inputs: Sequence[tuple[str, torch.Tensor]],
    *,
    output_names: Sequence[str] | None = None,
    dynamic_dims: Sequence[tuple[str, int]] = (),
    max_batch_size: int = 32,
    max_batch_delay_ms: float = 5.0,
) -> ModelConfig:
    """A config inferred from an example batch: names, datatypes, shapes after the batch dim.

    dynamic_dims: (input name, dimension after the batch one) pairs written as -1.
    """
    with torch.inference_mode():
        result = module.eval()(*(tensor for _, tensor in inputs))
    outputs = (
        list(result.values())
        if isinstance(result, dict)
        else list(result)
        if isinstance(result, tuple | list)
        else [result]
    )
    if isinstance(result, dict):
        output_names = list(result)
    names = list(output_names or (["output"] if len(outputs) == 1 else
                                  [f"output_{i}" for i in range(len(outputs))]))  # fmt: skip
    dynamic = set(dynamic_dims)
    input_specs = tuple(
        TensorSpec(
            name=name,
            datatype=datatype_of(tensor.dtype),
            shape=tuple(
                VARIABLE_DIM if (name, position) in dynamic else size
                for position, size in enumerate(tensor.shape[1:])
            ),
        )
        for name, tensor in inputs
    )
    output_specs = tuple(
        TensorSpec(name=name, datatype=datatype_of(tensor.dtype), shape=tuple(tensor.shape[1:]))
        for name, tensor in zip(names, outputs, strict=True)
    )
    return ModelConfig(
        inputs=input_specs,
        outputs=output_specs,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=max_batch_delay_ms,
    )


def next_version(model_dir: Path) -> int:
    """One more than the newest version directory of ``model_dir`` (1 for a new model)."""
    if not model_dir.is_dir():
        return 1
    versions = [v for v in map(parse_version, model_dir.iterdir()) if v is not None]
    return max(versions, default=0) + 1


def default_cache_dir() -> Path:
    """Where compiled AOTInductor packages are kept between runs (outside any checkout)."""
    configured = os.environ.get("INFERQ_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "inferq"


def program_digest(program: torch.export.ExportedProgram) -> str:
    """A digest of what a program computes: its graph, shape ranges, weights and torch version.

    (`torch.export.save` does not write the same bytes twice, so its file cannot be the key.)
    """
    digest = hashlib.sha256(torch.__version__.encode())
    digest.update(program.graph_module.code.encode())
    digest.update(repr(sorted(map(str, program.range_constraints.values()))).encode())
    for name, tensor in sorted({**program.state_dict, **program.constants}.items()):
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            flat = tensor.detach().contiguous().cpu().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def compile_aot_inductor(
    program: torch.export.ExportedProgram, destination: Path, *, cache_dir: Path | None = None
) -> None:
    """Compile ``program`` into an AOTInductor package at ``destination`` (needs a compiler).

    Compiling takes tens of seconds on a small CPU, so packages are cached by
    `program_digest`: the same program compiles once per machine.
    """
    cache_root = (cache_dir or default_cache_dir()) / "aoti"
    cached = cache_root / f"{program_digest(program)}.pt2"
    if not cached.is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        from torch._inductor import aoti_compile_and_package

        partial = cache_root / f".{cached.stem}.{os.getpid()}.tmp.pt2"
        aoti_compile_and_package(program, package_path=str(partial))
        partial.replace(cached)
    shutil.copyfile(cached, destination)


def save_model_file(
    fmt: ModelFormat,
    module: torch.nn.Module,
    config: ModelConfig,
    destination: Path,
    *,
    cache_dir: Path | None = None,
) -> None:
    """Save ``module`` as ``fmt`` at ``destination`` (the format's file in a version dir)."""
    if fmt is ModelFormat.TORCH_EXPORT:
        torch.export.save(export_program(module, config), str(destination))
    elif fmt is ModelFormat.AOT_INDUCTOR:
        compile_aot_inductor(export_program(module, config), destination, cache_dir=cache_dir)
    elif fmt is ModelFormat.SAFETENSORS:
        from safetensors.torch import save_file

        state = {name: tensor.contiguous() for name, tensor in module.state_dict().items()}
        save_file(state, str(destination))
    elif fmt is ModelFormat.STATE_DICT:
        torch.save(module.state_dict(), str(destination))
    else:
        from workers.models import torchscript_deprecation_silenced

        with torchscript_deprecation_silenced():
            scripted = torch.jit.script(module.eval())
            scripted.save(str(destination))  # type: ignore[no-untyped-call]


def write_version(
    *,
    root: Path,
    name: str,
    module: torch.nn.Module,
    config: ModelConfig,
    fmt: ModelFormat = ModelFormat.TORCH_EXPORT,
    version: int | None = None,
    factory: str | None = None,
    manifest: ModelManifest | None = None,
    cache_dir: Path | None = None,
    check: Callable[[Path, int], None] | None = None,
) -> Path:
    """Write one version of model ``name`` atomically; return its directory.

    version: None writes the next one. An existing version directory is replaced.
    factory: `package.module:callable` building ``module``'s class, for weights-only formats.
    manifest: written as the model's `model.json` when given.
    check: called with the finished staging directory and the version number before it is
        renamed into place (raise to leave the repository as it was, e.g. a trial load).
    """
    if fmt.needs_factory and factory is None:
        raise ValueError(f"format {fmt.value} stores weights only: give the factory")
    check_model_name(name)  # the directory root / name must be inside the repository
    if version is not None:
        check_model_version(version)
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        _write_atomically(model_dir / MANIFEST_FILENAME, manifest.model_dump_json(indent=2))
    number = next_version(model_dir) if version is None else version
    config = config.model_copy(
        update={"format": fmt, "factory": factory if fmt.needs_factory else None}
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{number}.", suffix=".tmp", dir=model_dir))
    try:
        save_model_file(fmt, module, config, staging / fmt.filename, cache_dir=cache_dir)
        (staging / CONFIG_FILENAME).write_text(
            config.model_dump_json(indent=2, exclude_none=True) + "\n"
        )
        write_checksums(staging)
        if check is not None:
            check(staging, number)
        staging.chmod(0o755)
        final = model_dir / str(number)
        if not final.exists():
            staging.rename(final)
        elif exchange_paths(staging, final):
            shutil.rmtree(staging)  # now the old version
        else:  # no atomic exchange here: the version is briefly absent
            retired = model_dir / f".{number}.{os.getpid()}.old"
            final.rename(retired)
            try:
                staging.rename(final)
            except BaseException:
                retired.rename(final)
                raise
            shutil.rmtree(retired)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system cannot, so the caller falls back to two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    status = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text + "\n")
    partial.replace(path)
