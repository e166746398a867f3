"""The worker's whole loop, driven without Kafka or Redis (burst mode over in-memory ports)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from deploy.local.demo import model_outputs
from schemas.codec import ContentType, decode_result, encode_request
from schemas.errors import ErrorCode
from schemas.messages import InferenceRequest, ResultStatus
from schemas.settings import KafkaSettings
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from workers.authoring import write_version
from workers.example_models import write_example_models
from workers.memory import MemoryConsumer, MemoryPartition, MemoryRecord, MemoryWriter
from workers.metrics import Outcome, WorkerMetrics
from workers.models import ModelConfig, ParameterSpec, TensorSpec
from workers.repository import DirectoryModelRepository
from workers.runner import ModelRunner
from workers.settings import WorkerSettings
from workers.worker import Worker

PREFIX = "loop"
TOPICS = TopicNames(prefix=PREFIX)
P0 = MemoryPartition(TOPICS.requests("mlp"), 0)
P1 = MemoryPartition(TOPICS.requests("mlp"), 1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_example_models(root)
    return root


@pytest.fixture
async def runner() -> AsyncIterator[ModelRunner]:
    async with ModelRunner(device=torch.device("cpu"), num_threads=1) as model_runner:
        yield model_runner


def new_worker(models_dir: Path, runner: ModelRunner, **overrides: object) -> Worker:
    settings = WorkerSettings(
        kafka=KafkaSettings(topic_prefix=PREFIX),
        models_dir=models_dir,
        worker_id="w-loop",
        shutdown_timeout_s=20.0,
        **overrides,  # type: ignore[arg-type]
    )
    repository = DirectoryModelRepository(root=models_dir, device=torch.device("cpu"))
    repository.load()
    return Worker(settings=settings, repository=repository, runner=runner, metrics=WorkerMetrics())


def requests(count: int, *, seed: int = 0, first: int = 0) -> list[InferenceRequest]:
    rows = np.random.default_rng(seed).standard_normal((count, 1, 784), dtype=np.float32)
    return [
        InferenceRequest(
            id=f"r{first + i}", model="mlp", version=1, inputs=(Tensor.from_numpy("input", row),)
        )
        for i, row in enumerate(rows)
    ]


async def serve_burst(worker: Worker, consumer: MemoryConsumer, writer: MemoryWriter) -> None:
    async with asyncio.timeout(60):
        await worker.serve(consumer=consumer, writer=writer, stop=asyncio.Event(), burst=True)


async def test_a_burst_answers_every_record_once_and_commits_past_the_last(
    models_dir: Path, runner: ModelRunner
) -> None:
    good = requests(300)
    records = [MemoryRecord(offset=i, value=encode_request(r)) for i, r in enumerate(good)]
    bad_shape = InferenceRequest(
        id="bad-shape", model="mlp", inputs=(Tensor.from_numpy("input", np.zeros((1, 3), "f4")),)
    )
    extra = [
        MemoryRecord(offset=300, value=b"\xc1 not msgpack"),
        MemoryRecord(offset=301, value=encode_request(bad_shape)),
    ]
    consumer = MemoryConsumer({P0: records[:150] + extra, P1: records[150:]})
    worker = new_worker(models_dir, runner)
    writer = MemoryWriter(answers=worker._answer_builder)

    await serve_burst(worker, consumer, writer)

    assert consumer.committed == {P0: 302, P1: 300}
    assert worker.in_flight == 0
    by_id = Counter(answer.request_id for answer in writer.sent)
    assert by_id.pop(None) == 1  # the undecodable record, dead-lettered
    assert by_id == Counter({r.id: 1 for r in good} | {"bad-shape": 1})
    results = {a.request_id: decode_result(a.value) for a in writer.sent if a.request_id}
    error = results["bad-shape"].error
    assert error is not None
    assert error.code is ErrorCode.SHAPE_MISMATCH
    expected = model_outputs(models_dir / "mlp" / "1", good)
    for row, request in enumerate(good):
        result = results[request.id]
        assert result.status is ResultStatus.OK
        assert result.timing is not None
        np.testing.assert_allclose(
            result.outputs[0].to_numpy(), expected[row : row + 1], rtol=1e-4, atol=1e-5
        )
    assert max(r.timing.batch_size for r in results.values() if r.timing) > 1


async def test_exactly_once_commits_offsets_only_with_the_answers_that_complete_them(
    models_dir: Path, runner: ModelRunner
) -> None:
    good = requests(300)
    records = [MemoryRecord(offset=i, value=encode_request(r)) for i, r in enumerate(good)]
    by_partition = {P0: records[:150], P1: records[150:]}
    consumer = MemoryConsumer(by_partition)
    worker = new_worker(models_dir, runner, exactly_once=True)

    class Recording(MemoryWriter):
        """Checks, at each write, that the offsets sent never pass an unwritten answer."""

        answered: set[tuple[MemoryPartition, int]] = set()  # noqa: RUF012 - one test's own

        async def write(self, answers, *, offsets=None):  # type: ignore[no-untyped-def]
            assert offsets is not None, "an exactly-once write carries its offsets"
            for answer in answers:
                self.answered.add((answer.source.partition, answer.source.offset))

            def checked() -> dict[MemoryPartition, int]:
                sent = dict(offsets())
                for partition, offset in sent.items():
                    below = [r.offset for r in by_partition[partition] if r.offset < offset]
                    assert all((partition, o) in self.answered for o in below)
                return sent

            return await super().write(answers, offsets=checked)

    writer = Recording(answers=worker._answer_builder)
    await serve_burst(worker, consumer, writer)

    assert consumer.committed == {}, "the consumer commits nothing itself"
    assert writer.committed == {P0: 150, P1: 300}
    assert writer.transactions >= 1
    assert Counter(a.request_id for a in writer.sent) == Counter({r.id: 1 for r in good})
    assert worker.in_flight == 0


async def test_a_redelivered_burst_is_answered_from_the_cache_without_running(
    models_dir: Path, runner: ModelRunner
) -> None:
    batch = requests(40)
    records = [MemoryRecord(offset=i, value=encode_request(r)) for i, r in enumerate(batch)]
    worker = new_worker(models_dir, runner)
    writer = MemoryWriter(answers=worker._answer_builder)
    await serve_burst(worker, MemoryConsumer({P0: records}), writer)
    first = {answer.request_id: answer.value for answer in writer.sent}

    again = new_worker(models_dir, runner)
    writer.sent.clear()
    await serve_burst(again, MemoryConsumer({P0: records}), writer)

    assert {answer.outcome for answer in writer.sent} == {Outcome.CACHED}
    assert {answer.request_id: answer.value for answer in writer.sent} == first


async def test_higher_priority_requests_run_in_earlier_batches(
    models_dir: Path, runner: ModelRunner
) -> None:
    def record(offset: int, priority: int) -> MemoryRecord:
        (request,) = requests(1, seed=offset, first=offset)
        return MemoryRecord(
            offset=offset, value=encode_request(request.model_copy(update={"priority": priority}))
        )

    # One poll of 64 low-priority requests, then 8 urgent ones, all in one key's queue.
    records = [record(i, 0) for i in range(64)] + [record(64 + i, 5) for i in range(8)]
    worker = new_worker(models_dir, runner)
    writer = MemoryWriter(answers=worker._answer_builder)
    await serve_burst(worker, MemoryConsumer({P0: records}), writer)

    order = [answer.request_id for answer in writer.sent]
    urgent = [order.index(f"r{64 + i}") for i in range(8)]
    assert max(urgent) < 32, f"urgent requests answered at positions {urgent}"


async def test_a_record_of_plain_and_of_unusual_shape_get_the_same_result(
    models_dir: Path, runner: ModelRunner
) -> None:
    """The fast path and the full codec agree: the same request sent plainly and with an
    unknown extra key (which only the full codec reads) gets byte-equal outputs."""
    (request,) = requests(1)
    plain = encode_request(request)
    unusual = msgpack.packb({**msgpack.unpackb(plain), "id": "r-unusual", "extension": [1]})
    records = [MemoryRecord(offset=0, value=plain), MemoryRecord(offset=1, value=unusual)]
    worker = new_worker(models_dir, runner)
    writer = MemoryWriter(answers=worker._answer_builder)
    await serve_burst(worker, MemoryConsumer({P0: records}), writer)

    plain_result, unusual_result = (decode_result(answer.value) for answer in writer.sent)
    assert plain_result.outputs == unusual_result.outputs


class WatchedConsumer(MemoryConsumer):
    """A `MemoryConsumer` that notes the worker's in-flight bytes at every poll."""

    def __init__(self, records: dict[MemoryPartition, list[MemoryRecord]]) -> None:
        super().__init__(records)
        self.worker: Worker | None = None
        self.bytes_at_poll: list[int] = []

    async def getmany(
        self, *partitions: object, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[MemoryPartition, list[MemoryRecord]]:
        assert self.worker is not None
        self.bytes_at_poll.append(self.worker.in_flight_bytes)
        return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)


