"""The model repository: config validation, input checks, output collection, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn

from schemas.errors import ErrorCode
from workers.authoring import write_version
from workers.errors import (
    DtypeMismatchError,
    InferenceFailedError,
    InputNameMismatchError,
    ShapeMismatchError,
)
from workers.example_models import write_example_models
from workers.formats import ModelFormat
from workers.models import (
    TORCH_DTYPES,
    InputSignature,
    LoadedModel,
    ModelConfig,
    TensorSpec,
    datatype_of,
    torch_dtype,
    torchscript_deprecation_silenced,
)

CPU = torch.device("cpu")


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Truncate(nn.Module):
    """Returns one column fewer than its config promises: a broken model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:]


def spec(name: str, *shape: int, datatype: str = "FP32") -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, shape=shape)


DOUBLE_CONFIG = ModelConfig(inputs=(spec("x", 3),), outputs=(spec("y", 3),))


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with torchscript_deprecation_silenced():
        result: torch.jit.ScriptModule = torch.jit.script(module)
    return result


def write_double(root: Path, name: str = "double", version: int = 1) -> Path:
    return write_version(
        fmt=ModelFormat.TORCHSCRIPT,
        root=root,
        name=name,
        version=version,
        module=scripted(Double()),
        config=DOUBLE_CONFIG,
    )


def two_input_model() -> LoadedModel:
    config = ModelConfig(
        inputs=(spec("image", 3, -1), spec("mask", -1, datatype="BOOL")),
        outputs=(spec("score", 1), spec("label", datatype="INT64")),
    )
    return LoadedModel(name="seg", version=2, config=config, module=Double(), device=CPU)


@pytest.fixture(scope="module")
def examples_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    write_example_models(root)
    return root


# Config


def test_tensor_spec_accepts_variable_dims_and_known_datatypes() -> None:
    assert spec("x", -1, 4).shape == (-1, 4)
    assert spec("x").shape == ()


@pytest.mark.parametrize(
    ("datatype", "shape"), [("FLOAT", (3,)), ("fp32", (3,)), ("FP32", (0,)), ("FP32", (-2,))]
)
def test_tensor_spec_rejects_bad_datatype_or_dims(datatype: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(pydantic.ValidationError):
        TensorSpec(name="x", datatype=datatype, shape=shape)


def test_model_config_reads_json_with_defaults() -> None:
    config = ModelConfig.model_validate_json(
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],'
        ' "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}]}'
    )
    assert config.max_batch_size == 32
    assert config.max_batch_delay_ms == 5.0
    assert config.format is None
    assert config.factory is None
    assert config.inputs[0].shape == (3,)


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": []},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}] * 2},
        {"max_batch_size": 0},
        {"max_batch_delay_ms": -1.0},
        {"format": "pickle"},
        {"factory": "not a factory"},
        {"unknown_key": 1},
    ],
)
def test_model_config_rejects_invalid_content(change: dict[str, object]) -> None:
    content = DOUBLE_CONFIG.model_dump(mode="json") | change
    with pytest.raises(pydantic.ValidationError):
        ModelConfig.model_validate_json(json.dumps(content))


def test_every_datatype_maps_to_a_torch_dtype_and_back() -> None:
    assert len(TORCH_DTYPES) == 10
    for datatype in TORCH_DTYPES:
        assert datatype_of(torch_dtype(datatype)) == datatype


def test_unsupported_torch_dtype_is_a_dtype_mismatch() -> None:
    with pytest.raises(DtypeMismatchError, match="complex64"):
        datatype_of(torch.complex64)


def test_check_tensors_rejects_a_tensor_without_datatype() -> None:
    model = LoadedModel(name="m", version=1, config=DOUBLE_CONFIG, module=Double(), device=CPU)
    with pytest.raises(DtypeMismatchError, match=r"m:1 input 'x': torch dtype torch\.complex64"):
        model.check_tensors({"x": torch.zeros(1, 3, dtype=torch.complex64)})


def test_loaded_model_rejects_non_positive_version() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoadedModel(name="m", version=0, config=DOUBLE_CONFIG, module=Double(), device=CPU)


# Input checks


def test_check_inputs_returns_rows_and_accepts_variable_dims() -> None:
    model = two_input_model()
    rows = model.check_inputs(
        [InputSignature("mask", "BOOL", (4, 7)), InputSignature("image", "FP32", (4, 3, 9))]
    )
    assert rows == 4


