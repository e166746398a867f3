"""Offset bookkeeping: which consumed records are safe to commit.

Pure logic, generic over the partition type (the worker uses aiokafka's `TopicPartition`).
Records are tracked when consumed and completed when their result is durably written;
completions arrive out of order. A partition's commit offset is one past the highest offset
such that it and every earlier tracked offset of the partition are complete, so a commit never
skips a record whose result is not yet written. Tracked offsets need not be contiguous
(compaction and transaction markers leave gaps). Every operation is O(1) amortised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class OffsetTrackingError(Exception):
    """Base of the errors raised by `OffsetTracker`: a bug in the caller, not retriable."""


class UntrackedOffsetError(OffsetTrackingError):
    """An offset was completed that is not tracked, or was completed already."""

    def __init__(self, *, partition: object, offset: int) -> None:
        self.partition = partition
        self.offset = offset
        super().__init__(
            f"offset {offset} of partition {partition!r} is not tracked or was already completed"
        )


class OffsetOrderError(OffsetTrackingError):
    """An offset was tracked that is not above the partition's last tracked offset."""

    def __init__(self, *, partition: object, offset: int, last_tracked: int) -> None:
        self.partition = partition
        self.offset = offset
        self.last_tracked = last_tracked
        super().__init__(
            f"offset {offset} of partition {partition!r} is not above the last tracked"
            f" offset {last_tracked}"
        )


class _PartitionState:
    """Tracked offsets of one partition that are not yet past its watermark."""

    __slots__ = ("committed", "done", "last_tracked", "order", "tracked", "watermark")

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        self.tracked: set[int] = set()
        self.done: set[int] = set()
        self.last_tracked: int | None = None
        self.watermark: int | None = None
        self.committed: int | None = None


class OffsetTracker(Generic[P]):
    """Tracks consumed offsets per partition and says which commit offsets are safe."""

    def __init__(self) -> None:
        """Create a tracker with no partitions."""
        self._partitions: dict[P, _PartitionState] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Tracked records over all partitions whose completion has not been reported."""
        return self._in_flight

    def tracks(self, partition: P) -> bool:
        """Whether `partition` has state here (tracked since creation or its last `forget`)."""
        return partition in self._partitions

    def track(self, partition: P, offset: int) -> None:
        """Record that the record at `offset` of `partition` was consumed.

        Offsets must increase per partition; raises `OffsetOrderError` otherwise.
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset!r}")
        state = self._partitions.get(partition)
        if state is None:
            state = _PartitionState()
            self._partitions[partition] = state
        elif state.last_tracked is not None and offset <= state.last_tracked:
            raise OffsetOrderError(
                partition=partition, offset=offset, last_tracked=state.last_tracked
            )
        state.order.append(offset)
        state.tracked.add(offset)
        state.last_tracked = offset
        self._in_flight += 1

    def complete(self, partition: P, offset: int) -> None:
        """Record that the result of the record at `offset` of `partition` is durably written.

        Raises `UntrackedOffsetError` when the offset is not tracked (never tracked, its
        partition forgotten since) or was completed already.
        """
        state = self._partitions.get(partition)
        if state is None or offset not in state.tracked or offset in state.done:
            raise UntrackedOffsetError(partition=partition, offset=offset)
        state.done.add(offset)
        self._in_flight -= 1
        order = state.order
        while order and order[0] in state.done:
            finished = order.popleft()
            state.tracked.discard(finished)
            state.done.discard(finished)
            state.watermark = finished + 1

    def watermark(self, partition: P) -> int | None:
        """Commit offset of `partition` (its next unfinished offset); None before any progress."""
        state = self._partitions.get(partition)
        return None if state is None else state.watermark

    def committable(self) -> dict[P, int]:
        """Commit offsets of the partitions whose watermark advanced since `mark_committed`.

        The value is the Kafka commit offset: the next record to read, one past the last
        record that is complete along with every earlier tracked one. Changes no state.
        """
        return {
            partition: state.watermark
            for partition, state in self._partitions.items()
            if state.watermark is not None
            and (state.committed is None or state.watermark > state.committed)
        }

    def mark_committed(self, offsets: Mapping[P, int]) -> None:
        """Record that `offsets` were committed; partitions no longer tracked are ignored."""
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is None:
                continue
            if state.committed is None or offset > state.committed:
                state.committed = offset

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop all state of `partitions` (on revocation); later completions of theirs raise."""
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is not None:
                self._in_flight -= len(state.order) - len(state.done)

    def pending(self, partition: P | None = None) -> int:
        """Tracked records not yet behind the watermark, of `partition` or of all partitions.

        Includes records completed out of order that wait for an earlier one.
        """
        if partition is not None:
            state = self._partitions.get(partition)
            return 0 if state is None else len(state.order)
        return sum(len(state.order) for state in self._partitions.values())