@pytest.mark.parametrize("bounded", [True, False])
async def test_intake_pauses_at_the_byte_bound_and_still_answers_everything(
    models_dir: Path, runner: ModelRunner, bounded: bool
) -> None:
    batch = requests(200)
    records = [MemoryRecord(offset=i, value=encode_request(r)) for i, r in enumerate(batch)]
    record_bytes = len(records[0].value or b"")
    bound = 20 * record_bytes
    consumer = WatchedConsumer({P0: records[:100], P1: records[100:]})
    overrides: dict[str, object] = {"fetch_max_records": 8, "max_in_flight": 4096}
    if bounded:
        overrides["max_in_flight_bytes"] = bound
    worker = new_worker(models_dir, runner, **overrides)
    consumer.worker = worker
    writer = MemoryWriter(answers=worker._answer_builder)

    await serve_burst(worker, consumer, writer)

    assert Counter(answer.request_id for answer in writer.sent) == Counter(r.id for r in batch)
    assert worker.in_flight_bytes == 0
    pauses = worker._metrics.registry.get_sample_value("inferq_consumer_pauses_total")
    if bounded:
        assert pauses is not None
        assert pauses > 0
        # Intake polls only below the bound, and a poll adds at most fetch_max_records.
        assert max(consumer.bytes_at_poll) < bound + 8 * record_bytes
    else:
        assert not pauses


