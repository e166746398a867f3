"""The model repository: config validation, input checks, output collection, loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn

from schemas.errors import ErrorCode
from workers.errors import (
    DtypeMismatchError,
    InferenceFailedError,
    InputNameMismatchError,
    ModelLoadError,
    ShapeMismatchError,
    UnknownModelError,
    UnknownVersionError,
)
from workers.example_models import write_example_models, write_model
from workers.models import (
    TORCH_DTYPES,
    DirectoryModelRepository,
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
    return write_model(
        root=root, name=name, version=version, module=scripted(Double()), config=DOUBLE_CONFIG
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
    assert config.sha256 is None
    assert config.inputs[0].shape == (3,)


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": []},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}] * 2},
        {"max_batch_size": 0},
        {"max_batch_delay_ms": -1.0},
        {"sha256": "ABC"},
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


# Repository


def test_repository_loads_examples_and_serves_latest_version(examples_root: Path) -> None:
    repository = DirectoryModelRepository(root=examples_root, device=CPU)
    repository.load()
    assert repository.names() == ["cnn", "mlp"]
    assert [(m.name, m.version) for m in repository.models()] == [
        ("cnn", 1),
        ("mlp", 1),
        ("mlp", 2),
    ]
    latest = repository.get("mlp")
    assert latest.version == 2
    assert repository.get("mlp", 1).version == 1
    assert not latest.module.training
    assert latest.config.inputs[0].shape == (784,)
    assert latest.config.sha256 is not None


def test_repository_loads_only_the_named_models(examples_root: Path) -> None:
    repository = DirectoryModelRepository(
        root=examples_root, device=CPU, names=["cnn"], warmup=False
    )
    repository.load()
    assert repository.names() == ["cnn"]


def test_unknown_model_and_version_raise_typed_errors(tmp_path: Path) -> None:
    write_double(tmp_path, version=3)
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    repository.load()
    with pytest.raises(
        UnknownModelError, match="'nope' is not served here; served: \\['double'\\]"
    ):
        repository.get("nope")
    with pytest.raises(UnknownVersionError, match="no version 1; loaded: \\[3\\]") as raised:
        repository.get("double", 1)
    assert raised.value.code is ErrorCode.UNKNOWN_VERSION


def test_entries_that_are_not_versions_are_ignored(tmp_path: Path) -> None:
    write_double(tmp_path)
    for ignored in ("double/latest", "double/0", "double/01", "empty"):
        (tmp_path / ignored).mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    (tmp_path / "double" / "notes.txt").write_text("not a version")
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    repository.load()
    assert [(m.name, m.version) for m in repository.models()] == [("double", 1)]


def test_checksum_mismatch_is_a_load_error(tmp_path: Path) -> None:
    version_dir = write_double(tmp_path)
    config_path = version_dir / "config.json"
    content = json.loads(config_path.read_text())
    content["sha256"] = "0" * 64
    config_path.write_text(json.dumps(content))
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    with pytest.raises(ModelLoadError, match=r"double:1: sha256 of .* config.json says 0000"):
        repository.load()


def test_config_without_checksum_is_accepted(tmp_path: Path) -> None:
    version_dir = write_double(tmp_path)
    (version_dir / "config.json").write_text(DOUBLE_CONFIG.model_dump_json())
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    repository.load()
    assert repository.get("double").config.sha256 is None


@pytest.mark.parametrize(
    ("breakage", "detail"),
    [
        ("bad-json", "bad .*config.json"),
        ("no-config", "bad .*config.json"),
        ("no-module", "model.pt is missing"),
        ("garbage-module", "cannot load"),
    ],
)
def test_broken_version_directory_is_a_load_error(
    tmp_path: Path, breakage: str, detail: str
) -> None:
    version_dir = write_double(tmp_path)
    if breakage == "bad-json":
        (version_dir / "config.json").write_text("{not json")
    elif breakage == "no-config":
        (version_dir / "config.json").unlink()
    elif breakage == "no-module":
        (version_dir / "model.pt").unlink()
    else:
        (version_dir / "model.pt").write_bytes(b"not a zip archive")
        (version_dir / "config.json").write_text(DOUBLE_CONFIG.model_dump_json())
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    with pytest.raises(ModelLoadError, match=detail) as raised:
        repository.load()
    assert raised.value.code is ErrorCode.INTERNAL
    assert repository.names() == []


def test_warmup_catches_a_module_that_breaks_its_config(tmp_path: Path) -> None:
    write_model(
        root=tmp_path, name="bad", version=1, module=scripted(Truncate()), config=DOUBLE_CONFIG
    )
    with pytest.raises(ModelLoadError, match=r"bad:1: warm-up forward failed.*shape \[1, 2\]"):
        DirectoryModelRepository(root=tmp_path, device=CPU).load()
    repository = DirectoryModelRepository(root=tmp_path, device=CPU, warmup=False)
    repository.load()
    assert repository.names() == ["bad"]


def test_missing_root_named_model_or_empty_repository_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        DirectoryModelRepository(root=tmp_path / "absent", device=CPU).load()
    with pytest.raises(ModelLoadError, match="holds no models"):
        DirectoryModelRepository(root=tmp_path, device=CPU).load()
    write_double(tmp_path)
    with pytest.raises(ModelLoadError, match=r"\['other'\] not found"):
        DirectoryModelRepository(root=tmp_path, device=CPU, names=["double", "other"]).load()
    (tmp_path / "hollow").mkdir()
    with pytest.raises(ModelLoadError, match="'hollow' has no version directories"):
        DirectoryModelRepository(root=tmp_path, device=CPU, names=["hollow"]).load()


def test_repository_rejects_a_string_as_names(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        DirectoryModelRepository(root=tmp_path, device=CPU, names="mlp")
    with pytest.raises(ValueError, match="non-empty"):
        DirectoryModelRepository(root=tmp_path, device=CPU, names=[])


def test_a_failed_reload_keeps_the_models_already_loaded(tmp_path: Path) -> None:
    version_dir = write_double(tmp_path)
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    repository.load()
    shutil.rmtree(version_dir)
    write_double(tmp_path, version=2)
    (tmp_path / "double" / "2" / "model.pt").unlink()
    with pytest.raises(ModelLoadError):
        repository.load()
    assert repository.get("double").version == 1
