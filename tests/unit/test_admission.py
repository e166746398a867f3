"""Admission turns each record into a request to batch or an answer: no I/O involved."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from schemas.codec import CodecLimits, ContentType, decode_result, encode_request
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest, ResultStatus
from schemas.tensors import Tensor
from schemas.topics import HEADER_ERROR_CODE, HEADER_SOURCE, TopicNames
from workers.admission import Admission, PendingRequest
from workers.answers import Answers
from workers.authoring import write_version
from workers.example_models import write_example_models
from workers.formats import ModelFormat
from workers.metrics import Outcome
from workers.models import ModelConfig, TensorSpec, torchscript_deprecation_silenced
from workers.records import Answer, RecordSource
from workers.repository import DirectoryModelRepository

TOPICS = TopicNames(prefix="unit")
REPLY_PREFIXES = ("unit.replies.",)


def new_admission(repository: DirectoryModelRepository, worker_id: str = "w1") -> Admission:
    return Admission(
        repository=repository,
        answers=Answers(topics=TOPICS, worker_id=worker_id),
        limits=CodecLimits(),
        reply_topic_prefixes=REPLY_PREFIXES,
    )


class Partition:
    """Stands in for aiokafka's TopicPartition (a NamedTuple of topic and partition)."""

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


@pytest.fixture(scope="module")
def admission(tmp_path_factory: pytest.TempPathFactory) -> Admission:
    root = tmp_path_factory.mktemp("models")
    write_example_models(root)
    repository = DirectoryModelRepository(root=root, device=torch.device("cpu"))
    repository.load()
    return new_admission(repository)


def admit(admission: Admission, value: bytes, *, headers: list | None = None, now_ms: int = 0):
    return admission.admit(
        source=RecordSource(Partition(TOPICS.requests("mlp"), 3), 42),
        key=b"k",
        value=value,
        headers=headers or [],
        received_at=1.0,
        received_ms=now_ms,
    )


def request(**fields: object) -> InferenceRequest:
    values: dict = {
        "id": "r1",
        "model": "mlp",
        "inputs": (Tensor.from_numpy("input", np.zeros((2, 784), np.float32)),),
    }
    values.update(fields)
    return InferenceRequest(**values)


def test_a_valid_request_is_pending_with_its_batch_key(admission: Admission) -> None:
    pending = admit(admission, encode_request(request(version=1)))
    assert isinstance(pending, PendingRequest)
    assert pending.rows == 2
    assert pending.key.model == "mlp"
    assert pending.key.version == 1
    assert [tuple(s) for s in pending.key.signature] == [("input", "FP32", (784,))]
    assert pending.to.topic == TOPICS.results("mlp")
    assert pending.to.fallback_topic is None


def test_requests_without_version_batch_with_the_latest(admission: Admission) -> None:
    latest = admit(admission, encode_request(request()))
    pinned = admit(admission, encode_request(request(version=2)))
    older = admit(admission, encode_request(request(version=1)))
    assert isinstance(latest, PendingRequest)
    assert isinstance(pinned, PendingRequest)
    assert isinstance(older, PendingRequest)
    assert latest.key == pinned.key != older.key


def test_bytes_without_a_readable_id_become_a_dead_letter(admission: Admission) -> None:
    answer = admit(admission, b"\xc1garbage")
    assert isinstance(answer, Answer)
    assert answer.topic == TOPICS.dead_letters
    assert answer.value == b"\xc1garbage"
    assert answer.cache_key is None
    assert answer.outcome is Outcome.DEAD_LETTER
    headers = dict(answer.headers)
    assert headers[HEADER_ERROR_CODE] == b"DECODE_ERROR"
    assert headers[HEADER_SOURCE] == f"{TOPICS.requests('mlp')}/3/42".encode()


def test_an_invalid_request_with_an_id_gets_an_error_result(admission: Admission) -> None:
    value = msgpack.packb({"id": "r9", "model": "mlp", "inputs": "not a list"})
    answer = admit(admission, value)
    assert isinstance(answer, Answer)
    assert answer.cache_key == TOPICS.result_key("r9")
    result = decode_result(answer.value)
    assert result.error is not None
    assert result.error.code is ErrorCode.VALIDATION_ERROR
    assert "inputs" in result.error.message


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"model": "nope"}, ErrorCode.UNKNOWN_MODEL),
        ({"version": 7}, ErrorCode.UNKNOWN_VERSION),
        (
            {"inputs": (Tensor.from_numpy("input", np.zeros((1, 10), np.float32)),)},
            ErrorCode.SHAPE_MISMATCH,
        ),
        (
            {"inputs": (Tensor.from_numpy("input", np.zeros((1, 784), np.int64)),)},
            ErrorCode.DTYPE_MISMATCH,
        ),
    ],
)
def test_model_mismatches_are_answered_with_their_code(
    admission: Admission, fields: dict, code: ErrorCode
) -> None:
    answer = admit(admission, encode_request(request(**fields), ContentType.JSON),
                   headers=[("content-type", b"application/json")])  # fmt: skip
    assert isinstance(answer, Answer)
    assert answer.value.startswith(b"{"), "answered in the request's encoding"
    result = decode_result(answer.value, ContentType.JSON)
    assert result.status is ResultStatus.ERROR
    assert result.error is not None
    assert result.error.code is code


