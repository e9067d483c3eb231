"""The reorder buffer: strict order, stale epochs and duplicates dropped, a bounded wait for gaps, a bounded buffer."""

from __future__ import annotations

from itertools import accumulate, pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.reorder import Reorder, ReorderStats

PROPERTY = settings(max_examples=200, deadline=None)
FOREVER = 1e9  # a max_wait no test outlives

Key = tuple[int, int]


def times(data: st.DataObject, n: int) -> list[float]:
    """``n`` non-decreasing arrival times from 0."""
    steps = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    return list(accumulate(steps))


def assert_increasing(keys: list[Key]) -> None:
    assert all(a < b for a, b in pairwise(keys)), keys


# ---- properties ----


@PROPERTY
@given(data=st.data(), start=st.integers(0, 1000), epoch=st.integers(0, 5), n=st.integers(1, 50))
def test_a_shuffled_run_comes_out_sorted_without_skips(data: st.DataObject, start: int, epoch: int, n: int) -> None:
    run = list(range(start, start + n))
    order = data.draw(st.permutations(run))
    r: Reorder[int] = Reorder(max_wait=FOREVER, first_epoch=epoch, first_index=start)
    out: list[int] = []
    for index, now in zip(order, times(data, n), strict=True):
        out += r.push(epoch, index, index, now)
        assert r.poll(now) == []  # the wait never expires: only pushes release
    assert out == run
    assert r.stats == ReorderStats(emitted=n)
    assert len(r) == 0 and r.deadline() is None


@PROPERTY
@given(data=st.data(), n=st.integers(1, 30))
def test_duplicates_are_dropped_and_counted(data: st.DataObject, n: int) -> None:
    extras = data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    order = data.draw(st.permutations(list(range(n)) + extras))
    r: Reorder[Key] = Reorder(max_wait=FOREVER, max_buffered=3 * n)
    out: list[Key] = []
    copies: dict[int, int] = {}
    for index, now in zip(order, times(data, len(order)), strict=True):
        copies[index] = copies.get(index, 0) + 1
        out += r.push(0, index, (0, index), now)  # items are their keys: what comes out shows where it came from
    assert_increasing(out)
    assert out == [(0, i) for i in range(n)]
    assert r.stats == ReorderStats(emitted=n, dropped_duplicate=len(extras))


@PROPERTY
@given(data=st.data(), n=st.integers(1, 30), max_wait=st.floats(0, 3))
def test_duplicates_with_expiring_waits_keep_the_order_and_the_count(
    data: st.DataObject, n: int, max_wait: float
) -> None:
    indices = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3 * n))
    r: Reorder[Key] = Reorder(max_wait=max_wait)
    out: list[Key] = []
    for index, now in zip(indices, times(data, len(indices)), strict=True):
        out += r.push(0, index, (0, index), now)
        if data.draw(st.booleans()):
            out += r.poll(now)
    out += r.poll(now + max_wait + 1)
    assert_increasing(out)
    s = r.stats
    assert len(r) == 0
    assert s.emitted == len(out)
    assert s.emitted + s.dropped_duplicate == len(indices)  # each push is emitted once or dropped
    assert s.dropped_duplicate >= len(indices) - len(set(indices))  # at least every extra copy


