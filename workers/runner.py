"""Running batches through PyTorch on one dedicated thread, off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeAlias

import structlog
import torch

from workers.errors import (
    DeviceUnavailableError,
    InferenceFailedError,
    InferenceOutOfMemoryError,
    RunnerClosedError,
    WorkerError,
)
from workers.models import LoadedModel

log = structlog.get_logger(__name__)

MAX_ERROR_MESSAGE_CHARS = 1024
"""Longest model exception text carried into an InferenceFailedError message."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestSucceeded:
    """A request's outputs: CPU, contiguous, in `config.outputs` order, its rows only."""

    outputs: tuple[torch.Tensor, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestFailed:
    """Why a request got no outputs."""

    error: WorkerError


RequestOutcome: TypeAlias = RequestSucceeded | RequestFailed


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchOutcome:
    """What running one batch gave: one outcome per request, in request order."""

    outcomes: tuple[RequestOutcome, ...]
    infer_ms: float
    """Wall time on the runner thread, stacking and copies included, in milliseconds."""
    forward_passes: int
    """Module calls made: 1 for a clean batch, more after an out-of-memory split or isolation."""


@dataclass(frozen=True, slots=True)
class _Request:
    index: int
    tensors: Mapping[str, torch.Tensor]
    rows: int


def _is_out_of_memory(error: Exception) -> bool:
    # TorchScript's interpreter may re-raise a CUDA OOM as a plain RuntimeError carrying
    # torch's text, so the type alone does not always tell.
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)
    )


