"""The model repository: formats, integrity, version policies, reload, drain and unload."""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from schemas.errors import ErrorCode
from workers.authoring import export_program, write_version
from workers.checksums import CHECKSUMS_FILENAME, write_checksums
from workers.errors import ModelLoadError, UnknownModelError, UnknownVersionError
from workers.example_models import (
    EXAMPLE_MODELS,
    build_example,
    write_example,
    write_example_models,
)
from workers.formats import ModelFormat
from workers.metrics import WorkerMetrics
from workers.models import ModelConfig, TensorSpec
from workers.reload import ModelReloader
from workers.repository import (
    Change,
    DirectoryModelRepository,
    ModelManifest,
    VersionPolicy,
    VersionState,
    open_version,
)

CPU = torch.device("cpu")
MLP = EXAMPLE_MODELS[0]


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


DOUBLE_CONFIG = ModelConfig(
    inputs=(TensorSpec(name="x", datatype="FP32", shape=(3,)),),
    outputs=(TensorSpec(name="y", datatype="FP32", shape=(3,)),),
    max_batch_size=8,
)


def write_double(root: Path, version: int, *, policy: VersionPolicy | None = None) -> Path:
    return write_version(
        root=root,
        name="double",
        module=Double(),
        config=DOUBLE_CONFIG,
        version=version,
        manifest=None if policy is None else ModelManifest(version_policy=policy),
    )


