"""The example models: deterministic, loadable, served with the signatures they declare."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from workers.checksums import verify_checksums
from workers.example_models import EXAMPLE_MODELS, build_example, main, write_example_models
from workers.formats import ModelFormat
from workers.repository import DirectoryModelRepository, open_version

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("examples")
    return root, write_example_models(root)


def test_writes_every_example_as_a_torch_export_program_with_its_checksums(
    written: tuple[Path, list[Path]],
) -> None:
    root, version_dirs = written
    assert version_dirs == [root / "mlp" / "1", root / "mlp" / "2", root / "cnn" / "1"]
    for version_dir in version_dirs:
        config = json.loads((version_dir / "config.json").read_text())
        assert config["format"] == "torch_export"
        assert sorted(path.name for path in version_dir.iterdir()) == [
            "SHA256SUMS", "config.json", "model.pt2"
        ]  # fmt: skip
        assert dict(verify_checksums(version_dir)) == {
            name: hashlib.sha256((version_dir / name).read_bytes()).hexdigest()
            for name in ("config.json", "model.pt2")
        }
    assert not [path for path in (root / "mlp").iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    "fmt",
    [ModelFormat.SAFETENSORS, ModelFormat.STATE_DICT, ModelFormat.TORCHSCRIPT],
    ids=lambda fmt: fmt.value,
)
def test_every_format_of_an_example_gives_the_outputs_of_its_torch_export_program(
    written: tuple[Path, list[Path]], tmp_path: Path, fmt: ModelFormat
) -> None:
    root, _ = written
    write_example_models(tmp_path, fmt)
    x = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exported = open_version(root / "cnn" / "1").module(x)
        other = open_version(tmp_path / "cnn" / "1").module(x)
    assert isinstance(exported, torch.Tensor)
    assert isinstance(other, torch.Tensor)
    assert open_version(tmp_path / "cnn" / "1").format is fmt
    torch.testing.assert_close(other, exported)


def test_same_seed_gives_identical_weights() -> None:
    torch.manual_seed(12345)  # the global generator's state must not matter
    for example in EXAMPLE_MODELS:
        one_state = build_example(example).state_dict()
        other_state = build_example(example).state_dict()
        assert one_state.keys() == other_state.keys()
        for key, value in one_state.items():
            assert torch.equal(value, other_state[key])


def test_building_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_example(EXAMPLE_MODELS[0])
    assert torch.equal(torch.rand(3), expected)


def test_mlp_versions_differ(written: tuple[Path, list[Path]]) -> None:
    root, _ = written
    repository = DirectoryModelRepository(root=root, device=CPU, names=["mlp"], warmup=False)
    repository.load()
    x = torch.ones(1, 784)
    with torch.inference_mode():
        one = repository.get("mlp", 1).module(x)
        two = repository.get("mlp", 2).module(x)
    assert not torch.allclose(one, two)


@pytest.mark.parametrize(("name", "row_shape"), [("mlp", (784,)), ("cnn", (3, 64, 64))])
def test_examples_load_and_answer_with_their_declared_shapes(
    written: tuple[Path, list[Path]], name: str, row_shape: tuple[int, ...]
) -> None:
    root, _ = written
    repository = DirectoryModelRepository(root=root, device=CPU, names=[name])
    repository.load()
    model = repository.get(name)
    inputs = {"input": torch.randn(2, *row_shape)}
    assert model.check_tensors(inputs) == 2
    with torch.inference_mode():
        (logits,) = model.collect_outputs(model.module(inputs["input"]), rows=2)
    assert logits.shape == (2, 10)
    assert logits.dtype == torch.float32


def test_command_line_writes_the_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models"
    assert main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "mlp" / "1"), str(out / "mlp" / "2"), str(out / "cnn" / "1")]
    assert (out / "cnn" / "1" / "model.pt2").is_file()
