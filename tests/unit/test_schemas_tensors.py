"""Datatypes and `Tensor`: numpy and torch conversions, BF16, memory sharing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas import Datatype, RequestValidationError, Tensor, bfloat16_bits, bfloat16_to_float32


@pytest.mark.parametrize("datatype", list(Datatype))
def test_each_datatype_maps_to_numpy_and_torch_of_the_same_itemsize(datatype: Datatype) -> None:
    assert datatype.numpy_dtype.itemsize == datatype.itemsize
    assert torch.empty(0, dtype=datatype.torch_dtype).element_size() == datatype.itemsize
    assert Datatype.from_torch(datatype.torch_dtype) is datatype
    if datatype is not Datatype.BF16:
        assert Datatype.from_numpy(datatype.numpy_dtype) is datatype


def test_numpy_dtypes_without_a_datatype_are_refused() -> None:
    with pytest.raises(RequestValidationError, match=r"^datatype: numpy dtype complex64"):
        Datatype.from_numpy(np.complex64)
    with pytest.raises(RequestValidationError, match="uint32"):
        Datatype.from_numpy(np.uint32)


def test_big_endian_arrays_are_converted_to_little_endian() -> None:
    tensor = Tensor.from_numpy("x", np.arange(3, dtype=">i4"))
    assert tensor.datatype is Datatype.INT32
    assert tensor.data.dtype == np.dtype("<i4")
    assert tensor.data.tolist() == [0, 1, 2]


def test_from_numpy_shares_memory_when_it_can() -> None:
    array = np.zeros((2, 3), dtype=np.float32)
    assert np.shares_memory(Tensor.from_numpy("x", array).data, array)


def test_from_numpy_copies_a_non_contiguous_array_into_c_order() -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]
    tensor = Tensor.from_numpy("x", array)
    assert tensor.data.flags.c_contiguous
    assert tensor.data.tolist() == array.tolist()


def test_from_numpy_keeps_zero_dimensional_arrays_scalar() -> None:
    assert Tensor.from_numpy("x", np.float32(2.5)).shape == ()


def test_from_numpy_refuses_a_lossy_kind_change() -> None:
    with pytest.raises(RequestValidationError, match=r"^data: cannot convert float64 to INT32"):
        Tensor.from_numpy("x", np.array([1.5]), Datatype.INT32)


def test_constructor_checks_the_dtype_against_the_datatype() -> None:
    with pytest.raises(RequestValidationError, match=r"^data: dtype float64 does not match"):
        Tensor(name="x", datatype=Datatype.FP32, data=np.zeros(2))
    with pytest.raises(RequestValidationError, match=r"^datatype: unknown datatype 'FP8'"):
        Tensor(name="x", datatype="FP8", data=np.zeros(2))
    with pytest.raises(RequestValidationError, match=r"^name:"):
        Tensor(name="", datatype=Datatype.FP64, data=np.zeros(2))


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 1e3,
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45], dtype=np.float32),
            # Exact ties, which round to even.
            (np.arange(0x3F800000, 0x3F800000 + 64 * 0x8000, 0x8000, dtype=np.uint32)).view(
                np.float32
            ),
        ]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    bits = bfloat16_bits(values)
    numbers = ~np.isnan(values)  # NaN stays NaN; torch and we may pick different NaN bits
    assert np.array_equal(bits.view(np.int16)[numbers], expected[numbers])
    assert np.isnan(bfloat16_to_float32(bits[~numbers])).all()


def test_bfloat16_bits_back_to_float32_are_exact() -> None:
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0000, 0x8000], dtype=np.uint16)
    assert bfloat16_to_float32(bits).tolist() == [1.0, -2.0, float("inf"), 0.0, -0.0]


def test_bf16_from_floats_and_to_torch() -> None:
    tensor = Tensor.from_numpy("x", np.array([1.0, 2.5, -3.0], dtype=np.float32), "BF16")
    assert tensor.data.dtype == np.uint16
    shared = tensor.to_torch()
    assert shared.dtype == torch.bfloat16
    assert shared.tolist() == [1.0, 2.5, -3.0]


@pytest.mark.parametrize("datatype", list(Datatype))
def test_to_torch_shares_memory_even_when_read_only(datatype: Datatype) -> None:
    buffer = bytes(range(24)) if datatype is not Datatype.BOOL else bytes([0, 1] * 12)
    count = 24 // datatype.itemsize
    array = np.frombuffer(buffer, dtype=datatype.numpy_dtype, count=count).reshape(count, 1)
    assert not array.flags.writeable
    shared = Tensor(name="x", datatype=datatype, data=array).to_torch()  # no warning: errors
    assert shared.dtype == datatype.torch_dtype
    assert shared.shape == (count, 1)
    assert shared.data_ptr() == array.ctypes.data


def test_from_torch_round_trips_every_dtype() -> None:
    for datatype in Datatype:
        source = torch.arange(6).reshape(2, 3).to(datatype.torch_dtype)
        tensor = Tensor.from_torch("y", source)
        assert tensor.datatype is datatype
        assert torch.equal(tensor.to_torch(), source)


def test_from_torch_refuses_unsupported_dtypes() -> None:
    with pytest.raises(RequestValidationError, match=r"^datatype: torch dtype torch.complex64"):
        Tensor.from_torch("x", torch.zeros(2, dtype=torch.complex64))


def test_equality_is_by_name_datatype_shape_and_bytes() -> None:
    nan = np.array([np.nan], dtype=np.float32)
    assert Tensor.from_numpy("x", nan) == Tensor.from_numpy("x", nan.copy())
    assert Tensor.from_numpy("x", nan) != Tensor.from_numpy("y", nan)
    assert Tensor.from_numpy("x", np.zeros((1, 2))) != Tensor.from_numpy("x", np.zeros((2, 1)))
    assert repr(Tensor.from_numpy("x", np.zeros((1, 2)))) == (
        "Tensor(name='x', datatype=FP64, shape=(1, 2))"
    )


def test_importing_schemas_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, schemas; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