@pytest.fixture(scope="module")
def double_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported `double` version, copied by tests instead of exported again."""
    return write_double(tmp_path_factory.mktemp("double"), 1)


def copy_version(source: Path, root: Path, version: int, name: str = "double") -> Path:
    """Put a copy of ``source`` in place as a writer must: a temporary name, then rename."""
    (root / name).mkdir(parents=True, exist_ok=True)
    staging = root / name / f".{version}.tmp"
    shutil.copytree(source, staging)
    final = root / name / str(version)
    staging.rename(final)
    return final


def served(repository: DirectoryModelRepository) -> list[tuple[str, int]]:
    return [(model.name, model.version) for model in repository.models()]


def load(root: Path, **options: object) -> DirectoryModelRepository:
    repository = DirectoryModelRepository(root=root, device=CPU, **options)  # type: ignore[arg-type]
    repository.load()
    return repository


def refresh(repository: DirectoryModelRepository) -> list[tuple[str, int, str]]:
    """One reload, as the reloader runs it; the failures as (name, version, reason)."""
    change = repository.apply(repository.reconcile(repository.scan()))
    return [(f.name, f.version, f.reason) for f in change.failures]


# Formats and the example repository


def test_the_examples_serve_with_their_policies(tmp_path: Path) -> None:
    write_example_models(tmp_path)
    repository = load(tmp_path)
    assert served(repository) == [("cnn", 1), ("mlp", 1), ("mlp", 2)]
    assert repository.get("mlp").version == 2
    assert {s.format for s in repository.statuses()} == {ModelFormat.TORCH_EXPORT}


def test_an_exported_program_runs_batches_of_1_7_and_the_largest(double_v1: Path) -> None:
    module = open_version(double_v1).module
    for rows in (1, 7, DOUBLE_CONFIG.max_batch_size):
        x = torch.randn(rows, 3)
        torch.testing.assert_close(module(x), x * 2)


def test_a_program_exported_at_batch_1_is_refused_by_its_warm_up(tmp_path: Path) -> None:
    # Exporting with an example batch of 1 fixes the batch dimension at 1, silently.
    fixed = torch.export.export(Double(), (torch.zeros(1, 3),))
    version_dir = tmp_path / "double" / "1"
    version_dir.mkdir(parents=True)
    torch.export.save(fixed, str(version_dir / "model.pt2"))
    (version_dir / "config.json").write_text(DOUBLE_CONFIG.model_dump_json())
    write_checksums(version_dir)
    with pytest.raises(ModelLoadError, match=r"double:1: warm-up forward failed"):
        load(tmp_path)
    assert export_program(Double(), DOUBLE_CONFIG).module()(torch.zeros(5, 3)).shape == (5, 3)


def test_torchscript_loads_with_its_deprecation_logged_once_per_model(tmp_path: Path) -> None:
    for example in EXAMPLE_MODELS:
        write_example(tmp_path, example, ModelFormat.TORCHSCRIPT)
    with capture_logs() as logs:
        repository = load(tmp_path)
    deprecated = sorted(e["model"] for e in logs if e["event"] == "model format deprecated")
    assert deprecated == ["cnn:1", "mlp:1", "mlp:2"]
    assert {s.format for s in repository.statuses()} == {ModelFormat.TORCHSCRIPT}


def test_a_weights_format_needs_its_factory(tmp_path: Path) -> None:
    version_dir = write_example(tmp_path, MLP, ModelFormat.SAFETENSORS)
    config = json.loads((version_dir / "config.json").read_text())
    assert config["factory"] == "workers.example_models:MLP"
    del config["factory"]
    (version_dir / "config.json").write_text(json.dumps(config))
    write_checksums(version_dir)
    with pytest.raises(ModelLoadError, match=r"holds weights only: config\.json needs a factory"):
        load(tmp_path)


class _WritesMarker:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", [ModelFormat.STATE_DICT, ModelFormat.TORCHSCRIPT])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, fmt: ModelFormat) -> None:
    marker = tmp_path / "marker"
    version_dir = write_example(tmp_path / "models", MLP, fmt)
    with (version_dir / fmt.filename).open("wb") as file:
        pickle.dump({"hidden.weight": _WritesMarker(marker)}, file)
    # A zip with the pickle inside, as torch.save writes it, must be refused just the same.
    torch.save({"hidden.weight": _WritesMarker(marker)}, str(tmp_path / "zipped.pt"))
    write_checksums(version_dir)
    for attempt in ("plain pickle", "torch.save zip"):
        if attempt == "torch.save zip":
            shutil.copyfile(tmp_path / "zipped.pt", version_dir / fmt.filename)
            write_checksums(version_dir)
        with pytest.raises(ModelLoadError, match=r"no model that loads: model mlp:1: "):
            load(tmp_path / "models")
    assert not marker.exists()
    if fmt is ModelFormat.STATE_DICT:
        with pytest.raises(ModelLoadError, match=r"not a plain-weights checkpoint") as raised:
            open_version(version_dir)
        assert raised.value.reason == "unsafe_checkpoint"
        assert not marker.exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "fmt",
    [ModelFormat.TORCH_EXPORT, ModelFormat.SAFETENSORS, ModelFormat.TORCHSCRIPT],
    ids=lambda fmt: fmt.value,
)
def test_a_reduced_precision_computes_in_it_and_answers_in_the_declared_datatype(
    tmp_path: Path, fmt: ModelFormat, precision: str
) -> None:
    config = MLP.config.model_copy(update={"precision": precision})
    version_dir = write_version(root=tmp_path, name="mlp", module=build_example(MLP),
                                config=config, fmt=fmt, version=1, factory=MLP.factory)  # fmt: skip
    model = open_version(version_dir, warmup=True)
    assert isinstance(model.module, nn.Module)
    weights = list(model.module.parameters())
    assert {p.dtype for p in weights} == {model.compute_dtype}
    x = torch.randn(7, 784, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        (reduced,) = model.forward([x], {}, rows=7)
        exact = build_example(MLP)(x)
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, exact, rtol=0.05, atol=0.05)
    assert not torch.equal(reduced, exact)


def test_int8_quantization_replaces_the_linear_layers_of_a_factory_model(tmp_path: Path) -> None:
    config = MLP.config.model_copy(update={"quantization": "int8_dynamic"})
    version_dir = write_version(root=tmp_path, name="mlp", module=build_example(MLP),
                                config=config, fmt=ModelFormat.SAFETENSORS, version=1,
                                factory=MLP.factory)  # fmt: skip
    model = open_version(version_dir, warmup=True)
    x = torch.randn(7, 784, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        (quantized,) = model.forward([x], {}, rows=7)
        exact = build_example(MLP)(x)
    torch.testing.assert_close(quantized, exact, rtol=0.05, atol=0.05)
    assert not torch.equal(quantized, exact)
    exported = write_version(root=tmp_path, name="exported", module=build_example(MLP),
                             config=config, version=1)  # fmt: skip
    with pytest.raises(ModelLoadError, match="has none to replace") as raised:
        open_version(exported)
    assert raised.value.reason == "config"


def test_a_compiled_package_cannot_be_cast_to_another_precision(tmp_path: Path) -> None:
    version_dir = write_example(tmp_path, MLP, ModelFormat.AOT_INDUCTOR)
    config = json.loads((version_dir / "config.json").read_text())
    config["precision"] = "bf16"
    (version_dir / "config.json").write_text(json.dumps(config))
    write_checksums(version_dir)
    with pytest.raises(ModelLoadError, match="runs at the dtypes it was compiled for") as raised:
        open_version(version_dir)
    assert raised.value.reason == "config"


# Integrity


def test_one_changed_byte_refuses_the_version_and_the_others_serve(
    tmp_path: Path, double_v1: Path
) -> None:
    copy_version(double_v1, tmp_path, 1)
    tampered = copy_version(double_v1, tmp_path, 2)
    data = bytearray((tampered / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "model.pt2").write_bytes(bytes(data))
    with capture_logs():
        repository = load(tmp_path)
    assert served(repository) == [("double", 1)]
    (failed,) = [s for s in repository.statuses() if s.state is VersionState.FAILED]
    assert failed.version == 2
    assert failed.detail.startswith("checksums: model double:2: ")
    assert "changed ['model.pt2']" in failed.detail


@pytest.mark.parametrize(
    ("breakage", "reason", "detail"),
    [
        ("no-checksums", "incomplete", "has no SHA256SUMS"),
        ("unlisted-file", "checksums", "unlisted ['notes.txt']"),
        ("missing-file", "checksums", "missing ['config.json']"),
        ("bad-config", "config", "bad config.json"),
        ("no-model-file", "load", "has no model file"),
        ("garbage-model", "load", "cannot load model.pt2 as torch_export"),
    ],
)
def test_a_broken_version_is_refused_with_its_reason(
    tmp_path: Path, double_v1: Path, breakage: str, reason: str, detail: str
) -> None:
    copy_version(double_v1, tmp_path, 1)
    broken = copy_version(double_v1, tmp_path, 2)
    if breakage == "no-checksums":
        (broken / CHECKSUMS_FILENAME).unlink()
    elif breakage == "unlisted-file":
        (broken / "notes.txt").write_text("extra")
    elif breakage == "missing-file":
        (broken / "config.json").unlink()
    else:
        if breakage == "bad-config":
            (broken / "config.json").write_text('{"inputs": []}')
        elif breakage == "no-model-file":
            (broken / "model.pt2").unlink()
            config = json.loads((broken / "config.json").read_text())
            del config["format"]
            (broken / "config.json").write_text(json.dumps(config))
        else:
            (broken / "model.pt2").write_bytes(b"not a zip archive")
        write_checksums(broken)
    repository = DirectoryModelRepository(root=tmp_path, device=CPU)
    (failure,) = repository.load().failures
    assert served(repository) == [("double", 1)]
    assert (failure.version, failure.reason) == (2, reason)
    assert detail in failure.message


def test_model_names_that_could_name_a_path_are_not_served(tmp_path: Path, double_v1: Path) -> None:
    copy_version(double_v1, tmp_path, 1)
    for bad in ("-rf", ".hidden", "with space"):
        copy_version(double_v1, tmp_path, 1, name=bad)
    assert load(tmp_path).names() == ["double"]


def test_entries_that_are_not_versions_are_ignored(tmp_path: Path, double_v1: Path) -> None:
    copy_version(double_v1, tmp_path, 1)
    for ignored in ("double/latest", "double/0", "double/01", "double/.2.tmp", "empty"):
        (tmp_path / ignored).mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    (tmp_path / "double" / "notes.txt").write_text("not a version")
    assert served(load(tmp_path)) == [("double", 1)]


# Versions


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (VersionPolicy(), [3]),
        (VersionPolicy(latest=2), [2, 3]),
        (VersionPolicy(specific=(1, 3, 9)), [1, 3]),
        (VersionPolicy(all=True), [1, 2, 3]),
    ],
    ids=["default", "latest-2", "specific", "all"],
)
def test_the_version_policy_picks_the_served_versions(
    tmp_path: Path, double_v1: Path, policy: VersionPolicy, expected: list[int]
) -> None:
    for version in (1, 2, 3):
        copy_version(double_v1, tmp_path, version)
    (tmp_path / "double" / "model.json").write_text(
        ModelManifest(version_policy=policy).model_dump_json()
    )
    repository = load(tmp_path)
    assert [version for _, version in served(repository)] == expected
    assert repository.get("double").version == max(expected)


def test_the_policy_reads_all_as_a_word_and_refuses_two_at_once() -> None:
    assert ModelManifest.model_validate_json('{"version_policy": "all"}').version_policy.all
    with pytest.raises(ValueError, match="one of latest, specific or all"):
        VersionPolicy(latest=1, all=True)


def test_unknown_model_and_version_raise_typed_errors(tmp_path: Path, double_v1: Path) -> None:
    copy_version(double_v1, tmp_path, 3)
    repository = load(tmp_path)
    with pytest.raises(UnknownModelError, match="'nope' is not served here; served: \\['double'"):
        repository.get("nope")
    with pytest.raises(UnknownVersionError, match="no version 1 served here; served: \\[3\\]") as e:
        repository.get("double", 1)
    assert e.value.code is ErrorCode.UNKNOWN_VERSION


def test_when_the_newest_fails_the_policy_falls_back_and_it_is_not_retried(
    tmp_path: Path, double_v1: Path
) -> None:
    copy_version(double_v1, tmp_path, 1)
    repository = load(tmp_path)
    broken = copy_version(double_v1, tmp_path, 2)
    (broken / "model.pt2").write_bytes(b"broken")
    assert refresh(repository) == [("double", 2, "checksums")]
    assert served(repository) == [("double", 1)]
    assert refresh(repository) == []  # the same content is not tried again
    shutil.rmtree(broken)
    copy_version(double_v1, tmp_path, 2)
    assert refresh(repository) == []
    assert served(repository) == [("double", 2)]


def test_a_new_version_swaps_in_and_the_old_one_drains_then_unloads(
    tmp_path: Path, double_v1: Path
) -> None:
    copy_version(double_v1, tmp_path, 1)
    repository = load(tmp_path)
    generation = repository.generation
    held = repository.get("double")  # a request queued for version 1 holds it
    copy_version(double_v1, tmp_path, 2)
    refresh(repository)
    assert repository.generation == generation + 1
    assert repository.get("double").version == 2
    with pytest.raises(UnknownVersionError):
        repository.get("double", 1)
    states = {(s.version, s.state) for s in repository.statuses()}
    assert states == {(1, VersionState.DRAINING), (2, VersionState.READY)}
    assert repository.drained() == []
    torch.testing.assert_close(held.module(torch.ones(1, 3)), torch.full((1, 3), 2.0))
    del held
    gc.collect()
    assert [(s.model, s.version) for s in repository.drained()] == [("double", 1)]
    assert {s.version for s in repository.statuses()} == {2}


def test_removing_every_version_stops_serving_the_model(tmp_path: Path, double_v1: Path) -> None:
    copy_version(double_v1, tmp_path, 1)
    copy_version(double_v1, tmp_path, 1, name="other")
    repository = load(tmp_path)
    shutil.rmtree(tmp_path / "double")
    change = repository.apply(repository.reconcile(repository.scan()))
    assert change.names_changed
    assert repository.names() == ["other"]


def test_a_version_changed_in_place_is_loaded_again_and_a_bad_change_keeps_the_old(
    tmp_path: Path, double_v1: Path
) -> None:
    version_dir = copy_version(double_v1, tmp_path, 1)
    repository = load(tmp_path)
    before = repository.get("double")
    (version_dir / "notes.txt").write_text("a new file, listed")
    write_checksums(version_dir)
    assert refresh(repository) == []
    after = repository.get("double")
    assert after is not before
    (version_dir / "notes.txt").write_text("changed, not listed")
    assert refresh(repository) == [("double", 1, "checksums")]
    assert repository.get("double") is after


# Hot reload and memory


async def test_the_reloader_counts_refusals_and_follows_the_repository(
    tmp_path: Path, double_v1: Path
) -> None:
    copy_version(double_v1, tmp_path, 1)
    repository = load(tmp_path)
    metrics = WorkerMetrics()
    metrics.watch_models(repository.statuses)
    changes: list[list[int]] = []

    async def on_change(change: Change) -> None:
        changes.append([served.model.version for served in change.added])

    reloader = ModelReloader(
        repository=repository, interval_s=0, metrics=metrics, on_change=on_change
    )
    broken = copy_version(double_v1, tmp_path, 2)
    (broken / "config.json").write_text("{}")
    with capture_logs() as logs:
        await reloader.reload()
    assert [e["reason"] for e in logs if e["event"] == "model version refused"] == ["checksums"]
    labels = {"model": "double", "version": "2", "reason": "checksums"}
    assert metrics.registry.get_sample_value("inferq_model_load_failures_total", labels) == 1
    ready = {"model": "double", "version": "1"}
    assert metrics.registry.get_sample_value("inferq_model_ready", ready) == 1
    assert metrics.registry.get_sample_value("inferq_model_memory_bytes", ready) is not None
    assert metrics.registry.get_sample_value("inferq_model_load_seconds", ready) > 0
    assert changes == []
    shutil.rmtree(broken)
    copy_version(double_v1, tmp_path, 2)
    held = repository.get("double")  # as a queued request would
    await reloader.reload()
    assert repository.get("double").version == 2
    assert changes == [[2]]
    assert metrics.registry.get_sample_value("inferq_model_ready", ready) == 0  # draining
    del held
    await reloader.reload()  # nothing holds version 1 any more: it is unloaded
    assert metrics.registry.get_sample_value("inferq_model_ready", ready) is None


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Wide(nn.Module):
    """16 MiB of weights: a leak of a few copies shows in the process's RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.layer(x)
        return result


