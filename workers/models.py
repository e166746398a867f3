"""A minimal model repository: `{root}/{name}/{version}/model.pt` + `config.json`, loaded once."""

from __future__ import annotations

import hashlib
import time
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NamedTuple, Protocol

import pydantic
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.tensors import Datatype
from workers.errors import (
    DtypeMismatchError,
    InferenceFailedError,
    InputNameMismatchError,
    ModelLoadError,
    ShapeMismatchError,
    UnknownModelError,
    UnknownVersionError,
)

log = structlog.get_logger(__name__)

MODEL_FILENAME = "model.pt"
CONFIG_FILENAME = "config.json"
VARIABLE_DIM = -1
"""A dimension of a `TensorSpec.shape` that accepts any size."""

# The wire datatype names (see `schemas.tensors.Datatype`) and the torch dtype of each.
TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
_DATATYPES_BY_DTYPE: Mapping[torch.dtype, str] = {
    dtype: name for name, dtype in TORCH_DTYPES.items()
}


def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of a wire datatype name such as `FP32`."""
    try:
        return TORCH_DTYPES[datatype]
    except KeyError:
        raise DtypeMismatchError(f"unknown datatype {datatype!r}") from None


def datatype_of(dtype: torch.dtype) -> str:
    """The wire datatype name of a torch dtype; DtypeMismatchError for one inferq can't carry."""
    try:
        return _DATATYPES_BY_DTYPE[dtype]
    except KeyError:
        raise DtypeMismatchError(f"torch dtype {dtype} has no inferq datatype") from None


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Silence torch's FutureWarning that `torch.jit.*` is deprecated (TorchScript is our format).

    `warnings.catch_warnings` is not thread-safe: use it at startup and in tools only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning
        )
        yield


def _format_shape(shape: Sequence[int], *, batch: object = None) -> str:
    """`[2, 784]`, or with `batch` given `[batch, 784]`: a spec shape behind a batch dimension."""
    dims = [str(dim) for dim in shape] if batch is None else [str(batch), *map(str, shape)]
    return "[" + ", ".join(dims) + "]"


