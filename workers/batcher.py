"""Dynamic batching policy: which queued requests run together, and when.

Pure logic: the caller adds requests with the monotonic time it received them and asks for the
next due batch with the current monotonic time. The batcher reads no clock and does no I/O.

Ordering rule of `Batcher.pop_due`: earliest deadline first. A key's deadline is the receipt time
of its oldest queued request plus the key's `max_batch_delay_ms`. Among the keys that are due
(full, or past their deadline) the one with the earliest deadline is popped; on a tie a full key
goes before a partial one, then the key that was queued first. This bounds every request's wait
without letting a busy key that is always full starve a quiet key whose request has waited its
delay; a full key is still popped as soon as no key with an earlier deadline is due.

Within a key, a batch takes requests of higher `priority` first and, within a priority, the
oldest first; the key's deadline still follows its oldest request, whatever its priority.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchPolicy:
    """How many rows one batch of a key may hold and how long its oldest request may wait."""

    max_batch_size: int
    """Most rows (summed batch dimensions) in one batch; a single larger request runs alone."""
    max_batch_delay_ms: float
    """Milliseconds from a request's receipt after which its partial batch is due; 0 = at once."""

    def __post_init__(self) -> None:
        size = self.max_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {size!r}")
        delay = self.max_batch_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise ValueError(f"max_batch_delay_ms must be a number, got {delay!r}")
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"max_batch_delay_ms must be finite and >= 0, got {delay!r}")

    @property
    def max_batch_delay_s(self) -> float:
        """`max_batch_delay_ms` in seconds, the unit of the monotonic clock."""
        return self.max_batch_delay_ms / 1000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch(Generic[K, T]):
    """Requests of one key that run together, in the order they were added."""

    key: K
    """The key all items were added under."""
    items: tuple[T, ...]
    """The requests, oldest added first."""
    rows: int
    """Sum of the items' rows: the batch dimension of the concatenated inputs."""
    oldest_received_at: float
    """Earliest receipt time (monotonic seconds) among the items."""


@dataclass(eq=False, slots=True)
class _Entry(Generic[T]):
    item: T
    rows: int
    received_at: float
    priority: int


class _Lane(Generic[T]):
    """FIFO of one priority within a key, with its minimum receipt time kept in O(1)."""

    __slots__ = ("entries", "minima")

    def __init__(self) -> None:
        self.entries: deque[_Entry[T]] = deque()
        # Entries with non-decreasing received_at, a subsequence of entries: its front is the
        # oldest entry even when the caller adds requests slightly out of receipt order.
        self.minima: deque[_Entry[T]] = deque()

    def push(self, entry: _Entry[T]) -> None:
        self.entries.append(entry)
        while self.minima and self.minima[-1].received_at > entry.received_at:
            self.minima.pop()
        self.minima.append(entry)

    def popleft(self) -> _Entry[T]:
        entry = self.entries.popleft()
        if self.minima[0] is entry:
            self.minima.popleft()
        return entry


class _KeyQueue(Generic[T]):
    """The queued requests of one key: a FIFO lane per priority, higher priorities first."""

    __slots__ = ("_lanes", "_length", "policy", "rows")

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.rows = 0
        self._length = 0
        self._lanes: dict[int, _Lane[T]] = {}

    def __len__(self) -> int:
        return self._length

    def push(self, entry: _Entry[T]) -> None:
        lane = self._lanes.get(entry.priority)
        if lane is None:
            lane = self._lanes[entry.priority] = _Lane()
        lane.push(entry)
        self.rows += entry.rows
        self._length += 1

    def entries(self) -> tuple[_Entry[T], ...]:
        """Every entry, in dispatch order: by priority (highest first), then FIFO."""
        return tuple(entry for _, lane in self._by_priority() for entry in lane.entries)

    def _by_priority(self) -> list[tuple[int, _Lane[T]]]:
        lanes = self._lanes
        if len(lanes) == 1:
            return list(lanes.items())
        return sorted(lanes.items(), key=lambda item: -item[0])

    @property
    def oldest_received_at(self) -> float:
        return min(lane.minima[0].received_at for lane in self._lanes.values())

    @property
    def full(self) -> bool:
        return self.rows >= self.policy.max_batch_size

    @property
    def deadline(self) -> float:
        return self.oldest_received_at + self.policy.max_batch_delay_s

    def take_batch(self, key: K) -> Batch[K, T]:
        """Remove the entries that come first (highest priority, then oldest) while their rows
        fit in one batch; a first entry larger than the batch goes alone."""
        items: list[T] = []
        rows = 0
        oldest = math.inf
        limit = self.policy.max_batch_size
        for priority, lane in self._by_priority():
            entries = lane.entries
            while entries and (not items or rows + entries[0].rows <= limit):
                entry = lane.popleft()
                items.append(entry.item)
                rows += entry.rows
                oldest = min(oldest, entry.received_at)
            if not entries:
                del self._lanes[priority]
            else:
                break  # the next entry does not fit; lower priorities wait behind it
        self.rows -= rows
        self._length -= len(items)
        return Batch(key=key, items=tuple(items), rows=rows, oldest_received_at=oldest)


