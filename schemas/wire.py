"""Between unpacked wire maps and the message models, for both encodings.

Decoding checks what pydantic cannot (tensor shapes against their bytes, limits, the JSON
number lists) by hand, then validates the fields through the models themselves, so a field
constraint lives in one place. Every failure is a `SchemaError` naming the field at fault.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError

from schemas.errors import PayloadTooLargeError, RequestValidationError, SchemaError
from schemas.limits import CodecLimits
from schemas.messages import (
    INT64_MAX,
    INT64_MIN,
    MAX_TRACE_LENGTH,
    REQUEST_ID_PATTERN,
    InferenceRequest,
    InferenceResult,
    ResultStatus,
)
from schemas.names import is_model_name
from schemas.tensors import (
    MAX_TENSOR_NAME_LENGTH,
    Datatype,
    Tensor,
    bfloat16_bits,
    bfloat16_to_float32,
)
from schemas.topics import is_topic_name

REQUEST_FIELDS: Final = (
    "id",
    "model",
    "version",
    "inputs",
    "parameters",
    "reply_to",
    "deadline_ms",
    "created_ms",
    "priority",
    "trace",
)
"""A request's keys, in the order the encoder writes them."""
RESULT_FIELDS: Final = (
    "id",
    "model",
    "version",
    "status",
    "outputs",
    "error",
    "timing",
    "worker",
    "created_ms",
    "trace",
)
"""A result's keys, in the order the encoder writes them."""
TENSOR_FIELDS: Final = ("name", "datatype", "shape", "data")
"""A tensor's keys, in the order the encoder writes them."""

_REQUEST_FIELD_SET: Final = frozenset(REQUEST_FIELDS)
_RESULT_FIELD_SET: Final = frozenset(RESULT_FIELDS)
_TENSOR_FIELD_SET: Final = frozenset(TENSOR_FIELDS)

