"""Prebuilt msgpack for the `ok` results of one model version: the worker's hot path.

Everything in such a result but the id, the outputs' rows, the timing and `created_ms` is
the same for every request of the version, so it is packed once. `OkResultTemplate.encode`
gives the same bytes as `encode_success` (and so as `encode_result`); a test pins that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
from numpy.typing import NDArray

from schemas.tensors import Datatype

_packb = msgpack.packb


def _map_header(entries: int) -> bytes:
    assert entries < 16
    return bytes([0x80 | entries])


def _array_header(items: int) -> bytes:
    assert items < 16
    return bytes([0x90 | items])


class OkResultTemplate:
    """Encodes `ok` results of one model version in msgpack, from prebuilt pieces."""

    __slots__ = (
        "_after_id", "_created_key", "_head", "_head_traced", "_infer_key", "_output_heads"
    )  # fmt: skip

    def __init__(
        self,
        *,
        model: str,
        version: int,
        outputs: Sequence[tuple[str, Datatype]],
        worker: str | None,
    ) -> None:
        """outputs: each output's name and datatype, in the order results list them.

        worker: the worker id results carry; None leaves the key out.
        """
        entries = 7 if worker is None else 8
        self._head = _map_header(entries) + _packb("id")
        self._head_traced = _map_header(entries + 1) + _packb("id")
        self._after_id = b"".join(
            [_packb("model"), _packb(model), _packb("version"), _packb(version),
             _packb("status"), _packb("ok"), _packb("outputs"), _array_header(len(outputs))]
        )  # fmt: skip
        self._output_heads = [
            _map_header(4) + _packb("name") + _packb(name) + _packb("datatype")
            + _packb(datatype.value) + _packb("shape")
            for name, datatype in outputs
        ]  # fmt: skip
        self._infer_key = _packb("infer_ms")
        worker_part = b"" if worker is None else _packb("worker") + _packb(worker)
        self._created_key = worker_part + _packb("created_ms")

    def encode(
        self,
        *,
        request_id: str,
        outputs: Sequence[NDArray[Any]],
        queue_ms: float,
        infer_ms: float,
        batch_size: int,
        created_ms: int,
        trace: str | None = None,
    ) -> bytes:
        """One result: ``outputs`` are the request's C-contiguous little-endian arrays, batch
        dimension first (BF16 as raw uint16 bits), in the template's output order."""
        head = self._head if trace is None else self._head_traced
        parts = [head, _packb(request_id), self._after_id]
        for head, array in zip(self._output_heads, outputs, strict=True):
            parts += (head, _packb(list(array.shape)), _DATA_KEY, _packb(array.data))
        parts += (
            _TIMING_HEAD, _packb(float(queue_ms)), self._infer_key, _packb(float(infer_ms)),
            _BATCH_SIZE_KEY, _packb(batch_size), self._created_key, _packb(created_ms),
        )  # fmt: skip
        if trace is not None:
            parts += (_TRACE_KEY, _packb(trace))
        return b"".join(parts)


_DATA_KEY = _packb("data")
_TIMING_HEAD = _packb("timing") + _map_header(3) + _packb("queue_ms")
_BATCH_SIZE_KEY = _packb("batch_size")
_TRACE_KEY = _packb("trace")
