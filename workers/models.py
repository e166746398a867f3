"""What a model version is: its config (`config.json`), its signature, and the loaded module."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.tensors import Datatype
from workers.errors import (
    DtypeMismatchError,
    InferenceFailedError,
    InputNameMismatchError,
    ParameterError,
    ShapeMismatchError,
)
from workers.formats import FACTORY_PATTERN, Forward, ModelFormat

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


PARAMETER_DATATYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool,
    "INT64": torch.int64,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
"""What a request parameter may be: a scalar the model receives as a 0-d tensor."""

ParameterValue = bool | int | float
ResolvedParameters = tuple[tuple[str, ParameterValue], ...]
"""A request's parameters with the defaults filled in, sorted by name: part of its batch key."""


class ParameterSpec(BaseModel):
    """A keyword argument the model takes, set per request in its `parameters`.

    The module receives it as a 0-d tensor of `datatype` (so an exported program takes any
    value, not only the one it was exported with); requests batch only with requests whose
    parameters are equal.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
    datatype: str
    default: ParameterValue | None = None
    """The value when a request leaves it out; None: every request must give it."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in PARAMETER_DATATYPES:
            raise ValueError(
                f"parameter datatype {value!r} is not one of {list(PARAMETER_DATATYPES)}"
            )
        return value

    @model_validator(mode="after")
    def _default_fits(self) -> ParameterSpec:
        if self.default is not None and not self.accepts(self.default):
            raise ValueError(f"default {self.default!r} is not a {self.datatype}")
        return self

    def accepts(self, value: object) -> bool:
        """Whether a request's value can be this parameter (an int is a float; a bool is not
        a number)."""
        if self.datatype == "BOOL":
            return type(value) is bool
        if self.datatype == "INT64":
            return type(value) is int
        return type(value) in (int, float)

    def zero(self) -> ParameterValue:
        """The value used for warm-up when there is no default."""
        return {"BOOL": False, "INT64": 0}.get(self.datatype, 0.0)


PRECISIONS: Mapping[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


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
    format: ModelFormat | None = None
    """How the model file is stored; None: told by the file's name (see `workers.formats`)."""
    factory: Annotated[str | None, Field(pattern=FACTORY_PATTERN.pattern)] = None
    """`package.module:callable` building the module, for weights-only formats."""
    parameters: tuple[ParameterSpec, ...] = ()
    """Keyword arguments a request may (or, without a default, must) set in `parameters`."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """The floating dtype the module computes in: cast at load, inputs cast on the way in,
    outputs cast back to the datatypes declared here."""
    quantization: Literal["int8_dynamic"] | None = None
    """`int8_dynamic`: the module's `nn.Linear` layers are quantized at load (torchao: int8
    weights, activations quantized per batch)."""

    @model_validator(mode="after")
    def _unique_names(self) -> ModelConfig:
        for kind, specs in (
            ("input", self.inputs),
            ("output", self.outputs),
            ("parameter", self.parameters),
        ):
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


@dataclass(frozen=True, kw_only=True, slots=True, eq=False, weakref_slot=True)
class LoadedModel:
    """One model version, loaded on its device and ready to run.

    Compared and hashed by identity: a version loaded again is another `LoadedModel`.
    """

    name: str
    version: int
    config: ModelConfig
    module: Forward
    """Called with the batched inputs positionally (an `nn.Module`, an AOTInductor model)."""
    device: torch.device
    format: ModelFormat = ModelFormat.TORCH_EXPORT

    compute_dtype: torch.dtype | None = field(init=False, repr=False, compare=False)
    """The dtype floating inputs are cast to (`config.precision`); None for fp32."""
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
        object.__setattr__(self, "compute_dtype", PRECISIONS[self.config.precision])

    def forward(
        self, inputs: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor], *, rows: int
    ) -> list[torch.Tensor]:
        """Run the module on batched inputs; its outputs checked, in `config.outputs` order.

        At a reduced precision, floating inputs are cast to it and floating outputs back to
        their declared datatypes.
        """
        compute = self.compute_dtype
        if compute is not None:
            inputs = [t.to(compute) if t.is_floating_point() else t for t in inputs]
            kwargs = {k: t.to(compute) if t.is_floating_point() else t for k, t in kwargs.items()}
        return self.collect_outputs(self.module(*inputs, **kwargs), rows=rows)

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

    def resolve_parameters(self, given: Mapping[str, object]) -> ResolvedParameters:
        """A request's parameters checked against the config, defaults filled in, by name.

        ParameterError (VALIDATION_ERROR) for an unknown name, a missing required one, or a
        value of the wrong kind.
        """
        specs = self.config.parameters
        unknown = sorted(set(given) - {spec.name for spec in specs})
        if unknown:
            declared = [spec.name for spec in specs]
            raise ParameterError(
                f"model {self.label} takes parameters {declared}; request has unknown {unknown}",
                model=self.name, version=self.version,
            )  # fmt: skip
        resolved: list[tuple[str, ParameterValue]] = []
        for spec in specs:
            value = given.get(spec.name, spec.default)
            if value is None:
                raise ParameterError(
                    f"model {self.label} needs parameter {spec.name!r} ({spec.datatype})",
                    model=self.name, version=self.version,
                )  # fmt: skip
            if not spec.accepts(value):
                raise ParameterError(
                    f"model {self.label} parameter {spec.name!r}: {value!r} is not a "
                    f"{spec.datatype}",
                    model=self.name, version=self.version,
                )  # fmt: skip
            assert isinstance(value, bool | int | float)
            resolved.append((spec.name, value))
        return tuple(sorted(resolved))

    @property
    def default_parameters(self) -> ResolvedParameters | None:
        """The parameters of a request that sets none; None when one of them is required."""
        if any(spec.default is None for spec in self.config.parameters):
            return None
        return self.resolve_parameters({})

    def parameter_tensors(self, parameters: ResolvedParameters) -> dict[str, torch.Tensor]:
        """Resolved parameters as the 0-d tensors the module takes, on the model's device."""
        dtypes = {spec.name: PARAMETER_DATATYPES[spec.datatype] for spec in self.config.parameters}
        return {
            name: torch.tensor(value, dtype=dtypes[name], device=self.device)
            for name, value in parameters
        }

    def warm_up_parameters(self) -> dict[str, torch.Tensor]:
        """Each parameter's default (or zero) as the module takes it, for warm-up."""
        values = {
            spec.name: spec.default if spec.default is not None else spec.zero()
            for spec in self.config.parameters
        }
        return self.parameter_tensors(tuple(sorted(values.items())))

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
            declared = torch_dtype(spec.datatype)
            if (
                self.compute_dtype is not None
                and tensor.dtype == self.compute_dtype
                and declared.is_floating_point
            ):
                tensor = tensor.to(declared)
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
