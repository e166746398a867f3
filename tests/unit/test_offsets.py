"""Offset bookkeeping: commits never pass a record whose result is not durably written."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.offsets import (
    OffsetOrderError,
    OffsetTracker,
    OffsetTrackingError,
    UntrackedOffsetError,
)


class TopicPartition(NamedTuple):
    """Shaped like aiokafka's, which the worker uses."""

    topic: str
    partition: int


P0 = TopicPartition("requests", 0)
P1 = TopicPartition("requests", 1)


def tracker_with(partition: TopicPartition, offsets: list[int]) -> OffsetTracker[TopicPartition]:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    for offset in offsets:
        tracker.track(partition, offset)
    return tracker


def test_new_tracker_is_empty() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    assert tracker.committable() == {}
    assert tracker.pending() == 0
    assert tracker.pending(P0) == 0
    assert tracker.in_flight == 0
    assert tracker.watermark(P0) is None
    assert not tracker.tracks(P0)


def test_nothing_committable_until_the_first_record_completes() -> None:
    tracker = tracker_with(P0, [5, 6, 7])
    assert tracker.tracks(P0)
    assert tracker.committable() == {}
    assert tracker.pending(P0) == 3
    assert tracker.in_flight == 3


def test_commit_offset_is_one_past_the_contiguous_completed_prefix() -> None:
    tracker = tracker_with(P0, [5, 6, 7])
    tracker.complete(tracker.lease(P0), 5)
    assert tracker.committable() == {P0: 6}
    tracker.complete(tracker.lease(P0), 6)
    assert tracker.committable() == {P0: 7}
    tracker.complete(tracker.lease(P0), 7)
    assert tracker.committable() == {P0: 8}
    assert tracker.pending(P0) == 0
    assert tracker.in_flight == 0


def test_out_of_order_completion_waits_for_the_earlier_record() -> None:
    tracker = tracker_with(P0, [0, 1, 2, 3])
    tracker.complete(tracker.lease(P0), 2)
    tracker.complete(tracker.lease(P0), 3)
    assert tracker.committable() == {}
    assert tracker.pending(P0) == 4
    assert tracker.in_flight == 2
    tracker.complete(tracker.lease(P0), 1)
    assert tracker.committable() == {}
    tracker.complete(tracker.lease(P0), 0)
    assert tracker.committable() == {P0: 4}
    assert tracker.pending(P0) == 0


def test_gaps_between_tracked_offsets_do_not_block_commits() -> None:
    # Compaction and transaction markers leave offsets that are never consumed.
    tracker = tracker_with(P0, [10, 13, 20])
    tracker.complete(tracker.lease(P0), 13)
    tracker.complete(tracker.lease(P0), 10)
    assert tracker.committable() == {P0: 14}
    tracker.complete(tracker.lease(P0), 20)
    assert tracker.committable() == {P0: 21}


def test_partitions_are_independent() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(P0, 0)
    tracker.track(P1, 0)
    tracker.track(P0, 1)
    tracker.complete(tracker.lease(P1), 0)
    assert tracker.committable() == {P1: 1}
    assert tracker.pending() == 2
    assert tracker.pending(P0) == 2
    assert tracker.pending(P1) == 0


def test_committable_only_lists_partitions_that_advanced_since_the_last_commit() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    for offset in range(3):
        tracker.track(P0, offset)
        tracker.track(P1, offset)
    tracker.complete(tracker.lease(P0), 0)
    tracker.complete(tracker.lease(P1), 0)
    offsets = tracker.committable()
    assert offsets == {P0: 1, P1: 1}
    assert tracker.committable() == offsets  # asking changes nothing
    tracker.mark_committed(offsets)
    assert tracker.committable() == {}
    tracker.complete(tracker.lease(P1), 1)
    assert tracker.committable() == {P1: 2}


def test_mark_committed_never_moves_backwards_and_ignores_unknown_partitions() -> None:
    tracker = tracker_with(P0, [0, 1])
    tracker.complete(tracker.lease(P0), 0)
    tracker.complete(tracker.lease(P0), 1)
    tracker.mark_committed({P0: 2, P1: 7})
    tracker.mark_committed({P0: 1})  # a late reply to an older commit
    assert tracker.committable() == {}
    assert not tracker.tracks(P1)


