"""The client's cap on large records in flight: what may go together, what waits, in what order."""

from __future__ import annotations

import asyncio

import pytest

from producers.client import InFlightBytes

MIB = 1024 * 1024


async def started(gate: InFlightBytes, size: int) -> asyncio.Task[None]:
    """An acquire of ``size`` bytes, given the chance to run until it blocks or succeeds."""
    task = asyncio.create_task(gate.acquire(size))
    for _ in range(5):
        await asyncio.sleep(0)
    return task


async def test_records_that_fit_the_budget_go_together() -> None:
    gate = InFlightBytes(budget_bytes=64 * MIB)
    first, second = await started(gate, 30 * MIB), await started(gate, 30 * MIB)
    assert first.done()
    assert second.done()
    assert gate.in_flight_bytes == 60 * MIB


async def test_a_record_that_does_not_fit_waits_for_an_acknowledgement() -> None:
    gate = InFlightBytes(budget_bytes=64 * MIB)
    await gate.acquire(60 * MIB)
    second = await started(gate, 60 * MIB)
    assert not second.done(), "two 60 MiB records would share one produce request"
    gate.release(60 * MIB)
    await asyncio.wait_for(second, 1)
    assert gate.in_flight_bytes == 60 * MIB


async def test_a_record_above_the_budget_goes_alone() -> None:
    gate = InFlightBytes(budget_bytes=10 * MIB)
    await asyncio.wait_for(gate.acquire(20 * MIB), 1)
    follower = await started(gate, 2 * MIB)
    assert not follower.done()
    gate.release(20 * MIB)
    await asyncio.wait_for(follower, 1)


async def test_a_waiting_record_is_not_overtaken_by_smaller_later_ones() -> None:
    gate = InFlightBytes(budget_bytes=64 * MIB)
    await gate.acquire(40 * MIB)
    large = await started(gate, 60 * MIB)
    small = await started(gate, 2 * MIB)  # would fit now, but comes after `large`
    assert not large.done()
    assert not small.done()
    gate.release(40 * MIB)
    await asyncio.wait_for(asyncio.gather(large, small), 1)
    assert gate.in_flight_bytes == 62 * MIB


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="budget_bytes"):
        InFlightBytes(budget_bytes=0)