JSON_FLOAT_WORDS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""How JSON carries the floats it has no literal for (as protobuf's JSON mapping does)."""

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_DATATYPES: Final = {datatype.value: datatype for datatype in Datatype}
_FLOAT_DATATYPES: Final = frozenset({Datatype.FP16, Datatype.BF16, Datatype.FP32, Datatype.FP64})
_Model = TypeVar("_Model", bound=BaseModel)
_MESSAGE_DEPTH: Final = 0
_TENSOR_DEPTH: Final = 2  # message map, inputs list, tensor map


class _Context:
    """What is known of the message so far, to address an error result if decoding fails."""

    __slots__ = ("model", "reply_to", "request_id")

    def __init__(self, message: dict[Any, Any]) -> None:
        request_id = message.get("id")
        model = message.get("model")
        reply_to = message.get("reply_to")
        self.request_id = request_id if _matches(_REQUEST_ID, request_id) else None
        self.model = model if is_model_name(model) else None
        self.reply_to = reply_to if isinstance(reply_to, str) and is_topic_name(reply_to) else None

    def attach(self, error: SchemaError) -> SchemaError:
        error.request_id = self.request_id
        error.model = self.model
        error.reply_to = self.reply_to
        return error


def _matches(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def request_from_wire(message: object, *, from_json: bool, limits: CodecLimits) -> InferenceRequest:
    """The request in an unpacked message (bin data for msgpack, number lists for JSON)."""
    if type(message) is not dict:
        raise RequestValidationError(f"message: must be a map, got {_kind(message)}")
    try:
        fields = _known_fields(message, _REQUEST_FIELD_SET, _MESSAGE_DEPTH, limits)
        if "inputs" in fields:
            fields["inputs"] = _tensors(fields["inputs"], "inputs", from_json, limits)
        parameters = fields.get("parameters")
        if isinstance(parameters, dict) and len(parameters) > limits.max_parameters:
            raise PayloadTooLargeError(
                f"parameters: {len(parameters)} entries, max_parameters is {limits.max_parameters}"
            )
        if from_json:
            _check_texts(fields, ("trace",))
            if isinstance(parameters, dict):
                for key, value in parameters.items():
                    _check_text(key, "parameters")
                    _check_text(value, f"parameters.{key}")
        if _plainly_valid(fields):
            values = {**_REQUEST_DEFAULTS, "parameters": {}, **fields}
            return _construct(InferenceRequest, values, fields_set=set(fields))
        return InferenceRequest.model_validate(fields)
    except SchemaError as error:
        raise _Context(message).attach(error) from None
    except ValidationError as error:
        raise _Context(message).attach(RequestValidationError(_describe(error))) from None


_REQUEST_DEFAULTS: Final[dict[str, Any]] = {
    name: field.default
    for name, field in InferenceRequest.model_fields.items()
    if not field.is_required() and field.default_factory is None
}


def _plainly_valid(fields: dict[str, Any]) -> bool:
    """Whether the request fields surely pass the model.

    The common case, checked by hand at a fraction of pydantic's cost; anything unusual
    answers False and goes through `model_validate`, which also words the error. A test
    pins that this never accepts what the model refuses.
    """
    if not (_matches(_REQUEST_ID, fields.get("id")) and is_model_name(fields.get("model"))):
        return False
    inputs = fields.get("inputs")
    if type(inputs) is not tuple or not inputs:
        return False
    if len(inputs) > 1 and len({tensor.name for tensor in inputs}) != len(inputs):
        return False
    if not plain_scalar_fields(fields):
        return False
    parameters = fields.get("parameters")
    return parameters is None or (
        type(parameters) is dict and all(map(_plain_parameter, parameters.items()))
    )


def plain_scalar_fields(fields: Mapping[str, Any]) -> bool:
    """Whether a request's scalar fields (`version`, `deadline_ms`, `created_ms`, `priority`,
    `reply_to`, `trace`), absent or as decoded, surely pass the model; False is not an error,
    only "let the model decide". Shared by `_plainly_valid` and the worker's fast path."""
    version = fields.get("version")
    if version is not None and not (type(version) is int and 1 <= version <= INT64_MAX):
        return False
    for name in ("deadline_ms", "created_ms"):
        millis = fields.get(name)
        if millis is not None and not (type(millis) is int and 0 <= millis <= INT64_MAX):
            return False
    priority = fields.get("priority")
    if priority is not None and not (type(priority) is int and INT64_MIN <= priority <= INT64_MAX):
        return False
    reply_to = fields.get("reply_to")
    if reply_to is not None and not (type(reply_to) is str and is_topic_name(reply_to)):
        return False
    trace = fields.get("trace")
    return trace is None or (type(trace) is str and len(trace) <= MAX_TRACE_LENGTH)


def _plain_parameter(item: tuple[object, object]) -> bool:
    key, value = item
    kind = type(value)
    return type(key) is str and (
        kind is str
        or kind is bool
        or (kind is int and INT64_MIN <= value <= INT64_MAX)  # type: ignore[operator]
        or (kind is float and math.isfinite(value))  # type: ignore[arg-type]
    )


def _construct(model: type[_Model], values: dict[str, Any], *, fields_set: set[str]) -> _Model:
    """`model` from all its field values, known valid, without `model_construct`'s overhead.

    This sets the same four attributes `BaseModel.model_construct` sets; a test compares
    the two so that a pydantic upgrade that changes them fails loudly.
    """
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", fields_set)
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def result_from_wire(message: object, *, from_json: bool, limits: CodecLimits) -> InferenceResult:
    """The result in an unpacked message (bin data for msgpack, number lists for JSON)."""
    if type(message) is not dict:
        raise RequestValidationError(f"message: must be a map, got {_kind(message)}")
    try:
        fields = _known_fields(message, _RESULT_FIELD_SET, _MESSAGE_DEPTH, limits)
        if "outputs" in fields:
            fields["outputs"] = _tensors(fields["outputs"], "outputs", from_json, limits)
        if from_json:
            _check_texts(fields, ("worker", "trace"))
            error = fields.get("error")
            if isinstance(error, dict):
                _check_texts(error, ("message",))
        return InferenceResult.model_validate(fields)
    except SchemaError as error:
        raise _Context(message).attach(error) from None
    except ValidationError as error:
        raise _Context(message).attach(RequestValidationError(_describe(error))) from None


def request_to_wire(request: InferenceRequest, *, to_json: bool) -> dict[str, Any]:
    """The map the encoder writes for `request`: defaults and None fields are left out."""
    message: dict[str, Any] = {"id": request.id, "model": request.model}
    if request.version is not None:
        message["version"] = request.version
    message["inputs"] = [tensor_to_wire(tensor, to_json=to_json) for tensor in request.inputs]
    if request.parameters:
        message["parameters"] = request.parameters
    for name in _OPTIONAL_REQUEST_FIELDS:
        value = getattr(request, name)
        if value is not None:
            message[name] = value
    if request.priority:
        message["priority"] = request.priority
    return message


_OPTIONAL_REQUEST_FIELDS: Final = ("reply_to", "deadline_ms", "created_ms", "trace")


def result_to_wire(result: InferenceResult, *, to_json: bool) -> dict[str, Any]:
    """The map the encoder writes for `result`: None fields are left out."""
    message: dict[str, Any] = {
        "id": result.id,
        "model": result.model,
        "version": result.version,
        "status": result.status.value,
        "outputs": (
            [tensor_to_wire(tensor, to_json=to_json) for tensor in result.outputs]
            if result.status is ResultStatus.OK
            else None
        ),
        "error": (
            None
            if result.error is None
            else {"code": result.error.code.value, "message": result.error.message}
        ),
        "timing": (
            None
            if result.timing is None
            else {
                "queue_ms": result.timing.queue_ms,
                "infer_ms": result.timing.infer_ms,
                "batch_size": result.timing.batch_size,
            }
        ),
        "worker": result.worker,
        "created_ms": result.created_ms,
        "trace": result.trace,
    }
    return {key: value for key, value in message.items() if value is not None}


def tensor_to_wire(tensor: Tensor, *, to_json: bool) -> dict[str, Any]:
    """A tensor's map: `data` as raw little-endian C-order bytes, or a flat JSON number list."""
    array = tensor.data
    data: Any
    if to_json:
        data = _json_numbers(array.reshape(-1), tensor.datatype)
    else:
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        data = array.data  # a C-contiguous buffer: msgpack and bytes.join take it as is
    return {
        "name": tensor.name,
        "datatype": tensor.datatype.value,
        "shape": list(tensor.shape),
        "data": data,
    }


def _json_numbers(flat: NDArray[Any], datatype: Datatype) -> list[Any]:
    if datatype is Datatype.BF16:
        flat = bfloat16_to_float32(flat)
    numbers: list[Any] = flat.tolist()
    if datatype in _FLOAT_DATATYPES and not np.isfinite(flat).all():
        numbers = [
            value if math.isfinite(value) else ("NaN" if value != value else _infinity(value))
            for value in numbers
        ]
    return numbers


def _infinity(value: float) -> str:
    return "Infinity" if value > 0 else "-Infinity"


def _known_fields(
    message: dict[Any, Any], names: frozenset[str], depth: int, limits: CodecLimits
) -> dict[str, Any]:
    """The known, non-null fields; unknown ones are ignored once their nesting is checked."""
    fields = {key: value for key, value in message.items() if key in names and value is not None}
    if len(fields) != len(message):
        for key, value in message.items():
            if key not in fields and isinstance(value, list | dict):
                _check_nesting(value, depth + 1, limits, key)
    return fields


def _check_nesting(
    value: list[Any] | dict[Any, Any], depth: int, limits: CodecLimits, key: object
) -> None:
    pending: list[tuple[Any, int]] = [(value, depth)]
    while pending:
        item, level = pending.pop()
        if level >= limits.max_nesting:
            raise PayloadTooLargeError(
                f"{key}: nested deeper than max_nesting ({limits.max_nesting} levels)"
            )
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, level + 1) for child in children if isinstance(child, list | dict))


