"""The dynamic batching policy: due-ness, batch composition, ordering, draining."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.batcher import Batch, Batcher, BatchPolicy


@dataclass(frozen=True)
class Key:
    model: str
    version: str = "1"
    signature: tuple[int, ...] = (3,)


A = Key("a")
B = Key("b")


def batcher(size: int = 4, delay_ms: float = 10.0) -> Batcher[Key, str]:
    policy = BatchPolicy(max_batch_size=size, max_batch_delay_ms=delay_ms)
    return Batcher(policy_for=lambda key: policy)


# --- BatchPolicy -------------------------------------------------------------------------


def test_policy_converts_delay_to_seconds() -> None:
    assert BatchPolicy(max_batch_size=8, max_batch_delay_ms=5).max_batch_delay_s == 0.005


@pytest.mark.parametrize("size", [0, -1, True, 2.0])
def test_policy_rejects_bad_max_batch_size(size: object) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(max_batch_size=size, max_batch_delay_ms=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("delay", [-0.1, math.inf, math.nan, False, "1"])
def test_policy_rejects_bad_max_batch_delay(delay: object) -> None:
    with pytest.raises(ValueError, match="max_batch_delay_ms"):
        BatchPolicy(max_batch_size=1, max_batch_delay_ms=delay)  # type: ignore[arg-type]


def test_policy_accepts_zero_delay() -> None:
    assert BatchPolicy(max_batch_size=1, max_batch_delay_ms=0).max_batch_delay_ms == 0


def test_policy_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        BatchPolicy(4, 1.0)  # type: ignore[call-arg]
    policy = BatchPolicy(max_batch_size=4, max_batch_delay_ms=1.0)
    with pytest.raises(AttributeError):
        policy.max_batch_size = 5  # type: ignore[misc]


# --- add and bookkeeping ------------------------------------------------------------------


def test_empty_batcher_has_nothing_due() -> None:
    b = batcher()
    assert len(b) == 0
    assert b.rows_queued == 0
    assert b.keys() == ()
    assert b.next_due_at() is None
    assert b.pop_due(1e9) is None
    assert b.drain() == []


def test_add_counts_items_rows_and_keys() -> None:
    b = batcher()
    b.add(A, "a1", rows=2, received_at=1.0)
    b.add(B, "b1", rows=1, received_at=1.0)
    b.add(A, "a2", rows=1, received_at=1.0)
    assert len(b) == 3
    assert b.rows_queued == 4
    assert b.keys() == (A, B)


@pytest.mark.parametrize("rows", [0, -2, True, 1.5])
def test_add_rejects_bad_rows(rows: object) -> None:
    b = batcher()
    with pytest.raises(ValueError, match="rows"):
        b.add(A, "x", rows=rows, received_at=0.0)  # type: ignore[arg-type]
    assert len(b) == 0


@pytest.mark.parametrize("received_at", [math.inf, -math.inf, math.nan])
def test_add_rejects_non_finite_receipt_time(received_at: float) -> None:
    with pytest.raises(ValueError, match="received_at"):
        batcher().add(A, "x", rows=1, received_at=received_at)


def test_constructor_requires_callable_policy() -> None:
    with pytest.raises(TypeError, match="policy_for"):
        Batcher(policy_for=BatchPolicy(max_batch_size=1, max_batch_delay_ms=0))  # type: ignore[arg-type]


def test_policy_error_propagates_and_queues_nothing() -> None:
    def policy_for(key: Key) -> BatchPolicy:
        raise KeyError(key)

    b: Batcher[Key, str] = Batcher(policy_for=policy_for)
    with pytest.raises(KeyError):
        b.add(A, "x", rows=1, received_at=0.0)
    assert len(b) == 0
    assert b.keys() == ()


def test_policy_is_looked_up_per_key_when_its_queue_is_created() -> None:
    calls: list[Key] = []
    policies = {
        A: BatchPolicy(max_batch_size=2, max_batch_delay_ms=1000),
        B: BatchPolicy(max_batch_size=5, max_batch_delay_ms=1000),
    }

    def policy_for(key: Key) -> BatchPolicy:
        calls.append(key)
        return policies[key]

    b: Batcher[Key, str] = Batcher(policy_for=policy_for)
    for index in range(2):
        b.add(A, f"a{index}", rows=1, received_at=0.0)
        b.add(B, f"b{index}", rows=1, received_at=0.0)
    assert calls == [A, B]
    batch = b.pop_due(0.0)
    assert batch is not None
    assert batch.key == A  # full at 2 rows; B needs 5
    assert b.pop_due(0.0) is None
    b.add(A, "a2", rows=1, received_at=0.0)
    assert calls == [A, B, A]  # A's queue emptied and was created again


# --- due-ness -----------------------------------------------------------------------------


def test_partial_batch_is_due_once_oldest_waited_its_delay_since_receipt() -> None:
    b = batcher(size=4, delay_ms=10.0)
    b.add(A, "a1", rows=1, received_at=100.0)
    b.add(A, "a2", rows=1, received_at=100.005)
    assert b.pop_due(100.009) is None
    assert b.next_due_at() == 100.0 + 0.010
    batch = b.pop_due(100.0101)
    assert batch == Batch(key=A, items=("a1", "a2"), rows=2, oldest_received_at=100.0)
    assert len(b) == 0


def test_delay_is_measured_from_receipt_not_from_add_or_poll() -> None:
    b = batcher(size=4, delay_ms=10.0)
    # Received long before it reached the batcher (e.g. decoded late): due at once.
    b.add(A, "late", rows=1, received_at=50.0)
    assert b.pop_due(100.0) is not None


def test_due_exactly_at_next_due_at() -> None:
    b = batcher(size=4, delay_ms=7.3)
    b.add(A, "a1", rows=1, received_at=12.345)
    due_at = b.next_due_at()
    assert due_at is not None
    assert b.pop_due(math.nextafter(due_at, -math.inf)) is None
    assert b.pop_due(due_at) is not None


def test_zero_delay_is_due_immediately() -> None:
    b = batcher(size=4, delay_ms=0.0)
    b.add(A, "a1", rows=1, received_at=5.0)
    assert b.next_due_at() == 5.0
    assert b.pop_due(5.0) is not None


def test_full_key_is_due_whatever_the_clock() -> None:
    b = batcher(size=3, delay_ms=1000.0)
    b.add(A, "a1", rows=2, received_at=10.0)
    assert b.next_due_at() == 11.0
    b.add(A, "a2", rows=1, received_at=10.0)
    assert b.next_due_at() == -math.inf
    batch = b.pop_due(0.0)
    assert batch is not None
    assert batch.items == ("a1", "a2")
    assert batch.rows == 3


def test_next_due_at_is_earliest_over_keys() -> None:
    policies = {
        A: BatchPolicy(max_batch_size=10, max_batch_delay_ms=50),
        B: BatchPolicy(max_batch_size=10, max_batch_delay_ms=5),
    }
    b: Batcher[Key, str] = Batcher(policy_for=policies.__getitem__)
    b.add(A, "a", rows=1, received_at=1.0)
    b.add(B, "b", rows=1, received_at=1.02)
    assert b.next_due_at() == pytest.approx(1.025)
    batch = b.pop_due(1.03)
    assert batch is not None
    assert batch.key == B
    assert b.pop_due(1.03) is None
    assert b.next_due_at() == pytest.approx(1.05)


def test_oldest_is_tracked_when_items_arrive_out_of_receipt_order() -> None:
    b = batcher(size=10, delay_ms=10.0)
    b.add(A, "newer", rows=1, received_at=2.0)
    b.add(A, "older", rows=1, received_at=1.0)
    assert b.next_due_at() == pytest.approx(1.01)
    batch = b.pop_due(1.02)
    assert batch is not None
    assert batch.items == ("newer", "older")  # FIFO by add order still
    assert batch.oldest_received_at == 1.0


# --- batch composition --------------------------------------------------------------------


def test_items_beyond_one_full_batch_stay_queued() -> None:
    b = batcher(size=4, delay_ms=1000.0)
    for index in range(10):
        b.add(A, f"a{index}", rows=1, received_at=float(index))
    first = b.pop_due(0.0)
    second = b.pop_due(0.0)
    assert first is not None
    assert second is not None
    assert first.items == ("a0", "a1", "a2", "a3")
    assert second.items == ("a4", "a5", "a6", "a7")
    assert b.pop_due(0.0) is None  # two left, not full, not waited
    assert len(b) == 2
    assert b.rows_queued == 2
    last = b.pop_due(1009.0)
    assert last is not None
    assert last.items == ("a8", "a9")
    assert last.oldest_received_at == 8.0


def test_batch_stops_before_an_item_that_would_overflow() -> None:
    b = batcher(size=5, delay_ms=0.0)
    b.add(A, "three", rows=3, received_at=0.0)
    b.add(A, "four", rows=4, received_at=0.0)
    b.add(A, "one", rows=1, received_at=0.0)
    first = b.pop_due(0.0)
    assert first is not None
    assert (first.items, first.rows) == (("three",), 3)  # no skipping ahead: FIFO
    second = b.pop_due(0.0)
    assert second is not None
    assert (second.items, second.rows) == (("four", "one"), 5)


def test_oversize_item_goes_alone() -> None:
    b = batcher(size=4, delay_ms=1000.0)
    b.add(A, "small", rows=1, received_at=0.0)
    b.add(A, "huge", rows=9, received_at=0.0)
    b.add(A, "tail", rows=1, received_at=0.0)
    batches = [b.pop_due(0.0), b.pop_due(0.0)]
    assert [(x.items, x.rows) for x in batches if x] == [(("small",), 1), (("huge",), 9)]
    assert b.pop_due(0.0) is None
    assert len(b) == 1


def test_oversize_item_alone_is_due_at_once() -> None:
    b = batcher(size=4, delay_ms=1000.0)
    b.add(A, "huge", rows=5, received_at=0.0)
    assert b.next_due_at() == -math.inf
    batch = b.pop_due(0.0)
    assert batch is not None
    assert (batch.items, batch.rows) == (("huge",), 5)


def test_batches_keep_filling_while_the_caller_does_not_pop() -> None:
    b = batcher(size=8, delay_ms=1.0)
    for index in range(6):
        b.add(A, f"a{index}", rows=1, received_at=index * 0.01)
    batch = b.pop_due(1.0)  # long past the delay: everything queued so far goes together
    assert batch is not None
    assert batch.rows == 6


# --- which due key first ------------------------------------------------------------------


def test_earliest_deadline_first_among_due_keys() -> None:
    b = batcher(size=100, delay_ms=10.0)
    b.add(A, "a", rows=1, received_at=2.0)
    b.add(B, "b", rows=1, received_at=1.0)
    first = b.pop_due(5.0)
    assert first is not None
    assert first.key == B


def test_quiet_expired_key_is_not_starved_by_a_busy_full_key() -> None:
    policies = {
        A: BatchPolicy(max_batch_size=2, max_batch_delay_ms=1000),
        B: BatchPolicy(max_batch_size=2, max_batch_delay_ms=10),
    }
    b: Batcher[Key, str] = Batcher(policy_for=policies.__getitem__)
    b.add(B, "b", rows=1, received_at=1.0)
    for index in range(6):
        b.add(A, f"a{index}", rows=1, received_at=1.0)
    first = b.pop_due(1.02)
    assert first is not None
    assert first.key == B  # its deadline 1.01 passed; A's full batches are due by 2.0


def test_full_key_goes_first_when_no_earlier_deadline_is_due() -> None:
    b = batcher(size=2, delay_ms=10.0)
    b.add(A, "a", rows=1, received_at=1.0)
    b.add(B, "b1", rows=1, received_at=1.005)
    b.add(B, "b2", rows=1, received_at=1.005)
    first = b.pop_due(1.006)  # A is not due yet, B is full
    assert first is not None
    assert first.key == B


def test_tie_on_deadline_prefers_full_key_then_first_queued() -> None:
    b = batcher(size=2, delay_ms=0.0)
    b.add(A, "a", rows=1, received_at=1.0)
    b.add(B, "b1", rows=1, received_at=1.0)
    b.add(B, "b2", rows=1, received_at=1.0)
    c = Key("c")
    b.add(c, "c", rows=1, received_at=1.0)
    keys = []
    while (batch := b.pop_due(1.0)) is not None:
        keys.append(batch.key)
    assert keys == [B, A, c]


# --- drain --------------------------------------------------------------------------------


def test_drain_everything_as_batches_within_max_size() -> None:
    b = batcher(size=3, delay_ms=1000.0)
    for index in range(5):
        b.add(A, f"a{index}", rows=1, received_at=0.0)
    b.add(B, "b-huge", rows=7, received_at=0.0)
    b.add(B, "b0", rows=2, received_at=0.0)
    batches = b.drain()
    assert [(x.key, x.items) for x in batches] == [
        (A, ("a0", "a1", "a2")),
        (A, ("a3", "a4")),
        (B, ("b-huge",)),
        (B, ("b0",)),
    ]
    assert len(b) == 0
    assert b.rows_queued == 0
    assert b.keys() == ()
    assert b.next_due_at() is None


def test_drain_with_predicate_keeps_the_rest_in_order() -> None:
    b = batcher(size=2, delay_ms=10.0)
    # Items carry their partition, as the worker's would.
    for index in range(6):
        b.add(A, f"p{index % 2}-a{index}", rows=1, received_at=float(index))
    b.add(B, "p0-b", rows=1, received_at=0.5)
    batches = b.drain(lambda key, item: item.startswith("p1"))
    assert [x.items for x in batches] == [("p1-a1", "p1-a3"), ("p1-a5",)]
    assert batches[0].oldest_received_at == 1.0
    assert len(b) == 4
    assert b.rows_queued == 4
    assert b.keys() == (A, B)
    assert b.next_due_at() == -math.inf  # A still holds three rows, more than one batch
    rest = b.drain()
    assert [x.items for x in rest] == [("p0-a0", "p0-a2"), ("p0-a4",), ("p0-b",)]


def test_drain_with_predicate_removes_emptied_keys() -> None:
    b = batcher()
    b.add(A, "x", rows=1, received_at=0.0)
    b.add(B, "y", rows=1, received_at=0.0)
    assert [x.items for x in b.drain(lambda key, item: key == A)] == [("x",)]
    assert b.keys() == (B,)
    assert b.drain(lambda key, item: False) == []
    assert len(b) == 1


def test_drained_batch_oldest_accounts_for_out_of_order_receipt() -> None:
    b = batcher(size=10)
    b.add(A, "x", rows=1, received_at=3.0)
    b.add(A, "y", rows=1, received_at=2.0)
    b.add(A, "z", rows=1, received_at=1.0)
    b.drain(lambda key, item: item == "z")
    assert b.next_due_at() == pytest.approx(2.01)


# --- properties ---------------------------------------------------------------------------

KEYS = ("k0", "k1", "k2")
POLICIES = {
    "k0": BatchPolicy(max_batch_size=1, max_batch_delay_ms=0.0),
    "k1": BatchPolicy(max_batch_size=4, max_batch_delay_ms=5.0),
    "k2": BatchPolicy(max_batch_size=7, max_batch_delay_ms=20.0),
}


@dataclass(frozen=True)
class Item:
    serial: int
    rows: int
    received_at: float


@dataclass
class Model:
    """A plain reference: a list per key, due-ness recomputed from scratch."""

    queues: dict[str, list[Item]] = field(default_factory=dict)

    def deadline(self, key: str) -> float:
        oldest = min(item.received_at for item in self.queues[key])
        return oldest + POLICIES[key].max_batch_delay_s

    def full(self, key: str) -> bool:
        return sum(item.rows for item in self.queues[key]) >= POLICIES[key].max_batch_size

    def due_keys(self, now: float) -> list[str]:
        return [
            k for k, q in self.queues.items() if q and (self.full(k) or now >= self.deadline(k))
        ]


add_op = st.tuples(
    st.just("add"),
    st.sampled_from(KEYS),
    st.integers(min_value=1, max_value=9),
    st.integers(min_value=-3, max_value=30),  # ms after the clock: slightly out of order too
)
pop_op = st.tuples(st.just("pop"), st.integers(min_value=0, max_value=40))
drain_op = st.tuples(st.just("drain"), st.integers(min_value=0, max_value=3))
ops = st.lists(st.one_of(add_op, add_op, pop_op, drain_op), max_size=80)


def take_greedy(batch: Batch[str, Item], sequence: list[Item]) -> list[Item]:
    """Check `batch` is the greedy front of `sequence`; return what is left of it."""
    policy = POLICIES[batch.key]
    assert batch.items, "never an empty batch"
    assert batch.rows == sum(item.rows for item in batch.items)
    assert batch.rows <= policy.max_batch_size or len(batch.items) == 1
    assert batch.oldest_received_at == min(item.received_at for item in batch.items)
    assert list(batch.items) == sequence[: len(batch.items)], "FIFO, from the front"
    rest = sequence[len(batch.items) :]
    if rest:
        assert batch.rows + rest[0].rows > policy.max_batch_size, "filled as far as fits"
    return rest


@settings(max_examples=300, deadline=None)
@given(ops)
def test_batcher_matches_reference_and_keeps_its_invariants(
    operations: list[tuple[object, ...]],
) -> None:
    b: Batcher[str, Item] = Batcher(policy_for=POLICIES.__getitem__)
    model = Model()
    clock = 0.0
    serial = 0
    added: list[Item] = []
    out: list[Item] = []
    popped_per_key: dict[str, list[int]] = {}

    for op in operations:
        if op[0] == "add":
            _, key, rows, skew_ms = op
            assert isinstance(key, str)
            assert isinstance(rows, int)
            assert isinstance(skew_ms, int)
            clock += 0.001
            item = Item(serial=serial, rows=rows, received_at=clock + skew_ms / 1000)
            serial += 1
            b.add(key, item, rows=rows, received_at=item.received_at)
            model.queues.setdefault(key, []).append(item)
            added.append(item)
        elif op[0] == "pop":
            (_, advance_ms) = op
            assert isinstance(advance_ms, int)
            clock += advance_ms / 1000
            due = model.due_keys(clock)
            due_at = b.next_due_at()
            batch = b.pop_due(clock)
            if not due:
                assert batch is None
                assert due_at is None or due_at > clock
                continue
            assert batch is not None
            assert due_at is not None
            assert due_at <= clock
            expected_key = min(due, key=lambda k: (model.deadline(k), not model.full(k)))
            assert batch.key == expected_key, "earliest deadline, then full, then first queued"
            model.queues[batch.key] = take_greedy(batch, model.queues[batch.key])
            popped_per_key.setdefault(batch.key, []).extend(i.serial for i in batch.items)
            out.extend(batch.items)
        else:
            (_, modulus) = op
            assert isinstance(modulus, int)

            def chosen(item: Item, modulus: int = modulus) -> bool:
                return item.serial % (modulus + 1) == 0

            drained = b.drain(lambda key, item: chosen(item))
            sequences = {k: [i for i in q if chosen(i)] for k, q in model.queues.items()}
            expected_keys = [k for k, seq in sequences.items() for _ in seq]
            drained_keys = [batch.key for batch in drained]
            assert drained_keys == sorted(drained_keys, key=list(model.queues).index)
            assert set(drained_keys) == set(expected_keys)
            for batch in drained:
                sequences[batch.key] = take_greedy(batch, sequences[batch.key])
                out.extend(batch.items)
            assert not any(sequences.values()), "drain took every matching item"
            model.queues = {k: [i for i in q if not chosen(i)] for k, q in model.queues.items()}
        model.queues = {k: q for k, q in model.queues.items() if q}
        assert len(b) == sum(len(q) for q in model.queues.values())
        assert b.rows_queued == sum(i.rows for q in model.queues.values() for i in q)
        assert b.keys() == tuple(model.queues)
        expected_due = None
        for key in model.queues:
            key_due = -math.inf if model.full(key) else model.deadline(key)
            expected_due = key_due if expected_due is None else min(expected_due, key_due)
        assert b.next_due_at() == expected_due

    for batch in b.drain():
        out.extend(batch.items)
    assert sorted(i.serial for i in out) == [i.serial for i in added], "no loss, no duplicates"
    for serials in popped_per_key.values():
        assert serials == sorted(serials), "FIFO across popped batches of a key"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KEYS),
            st.integers(min_value=1, max_value=9),
            st.floats(min_value=0, max_value=1e6, allow_nan=False),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_popping_at_next_due_at_always_yields_until_empty(
    additions: list[tuple[str, int, float]],
) -> None:
    b: Batcher[str, int] = Batcher(policy_for=POLICIES.__getitem__)
    for serial, (key, rows, received_at) in enumerate(additions):
        b.add(key, serial, rows=rows, received_at=received_at)
    seen: list[int] = []
    while (due_at := b.next_due_at()) is not None:
        batch = b.pop_due(due_at)
        assert batch is not None
        seen.extend(batch.items)
    assert sorted(seen) == list(range(len(additions)))
    assert len(b) == 0


# --- priority -----------------------------------------------------------------------------


def test_higher_priority_goes_first_and_equal_priorities_keep_their_order() -> None:
    b = batcher(size=3)
    for name in ("low-1", "low-2", "low-3"):
        b.add(A, name, rows=1, received_at=0.0)
    b.add(A, "high-1", rows=1, received_at=1.0, priority=5)
    b.add(A, "high-2", rows=1, received_at=1.0, priority=5)
    b.add(A, "mid", rows=1, received_at=1.0, priority=1)
    first = b.pop_due(0.0)  # full, so due at once
    assert first is not None
    assert first.items == ("high-1", "high-2", "mid")
    assert first.oldest_received_at == 1.0
    second = b.pop_due(0.0)
    assert second is not None
    assert second.items == ("low-1", "low-2", "low-3")


def test_the_deadline_follows_the_oldest_request_whatever_its_priority() -> None:
    b = batcher(size=10, delay_ms=10.0)
    b.add(A, "old-low", rows=1, received_at=0.0)
    b.add(A, "new-high", rows=1, received_at=5.0, priority=9)
    assert b.next_due_at() == pytest.approx(0.010)
    batch = b.pop_due(0.010)
    assert batch is not None
    assert batch.items == ("new-high", "old-low")
