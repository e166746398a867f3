"""`inferq-model`: add writes a loadable version; validate and list report what is there."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from workers.checksums import verify_checksums
from workers.example_models import EXAMPLE_MODELS, build_example, write_example_models
from workers.health import HealthServer
from workers.model_cli import main
from workers.repository import DirectoryModelRepository, open_version


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    text = capsys.readouterr().out.translate({ord(c): " " for c in "│┃┏━┳┓┡╇┩└─┴┘"})
    return status, " ".join(text.split())


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    write_example_models(root)
    return root


def test_add_writes_the_next_version_with_an_inferred_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = tmp_path / "batch.npy"
    np.save(example, np.zeros((4, 784), dtype=np.float32))
    weights = tmp_path / "mlp.safetensors"
    from safetensors.torch import save_file

    save_file(build_example(EXAMPLE_MODELS[1]).state_dict(), str(weights))
    models = tmp_path / "models"
    for expected_version in (1, 2):
        status, out = run(
            capsys, "add", str(models), "fraud", "--factory", "workers.example_models:MLP",
            "--weights", str(weights), "--example", str(example), "--output", "logits",
            "--max-batch-size", "16",
        )  # fmt: skip
        assert status == 0, out
        assert f"wrote {models / 'fraud' / str(expected_version)}" in out
    version_dir = models / "fraud" / "2"
    verify_checksums(version_dir)
    config = json.loads((version_dir / "config.json").read_text())
    assert config["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [784]}]
    assert config["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [10]}]
    assert (config["format"], config["max_batch_size"]) == ("torch_export", 16)
    x = torch.randn(16, 784)
    with torch.inference_mode():
        expected = build_example(EXAMPLE_MODELS[1])(x)
        torch.testing.assert_close(open_version(version_dir).module(x), expected)


def test_add_takes_an_input_spec_a_format_and_a_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(
        capsys, "add", str(tmp_path), "cnn", "--factory", "workers.example_models:SmallCNN",
        "--input", "image:FP32:3,64,64", "--format", "safetensors", "--policy", "latest:2",
    )  # fmt: skip
    assert status == 0, out
    config = json.loads((tmp_path / "cnn" / "1" / "config.json").read_text())
    assert config["factory"] == "workers.example_models:SmallCNN"
    assert config["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [3, 64, 64]}
    repository = DirectoryModelRepository(root=tmp_path, device=torch.device("cpu"))
    repository.load()
    assert repository.get("cnn").format.value == "safetensors"


def test_validate_passes_on_the_examples(
    examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, "validate", str(examples))
    assert status == 0, out
    for row in ("cnn 1 torch_export ok", "mlp 1 torch_export ok", "mlp 2 torch_export ok"):
        assert row in out


def test_validate_reports_what_int8_quantization_costs_in_accuracy_and_speed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(
        capsys, "add", str(tmp_path), "mlp", "--factory", "workers.example_models:MLP",
        "--input", "input:FP32:784", "--format", "safetensors", "--quantization", "int8_dynamic",
    )  # fmt: skip
    assert status == 0, out
    status, out = run(capsys, "validate", str(tmp_path))
    assert status == 0, out
    assert "mlp 1 safetensors ok" in out
    assert "int8_dynamic: max |delta| " in out
    assert "against fp32" in out


@pytest.mark.parametrize(
    ("breakage", "note"),
    [
        ("missing file", "checksums: model mlp:2: "),
        ("tampered file", "changed ['model.pt2']"),
        ("wrong shape", "warm_up: model mlp:2: warm-up forward failed"),
    ],
)
def test_validate_fails_with_a_row_that_says_why(
    examples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str, note: str
) -> None:
    root = tmp_path / "models"
    shutil.copytree(examples, root)
    version_dir = root / "mlp" / "2"
    if breakage == "missing file":
        (version_dir / "config.json").unlink()
    elif breakage == "tampered file":
        data = bytearray((version_dir / "model.pt2").read_bytes())
        data[-100] ^= 0xFF
        (version_dir / "model.pt2").write_bytes(bytes(data))
    else:
        config = json.loads((version_dir / "config.json").read_text())
        config["outputs"][0]["shape"] = [11]
        (version_dir / "config.json").write_text(json.dumps(config))
        from workers.checksums import write_checksums

        write_checksums(version_dir)
    status, out = run(capsys, "validate", str(root))
    assert status == 1
    assert "mlp 1 torch_export ok" in out
    assert "mlp 2" in out
    assert "failed" in out
    assert note.replace(" ", "") in out.replace(" ", "")


def test_list_shows_the_repository_and_a_running_workers_state(
    examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, "list", str(examples))
    assert status == 0
    assert "mlp 2 torch_export latest: 2 yes" in out
    repository = DirectoryModelRepository(root=examples, device=torch.device("cpu"))
    repository.load()

    async def list_worker() -> tuple[int, str]:
        server = HealthServer(
            registry=CollectorRegistry(), is_ready=lambda: True, host="127.0.0.1", port=0,
            models=repository.statuses,
        )  # fmt: skip
        await server.start()
        try:
            return await asyncio.to_thread(
                run, capsys, "list", "--worker", f"http://127.0.0.1:{server.port}"
            )
        finally:
            await server.close()

    status, out = asyncio.run(list_worker())
    assert status == 0
    assert "cnn 1 torch_export ready" in out
    assert "mlp 2 torch_export ready" in out
