"""The runner: batches run on its thread, split back per request, with OOM and poison handling."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from torch import nn

from schemas.errors import ErrorCode
from workers.errors import (
    DeviceUnavailableError,
    InferenceFailedError,
    InferenceOutOfMemoryError,
    RunnerClosedError,
)
from workers.example_models import EXAMPLE_MODELS, build_example
from workers.models import LoadedModel, ModelConfig, TensorSpec, torchscript_deprecation_silenced
from workers.runner import (
    BatchOutcome,
    ModelRunner,
    RequestFailed,
    RequestSucceeded,
    execute_batch,
    resolve_device,
)

CPU = torch.device("cpu")
VECTOR_CONFIG = ModelConfig(
    inputs=(TensorSpec(name="x", datatype="FP32", shape=(4,)),),
    outputs=(TensorSpec(name="y", datatype="FP32", shape=(4,)),),
)


class Poisonable(nn.Module):
    """Doubles its input, but refuses any batch holding a huge value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e6:
            raise RuntimeError("poison value in input")
        return x * 2


class OutOfMemoryAbove(nn.Module):
    """Doubles its input; 'runs out of device memory' for batches above `max_rows` rows."""

    def __init__(self, max_rows: int, *, as_runtime_error: bool = False) -> None:
        super().__init__()
        self.max_rows = max_rows
        self.as_runtime_error = as_runtime_error
        self.batch_rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_rows.append(x.shape[0])
        if x.shape[0] > self.max_rows:
            if self.as_runtime_error:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2