@st.composite
def epoch_schedules(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Pushes of several epochs' runs (indices keep counting across epochs) in a random order, so old-epoch items
    arrive late and new-epoch ones early; with some ``start_epoch`` announcements and polls mixed in."""
    items: list[tuple[int, int]] = []
    starts = []
    index = draw(st.integers(0, 5))
    for epoch in range(draw(st.integers(1, 4))):
        count = draw(st.integers(1, 8))
        starts.append(index)
        items += [(epoch, index + k) for k in range(count)]
        index += count + draw(st.integers(0, 2))  # chunks may be lost around a cut too
    events = [("push", e, i) for e, i in draw(st.permutations(items))]
    for epoch, first in enumerate(starts):
        if epoch > 0 and draw(st.booleans()):
            events.insert(draw(st.integers(0, len(events))), ("start", epoch, first))
    for _ in range(draw(st.integers(0, len(events)))):
        events.insert(draw(st.integers(0, len(events))), ("poll", 0, 0))
    return events


@PROPERTY
@given(data=st.data(), events=epoch_schedules(), max_wait=st.floats(0, 2))
def test_old_epochs_never_come_out_after_a_newer_one(
    data: st.DataObject, events: list[tuple[str, int, int]], max_wait: float
) -> None:
    r: Reorder[Key] = Reorder(max_wait=max_wait)
    out: list[Key] = []
    newest = 0  # the newest epoch seen, pushed or announced
    stale = 0  # what dropped_stale must be, from what is observable
    pushes = 0
    late: set[Key] = set()  # pushed when a newer epoch was already seen: must never come out
    now = 0.0
    for (kind, epoch, index), now in zip(events, times(data, len(events)), strict=True):
        if epoch > newest:  # everything buffered is of an older epoch now
            stale += len(r)
            newest = epoch
        if kind == "push":
            pushes += 1
            if epoch < newest:
                stale += 1
                late.add((epoch, index))
            released = r.push(epoch, index, (epoch, index), now)
        elif kind == "start":
            released = r.start_epoch(epoch, index)
        else:
            released = r.poll(now)
        assert all(e == newest for e, _ in released)  # only the newest epoch comes out
        out += released
        assert r.stats.dropped_stale == stale
    out += r.poll(now + max_wait + 1)
    assert len(r) == 0
    assert_increasing(out)
    for i, (epoch, _) in enumerate(out):
        assert all(e >= epoch for e, _ in out[i:])
    assert not late & set(out)
    s = r.stats
    assert s.dropped_stale == stale
    assert s.emitted == len(out)
    assert s.emitted + s.dropped_stale + s.dropped_duplicate == pushes


@PROPERTY
@given(data=st.data(), n=st.integers(1, 40), max_wait=st.floats(0, 3), max_buffered=st.integers(1, 64))
def test_gaps_are_skipped_after_the_wait_and_nothing_is_held_forever(
    data: st.DataObject, n: int, max_wait: float, max_buffered: int
) -> None:
    delivered = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))  # some never come
    r: Reorder[Key] = Reorder(max_wait=max_wait, max_buffered=max_buffered)
    out: list[Key] = []
    now = 0.0
    for index, now in zip(delivered, times(data, len(delivered)), strict=True):
        skipped = r.stats.skipped
        out += r.push(0, index, (0, index), now)
        assert len(r) <= max_buffered
        if max_buffered >= n:  # no overflow: a push alone never gives up on a gap
            assert r.stats.skipped == skipped
        if data.draw(st.booleans()):
            out += r.poll(now)
            deadline = r.deadline()
            assert deadline is None or deadline > now  # nothing left that has waited its max_wait
    out += r.poll(now + max_wait + 1)
    assert len(r) == 0 and r.deadline() is None
    assert_increasing(out)
    emitted = [i for _, i in out]
    assert set(emitted) <= set(delivered)
    assert emitted[-1] == max(delivered)  # the highest index is never behind the release point
    s = r.stats
    assert s.emitted == len(out)
    assert s.emitted + s.skipped == emitted[-1] + 1  # every index of 0..last came out or was skipped
    assert s.emitted + s.dropped_duplicate == len(delivered)  # delivered ones that did not come out arrived late
    assert s.dropped_stale == 0


# ---- examples ----


def test_an_in_order_stream_comes_out_at_once() -> None:
    r: Reorder[str] = Reorder(max_wait=1.0)
    assert r.push(0, 0, "a", 0.0) == ["a"]
    assert r.push(0, 1, "b", 0.1) == ["b"]
    assert r.push(0, 2, "c", 0.2) == ["c"]
    assert len(r) == 0 and r.deadline() is None
    assert r.stats == ReorderStats(emitted=3)


def test_a_gap_is_skipped_after_max_wait_and_not_before() -> None:
    r: Reorder[str] = Reorder(max_wait=0.5)
    assert r.push(0, 0, "a", 0.0) == ["a"]
    assert r.push(0, 2, "c", 1.0) == []
    assert r.push(0, 3, "d", 1.2) == []
    assert r.deadline() == 1.5  # from the oldest held item's arrival
    assert r.poll(1.49) == []
    assert len(r) == 2
    assert r.poll(1.5) == ["c", "d"]
    assert r.stats == ReorderStats(emitted=3, skipped=1)
    assert r.push(0, 1, "b", 1.6) == []  # too late: counted as a duplicate of the skipped index
    assert r.stats.dropped_duplicate == 1
    assert r.push(0, 4, "e", 1.7) == ["e"]


def test_a_filled_gap_releases_the_held_run() -> None:
    r: Reorder[str] = Reorder(max_wait=5.0)
    assert r.push(0, 2, "c", 0.0) == []
    assert r.push(0, 1, "b", 0.1) == []
    assert r.push(0, 0, "a", 0.2) == ["a", "b", "c"]
    assert r.stats == ReorderStats(emitted=3)


def test_each_gap_waits_from_its_oldest_blocked_arrival() -> None:
    r: Reorder[str] = Reorder(max_wait=1.0)
    assert r.push(0, 1, "b", 0.0) == []
    assert r.push(0, 3, "d", 0.5) == []
    assert r.deadline() == 1.0
    assert r.poll(1.0) == ["b"]  # 0 skipped; 3 still has half its wait left for 2
    assert r.deadline() == 1.5
    assert r.poll(1.4) == []
    assert r.poll(1.5) == ["d"]
    assert r.stats == ReorderStats(emitted=2, skipped=2)
    assert r.deadline() is None


def test_an_item_that_waited_long_enough_releases_in_one_poll() -> None:
    r: Reorder[str] = Reorder(max_wait=1.0)
    assert r.push(0, 5, "f", 0.0) == []  # 0..4 missing, then 6..8
    assert r.push(0, 2, "c", 0.9) == []
    assert r.push(0, 9, "j", 0.95) == []
    assert r.deadline() == 1.0  # the oldest arrival counts, not the lowest index
    assert r.poll(1.0) == ["c", "f"]  # 2 skipped its gap and f had waited already; j has not
    assert r.poll(2.0) == ["j"]
    assert r.stats == ReorderStats(emitted=3, skipped=7)


def test_start_epoch_drops_old_items_and_releases_the_new_start_at_once() -> None:
    r: Reorder[str] = Reorder(max_wait=1.0)
    assert r.push(0, 0, "a", 0.0) == ["a"]
    assert r.push(0, 2, "c", 0.1) == []
    assert r.push(0, 3, "d", 0.2) == []
    assert r.start_epoch(1, 10) == []
    assert len(r) == 0 and r.deadline() is None
    assert r.stats.dropped_stale == 2
    assert r.push(1, 10, "K", 0.3) == ["K"]
    assert r.push(0, 1, "b", 0.4) == []  # the old epoch's late chunk
    assert r.stats == ReorderStats(emitted=2, dropped_stale=3)
    assert r.start_epoch(0, 20) == [] and r.start_epoch(1, 5) == []  # old or already known: no effect
    assert r.push(1, 11, "L", 0.5) == ["L"]


def test_an_unannounced_epoch_waits_then_starts_at_its_lowest_item() -> None:
    r: Reorder[str] = Reorder(max_wait=1.0)
    assert r.push(0, 0, "a", 0.0) == ["a"]
    assert r.push(0, 2, "c", 0.5) == []
    assert r.push(1, 12, "M", 1.0) == []  # newer epoch: c is stale; where epoch 1 starts is unknown
    assert r.stats.dropped_stale == 1
    assert r.push(1, 11, "L", 1.5) == []
    assert r.deadline() == 2.0  # from the epoch's first arrival
    assert r.poll(1.99) == []
    assert r.poll(2.0) == ["L", "M"]
    assert r.stats == ReorderStats(emitted=3, dropped_stale=1)  # no skip counted before an unknown start
    assert r.push(1, 10, "K", 2.1) == []  # behind the chosen start
    assert r.push(1, 13, "N", 2.2) == ["N"]
    assert r.stats.dropped_duplicate == 1


def test_start_epoch_of_the_current_unknown_epoch_releases_its_held_run() -> None:
    r: Reorder[str] = Reorder(max_wait=1.0)
    assert r.push(1, 11, "L", 0.0) == []
    assert r.push(1, 9, "J", 0.1) == []  # below the start announced next
    assert r.push(1, 10, "K", 0.2) == []
    assert r.start_epoch(1, 10) == ["K", "L"]
    assert r.stats == ReorderStats(emitted=2, dropped_duplicate=1)
    assert len(r) == 0


def test_the_buffer_is_bounded_by_skipping_forward() -> None:
    r: Reorder[int] = Reorder(max_wait=FOREVER, max_buffered=3)
    assert [r.push(0, i, i, 0.0) for i in (1, 2, 3)] == [[], [], []]
    assert r.push(0, 5, 5, 0.0) == [1, 2, 3]  # a fourth held item: give up on 0
    assert len(r) == 1
    assert r.stats == ReorderStats(emitted=3, skipped=1)
    assert r.push(0, 4, 4, 0.0) == [4, 5]


def test_stats_is_a_snapshot() -> None:
    r: Reorder[int] = Reorder(max_wait=1.0)
    stats = r.stats
    r.push(0, 0, 0, 0.0)
    assert stats.emitted == 0 and r.stats.emitted == 1


@pytest.mark.parametrize("kwargs", [{"max_wait": -0.1}, {"max_wait": 1.0, "max_buffered": 0}])
def test_bad_arguments_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Reorder(**kwargs)  # type: ignore[arg-type]
