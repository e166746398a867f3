"""Request digests: what binds a request id to the one request that used it first.

A producer that re-sends a request (a retry, a replay) sends the same model, version,
inputs and parameters; a different request that reuses the id differs in one of them.
Delivery fields (`reply_to`, `deadline_ms`, `created_ms`, `priority`, `trace`) may change
between re-sends, so they are left out.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from schemas.messages import InferenceRequest

DIGEST_BYTES = 16


def request_digest(request: InferenceRequest) -> bytes:
    """The digest of what ``request`` asks: model, version, inputs and parameters."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"inferq-request")
    _field(h, request.model.encode())
    _field(h, b"" if request.version is None else str(request.version).encode())
    for tensor in sorted(request.inputs, key=lambda t: t.name):
        _field(h, tensor.name.encode())
        _field(h, tensor.datatype.value.encode())
        _field(h, ",".join(map(str, tensor.shape)).encode())
        _field(h, np.ascontiguousarray(tensor.data).data.cast("B"))
    for name in sorted(request.parameters):
        value = request.parameters[name]
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
