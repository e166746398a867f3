"""Request digests: what binds a request id to the one request that used it first.

A producer that re-sends a request (a retry, a replay) sends the same model, version,
inputs and parameters; a different request that reuses the id differs in one of them.
Delivery fields (`reply_to`, `deadline_ms`, `created_ms`, `priority`, `trace`) may change
between re-sends, so they are left out.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from schemas.messages import InferenceRequest

DIGEST_BYTES = 16


def request_digest(request: InferenceRequest) -> bytes:
    """The digest of what ``request`` asks: model, version, inputs and parameters."""
    return digest_of(
        model=request.model,
        version=request.version,
        inputs=[
            (tensor.name, tensor.datatype.value, tensor.shape,
             np.ascontiguousarray(tensor.data).data.cast("B"))
            for tensor in request.inputs
        ],
        parameters=request.parameters,
    )  # fmt: skip


def digest_of(
    *,
    model: str,
    version: int | None,
    inputs: Iterable[tuple[str, str, Sequence[int], bytes | memoryview]],
    parameters: Mapping[str, object],
) -> bytes:
    """`request_digest` from a request's parts: inputs as (name, datatype, shape, raw bytes).

    The worker's fast path reads requests without building an `InferenceRequest`; both
    paths must give one request the same digest, so both come here.
    """
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"inferq-request")
    _field(h, model.encode())
    _field(h, b"" if version is None else str(version).encode())
    for name, datatype, shape, data in sorted(inputs, key=lambda part: part[0]):
        _field(h, name.encode())
        _field(h, datatype.encode())
        _field(h, ",".join(map(str, shape)).encode())
        _field(h, data)
    for name in sorted(parameters):
        value = parameters[name]
        _field(h, name.encode())
        _field(h, f"{type(value).__name__}:{value!r}".encode())
    return h.digest()


def record_digest(value: bytes) -> bytes:
    """The digest of a record that could not be decoded into a request: its raw bytes."""
    return hashlib.blake2b(value, digest_size=DIGEST_BYTES, person=b"inferq-record").digest()


def _field(h: hashlib.blake2b, data: bytes | memoryview) -> None:
    # Length-prefixed, so that no two different field sequences hash the same stream.
    h.update(struct.pack("<Q", len(data)))
    h.update(data)
