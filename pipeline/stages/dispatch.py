"""Which micro-batch goes next: the engine and the simulator both issue work through this.

The rules that keep the visibility rule exact while slots travel a ring of stages (DESIGN §6):

1. Ticks are issued one at a time, in order: every micro-batch of tick n before any of tick n+1. Each
   stage runs what it gets in order, so a tick's writes are all made before the next tick reads.
2. Within a tick a micro-batch goes as soon as every chunk in it has its input: the result of its
   previous step has come back round the ring (a newly admitted chunk has its input at once).
3. At most ``capacity`` micro-batches are out at once (every queue between stages is bounded).

So with T+1 ≥ S independent micro-batches per tick every stage has work; with fewer, the ring waits
for results (the simulator measures the bubbles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.scheduler import TickPlan


@dataclass
class TickWork:
    """A committed tick on its way out."""

    plan: TickPlan
    chunks: list[Any]  # the ChunkState of each slot
    groups: list[tuple[int, ...]]  # its micro-batches: slot indices
    issued: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.issued = [False] * len(self.groups)

    @property
    def done(self) -> bool:
        """Every micro-batch of the tick has been issued."""
        return all(self.issued)


class Dispatcher:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is not allowed: at least 1 micro-batch in flight")
        self.capacity = capacity
        self.out = 0  # micro-batches issued whose results have not come back

    def next(self, work: TickWork, ready: Callable[[Any], bool]) -> int | None:
        """The index of the micro-batch of ``work`` to issue now, or None (nothing is ready, or the
        ring is full). ``ready(chunk)``: the chunk's input is here."""
        if self.out >= self.capacity:
            return None
        for m, group in enumerate(work.groups):
            if not work.issued[m] and all(ready(work.chunks[i]) for i in group):
                return m
        return None

    def issued(self, work: TickWork, m: int) -> None:
        work.issued[m] = True
        self.out += 1

    def returned(self) -> None:
        self.out -= 1