def test_completing_an_untracked_offset_raises() -> None:
    tracker = tracker_with(P0, [3, 5])
    with pytest.raises(UntrackedOffsetError) as raised:
        tracker.complete(tracker.lease(P0), 4)
    assert raised.value.partition == P0
    assert raised.value.offset == 4
    assert "offset 4" in str(raised.value)
    with pytest.raises(KeyError):
        tracker.lease(P1)  # never tracked: no lease to complete under
    assert tracker.in_flight == 2


def test_completing_twice_raises_whether_or_not_the_watermark_passed_it() -> None:
    tracker = tracker_with(P0, [0, 1, 2])
    tracker.complete(tracker.lease(P0), 2)
    with pytest.raises(UntrackedOffsetError):
        tracker.complete(tracker.lease(P0), 2)  # still waiting behind 0 and 1
    tracker.complete(tracker.lease(P0), 0)
    with pytest.raises(UntrackedOffsetError):
        tracker.complete(tracker.lease(P0), 0)  # already behind the watermark
    assert tracker.in_flight == 1


def test_tracking_a_non_increasing_offset_raises() -> None:
    tracker = tracker_with(P0, [4, 7])
    with pytest.raises(OffsetOrderError) as raised:
        tracker.track(P0, 7)
    assert raised.value.last_tracked == 7
    with pytest.raises(OffsetOrderError):
        tracker.track(P0, 5)
    tracker.complete(tracker.lease(P0), 4)
    tracker.complete(tracker.lease(P0), 7)
    with pytest.raises(OffsetOrderError):
        tracker.track(P0, 7)  # even once everything is complete
    tracker.track(P0, 8)
    assert tracker.pending(P0) == 1


def test_negative_offset_is_rejected() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    with pytest.raises(ValueError, match="offset"):
        tracker.track(P0, -1)


def test_errors_share_one_base() -> None:
    assert issubclass(UntrackedOffsetError, OffsetTrackingError)
    assert issubclass(OffsetOrderError, OffsetTrackingError)


def test_revoking_ends_the_lease_and_later_completions_change_nothing() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    for offset in range(4):
        tracker.track(P0, offset)
        tracker.track(P1, offset)
    old_lease = tracker.lease(P0)
    tracker.complete(old_lease, 1)
    tracker.complete(tracker.lease(P1), 0)
    assert tracker.revoke([P0]) == 3  # P0's offsets 0, 2 and 3 were still in flight
    assert old_lease.revoked
    assert not tracker.tracks(P0)
    assert tracker.pending(P0) == 0
    assert tracker.pending() == 3
    assert tracker.in_flight == 3  # P1's offsets 1..3
    assert tracker.committable() == {P1: 1}
    assert tracker.complete(old_lease, 0) is False  # answered after revocation: not counted
    assert tracker.in_flight == 3
    assert tracker.revoke([P0, P1]) == 3  # revoking twice is harmless
    assert tracker.in_flight == 0
    assert tracker.committable() == {}


def test_partition_assigned_again_starts_afresh() -> None:
    tracker = tracker_with(P0, [10, 11])
    old_lease = tracker.lease(P0)
    tracker.complete(old_lease, 10)
    tracker.mark_committed(tracker.committable())
    tracker.revoke([P0])
    new_lease = tracker.track(P0, 11)  # re-delivered from the committed offset after reassignment
    assert new_lease is not old_lease
    assert (
        tracker.complete(old_lease, 11) is False
    )  # the old assignment's answer counts for nothing
    assert tracker.pending(P0) == 1
    assert tracker.complete(new_lease, 11) is True
    assert tracker.committable() == {P0: 12}


def test_track_many_equals_tracking_one_by_one() -> None:
    one_by_one = tracker_with(P0, [3, 4, 7])
    at_once: OffsetTracker[TopicPartition] = OffsetTracker()
    lease = at_once.track_many(P0, [3, 4, 7])
    assert at_once.in_flight == one_by_one.in_flight == 3
    at_once.complete(lease, 3)
    one_by_one.complete(one_by_one.lease(P0), 3)
    assert at_once.committable() == one_by_one.committable() == {P0: 4}
    with pytest.raises(OffsetOrderError):
        at_once.track_many(P0, [8, 8])