def _tensors(value: object, field: str, from_json: bool, limits: CodecLimits) -> tuple[Tensor, ...]:
    if type(value) is not list:
        raise RequestValidationError(f"{field}: must be a list of tensors, got {_kind(value)}")
    if len(value) > limits.max_inputs:
        raise PayloadTooLargeError(
            f"{field}: {len(value)} tensors, max_inputs is {limits.max_inputs}"
        )
    return tuple(
        [_tensor(item, field, index, from_json, limits) for index, item in enumerate(value)]
    )


def _tensor(value: object, field: str, index: int, from_json: bool, limits: CodecLimits) -> Tensor:
    path = f"{field}[{index}]"
    if type(value) is not dict:
        raise RequestValidationError(f"{path}: must be a map, got {_kind(value)}")
    name = value.get("name")
    if type(name) is not str or not 0 < len(name) <= MAX_TENSOR_NAME_LENGTH:
        raise RequestValidationError(
            f"{path}.name: must be a str of 1 to {MAX_TENSOR_NAME_LENGTH} characters"
        )
    if from_json:
        _check_text(name, f"{path}.name")
    datatype_name = value.get("datatype")
    datatype = _DATATYPES.get(datatype_name) if type(datatype_name) is str else None
    if datatype is None:
        raise RequestValidationError(
            f"{path}.datatype: must be one of {', '.join(_DATATYPES)}, got {_short(datatype_name)}"
        )
    shape = _shape(value.get("shape"), f"{path}.shape", limits)
    count = math.prod(shape)
    data = value.get("data")
    if from_json:
        array = _array_from_numbers(data, datatype, count, f"{path}.data")
        if len(value) != len(TENSOR_FIELDS):
            _known_fields(value, _TENSOR_FIELD_SET, _TENSOR_DEPTH, limits)
        return Tensor._trusted(name, datatype, array.reshape(shape))
    if type(data) is not bytes and type(data) is not memoryview:
        raise RequestValidationError(f"{path}.data: must be bin (raw bytes), got {_kind(data)}")
    dtype = datatype.numpy_dtype
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise RequestValidationError(
            f"{path}.data: {len(data)} bytes, expected {expected} "
            f"({count} elements of {dtype.itemsize} bytes)"
        )
    array = np.ndarray(shape, dtype, data)
    if datatype is Datatype.BOOL and count and array.view(np.uint8).max() > 1:
        raise RequestValidationError(f"{path}.data: BOOL bytes must be 0 or 1")
    if len(value) != len(TENSOR_FIELDS):
        _known_fields(value, _TENSOR_FIELD_SET, _TENSOR_DEPTH, limits)
    return Tensor._trusted(name, datatype, array)