async def test_fifty_cycles_of_adding_and_removing_a_version_give_the_memory_back(
    tmp_path: Path,
) -> None:
    wide = ModelConfig(
        inputs=(TensorSpec(name="x", datatype="FP32", shape=(2048,)),),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(2048,)),),
        max_batch_size=4,
    )
    source = write_version(
        root=tmp_path / "source", name="wide", module=Wide().eval(), config=wide, version=1
    )
    copy_version(source, tmp_path / "models", 1, name="wide")
    repository = load(tmp_path / "models", names=["wide"])
    reloader = ModelReloader(repository=repository, interval_s=0)
    for warm in (2, 3):  # the first cycles allocate what every later one reuses
        copy_version(source, tmp_path / "models", warm, name="wide")
        await reloader.reload()
        shutil.rmtree(tmp_path / "models" / "wide" / str(warm))
        await reloader.reload()
    before = rss_bytes()
    for cycle in range(50):
        version = 10 + cycle
        copy_version(source, tmp_path / "models", version, name="wide")
        await reloader.reload()
        assert repository.get("wide").version == version
        shutil.rmtree(tmp_path / "models" / "wide" / str(version))
        await reloader.reload()
        assert repository.get("wide").version == 1
    await reloader.reload()
    after = rss_bytes()
    print(f"RSS before {before / 2**20:.1f} MiB, after 50 cycles {after / 2**20:.1f} MiB")
    assert after <= before * 1.10
    assert [s.state for s in repository.statuses()] == [VersionState.READY]
    build_example(MLP)  # the example builder still works after the collector was unfrozen


