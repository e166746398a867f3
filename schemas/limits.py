"""The bounds the decoder enforces before it trusts a message with memory or time."""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_NESTING_CEILING = 128
"""The highest `max_nesting` allowed, well inside Python's recursion limit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CodecLimits:
    """What the decoder accepts; anything larger raises `PayloadTooLargeError`."""

    max_message_bytes: int = 64 * 1024 * 1024
    """The longest encoded message, in bytes (checked before parsing)."""
    max_tensor_rank: int = 8
    """The most dimensions a tensor may have."""
    max_tensor_elements: int = 2**28
    """The most elements one tensor may have (also the largest single dimension)."""
    max_inputs: int = 64
    """The most tensors in a request's `inputs` or a result's `outputs`."""
    max_parameters: int = 64
    """The most entries in a request's `parameters`."""
    max_nesting: int = 32
    """The deepest nesting of maps and lists anywhere in a message, unknown fields included
    (4 to 128: the zero-copy reader recurses once per level)."""
    zero_copy_min_bytes: int = 64 * 1024
    """msgpack messages at least this long are read without copying tensor bytes; shorter
    ones go through msgpack's C unpacker, which copies them but is faster at that size.
    0 makes every message zero-copy."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{field.name}: must be a non-negative int, got {value!r}")
        if not 4 <= self.max_nesting <= MAX_NESTING_CEILING:
            raise ValueError(
                f"max_nesting: must be 4 (a request's own depth) to {MAX_NESTING_CEILING}"
            )


DEFAULT_LIMITS = CodecLimits()
"""The limits `decode_request` and `decode_result` use unless given others."""
