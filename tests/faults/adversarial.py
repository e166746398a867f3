"""Adversarial request records for the fault suite: each keyed ``bad-{n}`` and, where it
carries an id at all, with that id, so that its error result or dead letter is found again."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgpack
import torch
from torch import nn

from tests.unit.test_codec_fuzz import seed_messages

POISON = 1e7
"""An input value the poison model refuses (it raises on any batch holding one)."""


class Poisonable(nn.Module):
    """Doubles its input, but raises on a batch holding `POISON`: a model that fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x >= 1e7).any()):
            raise RuntimeError("poison value in input")
        return x * 2


def _request(request_id: str, *, shape: list[int], data: bytes, model: str = "mlp") -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": shape, "data": data}
    return bytes(msgpack.packb({"model": model, "id": request_id, "inputs": [tensor]}))


def _mutated(payload: bytes, keep: int, rng: random.Random) -> bytes:
    """``payload`` with a few bytes after its first ``keep`` changed, or cut short."""
    body = bytearray(payload)
    if rng.random() < 0.3:
        return bytes(body[: rng.randrange(keep, len(body))])
    for _ in range(rng.randint(1, 4)):
        body[rng.randrange(keep, len(body))] = rng.randrange(256)
    return bytes(body)


def adversarial_records(
    count: int, *, max_message_bytes: int, seed: int = 0
) -> Iterator[tuple[str, str, bytes]]:
    """``count`` hostile records as (kind, key, value), for the mlp request topic except the
    ``poison`` kind (the poison model's topic). Kinds, in turn:

    garbage: random bytes. fuzz: the codec fuzz suite's seed messages, made mlp requests and
    mutated past their id. oversized: a record just over ``max_message_bytes``. huge_tensor:
    a tensor declaring 10^12 elements. poison: a request whose model raises.
    """
    rng = random.Random(seed)
    seeds: list[dict[str, Any]] = [m for m in seed_messages() if "inputs" in m]
    kinds = ("garbage", "fuzz", "oversized", "huge_tensor", "poison")
    for n in range(count):
        kind = kinds[n % len(kinds)]
        key = f"bad-{n}"
        if kind == "garbage":
            value = rng.randbytes(rng.randint(1, 2000))
        elif kind == "fuzz":
            message = {"model": "mlp", "id": key, **{k: v for k, v in rng.choice(seeds).items()
                                                     if k not in ("id", "model")}}  # fmt: skip
            payload = bytes(msgpack.packb(message))
            keep = payload.index(key.encode()) + len(key)
            value = _mutated(payload, keep, rng)
        elif kind == "oversized":
            over = max_message_bytes + rng.randint(1, 64)
            value = _request(key, shape=[1, 784], data=bytes(over))
        elif kind == "huge_tensor":
            value = _request(key, shape=[10**6, 10**6], data=bytes(16))
        else:
            data = torch.full((1, 4), POISON).numpy().tobytes()
            value = _request(key, shape=[1, 4], data=data, model="poison")
        yield kind, key, value