# --- properties ---------------------------------------------------------------------------


@st.composite
def tracked_then_shuffled(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    gaps = draw(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60))
    start = draw(st.integers(min_value=0, max_value=1000))
    offsets = []
    offset = start
    for gap in gaps:
        offsets.append(offset)
        offset += gap
    return offsets, draw(st.permutations(offsets))


@settings(max_examples=300, deadline=None)
@given(tracked_then_shuffled(), st.data())
def test_random_completion_order_never_commits_past_an_incomplete_record(
    tracked_and_order: tuple[list[int], list[int]], data: st.DataObject
) -> None:
    offsets, completion_order = tracked_and_order
    tracker = tracker_with(P0, offsets)
    complete: set[int] = set()
    committed: int | None = None
    for offset in completion_order:
        tracker.complete(tracker.lease(P0), offset)
        complete.add(offset)
        assert tracker.in_flight == len(offsets) - len(complete)
        commit = tracker.committable().get(P0)
        incomplete = [o for o in offsets if o not in complete]
        if commit is not None:
            assert all(o >= commit for o in incomplete), "commit passed an incomplete record"
            assert all(o in complete for o in offsets if o < commit)
            assert commit - 1 in complete
            assert committed is None or commit > committed
            if data.draw(st.booleans(), label="commit now"):
                tracker.mark_committed({P0: commit})
                committed = commit
        # The watermark is as far as it can be: the first incomplete record, or past the last.
        done_prefix = [o for o in offsets if not incomplete or o < incomplete[0]]
        expected = done_prefix[-1] + 1 if done_prefix else None
        assert tracker.watermark(P0) == expected
        assert tracker.pending(P0) == len(offsets) - len(done_prefix)
    assert tracker.watermark(P0) == offsets[-1] + 1
    assert tracker.pending() == 0
    assert tracker.in_flight == 0
    if committed != offsets[-1] + 1:
        assert tracker.committable() == {P0: offsets[-1] + 1}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([P0, P1]), st.booleans()),
        max_size=100,
    ),
    st.randoms(use_true_random=False),
)
def test_interleaved_partitions_commit_exactly_the_completed_prefix(
    steps: list[tuple[TopicPartition, bool]], rng: random.Random
) -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    next_offset = {P0: 0, P1: 0}
    outstanding: dict[TopicPartition, list[int]] = {P0: [], P1: []}
    complete: dict[TopicPartition, set[int]] = {P0: set(), P1: set()}
    for partition, finish_one in steps:
        if finish_one and outstanding[partition]:
            offset = outstanding[partition].pop(rng.randrange(len(outstanding[partition])))
            tracker.complete(tracker.lease(partition), offset)
            complete[partition].add(offset)
        else:
            offset = next_offset[partition]
            next_offset[partition] += 1 + rng.randrange(2)  # sometimes a gap
            tracker.track(partition, offset)
            outstanding[partition].append(offset)
        for p in (P0, P1):
            low = min(outstanding[p], default=next_offset[p])
            finished_below = [o for o in complete[p] if o < low]
            if finished_below:
                assert tracker.watermark(p) == max(finished_below) + 1
            else:
                assert tracker.watermark(p) is None
        assert tracker.in_flight == len(outstanding[P0]) + len(outstanding[P1])


def test_the_oldest_unanswered_record_is_dated_by_its_polls_first_record() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    lease = tracker.track_many("p", [0, 1, 2], first_timestamp_ms=1_000)
    tracker.track_many("p", [3, 4], first_timestamp_ms=2_000)
    assert tracker.oldest_ms("p") == 1_000
    for offset in (0, 1, 3):  # 3 done out of order: 2 still waits, in the first poll
        tracker.complete(lease, offset)
    assert tracker.oldest_ms("p") == 1_000
    tracker.complete(lease, 2)
    assert tracker.first_unanswered("p") == 4
    assert tracker.oldest_ms("p") == 2_000
    tracker.complete(lease, 4)
    assert tracker.oldest_ms("p") is None
    assert tracker.first_unanswered("p") == 5
    assert tracker.oldest_ms("other") is None


