"""Small bounded helpers the integration tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], *, what: str, timeout_s: float) -> T:
    """Await ``awaitable`` or fail the test with a message saying what did not happen in time."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise AssertionError(
            f"{what} did not finish within {timeout_s:.0f}s: is the broker/Redis still up?"
        ) from None