def test_an_expired_request_is_answered_without_running(admission: Admission) -> None:
    answer = admit(admission, encode_request(request(deadline_ms=1000)), now_ms=2000)
    assert isinstance(answer, Answer)
    result = decode_result(answer.value)
    assert result.status is ResultStatus.EXPIRED
    assert result.error is not None
    assert result.error.code is ErrorCode.DEADLINE_EXCEEDED


def test_an_allowed_reply_to_addresses_the_result(admission: Admission) -> None:
    pending = admit(admission, encode_request(request(reply_to="unit.replies.mine")))
    assert isinstance(pending, PendingRequest)
    assert pending.to.topic == "unit.replies.mine"
    assert pending.to.fallback_topic == TOPICS.results("mlp"), "used if reply_to is missing"
    answer = admit(admission, encode_request(request(model="nope", reply_to="unit.replies.x")))
    assert isinstance(answer, Answer)
    assert answer.topic == "unit.replies.x"


@pytest.mark.parametrize(
    "reply_to",
    [
        "unit.requests.mlp",  # the request topic itself: the worker would consume it again
        "unit.results.cnn",  # another model's results
        "unit.dlq",
        "__consumer_offsets",
        "__transaction_state",
        "some.other.topic",  # not under an allowed prefix
        "unit.replies",  # the prefix needs a name after it
    ],
)
def test_a_reply_to_outside_the_allow_list_is_refused_on_the_results_topic(
    admission: Admission, reply_to: str
) -> None:
    answer = admit(admission, encode_request(request(reply_to=reply_to)))
    assert isinstance(answer, Answer)
    assert answer.topic == TOPICS.results("mlp")
    assert answer.fallback_topic is None
    result = decode_result(answer.value)
    assert result.error is not None
    assert result.error.code is ErrorCode.VALIDATION_ERROR
    assert "reply_to" in result.error.message


def test_a_reply_to_read_from_an_invalid_request_is_checked_too(admission: Admission) -> None:
    value = msgpack.packb(
        {"id": "r9", "model": "mlp", "inputs": "not a list", "reply_to": "unit.requests.mlp"}
    )
    answer = admit(admission, value)
    assert isinstance(answer, Answer)
    assert answer.topic == TOPICS.results("mlp")


def test_the_digest_binds_what_the_request_asks_not_how_it_is_delivered(
    admission: Admission,
) -> None:
    def digest(**fields: object) -> bytes:
        admitted = admit(admission, encode_request(request(**fields)))
        if isinstance(admitted, Answer):  # refused (mlp takes no parameters), digest all the same
            assert admitted.digest is not None
            return admitted.digest
        return admitted.to.digest

    base = digest()
    assert base == digest(created_ms=5, deadline_ms=10**15, priority=3, trace="t")
    assert base == digest(reply_to="unit.replies.mine")
    other = Tensor.from_numpy("input", np.ones((2, 784), np.float32))
    assert base != digest(inputs=(other,))
    assert base != digest(version=1)
    assert base != digest(parameters={"k": 1})
    json_pending = admit(admission, encode_request(request(), ContentType.JSON),
                         headers=[("content-type", b"application/json")])  # fmt: skip
    assert isinstance(json_pending, PendingRequest)
    assert json_pending.to.digest == base, "the same request in JSON is the same request"


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_a_scalar_after_an_accepted_batch_of_scalars_is_answered_not_crashed(
    tmp_path: Path,
) -> None:
    """A per-row scalar input: `[N]` and `[]` share a batch key, but only `[N]` has rows."""
    with torchscript_deprecation_silenced():
        module = torch.jit.script(Doubler())
    spec = TensorSpec(name="input", datatype="FP32", shape=())
    output = spec.model_copy(update={"name": "y"})
    config = ModelConfig(inputs=[spec], outputs=[output])
    write_version(
        fmt=ModelFormat.TORCHSCRIPT,
        root=tmp_path,
        name="mlp",
        version=1,
        module=module,
        config=config,
    )
    repository = DirectoryModelRepository(root=tmp_path, device=torch.device("cpu"))
    repository.load()
    fresh = new_admission(repository, worker_id="w")
    rows = Tensor.from_numpy("input", np.ones(3, dtype=np.float32))
    assert isinstance(admit(fresh, encode_request(request(inputs=(rows,)))), PendingRequest)
    scalar = Tensor.from_numpy("input", np.array(1.0, dtype=np.float32))
    answer = admit(fresh, encode_request(request(id="r2", inputs=(scalar,))))
    assert isinstance(answer, Answer)
    result = decode_result(answer.value)
    assert result.error is not None
    assert result.error.code is ErrorCode.SHAPE_MISMATCH
