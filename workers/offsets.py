"""Offset bookkeeping: which consumed records are safe to commit.

Pure logic, generic over the partition type (the worker uses aiokafka's `TopicPartition`).
Records are tracked when consumed and completed when their result is durably written;
completions arrive out of order. A partition's commit offset is one past the highest offset
such that it and every earlier tracked offset of the partition are complete, so a commit never
skips a record whose result is not yet written. Tracked offsets need not be contiguous
(compaction and transaction markers leave gaps). Every operation is O(1) amortised per record.

Each assignment of a partition gets its own `PartitionOffsets`, the one owner of that
partition's consumed offsets, much as aiokafka's `TopicPartitionState` owns a partition's
position. Tracking returns it as a lease that travels with each request; revoking the
partition ends the lease as one operation, after which the lease's requests neither count as
in flight nor complete anything, even if the partition comes back in a later assignment.
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


class PartitionOffsets(Generic[P]):
    """One assignment of one partition: its tracked offsets not yet past the watermark.

    Created and changed only by `OffsetTracker`; requests hold it as their lease.
    """

    __slots__ = ("committed", "done", "last_tracked", "marks", "order", "partition",
                 "revoked", "sizes", "tracked", "watermark")  # fmt: skip

    def __init__(self, partition: P) -> None:
        self.partition = partition
        self.order: deque[int] = deque()
        self.tracked: set[int] = set()
        self.done: set[int] = set()
        self.last_tracked: int | None = None
        self.watermark: int | None = None
        """Commit offset: the next unfinished offset; None before any progress."""
        self.committed: int | None = None
        self.revoked = False
        """The partition was revoked: this lease's requests are someone else's now."""
        self.marks: deque[tuple[int, int]] = deque()
        """(first offset, its record's Unix ms) of each poll still tracked: for lag in time."""
        self.sizes: dict[int, int] = {}
        """Record bytes of each tracked offset not yet completed (those tracked with a size)."""

    @property
    def in_flight(self) -> int:
        """Tracked records whose completion has not been reported."""
        return len(self.order) - len(self.done)

    @property
    def bytes_in_flight(self) -> int:
        """Summed record bytes of this partition's records in flight (tracked with sizes)."""
        return sum(self.sizes.values())


class OffsetTracker(Generic[P]):
    """Tracks consumed offsets per partition and says which commit offsets are safe."""

    def __init__(self) -> None:
        """Create a tracker with no partitions."""
        self._partitions: dict[P, PartitionOffsets[P]] = {}
        self._in_flight = 0
        self._bytes_in_flight = 0

    @property
    def in_flight(self) -> int:
        """Tracked records over all partitions whose completion has not been reported."""
        return self._in_flight

    @property
    def in_flight_bytes(self) -> int:
        """Summed record bytes of the records in flight (those tracked with sizes)."""
        return self._bytes_in_flight

    def tracks(self, partition: P) -> bool:
        """Whether `partition` has a live lease (tracked since assignment or revocation)."""
        return partition in self._partitions

    def lease(self, partition: P) -> PartitionOffsets[P]:
        """The live lease of `partition`; raises KeyError when it has none."""
        return self._partitions[partition]

    def track(self, partition: P, offset: int) -> PartitionOffsets[P]:
        """Record that the record at `offset` of `partition` was consumed; return its lease.

        Offsets must increase per partition; raises `OffsetOrderError` otherwise.
        """
        return self.track_many(partition, (offset,))

    def track_many(
        self,
        partition: P,
        offsets: Iterable[int],
        *,
        first_timestamp_ms: int = -1,
        sizes: Iterable[int] | None = None,
    ) -> PartitionOffsets[P]:
        """`track` for a poll's increasing offsets of one partition, in one call.

        first_timestamp_ms: the first record's Unix ms (negative: unknown), for `oldest_ms`.
        sizes: each record's bytes, in the order of ``offsets``, counted in `in_flight_bytes`
            until the record completes or its partition is revoked.
        """
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = PartitionOffsets(partition)
        last = state.last_tracked
        added = list(offsets)
        for offset in added:
            if offset < 0:
                raise ValueError(f"offset must be >= 0, got {offset!r}")
            if last is not None and offset <= last:
                raise OffsetOrderError(partition=partition, offset=offset, last_tracked=last)
            last = offset
        if added and first_timestamp_ms >= 0:
            state.marks.append((added[0], first_timestamp_ms))
        state.order.extend(added)
        state.tracked.update(added)
        state.last_tracked = last
        self._in_flight += len(added)
        if sizes is not None:
            counted = list(sizes)
            if len(counted) != len(added):
                raise ValueError(f"{len(counted)} sizes for {len(added)} offsets")
            state.sizes.update(zip(added, counted, strict=True))
            self._bytes_in_flight += sum(counted)
        return state

    def complete(self, lease: PartitionOffsets[P], offset: int) -> bool:
        """Record that the result of the record at `offset` is durably written.

        Returns False, changing nothing, when the lease was revoked: the partition's new
        owner answers and commits it. Raises `UntrackedOffsetError` when the offset is not
        tracked under the lease or was completed already.
        """
        if lease.revoked:
            return False
        if offset not in lease.tracked or offset in lease.done:
            raise UntrackedOffsetError(partition=lease.partition, offset=offset)
        lease.done.add(offset)
        self._in_flight -= 1
        self._bytes_in_flight -= lease.sizes.pop(offset, 0)
        order = lease.order
        while order and order[0] in lease.done:
            finished = order.popleft()
            lease.tracked.discard(finished)
            lease.done.discard(finished)
            lease.watermark = finished + 1
        marks = lease.marks
        if not order:
            marks.clear()
        else:
            while len(marks) > 1 and marks[1][0] <= order[0]:
                marks.popleft()
        return True

    def revoke(self, partitions: Iterable[P]) -> int:
        """End the leases of `partitions` (given up in a rebalance); return the requests
        of theirs still in flight, which are now dropped rather than answered."""
        dropped = 0
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is not None:
                state.revoked = True
                dropped += state.in_flight
                self._bytes_in_flight -= state.bytes_in_flight
                state.sizes.clear()
        self._in_flight -= dropped
        return dropped

    def first_unanswered(self, partition: P) -> int | None:
        """The lowest tracked offset of `partition` not yet answered; past everything tracked
        when all is answered; None when nothing of it is tracked."""
        state = self._partitions.get(partition)
        if state is None or state.last_tracked is None:
            return None
        for offset in state.order:
            if offset not in state.done:
                return offset
        return state.last_tracked + 1

    def oldest_ms(self, partition: P) -> int | None:
        """Unix ms of the poll holding `partition`'s first unanswered record (its first
        record's timestamp: an upper bound on the age); None when nothing is unanswered."""
        state = self._partitions.get(partition)
        first = self.first_unanswered(partition)
        if state is None or first is None or state.last_tracked is None:
            return None
        if first > state.last_tracked:
            return None
        marks = state.marks
        while len(marks) > 1 and marks[1][0] <= first:
            marks.popleft()
        return marks[0][1] if marks else None

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

    def committable_with(
        self, completions: Iterable[tuple[PartitionOffsets[P], int]]
    ) -> dict[P, int]:
        """`committable` as it would be once `completions` (lease, offset) are complete too.

        Changes no state: a transaction sends these offsets with the answers of the
        completions, and only once it commits are they completed and marked committed.
        Revoked leases are left out (their partitions are someone else's now).
        """
        extra: dict[PartitionOffsets[P], set[int]] = {}
        for lease, offset in completions:
            if not lease.revoked:
                extra.setdefault(lease, set()).add(offset)
        offsets = self.committable()
        for lease, added in extra.items():
            watermark = lease.watermark
            for offset in lease.order:
                if offset not in added and offset not in lease.done:
                    break
                watermark = offset + 1
            if watermark is not None and (lease.committed is None or watermark > lease.committed):
                offsets[lease.partition] = watermark
        return offsets

    def mark_committed(self, offsets: Mapping[P, int]) -> None:
        """Record that `offsets` were committed; partitions no longer tracked are ignored."""
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is None:
                continue
            if state.committed is None or offset > state.committed:
                state.committed = offset

    def pending(self, partition: P | None = None) -> int:
        """Tracked records not yet behind the watermark, of `partition` or of all partitions.

        Includes records completed out of order that wait for an earlier one.
        """
        if partition is not None:
            state = self._partitions.get(partition)
            return 0 if state is None else len(state.order)
        return sum(len(state.order) for state in self._partitions.values())
