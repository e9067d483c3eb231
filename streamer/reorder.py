"""Put a session's decoded chunks back in order, with a bounded wait for missing ones.

Chunks of one session may complete out of order (several sessions, several pipeline stages). Each carries
``(epoch, chunk_index)``: ``epoch`` bumps on a hard cut, ``chunk_index`` counts the session's chunks across epochs.
:class:`Reorder` releases them by this policy:

* Strict order: items come out in increasing ``(epoch, index)``; nothing at or below an emitted key ever comes out.
* Only the newest epoch counts. An item of an older epoch than the newest one seen (pushed or announced with
  :meth:`Reorder.start_epoch`) is dropped, and so are the older items still buffered when a newer epoch appears
  (``dropped_stale``).
* Duplicates are dropped: an index already buffered, or one at or behind the release point (already emitted,
  skipped, or passed over) (``dropped_duplicate``).
* Where an epoch starts is known for the first epoch (constructor) and for one announced with ``start_epoch``;
  in-order items of such an epoch come out at once. An epoch first seen through a pushed item has an unknown start:
  its items are held until the wait below expires, then the lowest buffered one starts the epoch.
* The wait is bounded: ``max_wait`` seconds after the oldest buffered item arrived (every buffered item is blocked by
  a gap, or in-order ones would have come out), :meth:`Reorder.poll` gives up on the missing index(es) below the
  lowest buffered one, counts each as ``skipped`` (not for an unknown start: nothing is known to be missing), and
  releases what is then in order. So no item is held more than ``max_wait`` past its arrival, if polled in time.
* The buffer is bounded: past ``max_buffered`` held items, it skips forward the same way at once.

Time is passed in (``now``, in seconds, non-decreasing), never read from a clock, so the policy is deterministic.
``push`` only releases what the new item puts in order; expired waits are released by ``poll`` (see ``deadline``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class ReorderStats:
    """Counters of what a :class:`Reorder` did with the items pushed and the indices it expected."""

    emitted: int = 0
    dropped_stale: int = 0
    dropped_duplicate: int = 0
    skipped: int = 0


class Reorder(Generic[T]):
    """Releases one session's items in ``(epoch, index)`` order; see the module docstring for the policy."""

    def __init__(self, max_wait: float, first_epoch: int = 0, first_index: int = 0, max_buffered: int = 64) -> None:
        """``max_wait``: seconds to wait for a missing index; the stream starts at ``(first_epoch, first_index)``."""
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self._max_wait = max_wait
        self._max_buffered = max_buffered
        self._epoch = first_epoch
        self._next: int | None = first_index  # next index to release in the current epoch; None: start unknown
        self._held: dict[int, tuple[T, float]] = {}  # index -> (item, arrival time), current epoch only
        self._stats = ReorderStats()

    def push(self, epoch: int, index: int, item: T, now: float) -> list[T]:
        """Take one item that arrived at ``now``; return the items it puts in order (possibly none)."""
        if epoch < self._epoch:
            self._stats.dropped_stale += 1
            return []
        if epoch > self._epoch:
            self._enter(epoch, None)
        if index in self._held or (self._next is not None and index < self._next):
            self._stats.dropped_duplicate += 1
            return []
        self._held[index] = (item, now)
        out = self._release_in_order()
        while len(self._held) > self._max_buffered:
            out += self._skip_to_lowest()
        return out

    def poll(self, now: float) -> list[T]:
        """Release what the bounded wait lets out at ``now``; call it at (or after) :meth:`deadline`."""
        out: list[T] = []
        while (due := self.deadline()) is not None and now >= due:
            out += self._skip_to_lowest()
        return out

    def start_epoch(self, epoch: int, first_index: int) -> list[T]:
        """Announce that ``epoch`` begins at ``first_index``; return items this puts in order.

        A newer epoch becomes current at once: older buffered items are dropped as stale, and in-order items of the
        new epoch will come out as they arrive. For the current epoch, whose start was unknown, the buffered items
        from ``first_index`` on are released in order (those below it are dropped as duplicates). An announcement for
        an older epoch, or for the current one when its start is already known, changes nothing.
        """
        if epoch > self._epoch:
            self._enter(epoch, first_index)
            return []
        if epoch < self._epoch or self._next is not None:
            return []
        self._next = first_index
        for index in [i for i in self._held if i < first_index]:
            del self._held[index]
            self._stats.dropped_duplicate += 1
        return self._release_in_order()

    def deadline(self) -> float | None:
        """The time from which :meth:`poll` releases something, or None while nothing is buffered."""
        if not self._held:
            return None
        return min(arrival for _, arrival in self._held.values()) + self._max_wait

    @property
    def stats(self) -> ReorderStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    def __len__(self) -> int:
        """The number of items buffered."""
        return len(self._held)

    def _enter(self, epoch: int, first_index: int | None) -> None:
        """Make ``epoch`` (newer than the current one) current, dropping the older items buffered."""
        self._stats.dropped_stale += len(self._held)
        self._held.clear()
        self._epoch = epoch
        self._next = first_index

    def _release_in_order(self) -> list[T]:
        """Pop the buffered run that starts at the next expected index."""
        out: list[T] = []
        if self._next is None:
            return out
        while self._next in self._held:
            out.append(self._held.pop(self._next)[0])
            self._next += 1
        self._stats.emitted += len(out)
        return out

    def _skip_to_lowest(self) -> list[T]:
        """Give up on the gap below the lowest buffered index (there must be one) and release from it."""
        lowest = min(self._held)
        if self._next is not None:  # an unknown start misses nothing known: no skips to count
            self._stats.skipped += lowest - self._next
        self._next = lowest
        return self._release_in_order()