def test_poll_marks_do_not_pile_up_on_a_partition_that_keeps_up() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for poll in range(1000):
        lease = tracker.track_many("p", [2 * poll, 2 * poll + 1], first_timestamp_ms=poll)
        tracker.complete(lease, 2 * poll)
        tracker.complete(lease, 2 * poll + 1)
    assert len(tracker.lease("p").marks) == 0


def test_committable_with_is_what_completing_would_make_committable_without_completing() -> None:
    tracker = tracker_with(P0, [5, 6, 7, 9])
    tracker.track(P1, 0)
    lease = tracker.lease(P0)
    tracker.complete(lease, 6)
    assert tracker.committable_with([(lease, 5)]) == {P0: 7}
    assert tracker.committable_with([(lease, 5), (lease, 7), (lease, 9)]) == {P0: 10}
    assert tracker.committable_with([(lease, 7)]) == {}, "offset 5 is still unanswered"
    assert tracker.committable() == {}, "nothing was completed"
    assert tracker.in_flight == 4


def test_committable_with_keeps_partitions_already_committable_and_skips_committed_ones() -> None:
    tracker = tracker_with(P0, [0, 1])
    tracker.track(P1, 0)
    tracker.complete(tracker.lease(P1), 0)
    lease = tracker.lease(P0)
    assert tracker.committable_with([(lease, 0)]) == {P0: 1, P1: 1}
    tracker.mark_committed({P1: 1})
    tracker.complete(lease, 0)
    tracker.mark_committed({P0: 1})
    assert tracker.committable_with([]) == {}
    assert tracker.committable_with([(lease, 1)]) == {P0: 2}


def test_committable_with_leaves_out_revoked_leases() -> None:
    tracker = tracker_with(P0, [0])
    tracker.track(P1, 0)
    revoked = tracker.lease(P0)
    tracker.revoke([P0])
    assert tracker.committable_with([(revoked, 0), (tracker.lease(P1), 0)]) == {P1: 1}


@settings(max_examples=200, deadline=None)
@given(tracked_then_shuffled(), st.data())
def test_committable_with_equals_committable_after_completing(
    tracked_and_order: tuple[list[int], list[int]], data: st.DataObject
) -> None:
    offsets, completion_order = tracked_and_order
    tracker = tracker_with(P0, offsets)
    lease = tracker.lease(P0)
    remaining = list(completion_order)
    while remaining:
        size = data.draw(st.integers(min_value=1, max_value=len(remaining)), label="group size")
        group, remaining = remaining[:size], remaining[size:]
        predicted = tracker.committable_with([(lease, offset) for offset in group])
        for offset in group:
            tracker.complete(lease, offset)
        assert predicted == tracker.committable()
        if data.draw(st.booleans(), label="commit now"):
            tracker.mark_committed(predicted)


def test_in_flight_bytes_count_each_record_until_it_completes() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    lease = tracker.track_many(P0, [0, 1, 2], sizes=[100, 200, 300])
    other = tracker.track_many(P1, [5], sizes=[7])
    assert tracker.in_flight_bytes == 607
    tracker.complete(lease, 1)
    assert tracker.in_flight_bytes == 407
    tracker.complete(other, 5)
    tracker.complete(lease, 0)
    assert tracker.in_flight_bytes == 300
    assert lease.bytes_in_flight == 300


def test_revoking_a_partition_drops_its_bytes_and_late_completions_change_nothing() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    lease = tracker.track_many(P0, [0, 1], sizes=[100, 200])
    tracker.track_many(P1, [0], sizes=[50])
    assert tracker.revoke([P0]) == 2
    assert tracker.in_flight_bytes == 50
    assert not tracker.complete(lease, 0)
    assert tracker.in_flight_bytes == 50


def test_records_tracked_without_sizes_count_no_bytes() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    lease = tracker.track_many(P0, [0, 1])
    tracker.complete(lease, 0)
    assert tracker.in_flight_bytes == 0
    with pytest.raises(ValueError, match="2 sizes for 1 offsets"):
        tracker.track_many(P1, [0], sizes=[1, 2])