class BatchExecution:
    """One batch on the runner thread: forward passes, out-of-memory splits, poison isolation.

    Synchronous and blocking: `ModelRunner` runs it on its thread; tests may call it directly.
    """

    def __init__(self, *, model: LoadedModel, inputs_checked: bool = False) -> None:
        """model: the loaded model the batch runs through, on `model.device`.

        inputs_checked: the caller has already run `model.check_tensors` on every request
        (the worker does at admission), so only the rows are read here.
        """
        self._model = model
        self._device = model.device
        self._inputs_checked = inputs_checked
        self.forward_passes = 0

    def run(self, requests: Sequence[Mapping[str, torch.Tensor]]) -> list[RequestOutcome]:
        """One outcome per request (input name → CPU tensor whose dim 0 is its rows)."""
        outcomes: list[RequestOutcome | None] = [None] * len(requests)
        valid: list[_Request] = []
        for index, tensors in enumerate(requests):
            if self._inputs_checked:
                valid.append(_Request(index, tensors, next(iter(tensors.values())).shape[0]))
                continue
            try:
                rows = self._model.check_tensors(tensors)
            except WorkerError as error:
                outcomes[index] = RequestFailed(error=error)
                continue
            valid.append(_Request(index, tensors, rows))
        with torch.inference_mode():
            for request, outcome in zip(valid, self._run_group(valid), strict=True):
                outcomes[request.index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _run_group(self, group: Sequence[_Request]) -> list[RequestOutcome]:
        if not group:
            return []
        try:
            return [RequestSucceeded(outputs=outputs) for outputs in self._forward(group)]
        except Exception as error:
            if _is_out_of_memory(error):
                return self._after_out_of_memory(group, error)
            if len(group) == 1:
                return [RequestFailed(error=self._failure(error))]
            log.warning(
                "batch failed, retrying each request alone",
                model=self._model.name,
                version=self._model.version,
                requests=len(group),
                error=type(error).__name__,
            )
            return [outcome for request in group for outcome in self._run_group([request])]

    def _after_out_of_memory(
        self, group: Sequence[_Request], error: Exception
    ) -> list[RequestOutcome]:
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        if len(group) == 1:
            rows = group[0].rows
            failure = InferenceOutOfMemoryError(
                f"model {self._model.label} ran out of device memory on a request of "
                f"{rows} rows run alone",
                model=self._model.name,
                version=self._model.version,
            )
            return [RequestFailed(error=failure)]
        middle = len(group) // 2
        log.warning(
            "out of device memory, splitting batch",
            model=self._model.name,
            version=self._model.version,
            requests=len(group),
            rows=sum(request.rows for request in group),
        )
        return self._run_group(group[:middle]) + self._run_group(group[middle:])

    def _failure(self, error: Exception) -> WorkerError:
        if isinstance(error, WorkerError):
            return error
        text = str(error).strip() or type(error).__name__
        if len(text) > MAX_ERROR_MESSAGE_CHARS:
            text = text[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
        return InferenceFailedError(
            f"model {self._model.label} failed on this request: {text}",
            model=self._model.name,
            version=self._model.version,
        )

    def _forward(self, group: Sequence[_Request]) -> list[tuple[torch.Tensor, ...]]:
        rows = [request.rows for request in group]
        inputs = [
            self._to_device([request.tensors[spec.name] for request in group])
            for spec in self._model.config.inputs
        ]
        self.forward_passes += 1
        result = self._model.module(*inputs)
        outputs = self._to_host(self._model.collect_outputs(result, rows=sum(rows)))
        per_output = [torch.split(output, rows, dim=0) for output in outputs]
        return [
            tuple(part.contiguous() for part in parts) for parts in zip(*per_output, strict=True)
        ]

    def _to_device(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._device.type != "cuda":
            stacked = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)
            return stacked.to(self._device)
        # Stack straight into pinned host memory so the host-to-device copy is asynchronous.
        rows = sum(part.shape[0] for part in parts)
        pinned = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
        torch.cat(list(parts), dim=0, out=pinned)
        return pinned.to(self._device, non_blocking=True)

    def _to_host(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._device.type != "cuda":
            return [output.cpu() for output in outputs]
        hosts = []
        for output in outputs:
            host = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
            host.copy_(output, non_blocking=True)
            hosts.append(host)
        # One wait for every output copy, instead of one blocking copy each.
        torch.cuda.current_stream(self._device).synchronize()
        return hosts


def execute_batch(
    model: LoadedModel,
    requests: Sequence[Mapping[str, torch.Tensor]],
    inputs_checked: bool = False,
) -> BatchOutcome:
    """Run a batch synchronously (blocking); what `ModelRunner.run_batch` runs on its thread."""
    started = time.perf_counter()
    execution = BatchExecution(model=model, inputs_checked=inputs_checked)
    outcomes = execution.run(requests)
    return BatchOutcome(
        outcomes=tuple(outcomes),
        infer_ms=(time.perf_counter() - started) * 1000.0,
        forward_passes=execution.forward_passes,
    )


def _initialize_thread(device: torch.device, num_threads: int | None) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)


class ModelRunner:
    """Runs batches on one dedicated thread so torch never blocks the event loop."""

    def __init__(self, *, device: torch.device, num_threads: int | None = None) -> None:
        """device: where models run (every model passed in must be on it).

        num_threads: torch intra-op threads, set from the runner thread (process-wide in
        effect); None keeps torch's default.
        """
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be None or at least 1, got {num_threads}")
        self._device = device
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="inferq-runner",
            initializer=_initialize_thread,
            initargs=(device, num_threads),
        )

    @property
    def device(self) -> torch.device:
        """Where this runner's models run."""
        return self._device

    async def run_batch(
        self,
        model: LoadedModel,
        requests: Sequence[Mapping[str, torch.Tensor]],
        *,
        inputs_checked: bool = False,
    ) -> BatchOutcome:
        """Run `requests` (input name → CPU tensor, dim 0 its rows) as one batch of `model`.

        inputs_checked: every request already passed `model.check_tensors` (skip it here).

        Per-request problems come back as `RequestFailed`; nothing raises for them. If the
        caller is cancelled, the batch still finishes on the thread and its result is dropped.
        """
        if self._closed:
            raise RunnerClosedError(
                f"runner is closed; model {model.label} batch not run",
                model=model.name,
                version=model.version,
            )
        if model.device != self._device:
            raise ValueError(f"model {model.label} is on {model.device}, runner on {self._device}")
        if not requests:
            return BatchOutcome(outcomes=(), infer_ms=0.0, forward_passes=0)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, execute_batch, model, list(requests), inputs_checked
        )

    async def close(self) -> None:
        """Refuse new batches and wait (off the event loop) for the running one to finish."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def __aenter__(self) -> ModelRunner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def resolve_device(spec: str) -> torch.device:
    """The torch device for `cpu`, `cuda`, `cuda:N` or `auto` (cuda when available, else cpu)."""
    text = spec.strip().lower()
    if text == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text != "cuda" and not text.startswith("cuda:"):
        raise DeviceUnavailableError(f"unsupported device {spec!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {spec!r}: CUDA is not available on this machine")
    if text == "cuda":
        index = torch.cuda.current_device()
    else:
        suffix = text.removeprefix("cuda:")
        if not suffix.isdigit():
            raise DeviceUnavailableError(f"device {spec!r}: expected cuda:N with N a GPU index")
        index = int(suffix)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            f"device {spec!r}: this machine has {count} CUDA device(s), indices 0..{count - 1}"
        )
    return torch.device("cuda", index)