class Scaled(torch.nn.Module):
    """Takes its parameters as keyword arguments (0-d tensors)."""

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return x * scale + shift


async def test_parameters_reach_the_model_and_only_equal_ones_batch_together(
    tmp_path: Path, runner: ModelRunner
) -> None:
    config = ModelConfig(
        inputs=(TensorSpec(name="x", datatype="FP32", shape=(2,)),),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(2,)),),
        parameters=(
            ParameterSpec(name="scale", datatype="FP32", default=1.0),
            ParameterSpec(name="shift", datatype="INT64", default=0),
        ),
    )
    write_version(root=tmp_path, name="scaled", module=Scaled(), config=config, version=1)
    topic = MemoryPartition(TOPICS.requests("scaled"), 0)
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    asked: list[tuple[str, dict[str, object]]] = [
        (f"p{i}", parameters)
        for i, parameters in enumerate(
            [{}, {"scale": 2.0}, {"scale": 3, "shift": 1}, {}, {"scale": 2.0}] * 4
        )
    ]
    refused = [
        ("unknown", {"temperature": 1.0}),
        ("wrong-kind", {"shift": 0.5}),
        ("not-a-number", {"scale": "2"}),
        ("bool", {"scale": True}),
    ]

    def record(offset: int, request_id: str, parameters: dict[str, object]) -> MemoryRecord:
        request = InferenceRequest(
            id=request_id,
            model="scaled",
            inputs=(Tensor.from_numpy("x", x),),
            parameters=parameters,  # type: ignore[arg-type]
        )
        return MemoryRecord(offset=offset, value=encode_request(request))

    records = [record(offset, *asked_for) for offset, asked_for in enumerate(asked + refused)]
    consumer = MemoryConsumer({topic: records})
    worker = new_worker(tmp_path, runner)
    writer = MemoryWriter(answers=worker._answer_builder)

    await serve_burst(worker, consumer, writer)

    results = {a.request_id: decode_result(a.value) for a in writer.sent}
    for request_id, parameters in asked:
        scale, shift = parameters.get("scale", 1.0), parameters.get("shift", 0)
        result = results[request_id]
        assert result.status is ResultStatus.OK, result.error
        np.testing.assert_allclose(result.outputs[0].to_numpy(), x * scale + shift)
        assert result.timing is not None
        assert result.timing.batch_size <= 8  # 3 distinct parameter sets among 20 requests
    for request_id, _ in refused:
        error = results[request_id].error
        assert error is not None
        assert error.code is ErrorCode.VALIDATION_ERROR
    assert "takes parameters ['scale', 'shift']" in str(results["unknown"].error)


async def test_a_requests_trace_comes_back_in_its_result_whatever_the_outcome(
    models_dir: Path, runner: ModelRunner
) -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ok, slow = requests(2)
    bad = InferenceRequest(
        id="bad", model="mlp", inputs=(Tensor.from_numpy("input", np.zeros((1, 3), "f4")),)
    )
    traced = [
        request.model_copy(update={"trace": f"{trace}-{request.id}"}) for request in (ok, bad)
    ]
    records = [MemoryRecord(offset=0, value=encode_request(traced[0])),  # the fast path
               MemoryRecord(offset=1, value=encode_request(traced[1])),  # an error result
               MemoryRecord(offset=2, value=encode_request(slow, ContentType.JSON),
                            headers=[("content-type", b"application/json")])]  # fmt: skip
    consumer = MemoryConsumer({P0: records})
    worker = new_worker(models_dir, runner)
    writer = MemoryWriter(answers=worker._answer_builder)

    await serve_burst(worker, consumer, writer)

    results = {a.request_id: a for a in writer.sent}
    assert decode_result(results[ok.id].value).trace == f"{trace}-{ok.id}"
    assert decode_result(results["bad"].value).trace == f"{trace}-bad"
    no_trace = decode_result(results[slow.id].value, ContentType.JSON)
    assert no_trace.trace is None