def test_check_tensors_reads_signature_from_tensors() -> None:
    model = two_input_model()
    tensors = {"image": torch.zeros(2, 3, 5), "mask": torch.ones(2, 5, dtype=torch.bool)}
    assert model.check_tensors(tensors) == 2


def test_dtype_mismatch_names_model_input_and_datatypes() -> None:
    model = two_input_model()
    with pytest.raises(
        DtypeMismatchError, match=r"seg:2 input 'mask': datatype UINT8, expected BOOL"
    ):
        model.check_inputs(
            [InputSignature("image", "FP32", (1, 3, 2)), InputSignature("mask", "UINT8", (1, 2))]
        )


@pytest.mark.parametrize(
    "image_shape",
    [(1, 4, 2), (1, 3), (1, 3, 2, 1), ()],
)
def test_shape_mismatch_names_model_input_and_shapes(image_shape: tuple[int, ...]) -> None:
    model = two_input_model()
    with pytest.raises(ShapeMismatchError, match=r"seg:2 input 'image'.*expected \[batch, 3, -1\]"):
        model.check_inputs(
            [InputSignature("image", "FP32", image_shape), InputSignature("mask", "BOOL", (1, 2))]
        )


def test_inputs_disagreeing_on_batch_rows_are_a_shape_mismatch() -> None:
    model = two_input_model()
    with pytest.raises(ShapeMismatchError, match="disagree on the batch dimension"):
        model.check_inputs(
            [InputSignature("image", "FP32", (2, 3, 2)), InputSignature("mask", "BOOL", (3, 2))]
        )


def test_zero_rows_are_a_shape_mismatch() -> None:
    model = two_input_model()
    with pytest.raises(ShapeMismatchError, match="at least 1"):
        model.check_inputs(
            [InputSignature("image", "FP32", (0, 3, 2)), InputSignature("mask", "BOOL", (0, 2))]
        )


@pytest.mark.parametrize(
    ("names", "detail"),
    [
        (["image"], "missing=['mask']"),
        (["image", "mask", "extra"], "unexpected=['extra']"),
        (["image", "mask", "mask"], "repeated=['mask']"),
    ],
)
def test_input_names_must_match_the_config(names: list[str], detail: str) -> None:
    model = two_input_model()
    signatures = [
        InputSignature(
            name, "FP32" if name == "image" else "BOOL", (1, 3, 2) if name == "image" else (1, 2)
        )
        for name in names
    ]
    with pytest.raises(InputNameMismatchError) as raised:
        model.check_inputs(signatures)
    assert detail in raised.value.message
    assert raised.value.code is ErrorCode.VALIDATION_ERROR
    assert (raised.value.model, raised.value.version) == ("seg", 2)


# Output collection


def test_collect_outputs_accepts_tensor_sequence_and_dict() -> None:
    model = two_input_model()
    score, label = torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64)
    for result in ((score, label), [score, label], {"label": label, "score": score, "aux": 1}):
        collected = model.collect_outputs(result, rows=2)
        assert collected[0] is score
        assert collected[1] is label
    single = LoadedModel(name="d", version=1, config=DOUBLE_CONFIG, module=Double(), device=CPU)
    assert single.collect_outputs(torch.zeros(4, 3), rows=4)[0].shape == (4, 3)


@pytest.mark.parametrize(
    ("result", "detail"),
    [
        ((torch.zeros(2, 1),), "returned 1 outputs, expected 2"),
        ({"score": torch.zeros(2, 1)}, r"without outputs \['label'\]"),
        ((torch.zeros(2, 1), "label"), "returned a str for 'label'"),
        ((torch.zeros(2, 1), torch.zeros(2)), "returned torch.float32 for 'label'"),
        ((torch.zeros(3, 1), torch.zeros(2, dtype=torch.int64)), r"shape \[3, 1\]"),
        ((torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64)), r"expected \[2, 1\]"),
        (None, "returned a NoneType"),
    ],
)
def test_collect_outputs_rejects_results_that_break_the_config(result: object, detail: str) -> None:
    with pytest.raises(InferenceFailedError, match=detail):
        two_input_model().collect_outputs(result, rows=2)