class Slow(nn.Module):
    """Doubles its input after sleeping, and records the thread it ran on."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.threads: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return x * 2


class NamedOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": x.sum(dim=1, keepdim=True), "doubled": x * 2}


def vector_model(module: nn.Module, config: ModelConfig = VECTOR_CONFIG) -> LoadedModel:
    return LoadedModel(name="vec", version=1, config=config, module=module, device=CPU)


def rows_of(*rows: int) -> list[tuple[np.ndarray, ...]]:
    """Requests of the given row counts, with distinct values: each a tuple of its inputs."""
    return [
        (np.arange(count * 4, dtype=np.float32).reshape(count, 4) + 100 * index,)
        for index, count in enumerate(rows)
    ]


def succeeded(outcome: RequestSucceeded | RequestFailed) -> tuple[np.ndarray, ...]:
    assert isinstance(outcome, RequestSucceeded), outcome
    return outcome.outputs


def failed(outcome: RequestSucceeded | RequestFailed) -> Exception:
    assert isinstance(outcome, RequestFailed), outcome
    return outcome.error


@pytest.fixture
async def runner() -> AsyncIterator[ModelRunner]:
    async with ModelRunner(device=CPU, num_threads=None) as model_runner:
        yield model_runner


async def test_batched_outputs_equal_the_model_run_per_request(runner: ModelRunner) -> None:
    example = EXAMPLE_MODELS[0]
    module = build_example(example)
    model = LoadedModel(
        name=example.name, version=example.version, config=example.config, module=module, device=CPU
    )
    generator = torch.Generator().manual_seed(7)
    requests = [(torch.randn(rows, 784, generator=generator).numpy(),) for rows in (1, 3, 2)]

    batch = await runner.run_batch(model, requests)

    assert batch.forward_passes == 1
    assert batch.infer_ms > 0.0
    for request, outcome in zip(requests, batch.outcomes, strict=True):
        (logits,) = succeeded(outcome)
        expected = module(torch.from_numpy(request[0])).detach().numpy()
        assert logits.shape == (request[0].shape[0], 10)
        assert logits.flags.c_contiguous
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


async def test_rows_are_split_back_to_their_requests(runner: ModelRunner) -> None:
    requests = rows_of(2, 1, 3)
    batch = await runner.run_batch(vector_model(Poisonable()), requests)
    for request, outcome in zip(requests, batch.outcomes, strict=True):
        (doubled,) = succeeded(outcome)
        torch.testing.assert_close(doubled, request[0] * 2)


async def test_dict_outputs_come_back_in_config_order(runner: ModelRunner) -> None:
    config = ModelConfig(
        inputs=VECTOR_CONFIG.inputs,
        outputs=(
            TensorSpec(name="doubled", datatype="FP32", shape=(4,)),
            TensorSpec(name="total", datatype="FP32", shape=(1,)),
        ),
    )
    with torchscript_deprecation_silenced():
        module = torch.jit.script(NamedOutputs())
    requests = rows_of(1, 2)
    batch = await runner.run_batch(vector_model(module, config), requests)
    for request, outcome in zip(requests, batch.outcomes, strict=True):
        doubled, total = succeeded(outcome)
        torch.testing.assert_close(doubled, request[0] * 2)
        torch.testing.assert_close(total, request[0].sum(axis=1, keepdims=True))


async def test_a_poison_request_fails_alone_after_isolation(runner: ModelRunner) -> None:
    with torchscript_deprecation_silenced():
        module = torch.jit.script(Poisonable())
    requests = rows_of(1, 2, 1)
    requests[1] = (np.full((2, 4), 1e7, dtype=np.float32),)

    batch = await runner.run_batch(vector_model(module), requests)

    assert batch.forward_passes == 4
    error = failed(batch.outcomes[1])
    assert isinstance(error, InferenceFailedError)
    assert error.code is ErrorCode.INFERENCE_ERROR
    assert "vec:1 failed on this request" in error.message
    assert "poison value in input" in error.message
    for index in (0, 2):
        (doubled,) = succeeded(batch.outcomes[index])
        torch.testing.assert_close(doubled, requests[index][0] * 2)


async def test_a_failing_batch_of_one_fails_without_retry(runner: ModelRunner) -> None:
    poison = (np.full((1, 4), 1e7, dtype=np.float32),)
    batch = await runner.run_batch(vector_model(Poisonable()), [poison])
    assert batch.forward_passes == 1
    assert isinstance(failed(batch.outcomes[0]), InferenceFailedError)


def test_out_of_memory_splits_the_batch_until_it_fits() -> None:
    module = OutOfMemoryAbove(max_rows=2)
    requests = rows_of(1, 1, 1, 1, 1)

    batch = execute_batch(vector_model(module), requests)

    assert module.batch_rows == [5, 2, 3, 1, 2]
    assert batch.forward_passes == 5
    for request, outcome in zip(requests, batch.outcomes, strict=True):
        (doubled,) = succeeded(outcome)
        torch.testing.assert_close(doubled, request[0] * 2)


@pytest.mark.parametrize("as_runtime_error", [False, True])
def test_a_request_that_runs_out_of_memory_alone_fails(as_runtime_error: bool) -> None:
    module = OutOfMemoryAbove(max_rows=2, as_runtime_error=as_runtime_error)
    requests = rows_of(1, 3, 1)

    batch = execute_batch(vector_model(module), requests)

    assert module.batch_rows == [5, 1, 4, 3, 1]
    error = failed(batch.outcomes[1])
    assert isinstance(error, InferenceOutOfMemoryError)
    assert error.code is ErrorCode.INFERENCE_ERROR
    assert "3 rows" in error.message
    succeeded(batch.outcomes[0])
    succeeded(batch.outcomes[2])


def test_outputs_that_break_the_config_fail_every_request() -> None:
    model = vector_model(nn.Flatten(start_dim=0))
    batch = execute_batch(model, rows_of(1, 2))
    assert batch.forward_passes == 3
    for outcome in batch.outcomes:
        assert "returned shape" in failed(outcome).args[0]


async def test_event_loop_keeps_running_while_a_batch_runs(runner: ModelRunner) -> None:
    module = Slow(seconds=0.3)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        batch = await runner.run_batch(vector_model(module), rows_of(1, 1))
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)

    assert ticks >= 10
    assert module.threads == ["inferq-runner_0"]
    assert len(batch.outcomes) == 2


async def test_close_waits_for_the_running_batch_then_refuses_new_ones() -> None:
    runner = ModelRunner(device=CPU, num_threads=1)
    model = vector_model(Slow(seconds=0.2))
    running = asyncio.create_task(runner.run_batch(model, rows_of(1)))
    await asyncio.sleep(0.05)

    await runner.close()

    assert running.done()
    batch: BatchOutcome = running.result()
    succeeded(batch.outcomes[0])
    with pytest.raises(RunnerClosedError) as raised:
        await runner.run_batch(model, rows_of(1))
    assert raised.value.retriable
    await runner.close()


async def test_empty_batch_runs_nothing(runner: ModelRunner) -> None:
    batch = await runner.run_batch(vector_model(OutOfMemoryAbove(max_rows=1)), [])
    assert batch == BatchOutcome(outcomes=(), infer_ms=0.0, forward_passes=0)


async def test_runner_rejects_a_model_on_another_device(runner: ModelRunner) -> None:
    model = LoadedModel(
        name="vec",
        version=1,
        config=VECTOR_CONFIG,
        module=nn.Identity(),
        device=torch.device("meta"),
    )
    with pytest.raises(ValueError, match="vec:1 is on meta"):
        await runner.run_batch(model, rows_of(1))


def test_runner_rejects_non_positive_thread_count() -> None:
    with pytest.raises(ValueError, match="num_threads"):
        ModelRunner(device=CPU, num_threads=0)


# Devices


@pytest.mark.parametrize("spec", ["cpu", " CPU "])
def test_resolve_cpu(spec: str) -> None:
    assert resolve_device(spec) == CPU


def test_resolve_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            resolve_device(spec)


def test_resolve_with_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceUnavailableError, match=r"2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    with pytest.raises(DeviceUnavailableError, match="cuda:N"):
        resolve_device("cuda:first")


@pytest.mark.parametrize("spec", ["tpu", "mps", "", "cuda0"])
def test_resolve_unsupported_device(spec: str) -> None:
    with pytest.raises(DeviceUnavailableError, match="unsupported device"):
        resolve_device(spec)


class HalfPrecision(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_bf16_travels_as_its_raw_bits_both_ways() -> None:
    spec = TensorSpec(name="x", datatype="BF16", shape=(4,))
    config = ModelConfig(inputs=(spec,), outputs=(spec.model_copy(update={"name": "y"}),))
    values = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    batch = execute_batch(vector_model(HalfPrecision(), config), [(bits,), (bits.copy(),)])
    for outcome in batch.outcomes:
        (doubled,) = succeeded(outcome)
        assert doubled.dtype == np.uint16
        as_floats = torch.from_numpy(doubled.view(np.int16)).view(torch.bfloat16)
        assert torch.equal(as_floats, values * 2)
