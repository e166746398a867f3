"""Tensor datatypes and the `Tensor` that carries one named array on the wire.

torch is imported lazily, inside the functions that need it, so that `import schemas` stays
light for producers that only speak numpy (or only bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from schemas.errors import RequestValidationError

if TYPE_CHECKING:
    import torch

MAX_TENSOR_NAME_LENGTH: Final = 256
"""The longest tensor name accepted, in characters."""


class Datatype(StrEnum):
    """The element type of a tensor, named as in the Open Inference Protocol v2."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    BF16 = "BF16"
    """bfloat16: carried as its raw 16 bits, held in numpy as `uint16`."""
    FP32 = "FP32"
    FP64 = "FP64"

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The little-endian numpy dtype of the wire bytes (`uint16` bits for BF16)."""
        return _NUMPY_DTYPES[self]

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire."""
        return _NUMPY_DTYPES[self].itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype (`torch.bfloat16` for BF16); imports torch."""
        import torch

        return getattr(torch, _TORCH_DTYPE_NAMES[self])  # type: ignore[no-any-return]

    @classmethod
    def from_numpy(cls, dtype: np.dtype[Any] | type[Any] | str) -> Datatype:
        """The datatype of a numpy dtype (any byte order); numpy has no bfloat16, so never BF16."""
        resolved = np.dtype(dtype)
        try:
            return _BY_NUMPY_KIND[resolved.kind, resolved.itemsize]
        except KeyError:
            raise RequestValidationError(
                f"datatype: numpy dtype {resolved} has no inferq datatype"
            ) from None

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> Datatype:
        """The datatype of a torch dtype."""
        for datatype, name in _TORCH_DTYPE_NAMES.items():
            if str(dtype) == f"torch.{name}":
                return datatype
        raise RequestValidationError(f"datatype: torch dtype {dtype} has no inferq datatype")


_NUMPY_DTYPES: Final[dict[Datatype, np.dtype[Any]]] = {
    Datatype.BOOL: np.dtype("|b1"),
    Datatype.UINT8: np.dtype("|u1"),
    Datatype.INT8: np.dtype("|i1"),
    Datatype.INT16: np.dtype("<i2"),
    Datatype.INT32: np.dtype("<i4"),
    Datatype.INT64: np.dtype("<i8"),
    Datatype.FP16: np.dtype("<f2"),
    Datatype.BF16: np.dtype("<u2"),
    Datatype.FP32: np.dtype("<f4"),
    Datatype.FP64: np.dtype("<f8"),
}
_BY_NUMPY_KIND: Final[dict[tuple[str, int], Datatype]] = {
    (dtype.kind, dtype.itemsize): datatype
    for datatype, dtype in _NUMPY_DTYPES.items()
    if datatype is not Datatype.BF16
}
_TORCH_DTYPE_NAMES: Final[dict[Datatype, str]] = {
    Datatype.BOOL: "bool",
    Datatype.UINT8: "uint8",
    Datatype.INT8: "int8",
    Datatype.INT16: "int16",
    Datatype.INT32: "int32",
    Datatype.INT64: "int64",
    Datatype.FP16: "float16",
    Datatype.BF16: "bfloat16",
    Datatype.FP32: "float32",
    Datatype.FP64: "float64",
}


def bfloat16_bits(values: ArrayLike) -> NDArray[np.uint16]:
    """Round floats to bfloat16 (to nearest, ties to even, as torch does) and return the bits."""
    floats = np.ascontiguousarray(values, dtype=np.float32)
    bits = floats.view(np.uint32)
    # uint32 arithmetic wraps silently; only NaNs (fixed below) can reach the wrap.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nans = np.isnan(floats)
    if nans.any():
        rounded[nans] = ((bits[nans] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bfloat16_to_float32(bits: NDArray[np.uint16]) -> NDArray[np.float32]:
    """The float32 values of bfloat16 bits (exact: every bfloat16 is a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@functools.cache
def _torch_from_dlpack() -> Callable[[Any], torch.Tensor]:
    """torch's DLPack import, imported on first use (an import per call costs microseconds)."""
    from torch.utils.dlpack import from_dlpack

    return from_dlpack


class Tensor:
    """One named tensor of a request or result: a datatype, a shape and a numpy array.

    The array is C-contiguous and little-endian when it comes from the codec, and then a
    read-only view on the received message (no copy). BF16 data is held as `uint16` bits.
    """

    __slots__ = ("_array", "_datatype", "_name")

    _name: str
    _datatype: Datatype
    _array: NDArray[Any]

    def __init__(self, *, name: str, datatype: Datatype | str, data: NDArray[Any]) -> None:
        """`data` is the shaped array, of exactly `datatype.numpy_dtype` (uint16 bits for BF16)."""
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TENSOR_NAME_LENGTH:
            raise RequestValidationError(
                f"name: must be a str of 1 to {MAX_TENSOR_NAME_LENGTH} characters, got {name!r}"
            )
        try:
            datatype = Datatype(datatype)
        except ValueError:
            raise RequestValidationError(f"datatype: unknown datatype {datatype!r}") from None
        if not isinstance(data, np.ndarray):
            raise RequestValidationError(f"data: must be a numpy array, got {type(data).__name__}")
        if data.dtype != datatype.numpy_dtype:
            raise RequestValidationError(
                f"data: dtype {data.dtype} does not match datatype {datatype} "
                f"({datatype.numpy_dtype}); use Tensor.from_numpy to convert"
            )
        self._name = name
        self._datatype = datatype
        self._array = data

    @classmethod
    def _trusted(cls, name: str, datatype: Datatype, array: NDArray[Any]) -> Tensor:
        """Build without checks: for the codec, which has checked everything already."""
        tensor = object.__new__(cls)
        tensor._name = name
        tensor._datatype = datatype
        tensor._array = array
        return tensor

    @property
    def name(self) -> str:
        """The input or output name, as the model's signature spells it."""
        return self._name

    @property
    def datatype(self) -> Datatype:
        """The element type."""
        return self._datatype

    @property
    def shape(self) -> tuple[int, ...]:
        """The dimensions, outermost (batch) first."""
        return self._array.shape

    @property
    def data(self) -> NDArray[Any]:
        """The shaped array (read-only when decoded; uint16 bits for BF16)."""
        return self._array

    @property
    def nbytes(self) -> int:
        """Bytes of data on the wire (element count times item size)."""
        return self._array.nbytes

    def to_numpy(self) -> NDArray[Any]:
        """The shaped array itself, no copy (BF16 as uint16 bits: see `bfloat16_to_float32`)."""
        return self._array

    def to_torch(self) -> torch.Tensor:
        """A torch tensor sharing this tensor's memory (BF16 as `torch.bfloat16`).

        A decoded tensor views the received message, which is immutable: do not write the
        returned tensor in place (clone it first). DLPack shares the memory without the
        warning `torch.from_numpy` gives for a read-only array.
        """
        shared = _torch_from_dlpack()(self._array)
        if self._datatype is Datatype.BF16:
            import torch

            return shared.view(torch.bfloat16)
        return shared

    @classmethod
    def from_numpy(
        cls, name: str, array: ArrayLike, datatype: Datatype | str | None = None
    ) -> Tensor:
        """A tensor of `array`, sharing its memory when it is already C-contiguous little-endian.

        Without `datatype` it follows the array's dtype. With one, the array is converted
        (same-kind casts only: no silent float to int); BF16 takes uint16 bits as they are
        and rounds floats to nearest even.
        """
        values = np.asarray(array)
        target = Datatype.from_numpy(values.dtype) if datatype is None else Datatype(datatype)
        if target is Datatype.BF16 and values.dtype.kind == "f":
            converted: NDArray[Any] = bfloat16_bits(values)
        else:
            try:
                converted = values.astype(target.numpy_dtype, casting="same_kind", copy=False)
            except TypeError as error:
                raise RequestValidationError(
                    f"data: cannot convert {values.dtype} to {target}: {error}"
                ) from None
        if not converted.flags.c_contiguous:
            converted = converted.copy(order="C")
        return cls(name=name, datatype=target, data=converted)

    @classmethod
    def from_torch(cls, name: str, tensor: torch.Tensor) -> Tensor:
        """A tensor of a torch tensor; shares memory when it is on the CPU and contiguous."""
        import torch

        datatype = Datatype.from_torch(tensor.dtype)
        source = tensor.detach().cpu().contiguous()
        if datatype is Datatype.BF16:
            array: NDArray[Any] = source.view(torch.int16).numpy().view(np.uint16)
        else:
            array = source.numpy()
        return cls(name=name, datatype=datatype, data=array)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (
            self._name == other._name
            and self._datatype is other._datatype
            and self._array.shape == other._array.shape
            and self._array.tobytes() == other._array.tobytes()
        )

    __hash__ = None  # type: ignore[assignment]  # equal by content, which may change

    def __repr__(self) -> str:
        return f"Tensor(name={self._name!r}, datatype={self._datatype}, shape={self.shape})"