class TensorSpec(BaseModel):
    """One named input or output of a model; `shape` excludes the batch dimension."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    datatype: str
    shape: tuple[int, ...]
    """Dimensions after the batch dimension; -1 accepts any size."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in TORCH_DTYPES:
            raise ValueError(f"unknown datatype {value!r}, expected one of {list(TORCH_DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _valid_dims(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim < 1 and dim != VARIABLE_DIM for dim in value):
            raise ValueError(f"dimensions must be positive or -1, got {_format_shape(value)}")
        return value

    def accepts_row_shape(self, row_shape: Sequence[int]) -> bool:
        """Whether a tensor whose shape after the batch dimension is `row_shape` fits."""
        return len(row_shape) == len(self.shape) and all(
            expected in (VARIABLE_DIM, actual)
            for expected, actual in zip(self.shape, row_shape, strict=True)
        )


class ModelConfig(BaseModel):
    """The content of a model version's `config.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: Annotated[tuple[TensorSpec, ...], Field(min_length=1)]
    """Inputs in the order the module takes them as positional arguments."""
    outputs: Annotated[tuple[TensorSpec, ...], Field(min_length=1)]
    """Outputs in the order (or with the names) the module returns them."""
    max_batch_size: Annotated[int, Field(ge=1)] = 32
    """Most rows (summed over requests) in one forward pass."""
    max_batch_delay_ms: Annotated[float, Field(ge=0.0)] = 5.0
    """Longest a request waits for a batch to fill, in milliseconds."""
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None
    """Hex SHA-256 of `model.pt`, checked at load when given."""

    @model_validator(mode="after")
    def _unique_names(self) -> ModelConfig:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            repeated = [name for name, n in Counter(s.name for s in specs).items() if n > 1]
            if repeated:
                raise ValueError(f"repeated {kind} names: {repeated}")
        return self


class InputSignature(NamedTuple):
    """What a request says about one input: its name, datatype and full shape (batch first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def signature_of(tensors: Mapping[str, torch.Tensor]) -> list[InputSignature]:
    """The signature of a request given as input name → tensor."""
    signatures = []
    for name, tensor in tensors.items():
        try:
            datatype = datatype_of(tensor.dtype)
        except DtypeMismatchError as error:
            raise DtypeMismatchError(f"input {name!r}: {error.message}") from None
        signatures.append(InputSignature(name, datatype, tuple(tensor.shape)))
    return signatures


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedModel:
    """One model version, loaded on its device and ready to run."""

    name: str
    version: int
    config: ModelConfig
    module: torch.nn.Module
    """A TorchScript module in production; any module taking the inputs positionally works."""
    device: torch.device

    input_datatypes: tuple[Datatype, ...] = field(init=False, repr=False, compare=False)
    """The wire datatype of each input, in `config.inputs` order."""
    output_datatypes: tuple[Datatype, ...] = field(init=False, repr=False, compare=False)
    """The wire datatype of each output, in `config.outputs` order."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name must not be empty")
        if self.version < 1:
            raise ValueError(f"model version must be a positive int, got {self.version}")
        for name, specs in (("input", self.config.inputs), ("output", self.config.outputs)):
            datatypes = tuple(Datatype(spec.datatype) for spec in specs)
            object.__setattr__(self, f"{name}_datatypes", datatypes)

    @property
    def label(self) -> str:
        """`name:version`, as used in messages and logs."""
        return f"{self.name}:{self.version}"

    def batch_rows(self, inputs: Sequence[InputSignature]) -> int:
        """The request's batch rows: the leading dimension, which all inputs must share."""
        rows = {signature.shape[0] for signature in inputs if signature.shape}
        if any(not signature.shape for signature in inputs):
            raise ShapeMismatchError(
                f"model {self.label}: every input needs a leading batch dimension",
                model=self.name,
                version=self.version,
            )
        if len(rows) != 1:
            found = {signature.name: signature.shape[0] for signature in inputs}
            raise ShapeMismatchError(
                f"model {self.label}: inputs disagree on the batch dimension: {found}",
                model=self.name,
                version=self.version,
            )
        (count,) = rows
        if count < 1:
            raise ShapeMismatchError(
                f"model {self.label}: batch dimension must be at least 1, got {count}",
                model=self.name,
                version=self.version,
            )
        return count

    def check_inputs(self, inputs: Sequence[InputSignature]) -> int:
        """Validate a request's inputs against the config; return its batch rows."""
        given = Counter(signature.name for signature in inputs)
        expected = [spec.name for spec in self.config.inputs]
        repeated = sorted(name for name, n in given.items() if n > 1)
        missing = [name for name in expected if name not in given]
        unexpected = sorted(set(given) - set(expected))
        if repeated or missing or unexpected:
            raise InputNameMismatchError(
                f"model {self.label} takes inputs {expected}; request has "
                f"missing={missing} unexpected={unexpected} repeated={repeated}",
                model=self.name,
                version=self.version,
            )
        by_name = {signature.name: signature for signature in inputs}
        for spec in self.config.inputs:
            signature = by_name[spec.name]
            if signature.datatype != spec.datatype:
                raise DtypeMismatchError(
                    f"model {self.label} input {spec.name!r}: datatype {signature.datatype}, "
                    f"expected {spec.datatype}",
                    model=self.name,
                    version=self.version,
                )
            if not signature.shape or not spec.accepts_row_shape(signature.shape[1:]):
                raise ShapeMismatchError(
                    f"model {self.label} input {spec.name!r}: shape "
                    f"{_format_shape(signature.shape)}, "
                    f"expected {_format_shape(spec.shape, batch='batch')}",
                    model=self.name,
                    version=self.version,
                )
        return self.batch_rows(inputs)

    def check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """`check_inputs` for a request given as input name → tensor; return its batch rows."""
        try:
            signatures = signature_of(tensors)
        except DtypeMismatchError as error:
            raise DtypeMismatchError(
                f"model {self.label} {error.message}", model=self.name, version=self.version
            ) from None
        return self.check_inputs(signatures)

    def collect_outputs(self, result: object, *, rows: int) -> list[torch.Tensor]:
        """The module's result (tensor, tuple/list or dict) as a list in `config.outputs` order.

        Raises InferenceFailedError when it does not match the config or lacks `rows` rows.
        """
        specs = self.config.outputs
        tensors: list[object]
        if isinstance(result, torch.Tensor):
            tensors = [result]
        elif isinstance(result, tuple | list):
            tensors = list(result)
        elif isinstance(result, dict):
            missing = [spec.name for spec in specs if spec.name not in result]
            if missing:
                raise self._bad_output(f"returned a dict without outputs {missing}")
            tensors = [result[spec.name] for spec in specs]
        else:
            raise self._bad_output(f"returned a {type(result).__name__}")
        if len(tensors) != len(specs):
            raise self._bad_output(f"returned {len(tensors)} outputs, expected {len(specs)}")
        checked: list[torch.Tensor] = []
        for spec, tensor in zip(specs, tensors, strict=True):
            if not isinstance(tensor, torch.Tensor):
                raise self._bad_output(f"returned a {type(tensor).__name__} for {spec.name!r}")
            if tensor.dtype != torch_dtype(spec.datatype):
                raise self._bad_output(
                    f"returned {tensor.dtype} for {spec.name!r}, expected {spec.datatype}"
                )
            shape = tuple(tensor.shape)
            if not shape or shape[0] != rows or not spec.accepts_row_shape(shape[1:]):
                raise self._bad_output(
                    f"returned shape {_format_shape(shape)} for {spec.name!r}, expected "
                    f"{_format_shape(spec.shape, batch=rows)}"
                )
            checked.append(tensor)
        return checked

    def _bad_output(self, what: str) -> InferenceFailedError:
        return InferenceFailedError(
            f"model {self.label} {what}", model=self.name, version=self.version
        )


class ModelRepository(Protocol):
    """Where the worker finds the models it serves."""

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model; `version=None` means the latest loaded version."""
        ...

    def names(self) -> list[str]:
        """Names of the loaded models, sorted."""
        ...

    def models(self) -> list[LoadedModel]:
        """Every loaded model version, sorted by name then version."""
        ...


def _parse_version(entry: Path) -> int | None:
    """The version a directory entry stands for, or None when it is not a version directory."""
    if not entry.is_dir() or not entry.name.isdigit() or not entry.name.isascii():
        return None
    version = int(entry.name)
    return version if version >= 1 and str(version) == entry.name else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def warm_up(model: LoadedModel) -> None:
    """Run one forward pass of zeros at batch 1 (variable dims as 1) and check its outputs."""
    inputs = [
        torch.zeros(
            (1, *(1 if dim == VARIABLE_DIM else dim for dim in spec.shape)),
            dtype=torch_dtype(spec.datatype),
            device=model.device,
        )
        for spec in model.config.inputs
    ]
    with torch.inference_mode():
        model.collect_outputs(model.module(*inputs), rows=1)


class DirectoryModelRepository:
    """Models read from `{root}/{name}/{version}/` (TorchScript `model.pt` + `config.json`)."""

    def __init__(
        self,
        *,
        root: Path,
        device: torch.device,
        names: Collection[str] | None = None,
        warmup: bool = True,
    ) -> None:
        """Configure; nothing is read until `load()`.

        root: directory holding one subdirectory per model name.
        device: where modules are loaded (`map_location`) and run.
        names: model names to load; None loads every model under `root`.
        warmup: run one batch-1 forward of zeros per model at load to catch broken modules.
        """
        if isinstance(names, str):
            raise TypeError("names must be a collection of model names, not one string")
        if names is not None and (not names or not all(names)):
            raise ValueError(f"names must be None or non-empty model names, got {names!r}")
        self._root = root
        self._device = device
        self._wanted = frozenset(names) if names is not None else None
        self._warmup = warmup
        self._models: dict[str, dict[int, LoadedModel]] = {}

    def load(self) -> None:
        """Load every wanted model version; ModelLoadError when anything is broken.

        Blocking (file reads, deserialization, warm-up): call before serving starts.
        """
        if not self._root.is_dir():
            raise ModelLoadError(f"model repository {self._root} is not a directory")
        loaded: dict[str, dict[int, LoadedModel]] = {}
        for model_dir in sorted(self._root.iterdir()):
            name = model_dir.name
            if not model_dir.is_dir():
                log.info("ignoring repository entry", path=str(model_dir), reason="not a directory")
                continue
            if self._wanted is not None and name not in self._wanted:
                continue
            versions = self._load_versions(model_dir)
            if versions:
                loaded[name] = versions
            elif self._wanted is not None:
                raise ModelLoadError(f"model {name!r} has no version directories in {model_dir}")
            else:
                log.warning("ignoring repository entry", path=str(model_dir), reason="no versions")
        missing = sorted((self._wanted or frozenset()) - set(loaded))
        if missing:
            raise ModelLoadError(f"models {missing} not found in repository {self._root}")
        if not loaded:
            raise ModelLoadError(f"model repository {self._root} holds no models")
        self._models = loaded

    def _load_versions(self, model_dir: Path) -> dict[int, LoadedModel]:
        versions: dict[int, LoadedModel] = {}
        for entry in sorted(model_dir.iterdir()):
            version = _parse_version(entry)
            if version is None:
                log.info("ignoring repository entry", path=str(entry), reason="not a version")
                continue
            versions[version] = self._load_version(model_dir.name, version, entry)
        return versions

    def _load_version(self, name: str, version: int, version_dir: Path) -> LoadedModel:
        label = f"{name}:{version}"
        started = time.perf_counter()
        config_path = version_dir / CONFIG_FILENAME
        module_path = version_dir / MODEL_FILENAME
        try:
            config = ModelConfig.model_validate_json(config_path.read_bytes())
        except (OSError, pydantic.ValidationError) as error:
            raise ModelLoadError(
                f"model {label}: bad {config_path}: {error}", model=name, version=version
            ) from error
        if not module_path.is_file():
            raise ModelLoadError(
                f"model {label}: {module_path} is missing", model=name, version=version
            )
        if config.sha256 is not None:
            actual = _sha256(module_path)
            if actual != config.sha256:
                raise ModelLoadError(
                    f"model {label}: sha256 of {module_path} is {actual}, "
                    f"config.json says {config.sha256}",
                    model=name,
                    version=version,
                )
        try:
            with torchscript_deprecation_silenced():
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(module_path), map_location=self._device
                )
        except Exception as error:
            raise ModelLoadError(
                f"model {label}: cannot load {module_path}: {error}", model=name, version=version
            ) from error
        module.eval()
        model = LoadedModel(
            name=name, version=version, config=config, module=module, device=self._device
        )
        if self._warmup:
            try:
                warm_up(model)
            except Exception as error:
                raise ModelLoadError(
                    f"model {label}: warm-up forward failed: {error}", model=name, version=version
                ) from error
        log.info(
            "model loaded",
            model=name,
            version=version,
            device=str(self._device),
            load_ms=round((time.perf_counter() - started) * 1000.0, 3),
        )
        return model

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model; `version=None` means the latest loaded version."""
        versions = self._models.get(name)
        if versions is None:
            raise UnknownModelError(
                f"model {name!r} is not served here; served: {self.names()}", model=name
            )
        if version is None:
            return versions[max(versions)]
        model = versions.get(version)
        if model is None:
            raise UnknownVersionError(
                f"model {name!r} has no version {version}; loaded: {sorted(versions)}",
                model=name,
                version=version,
            )
        return model

    def names(self) -> list[str]:
        """Names of the loaded models, sorted."""
        return sorted(self._models)

    def models(self) -> list[LoadedModel]:
        """Every loaded model version, sorted by name then version."""
        return [
            self._models[name][version]
            for name in self.names()
            for version in sorted(self._models[name])
        ]
