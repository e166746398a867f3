"""Readiness: whether a worker can serve right now, and if not, what it waits for.

Ready means: started and not stopping, a member of its consumer group with an assignment
(possibly empty: more workers than partitions), and Kafka and Redis both answering. The
probes run in the worker's task group; `/readyz` reads `Readiness.ready`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum

import structlog

log = structlog.get_logger(__name__)

Probe = Callable[[], Awaitable[object]]


class Condition(StrEnum):
    """What a worker needs before it is ready; each one unmet is a reason it is not."""

    SERVING = "serving"
    """Started, and not stopping."""
    ASSIGNED = "assigned"
    """Joined its consumer group and received an assignment."""
    KAFKA = "kafka"
    """The broker answers."""
    REDIS = "redis"
    """Redis answers."""


class Readiness:
    """The one owner of a worker's readiness conditions."""

    def __init__(self) -> None:
        self._unmet: set[Condition] = set(Condition)

    @property
    def ready(self) -> bool:
        """Whether every condition holds."""
        return not self._unmet

    @property
    def unmet(self) -> frozenset[Condition]:
        """The conditions that do not hold now."""
        return frozenset(self._unmet)

    def set(self, condition: Condition, holds: bool) -> None:
        """Record whether ``condition`` holds; logs each change."""
        if holds == (condition not in self._unmet):
            return
        if holds:
            self._unmet.discard(condition)
        else:
            self._unmet.add(condition)
        log.info("readiness_changed", condition=condition.value, holds=holds,
                 ready=self.ready)  # fmt: skip


async def probe_forever(
    readiness: Readiness, probes: dict[Condition, Probe], *, interval_s: float
) -> None:
    """Run each probe every ``interval_s`` seconds and record whether it answered in time."""
    timeout_s = max(interval_s, 1.0)

    async def check(condition: Condition, probe: Probe) -> None:
        try:
            await asyncio.wait_for(probe(), timeout_s)
        except Exception as error:  # any failure to answer means "not ready", never a crash
            if condition not in readiness.unmet:
                log.warning("dependency_unavailable", dependency=condition.value,
                            error=repr(error))  # fmt: skip
            readiness.set(condition, False)
        else:
            readiness.set(condition, True)

    while True:
        await asyncio.gather(*(check(c, p) for c, p in probes.items()))
        await asyncio.sleep(interval_s)
