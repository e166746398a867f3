"""Admission's fast path: the common request read straight from msgpack, nothing built.

A plain request (msgpack, under the zero-copy size, only known keys, no parameters, inputs
exactly as the model's fixed signature) is checked field by field on the unpacked map and
its input bytes become numpy views: no `InferenceRequest`, no `Tensor`, no torch tensor.
Anything else, valid or not, answers None and goes through the full codec, which also words
the error. A test pins that this never accepts what the full codec refuses and that both
read the same request alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import numpy as np
from numpy.typing import NDArray

from schemas.limits import CodecLimits
from schemas.messages import REQUEST_ID_PATTERN
from schemas.tensors import Datatype
from schemas.wire import plain_scalar_fields
from workers.fingerprint import digest_of, finish, single_input_hasher
from workers.models import VARIABLE_DIM, LoadedModel

if TYPE_CHECKING:
    from hashlib import _Hash as Hasher

PLAIN_KEYS: Final = frozenset(
    {"id", "model", "version", "inputs", "reply_to", "deadline_ms", "created_ms", "priority",
     "trace", "parameters"}
)  # fmt: skip
_TENSOR_KEYS: Final = frozenset({"name", "datatype", "shape", "data"})
_REQUEST_ID: Final = re.compile(REQUEST_ID_PATTERN)

ModelResolver = Callable[[str, "int | None"], "LoadedModel | None"]
"""The loaded model for (name, version or None for the latest), or None when not served."""


@dataclass(frozen=True, slots=True)
class PlainRequest:
    """A request read by the fast path: what admission needs of it, already checked."""

    request_id: str
    model: LoadedModel
    inputs: tuple[NDArray[Any], ...]
    """One array per model input, in `config.inputs` order (views on the record's bytes)."""
    rows: int
    reply_to: str | None
    deadline_ms: int | None
    created_ms: int | None
    priority: int
    digest: bytes
    trace: str | None


@dataclass(frozen=True, slots=True)
class _InputLayout:
    """One model input as the fast path expects it: fixed row shape, known item size."""

    index: int
    datatype: str
    row_shape: list[int]
    row_bytes: int
    dtype: np.dtype[Any]


@dataclass(frozen=True, slots=True)
class _ModelLayout:
    inputs: Mapping[str, _InputLayout]
    row_elements: int
    """Elements of one row summed over the inputs: bounds the element-count check."""


def _layout(model: LoadedModel) -> _ModelLayout | None:
    """The model's inputs as the fast path reads them; None when it cannot (variable dims,
    BOOL inputs whose bytes must each be 0 or 1, a parameter every request must give)."""
    if model.default_parameters is None:
        return None
    inputs: dict[str, _InputLayout] = {}
    for index, (spec, datatype) in enumerate(
        zip(model.config.inputs, model.input_datatypes, strict=True)
    ):
        if VARIABLE_DIM in spec.shape or datatype is Datatype.BOOL:
            return None
        elements = math.prod(spec.shape)
        inputs[spec.name] = _InputLayout(
            index=index,
            datatype=datatype.value,
            row_shape=list(spec.shape),
            row_bytes=elements * datatype.itemsize,
            dtype=datatype.numpy_dtype,
        )
    row_elements = max(math.prod(spec.shape) for spec in model.config.inputs)
    return _ModelLayout(inputs=inputs, row_elements=row_elements)


class FastReader:
    """Reads plain requests for the models of one repository; holds a layout per version."""

    def __init__(self, *, limits: CodecLimits) -> None:
        self._limits = limits
        self._max_bytes = min(limits.zero_copy_min_bytes, limits.max_message_bytes)
        self._layouts: dict[tuple[str, int], _ModelLayout | None] = {}
        self._hashers: dict[tuple[str, int | None, int], Hasher] = {}
        """Digest prefixes of one-input requests by (model, requested version, rows)."""

    def forget_models(self) -> None:
        """Drop the layouts and digest prefixes built per model version."""
        self._layouts.clear()
        self._hashers.clear()

    def read(self, value: bytes, resolve: ModelResolver) -> PlainRequest | None:
        """The plain request in ``value``, or None when it needs the full codec."""
        if type(value) is not bytes or len(value) >= self._max_bytes:
            return None
        try:
            message = msgpack.unpackb(value, raw=False, strict_map_key=True)
        except Exception:  # the full codec reads it again and words the error
            return None
        if type(message) is not dict or not PLAIN_KEYS.issuperset(message):
            return None
        request_id = message.get("id")
        name = message.get("model")
        if type(request_id) is not str or _REQUEST_ID.fullmatch(request_id) is None:
            return None
        if type(name) is not str or not plain_scalar_fields(message):
            return None
        parameters = message.get("parameters")
        if parameters is not None and parameters != {}:  # the full codec checks the rest
            return None
        version = message.get("version")
        model = resolve(name, version)
        if model is None:
            return None
        read = self._inputs(model, message.get("inputs"))
        if read is None:
            return None
        arrays, rows, parts = read
        return PlainRequest(
            request_id=request_id,
            model=model,
            inputs=arrays,
            rows=rows,
            reply_to=message.get("reply_to"),
            deadline_ms=message.get("deadline_ms"),
            created_ms=message.get("created_ms"),
            priority=message.get("priority") or 0,
            digest=self._digest(name, version, parts),
            trace=message.get("trace"),
        )

    def _digest(
        self, name: str, version: int | None, parts: list[tuple[str, str, list[int], bytes]]
    ) -> bytes:
        if len(parts) > 1:
            return digest_of(model=name, version=version, inputs=parts, parameters={})
        ((input_name, datatype, shape, data),) = parts
        key = (name, version, shape[0])
        hasher = self._hashers.get(key)
        if hasher is None:
            if len(self._hashers) > 4096:  # many distinct row counts: keep the cache small
                self._hashers.clear()
            hasher = self._hashers[key] = single_input_hasher(
                model=name, version=version, name=input_name, datatype=datatype, shape=shape
            )
        return finish(hasher.copy(), data)

    def _inputs(
        self, model: LoadedModel, tensors: object
    ) -> tuple[tuple[NDArray[Any], ...], int, list[tuple[str, str, list[int], bytes]]] | None:
        key = (model.name, model.version)
        if key not in self._layouts:
            self._layouts[key] = _layout(model)
        layout = self._layouts[key]
        if layout is None or type(tensors) is not list or len(tensors) != len(layout.inputs):
            return None
        arrays: list[NDArray[Any] | None] = [None] * len(tensors)
        parts: list[tuple[str, str, list[int], bytes]] = []
        rows = -1
        for tensor in tensors:
            if type(tensor) is not dict or len(tensor) != 4 or not _TENSOR_KEYS.issuperset(tensor):
                return None
            name = tensor["name"]
            spec = layout.inputs.get(name) if type(name) is str else None
            if (
                spec is None
                or arrays[spec.index] is not None
                or tensor["datatype"] != spec.datatype
            ):
                return None
            shape, data = tensor["shape"], tensor["data"]
            if type(shape) is not list or not shape or shape[1:] != spec.row_shape:
                return None
            if type(data) is not bytes or not all(type(dim) is int for dim in shape):  # not bools
                return None
            count = shape[0]
            if count < 1 or (rows != -1 and count != rows):
                return None
            if count * layout.row_elements > self._limits.max_tensor_elements:
                return None
            if len(data) != count * spec.row_bytes or len(shape) > self._limits.max_tensor_rank:
                return None
            rows = count
            arrays[spec.index] = np.frombuffer(data, dtype=spec.dtype).reshape(shape)
            parts.append((name, spec.datatype, shape, data))
        return tuple(arrays), rows, parts  # type: ignore[arg-type]  # every slot filled