def test_a_broken_model_json_changes_nothing_that_serves(tmp_path: Path, double_v1: Path) -> None:
    copy_version(double_v1, tmp_path, 1)
    repository = load(tmp_path)
    (tmp_path / "double" / "model.json").write_text('{"version_policy": {"latest": 0}}')
    copy_version(double_v1, tmp_path, 2)
    assert refresh(repository) == [("double", 0, "config")]
    assert served(repository) == [("double", 1)]
    assert refresh(repository) == []  # reported once, not at every scan
    (tmp_path / "double" / "model.json").write_text('{"version_policy": "all"}')
    assert refresh(repository) == []
    assert served(repository) == [("double", 1), ("double", 2)]


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(3.0))  # 0-d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_a_one_row_model_and_a_0_d_buffer_export_and_compile(tmp_path: Path) -> None:
    config = DOUBLE_CONFIG.model_copy(update={"max_batch_size": 1})
    for fmt in (ModelFormat.TORCH_EXPORT, ModelFormat.AOT_INDUCTOR):
        version_dir = write_version(root=tmp_path, name=f"scale-{fmt.value}", module=Scale(),
                                    config=config, fmt=fmt, version=1)  # fmt: skip
        model = open_version(version_dir, warmup=True)
        torch.testing.assert_close(model.forward([torch.ones(1, 3)], {}, rows=1)[0],
                                   torch.full((1, 3), 3.0))  # fmt: skip


def test_a_version_that_fails_its_check_is_never_renamed_into_place(
    tmp_path: Path, double_v1: Path
) -> None:
    copy_version(double_v1, tmp_path, 1)
    before = (tmp_path / "double" / "1" / "model.pt2").read_bytes()

    def refuse(staging: Path, version: int) -> None:
        raise ModelLoadError(f"refused {version}")

    for version in (1, 2):  # replacing one, adding one
        with pytest.raises(ModelLoadError, match=f"refused {version}"):
            write_version(root=tmp_path, name="double", module=Double(), config=DOUBLE_CONFIG,
                          version=version, check=refuse)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "double").iterdir()) == ["1"]
    assert (tmp_path / "double" / "1" / "model.pt2").read_bytes() == before
    write_version(root=tmp_path, name="double", module=Double(), config=DOUBLE_CONFIG,
                  version=1)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "double").iterdir()) == ["1"]  # swapped in place
    assert served(load(tmp_path)) == [("double", 1)]
