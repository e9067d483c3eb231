"""The executor contract and the messages that cross it; executors run the micro-batches the engine issues
and decide nothing (DESIGN §6).

An executor is handed to the engine as an instance. It says how a tick's slots are split into
micro-batches (:meth:`Executor.split`), takes them (:meth:`Executor.submit`) and hands back events
(:meth:`Executor.poll`): each micro-batch's x0, and decoded chunks from the decode phase. The executors
live in :mod:`pipeline.stages`: :class:`~pipeline.stages.local.LocalExecutor` (this process, one stage
owning every block) and :class:`~pipeline.stages.ring.RingExecutor` (the blocks over S processes).

The messages are what a micro-batch is (:class:`MicroBatch`), what travels with it from stage to stage
(:class:`Activations`), session changes every stage applies in order (:class:`Control`) and a
micro-batch's result (:class:`Denoised`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.scheduler import Slot, TickPlan
from pipeline.stats import PhaseTimer
from pipeline.types import DecodedChunk

BATCHINGS = ("tick", "slot", "step")


@dataclass(frozen=True)
class Control:
    """Session changes every stage applies, in order with the work around them."""

    epochs: tuple[tuple[str, int], ...] = ()  # (session, its epoch) after a cut: KV windows and decoder start over
    closed: tuple[str, ...] = ()  # sessions closed: everything of theirs is freed


@dataclass(frozen=True)
class MicroBatch:
    """Slots of one tick that travel the stages together."""

    tick: int
    index: int  # its place among the tick's micro-batches
    slots: tuple[Slot, ...]
    first_of_tick: bool
    last_of_tick: bool  # after it, this tick's writes become visible
    timing: tuple[tuple[float, tuple[float, ...]], ...]  # per slot: (scheduled_at, input arrival times)


@dataclass
class Activations:
    """What passes from stage to stage for one micro-batch of B slots, on the stage's device."""

    x: torch.Tensor  # [B, C, F, h, w] model dtype: each slot's input (the last stage makes x0 from it)
    sigma: torch.Tensor  # [B] float32
    text: torch.Tensor | None = None  # [B, Lt, Dt] text conditioning: into the first stage only
    time: torch.Tensor | None = None  # [B] float32 the model's time input (None: 1000·σ): into the first stage only
    hidden: torch.Tensor | None = None  # [B, L, E] between stages
    temb: torch.Tensor | None = None  # [B, E]
    tproj: torch.Tensor | None = None  # [B, 6, E]
    enc: torch.Tensor | None = None  # [B, Lt, E] text states
    x0: torch.Tensor | None = None  # [B, C, F, h, w] out of the last stage: each slot's x0 (the sampler's reading)


@dataclass(frozen=True)
class Denoised:
    """A micro-batch's result: each slot's x0, as the model's sampler reads the model's output (the last stage
    computes it once; the engine's update step makes the next input from it)."""

    tick: int
    index: int
    x0: torch.Tensor  # [B, C, F, h, w] on the engine's device


Event = Denoised | DecodedChunk


class Executor(Protocol):
    stages: int  # stages the blocks are spread over
    capacity: int  # micro-batches it takes in flight at once
    timer: PhaseTimer  # where its phases are timed (the DiT, the decode)
    decode_depth: int  # chunks a session has in its decode phase when the pipeline is full (0: decoded in the tick)

    def split(self, plan: TickPlan) -> list[tuple[int, ...]]:
        """The tick's micro-batches: indices into ``plan.slots``, in the order to issue them."""
        ...

    def submit(self, mb: MicroBatch, act: Activations) -> None: ...

    def control(self, control: Control) -> None:
        """Session changes (a cut, a close): applied by every stage before any later micro-batch."""
        ...

    def poll(self, timeout: float) -> list[Event]:
        """Events so far; waits up to ``timeout`` seconds for one when none is there and work is out."""
        ...

    def pending(self) -> int:
        """Micro-batches and decodes given and not yet handed back."""
        ...

    def close(self) -> None: ...


def split_slots(slots: tuple[Slot, ...], batching: str, stages: int = 1) -> list[tuple[int, ...]]:
    """Micro-batches of a tick, as indices into ``slots``.

    - ``tick``: one micro-batch, the whole StreamBatch;
    - ``slot``: one per slot;
    - ``step``: one per step level, all sessions together, so that a ring of stages has T+1 independent
      micro-batches per tick; where that is fewer than ``stages``, step levels are split by session.
    """
    groups = _split(slots, batching, stages)
    if len({s.frames for s in slots}) > 1:  # chunks of different lengths (per-step first chunks) do not stack
        groups = [
            tuple(i for i in g if slots[i].frames == n)
            for g in groups
            for n in dict.fromkeys(slots[i].frames for i in g)
        ]
    return groups


def _split(slots: tuple[Slot, ...], batching: str, stages: int) -> list[tuple[int, ...]]:
    if batching == "slot":
        return [(i,) for i in range(len(slots))]
    if batching == "tick":
        return [tuple(range(len(slots)))] if slots else []
    if batching != "step":
        raise ValueError(f"batching={batching!r} is not allowed: one of {BATCHINGS}")
    by_step: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        by_step.setdefault(s.step, []).append(i)
    groups = [tuple(g) for _, g in sorted(by_step.items())]
    if len(groups) < stages:
        groups = [
            tuple(i for i in g if slots[i].envelope.session_id == sid)
            for g in groups
            for sid in dict.fromkeys(slots[i].envelope.session_id for i in g)
        ]
    return groups
