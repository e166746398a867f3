"""What callers hand the client and get back: arrays in, arrays out.

Inputs may be numpy arrays, torch tensors or `schemas.Tensor`s, given by name (a mapping) or
as named `Tensor`s; a result's outputs come back as numpy arrays by name (`Prediction`).
Torch is never imported here: a torch tensor is recognised by its type and read through
`.detach().cpu().numpy()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from schemas.messages import ErrorInfo, InferenceResult, ResultStatus, Timing
from schemas.tensors import Tensor

ArrayLike: TypeAlias = Any
"""A numpy array (or anything `np.asarray` takes), a `schemas.Tensor`, or a torch tensor."""
Inputs: TypeAlias = Mapping[str, ArrayLike] | Iterable[Tensor]
"""Input name → array, or named tensors."""


def _is_torch_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def as_tensor(name: str, value: ArrayLike) -> Tensor:
    """One named input as the wire's `Tensor` (no copy where the array allows it)."""
    if isinstance(value, Tensor):
        return value if value.name == name else Tensor.from_numpy(name, value.to_numpy(),
                                                                   value.datatype)  # fmt: skip
    if _is_torch_tensor(value):
        value = value.detach().cpu().numpy()
    return Tensor.from_numpy(name, np.asarray(value))


def as_tensors(inputs: Inputs) -> tuple[Tensor, ...]:
    """Every input as a named `Tensor`, in the order given."""
    if isinstance(inputs, Mapping):
        return tuple(as_tensor(name, value) for name, value in inputs.items())
    tensors = tuple(inputs)
    if not all(isinstance(tensor, Tensor) for tensor in tensors):
        raise TypeError("inputs must be a mapping of name to array, or schemas.Tensor objects")
    return tensors


@dataclass(frozen=True, slots=True)
class Prediction:
    """A request's answer: its outputs as numpy arrays by name, or why there are none."""

    id: str
    model: str
    version: int | None
    status: ResultStatus
    outputs: Mapping[str, NDArray[Any]]
    """Empty unless `ok`."""
    error: ErrorInfo | None
    timing: Timing | None
    result: InferenceResult
    """The result as decoded, for anything else it carries."""

    @classmethod
    def of(cls, result: InferenceResult) -> Prediction:
        """The prediction of ``result``."""
        return cls(
            id=result.id,
            model=result.model,
            version=result.version,
            status=result.status,
            outputs={tensor.name: tensor.to_numpy() for tensor in result.outputs},
            error=result.error,
            timing=result.timing,
            result=result,
        )

    @property
    def ok(self) -> bool:
        """Whether the model ran and `outputs` holds its answer."""
        return self.status is ResultStatus.OK

    @property
    def output(self) -> NDArray[Any]:
        """The only output, for models that have one."""
        (array,) = self.outputs.values()
        return array
