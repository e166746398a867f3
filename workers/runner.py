"""Running batches through PyTorch on one dedicated thread, off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from schemas.tensors import Datatype
from workers.errors import (
    DeviceUnavailableError,
    InferenceFailedError,
    InferenceOutOfMemoryError,
    RunnerClosedError,
    WorkerError,
)
from workers.models import LoadedModel, ResolvedParameters

log = structlog.get_logger(__name__)

MAX_ERROR_MESSAGE_CHARS = 1024
"""Longest model exception text carried into an InferenceFailedError message."""


RequestInputs: TypeAlias = Sequence[NDArray[Any]]
"""One request's inputs: an array per model input in `config.inputs` order, dim 0 its rows,
already checked against the model (admission does); BF16 as its raw uint16 bits."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestSucceeded:
    """A request's outputs: its rows of each output, in `config.outputs` order, as CPU
    arrays of the wire's layout (BF16 as raw uint16 bits), views on the batch's output."""

    outputs: tuple[NDArray[Any], ...]


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
    inputs: RequestInputs
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

    def __init__(self, *, model: LoadedModel, parameters: ResolvedParameters = ()) -> None:
        """model: the loaded model the batch runs through, on `model.device`.
        parameters: the batch's parameters, passed as keyword arguments (0-d tensors)."""
        self._model = model
        self._kwargs = model.parameter_tensors(parameters) if parameters else {}
        self._device = model.device
        self.forward_passes = 0

    def run(self, requests: Sequence[RequestInputs]) -> list[RequestOutcome]:
        """One outcome per request, in request order."""
        group = [
            _Request(index, inputs, inputs[0].shape[0]) for index, inputs in enumerate(requests)
        ]
        with torch.inference_mode():
            return self._run_group(group)

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

    def _forward(self, group: Sequence[_Request]) -> list[tuple[NDArray[Any], ...]]:
        rows = sum(request.rows for request in group)
        inputs = [
            self._to_device([request.inputs[position] for request in group], datatype)
            for position, datatype in enumerate(self._model.input_datatypes)
        ]
        outputs = [
            _wire_array(output, datatype)
            for output, datatype in zip(
                self._to_host(self._call(inputs, rows)), self._model.output_datatypes, strict=True
            )
        ]
        per_request: list[tuple[NDArray[Any], ...]] = []
        start = 0
        for request in group:
            stop = start + request.rows
            per_request.append(tuple(output[start:stop] for output in outputs))
            start = stop
        return per_request

    def _call(self, inputs: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
        """The module's checked outputs; a lone request larger than `max_batch_size` runs in
        slices of it, since an exported program's batch dimension is bounded by it."""
        limit = self._model.config.max_batch_size
        if rows <= limit:
            self.forward_passes += 1
            return self._model.forward(inputs, self._kwargs, rows=rows)
        parts: list[list[torch.Tensor]] = []
        for start in range(0, rows, limit):
            stop = min(start + limit, rows)
            self.forward_passes += 1
            sliced = [tensor[start:stop] for tensor in inputs]
            parts.append(self._model.forward(sliced, self._kwargs, rows=stop - start))
        return [torch.cat(slices) for slices in zip(*parts, strict=True)]

    def _to_device(self, parts: Sequence[NDArray[Any]], datatype: Datatype) -> torch.Tensor:
        if self._device.type != "cuda":
            # One copy into a fresh (writable) array; torch shares its memory from there.
            host = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0].copy())
            return _as_model_dtype(host, datatype)
        # Stack straight into pinned host memory so the host-to-device copy is asynchronous.
        rows = sum(part.shape[0] for part in parts)
        first = parts[0]
        pinned = torch.empty(
            (rows, *first.shape[1:]), dtype=_storage_dtype(datatype), pin_memory=True
        )
        np.concatenate(parts, out=pinned.numpy().view(first.dtype))
        return _as_model_dtype(pinned, datatype).to(self._device, non_blocking=True)

    def _to_host(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._device.type != "cuda":
            return [output.contiguous() for output in outputs]
        hosts = []
        for output in outputs:
            host = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
            host.copy_(output, non_blocking=True)
            hosts.append(host)
        # One wait for every output copy, instead of one blocking copy each.
        torch.cuda.current_stream(self._device).synchronize()
        return hosts


def _storage_dtype(datatype: Datatype) -> torch.dtype:
    """The torch dtype whose numpy view holds ``datatype``'s wire bytes (BF16: int16)."""
    return torch.int16 if datatype is Datatype.BF16 else datatype.torch_dtype


def _as_model_dtype(tensor: torch.Tensor, datatype: Datatype) -> torch.Tensor:
    """The wire layout's tensor as the model takes it (BF16 bits reinterpreted)."""
    return tensor.view(torch.bfloat16) if datatype is Datatype.BF16 else tensor


def _wire_array(tensor: torch.Tensor, datatype: Datatype) -> NDArray[Any]:
    """A CPU output tensor as the array the wire carries (BF16 as its raw uint16 bits)."""
    if datatype is Datatype.BF16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    array: NDArray[Any] = tensor.numpy()
    return array


def execute_batch(
    model: LoadedModel, requests: Sequence[RequestInputs], parameters: ResolvedParameters = ()
) -> BatchOutcome:
    """Run a batch synchronously (blocking); what `ModelRunner.run_batch` runs on its thread."""
    started = time.perf_counter()
    execution = BatchExecution(model=model, parameters=parameters)
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
        requests: Sequence[RequestInputs],
        parameters: ResolvedParameters = (),
    ) -> BatchOutcome:
        """Run `requests` (each its checked input arrays) as one batch of `model`, with the
        `parameters` they share.

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
            self._executor, execute_batch, model, list(requests), parameters
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
