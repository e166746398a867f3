"""Model file formats: one loader each, behind one small interface.

A version directory holds exactly one model file, and its name says its format:

| file | format | loaded with |
|---|---|---|
| `model.pt2` | torch.export program (recommended) | `torch.export.load(...).module()` |
| `model.aoti.pt2` | AOTInductor package (compiled) | `torch._inductor.aoti_load_package` |
| `model.safetensors` | weights + the config's `factory` | `safetensors.torch.load_file` |
| `model.pth` | state dict + the config's `factory` | `torch.load(weights_only=True)` |
| `model.pt` | TorchScript (deprecated) | `torch.jit.load` |

Loaders read a local file; a store elsewhere (an object store) would fetch the version
directory first and hand its path over. Nothing is unpickled except through
`torch.load(weights_only=True)`, which builds tensors and containers only.
"""

from __future__ import annotations

import importlib
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from workers.errors import ModelLoadError

log = structlog.get_logger(__name__)

Forward = Callable[..., object]
"""What a loaded model is to the runner: called with the batched inputs, positionally."""

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
"""`package.module:callable`, as in a console-script entry point."""


class ModelFormat(StrEnum):
    """How a model version is stored; each has one file name (see the module docstring)."""

    TORCH_EXPORT = "torch_export"
    AOT_INDUCTOR = "aot_inductor"
    SAFETENSORS = "safetensors"
    STATE_DICT = "state_dict"
    TORCHSCRIPT = "torchscript"

    @property
    def filename(self) -> str:
        """The model file of this format in a version directory."""
        return MODEL_FILENAMES[self]

    @property
    def needs_factory(self) -> bool:
        """Whether the file holds weights only, so the config's `factory` builds the module."""
        return self in (ModelFormat.SAFETENSORS, ModelFormat.STATE_DICT)

    @property
    def deprecated(self) -> bool:
        """Whether the format is kept only for existing users."""
        return self is ModelFormat.TORCHSCRIPT


MODEL_FILENAMES: Mapping[ModelFormat, str] = {
    ModelFormat.TORCH_EXPORT: "model.pt2",
    ModelFormat.AOT_INDUCTOR: "model.aoti.pt2",
    ModelFormat.SAFETENSORS: "model.safetensors",
    ModelFormat.STATE_DICT: "model.pth",
    ModelFormat.TORCHSCRIPT: "model.pt",
}


def detect_format(version_dir: Path) -> ModelFormat:
    """The format of the one model file in ``version_dir``; ModelLoadError for none or two."""
    found = [fmt for fmt, name in MODEL_FILENAMES.items() if (version_dir / name).is_file()]
    if len(found) != 1:
        names = sorted(MODEL_FILENAMES.values())
        what = "no model file" if not found else f"{len(found)} model files"
        raise ModelLoadError(f"{version_dir} has {what}; expected exactly one of {names}")
    return found[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadRequest:
    """What a loader needs: the file, the device, and the factory for weights-only formats."""

    path: Path
    device: torch.device
    factory: str | None = None
    label: str = ""
    """`name:version`, for log lines."""


class ModelLoader(Protocol):
    """Loads one format's file into something the runner can call."""

    def __call__(self, request: LoadRequest) -> Forward: ...


def load_model_file(fmt: ModelFormat, request: LoadRequest) -> Forward:
    """Load ``request.path`` as ``fmt``; ModelLoadError with the cause when it cannot be."""
    if fmt.needs_factory and request.factory is None:
        raise ModelLoadError(f"{fmt.filename} holds weights only: config.json needs a factory")
    try:
        return LOADERS[fmt](request)
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{request.path.name} is not a plain-weights checkpoint (refused by "
            f"torch.load(weights_only=True)): {_first_line(error)}"
        ) from error
    except Exception as error:
        raise ModelLoadError(
            f"cannot load {request.path.name} as {fmt.value}: {_first_line(error)}"
        ) from error


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint that only a full unpickler could read: it is never unpickled."""

    reason = "unsafe_checkpoint"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_torch_export(request: LoadRequest) -> Forward:
    program = torch.export.load(str(request.path))
    if request.device.type != "cpu":
        # Moves the program's lifted constants too, which `Module.to` would leave behind.
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, request.device)
    module: torch.nn.Module = program.module()
    return module


def _load_aot_inductor(request: LoadRequest) -> Forward:
    from torch._inductor import aoti_load_package

    device_index = request.device.index if request.device.type == "cuda" else -1
    loaded: Forward = aoti_load_package(
        str(request.path), device_index=-1 if device_index is None else device_index
    )
    return loaded


def build_from_factory(factory: str) -> torch.nn.Module:
    """Import and call ``package.module:callable``; it must return a `torch.nn.Module`."""
    if not FACTORY_PATTERN.match(factory):
        raise ModelLoadError(f"factory {factory!r} is not of the form package.module:callable")
    module_name, _, attribute = factory.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"factory {factory!r} cannot be imported: {error}") from error
    built = target()
    if not isinstance(built, torch.nn.Module):
        raise ModelLoadError(f"factory {factory!r} returned a {type(built).__name__}, not a module")
    return built


def _with_weights(request: LoadRequest, weights: Mapping[str, torch.Tensor]) -> Forward:
    assert request.factory is not None
    module = build_from_factory(request.factory)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(
            f"weights in {request.path.name} do not fit factory {request.factory}: "
            f"{_first_line(error)}"
        ) from error
    return module.to(request.device).eval()


def _load_safetensors(request: LoadRequest) -> Forward:
    from safetensors.torch import load_file

    return _with_weights(request, load_file(str(request.path), device=str(request.device)))


def _load_state_dict(request: LoadRequest) -> Forward:
    state: Any = torch.load(str(request.path), map_location=request.device, weights_only=True)
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ModelLoadError(f"{request.path.name} does not hold a state dict (name → tensor)")
    return _with_weights(request, state)


def _load_torchscript(request: LoadRequest) -> Forward:
    # The deprecation warning is recorded and logged once per model version, not printed
    # (or silenced) process-wide. Loads run one at a time on the loader thread.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(request.path), map_location=request.device
        )
    for warning in caught:
        # Only torch.jit's own deprecation is ours to log; anything else (from this thread or
        # another, while the filter was in place) goes back to the warnings machinery.
        if issubclass(warning.category, FutureWarning) and "torch.jit" in str(warning.message):
            log.warning(
                "model format deprecated",
                model=request.label,
                format=ModelFormat.TORCHSCRIPT.value,
                advice="re-export it with torch.export (inferq-model add --format torch_export)",
                torch_warning=str(warning.message).splitlines()[0],
            )
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    scripted: torch.nn.Module = module.eval()
    return scripted


LOADERS: Mapping[ModelFormat, ModelLoader] = {
    ModelFormat.TORCH_EXPORT: _load_torch_export,
    ModelFormat.AOT_INDUCTOR: _load_aot_inductor,
    ModelFormat.SAFETENSORS: _load_safetensors,
    ModelFormat.STATE_DICT: _load_state_dict,
    ModelFormat.TORCHSCRIPT: _load_torchscript,
}
