"""Model names and versions cannot name a path, at every entry point that takes one."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from producers import cli as producer_cli
from producers.backfill import BackfillPlan
from producers.client import InferenceClient
from producers.settings import ProducerSettings
from schemas.codec import CodecLimits, decode_result
from schemas.errors import ErrorCode, InvalidModelNameError
from schemas.messages import InferenceRequest
from schemas.names import check_model_name, check_model_version, is_model_name
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from workers import model_cli
from workers.admission import Admission
from workers.answers import Answers
from workers.authoring import write_version
from workers.example_models import write_example_models
from workers.records import Answer, RecordSource
from workers.repository import DirectoryModelRepository, scan_repository
from workers.settings import WorkerSettings
from workers.topics_cli import repository_models

PATH_NAMES = [
    "..", ".", "../etc", "..\\etc", "a/b", "a\\b", "/etc", ".hidden", "%2e%2e", "%2fetc",
    "a\x00b", "mlp\n", "-rf", "", "a b", "é", "x" * 201,
]  # fmt: skip
GOOD_NAMES = ["mlp", "a", "fraud-v2", "m.1", "A_b-c.d", "9lives", "x" * 200]
TOPICS = TopicNames(prefix="unit")
ROW = Tensor.from_numpy("input", np.zeros((1, 784), np.float32))


@pytest.mark.parametrize("name", PATH_NAMES)
def test_a_name_that_could_name_a_path_is_refused(name: str) -> None:
    assert not is_model_name(name)
    with pytest.raises(InvalidModelNameError, match="cannot name a path"):
        check_model_name(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_names_are_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, 2**63, None])
def test_a_version_is_a_positive_int(version: object) -> None:
    with pytest.raises(InvalidModelNameError):
        check_model_version(version)


def test_the_invalid_name_error_is_a_typed_validation_error() -> None:
    assert InvalidModelNameError.code is ErrorCode.VALIDATION_ERROR
    assert issubclass(InvalidModelNameError, ValueError)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_a_request_message_refuses_the_name(name: str) -> None:
    with pytest.raises(ValidationError):
        InferenceRequest(id="r1", model=name, inputs=(ROW,))


@pytest.fixture(scope="module")
def admission(tmp_path_factory: pytest.TempPathFactory) -> Admission:
    root = tmp_path_factory.mktemp("models")
    write_example_models(root)
    (root / ".." / "escaped").mkdir(exist_ok=True)  # a directory a traversal would reach
    repository = DirectoryModelRepository(root=root, device=torch.device("cpu"))
    repository.load()
    return Admission(
        repository=repository,
        answers=Answers(topics=TOPICS, worker_id="w1"),
        limits=CodecLimits(),
        reply_topic_prefixes=("unit.replies.",),
    )


class Partition:
    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


@pytest.mark.parametrize("name", ["../escaped", "../mlp", "a/b", ".hidden", "%2e%2e", "mlp\n"])
def test_admission_answers_a_path_name_without_touching_the_repository(
    admission: Admission, name: str
) -> None:
    value = msgpack.packb({"id": "r1", "model": name, "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 784],
         "data": np.zeros((1, 784), np.float32).tobytes()}]})  # fmt: skip
    answer = admission.admit(
        source=RecordSource(Partition(TOPICS.requests("mlp"), 0), 1),
        key=b"k",
        value=value,
        headers=[],
        received_at=1.0,
        received_ms=0,
    )
    assert isinstance(answer, Answer)
    result = decode_result(answer.value)
    assert result.error is not None
    assert result.error.code is ErrorCode.VALIDATION_ERROR
    assert "model" in result.error.message


def test_the_repository_scan_skips_directories_that_are_no_model_names(tmp_path: Path) -> None:
    for name in [".hidden", "%2e%2e", "mlp\n", "-rf", "a b", "good"]:
        (tmp_path / name / "1").mkdir(parents=True)
    for version in ["0", "01", "-1", "\u0663", ".2.tmp", "1e3", "3"]:  # \u0663: Arabic 3
        (tmp_path / "good" / version).mkdir(parents=True, exist_ok=True)
    listings = scan_repository(tmp_path)
    assert sorted(listings) == ["good"]
    assert sorted(listings["good"].versions) == [1, 3]
    assert repository_models(tmp_path) == ["good"]


@pytest.mark.parametrize("name", ["../outside", "a/b", ".hidden", "%2e%2e"])
def test_write_version_refuses_a_path_name_and_writes_nothing(tmp_path: Path, name: str) -> None:
    root = tmp_path / "models"
    root.mkdir()
    with pytest.raises(InvalidModelNameError):
        write_version(root=root, name=name, module=torch.nn.Identity(), config=None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [root]
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("name", ["../outside", "a/b", ".hidden", "%2e%2e"])
def test_inferq_model_add_refuses_a_path_name(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "batch.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(SystemExit) as exited:
        model_cli.main(["add", str(tmp_path / "models"), name,
                        "--factory", "x:y", "--example", str(tmp_path / "batch.npy")])  # fmt: skip
    assert exited.value.code == 2
    assert "cannot name a path" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("command", ["send", "publish", "backfill"])
def test_inferq_produce_refuses_a_path_name_and_a_bad_version(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"send": ["--shape", "4"], "publish": ["--input", "x.npy"],
             "backfill": ["--input", "x.npy", "--run", "r1"]}[command]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        producer_cli.main([command, "--model", "../etc", *extra])
    assert exited.value.code == 2
    assert "cannot name a path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        producer_cli.main([command, "--model", "mlp", "--version", "0", *extra])
    assert "not a positive integer" in capsys.readouterr().err


def test_served_models_must_be_model_names() -> None:
    with pytest.raises(ValidationError, match="cannot name a path"):
        WorkerSettings(served_models="mlp,../etc")
    assert WorkerSettings(served_models="mlp, cnn").served_model_names == ["mlp", "cnn"]


async def test_the_client_refuses_a_path_name_before_publishing() -> None:
    client = InferenceClient(settings=ProducerSettings())  # not started: nothing is sent
    row = {"input": np.zeros((1, 4), np.float32)}
    try:
        for name in ["../etc", "a/b", ".hidden", "%2e%2e"]:
            with pytest.raises(InvalidModelNameError):
                client.request(name, row)
            with pytest.raises(InvalidModelNameError):
                await client.submit(name, row)
            with pytest.raises(InvalidModelNameError):
                await client.infer(name, row, timeout_s=1)
        with pytest.raises(InvalidModelNameError):
            client.request("mlp", row, version=0)
    finally:
        await client.close()


def test_a_backfill_plan_refuses_a_path_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelNameError):
        BackfillPlan(model="../etc", dataset=None, output=tmp_path / "o.npz", run_id="r")  # type: ignore[arg-type]
    with pytest.raises(InvalidModelNameError):
        BackfillPlan(model="mlp", dataset=None, output=tmp_path / "o.npz", run_id="r", version=0)  # type: ignore[arg-type]
