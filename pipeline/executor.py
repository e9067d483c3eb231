"""Executors run the micro-batches the engine issues; they decide nothing (DESIGN §6).

An executor is handed to the engine as an instance. It says how a tick's slots are split into
micro-batches (:meth:`Executor.split`), takes them (:meth:`Executor.submit`) and hands back events
(:meth:`Executor.poll`): each micro-batch's velocity, and decoded chunks from the decode phase.

- :class:`LocalExecutor`: every stage in this process, one :class:`~pipeline.stages.stage.Stage` that
  owns every block. ``batching="tick"`` is the StreamBatch: every slot of the tick, from every
  session, in one batched forward. ``batching="slot"`` is the sequential baseline: one forward per
  slot, the same visibility rule (writes held back to the tick's end).
- :class:`pipeline.stages.ring.RingExecutor`: the blocks spread over S processes in a ring.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.config import SystemConfig
from pipeline.decode import DecodePhase
from pipeline.models.loader import Models
from pipeline.scheduler import Slot, TickPlan
from pipeline.stages.stage import Activations, Control, MicroBatch, Stage
from pipeline.stats import PhaseTimer
from pipeline.types import DecodedChunk

BATCHINGS = ("tick", "slot", "step")


@dataclass(frozen=True)
class Velocity:
    """A micro-batch's result."""

    tick: int
    index: int
    velocity: torch.Tensor  # [B, C, F, h, w] on the engine's device


Event = Velocity | DecodedChunk


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


class LocalExecutor:
    """The one-stage case: the stage runs each micro-batch at once, in this thread."""

    stages = 1
    capacity = 1 << 30  # nothing to bound: a micro-batch is done when submit returns

    def __init__(self, stage: Stage, batching: str = "tick") -> None:
        if not (stage.first and stage.last):
            raise ValueError(f"a local executor runs every block; stage {stage.blocks} is not all of them")
        if batching not in BATCHINGS:
            raise ValueError(f"batching={batching!r} is not allowed: one of {BATCHINGS}")
        self.stage = stage
        self.batching = batching
        self.timer = stage.timer
        assert stage.decoder is not None
        self.decoder: DecodePhase = stage.decoder
        self.decode_depth = 1 if self.decoder.threaded else 0
        self.blocks = (stage.blocks,)
        self._results: deque[Velocity] = deque()

    def split(self, plan: TickPlan) -> list[tuple[int, ...]]:
        return split_slots(plan.slots, self.batching)

    def submit(self, mb: MicroBatch, act: Activations) -> None:
        out = self.stage.run(mb, act)
        assert out.velocity is not None
        self._results.append(Velocity(mb.tick, mb.index, out.velocity))

    def control(self, control: Control) -> None:
        self.stage.apply(control)  # in one process nothing is on its way: at once is in order

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = list(self._results)
        self._results.clear()
        events += self.decoder.take(0.0 if events else timeout)
        return events

    def pending(self) -> int:
        return len(self._results) + self.decoder.pending

    def close(self) -> None:
        self.decoder.stop()


def local_executor(
    config: SystemConfig,
    models: Models,
    batching: str = "tick",
    threaded_decode: bool | None = None,
    keep_latents: bool = False,
    decode_bound: int | None = None,
) -> LocalExecutor:
    """The model in this process: StreamBatch (``tick``) or sequential (``slot``) micro-batches, the
    decode phase in its own thread (``threaded_decode``; None: as the config says) or inline."""
    timer = PhaseTimer(models.dit.device.type)
    bound = decode_bound or max(2, config.max_sessions)
    threaded = config.threaded_decode if threaded_decode is None else threaded_decode
    decoder = DecodePhase(models.vae, config.fps, bound, threaded, keep_latents, timer)
    stage = Stage(models.dit, config, range(models.dit.num_blocks), models.sampler, decoder, timer)
    return LocalExecutor(stage, batching)