def _shape(value: object, path: str, limits: CodecLimits) -> tuple[int, ...]:
    if type(value) is not list:
        raise RequestValidationError(f"{path}: must be a list of ints, got {_kind(value)}")
    if len(value) > limits.max_tensor_rank:
        raise PayloadTooLargeError(
            f"{path}: rank {len(value)}, max_tensor_rank is {limits.max_tensor_rank}"
        )
    count = 1
    for index, dim in enumerate(value):
        if type(dim) is not int or dim < 0:
            raise RequestValidationError(
                f"{path}[{index}]: must be a non-negative int, got {_short(dim)}"
            )
        count *= dim
        if dim > limits.max_tensor_elements or count > limits.max_tensor_elements:
            raise PayloadTooLargeError(
                f"{path}: more than max_tensor_elements ({limits.max_tensor_elements}) elements"
            )
    return tuple(value)


def _array_from_numbers(data: object, datatype: Datatype, count: int, path: str) -> NDArray[Any]:
    if type(data) is not list:
        raise RequestValidationError(f"{path}: must be a flat list of numbers, got {_kind(data)}")
    if len(data) != count:
        raise RequestValidationError(f"{path}: {len(data)} values, expected {count}")
    kinds = set(map(type, data))
    if datatype is Datatype.BOOL:
        if not kinds <= {bool}:
            raise RequestValidationError(f"{path}: BOOL values must be true or false")
        return np.array(data, dtype=np.bool_)
    if datatype not in _FLOAT_DATATYPES:
        if not kinds <= {int}:
            raise RequestValidationError(f"{path}: {datatype} values must be integers")
        try:
            return np.array(data, dtype=datatype.numpy_dtype)
        except OverflowError:
            raise RequestValidationError(
                f"{path}: a value is out of range for {datatype}"
            ) from None
    if not kinds <= {int, float, str}:
        raise RequestValidationError(f"{path}: {datatype} values must be numbers")
    if str in kinds:
        try:
            data = [JSON_FLOAT_WORDS[item] if type(item) is str else item for item in data]
        except KeyError:
            raise RequestValidationError(
                f'{path}: the only strings allowed are "NaN", "Infinity" and "-Infinity"'
            ) from None
    try:
        floats = np.array(data, dtype=np.float64)
    except OverflowError:  # an int beyond float64
        raise RequestValidationError(f"{path}: a value is out of range for {datatype}") from None
    if datatype is Datatype.BF16:
        return bfloat16_bits(floats)
    with np.errstate(over="ignore"):  # too large for FP16/FP32 becomes infinity, as in any cast
        return floats.astype(datatype.numpy_dtype)


def _check_texts(fields: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        _check_text(fields.get(name), name)


def _check_text(value: object, path: str) -> None:
    """JSON can carry lone surrogates (`\\ud800`), which no UTF-8 encoder accepts: refuse them."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestValidationError(f"{path}: contains a lone UTF-16 surrogate") from None


def _describe(error: ValidationError) -> str:
    """`field.path: reason` for pydantic's first complaint, without the offending value."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    first = problems[0]
    path = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
    ).lstrip(".")
    reason = first["msg"].removeprefix("Value error, ")
    if not path:
        path, _, reason = reason.partition(": ") if ": " in reason else ("message", "", reason)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{path}: {reason}{more}"


def _kind(value: object) -> str:
    names: dict[type, str] = {
        dict: "a map",
        list: "a list",
        str: "a str",
        bytes: "bin",
        memoryview: "bin",
    }
    return names.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