class Batcher(Generic[K, T]):
    """Queues requests per key and hands out batches when they are full or have waited enough.

    One FIFO per key. A key is due when its queued rows reach `max_batch_size`, or when its
    oldest request has waited `max_batch_delay_ms` since it was received. See the module
    docstring for which due key is popped first.
    """

    def __init__(self, *, policy_for: Callable[[K], BatchPolicy]) -> None:
        """Create an empty batcher.

        policy_for: returns the `BatchPolicy` of a key. It is called when a key's queue is
            created (its first request after being empty), and that policy holds until the
            queue empties again; an exception it raises propagates out of `add`.
        """
        if not callable(policy_for):
            raise TypeError(f"policy_for must be callable, got {policy_for!r}")
        self._policy_for = policy_for
        self._queues: dict[K, _KeyQueue[T]] = {}
        self._items = 0
        self._rows = 0

    def __len__(self) -> int:
        """Number of requests queued over all keys."""
        return self._items

    @property
    def rows_queued(self) -> int:
        """Rows queued over all keys."""
        return self._rows

    def keys(self) -> tuple[K, ...]:
        """Keys with queued requests, in the order their queues were created."""
        return tuple(self._queues)

    def add(self, key: K, item: T, *, rows: int, received_at: float, priority: int = 0) -> None:
        """Queue `item` under `key`.

        rows: the item's own batch dimension, >= 1.
        received_at: monotonic seconds at which the request was received; the batching delay
            is measured from it.
        priority: within the key, items of a higher priority go into batches first; equal
            priorities keep their order.
        """
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        if not math.isfinite(received_at):
            raise ValueError(f"received_at must be finite, got {received_at!r}")
        queue = self._queues.get(key)
        if queue is None:
            queue = _KeyQueue(self._policy_for(key))
            self._queues[key] = queue
        queue.push(_Entry(item=item, rows=rows, received_at=received_at, priority=priority))
        self._items += 1
        self._rows += rows

    def pop_due(self, now: float) -> Batch[K, T] | None:
        """Remove and return the most urgent due batch at monotonic time `now`, or None.

        The batch takes items from the front of the key's FIFO while their rows fit in
        `max_batch_size`; a front item larger than that goes alone. The rest stays queued.
        Cost is linear in the number of keys with queued requests.
        """
        best_key: K | None = None
        best_queue: _KeyQueue[T] | None = None
        best_rank: tuple[float, bool] | None = None
        for key, queue in self._queues.items():
            deadline = queue.deadline
            full = queue.full
            if not full and now < deadline:
                continue
            rank = (deadline, not full)
            if best_rank is None or rank < best_rank:
                best_key, best_queue, best_rank = key, queue, rank
        if best_queue is None:
            return None
        assert best_key is not None  # set together with best_queue
        return self._take(best_key, best_queue)

    def next_due_at(self) -> float | None:
        """Earliest monotonic time at which some key is due; None when nothing is queued.

        A key that is already full is due whatever the clock says: its time is `-math.inf`.
        Otherwise it is the key's oldest receipt time plus its delay, the exact threshold that
        `pop_due` compares `now` with, so `pop_due(next_due_at())` always returns a batch.
        """
        earliest: float | None = None
        for queue in self._queues.values():
            due_at = -math.inf if queue.full else queue.deadline
            if earliest is None or due_at < earliest:
                earliest = due_at
        return earliest

    def drain(self, predicate: Callable[[K, T], bool] | None = None) -> list[Batch[K, T]]:
        """Remove every queued request (or those `predicate(key, item)` accepts) as batches.

        Batches respect `max_batch_size` like `pop_due`; they come key by key in the order the
        queues were created, each key's in FIFO order. Requests left behind keep their order.
        For shutdown, and for partition revocation with a predicate on the item's partition.
        """
        batches: list[Batch[K, T]] = []
        for key in tuple(self._queues):
            queue = self._queues[key]
            if predicate is None:
                taken = queue
                del self._queues[key]
            else:
                taken = _KeyQueue(queue.policy)
                kept: _KeyQueue[T] = _KeyQueue(queue.policy)
                for entry in queue.entries():
                    (taken if predicate(key, entry.item) else kept).push(entry)
                if not taken:
                    continue
                if kept:
                    self._queues[key] = kept
                else:
                    del self._queues[key]
            self._items -= len(taken)
            self._rows -= taken.rows
            while taken:
                batches.append(taken.take_batch(key))
        return batches

    def _take(self, key: K, queue: _KeyQueue[T]) -> Batch[K, T]:
        batch = queue.take_batch(key)
        self._items -= len(batch.items)
        self._rows -= batch.rows
        if not queue:
            del self._queues[key]
        return batch
