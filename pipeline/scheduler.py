"""The one decider, and the update step beside it: all the envelope arithmetic lives here.

Each tick the scheduler turns the states of all sessions into a frozen :class:`TickPlan` and never
changes them; the update step applies it in two parts:

- :meth:`Scheduler.commit`, when a plan is issued: admitted chunks enter (envelope, frame and pts
  counters), every other chunk moves to its next step, and a chunk whose σ=0 write is issued leaves;
- :func:`fold`, when a slot's result comes back: x0, then the next step's input with fresh noise.

In one process both happen in the same tick; when slots travel a ring of stages, a tick is planned
and committed while results of the one before are still on their way (DESIGN §6).

Visibility rules (DESIGN §4):

- ``stream``: a session admits a new chunk every tick while it has input, so T chunks are in flight
  (one per step) plus the σ=0 write of the chunk that left clean last tick: T+1 slots per tick.
  Every slot reads the KV window as it stood at the end of the previous tick.
- ``clean``: a session admits a chunk only when nothing of it is in flight (its previous chunk has
  finished and written its σ=0 keys/values), so a session has one slot per tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import SystemConfig
from pipeline.sampling import FlowSampler, chunk_noise, strength_sigmas
from pipeline.state import ChunkState, SessionState
from pipeline.types import PTS_CLOCK, Envelope
from pipeline.window import context_frames

# Makes an admitted chunk's first input: (x [C, F, h, w], text [Lt, Dt], its input frames' arrival).
ChunkMaker = Callable[["SessionState", "Slot"], tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]]


@dataclass(frozen=True)
class Slot:
    """One (chunk, step) to compute in a tick."""

    envelope: Envelope  # the chunk's identity, with its user-param snapshot
    step: int  # 0..T-1: a denoising step; T: the σ=0 write of a clean chunk (its output is unused)
    sigma: float  # noise level of the slot's input (0.0 for the σ=0 write)
    sigmas: tuple[float, ...]  # the chunk's whole table (sigma == sigmas[step] for a denoising step)
    admit: bool  # True: the chunk enters the window with this slot (its x is made from noise/input)
    context: tuple[int, ...]  # latent frames of the same epoch it reads from the KV window

    @property
    def last_step(self) -> bool:
        """Its result is the chunk's x0: the chunk leaves clean and is decoded."""
        return self.step == len(self.sigmas) - 1

    @property
    def is_write(self) -> bool:
        return self.step == len(self.sigmas)


@dataclass(frozen=True)
class TickPlan:
    tick: int  # engine tick number
    slots: tuple[Slot, ...]  # every slot of every session, in a stable order (session, age)


class Scheduler:
    def __init__(self, config: SystemConfig) -> None:
        self.config = config
        self.sigmas = config.sigmas()

    @property
    def depth(self) -> int:
        """Chunks one t2v session holds in flight when its pipeline is full: one per step (stream),
        one (clean). Fewer leave slots of the StreamBatch empty."""
        return 1 if self.config.context == "clean" else len(self.sigmas)

    def admits(self, s: SessionState) -> bool:
        if not s.has_input():
            return False
        if self.config.context == "clean":
            return not s.in_flight
        return all(c.step > 0 for c in s.in_flight)  # at most one new chunk per tick

    def new_envelope(self, s: SessionState) -> tuple[Envelope, tuple[float, ...]]:
        first = s.next_frame == 0
        n = self.config.frames_for_chunk(first)
        env = Envelope(
            session_id=s.session_id,
            epoch=s.epoch,
            chunk_index=s.next_chunk_index,
            frame_start=s.next_frame,
            video_frame=s.next_video_frame,
            pts=s.next_video_frame * PTS_CLOCK // self.config.fps,
            num_frames=n,
            params=s.params,
        )
        sigmas = strength_sigmas(self.sigmas, s.params.strength) if s.mode == "v2v" else self.sigmas
        return env, sigmas

    def schedule(self, tick: int, states: list[SessionState]) -> TickPlan:
        cfg = self.config
        slots: list[Slot] = []
        for s in states:
            for c in s.in_flight:
                ctx = context_frames(c.envelope.frame_start, cfg.sink_frames, cfg.window_frames)
                slots.append(Slot(c.envelope, c.step, c.sigma, c.sigmas, admit=False, context=ctx))
            if self.admits(s):
                env, sigmas = self.new_envelope(s)
                ctx = context_frames(env.frame_start, cfg.sink_frames, cfg.window_frames)
                slots.append(Slot(env, 0, sigmas[0], sigmas, admit=True, context=ctx))
        return TickPlan(tick=tick, slots=tuple(slots))

    # ---- the update step ------------------------------------------------------------------------

    def commit(self, plan: TickPlan, states: dict[str, SessionState], enter: ChunkMaker) -> list[ChunkState]:
        """The plan is issued: admitted chunks enter (``enter`` makes their first x and text), the others
        move to their next step, a chunk whose σ=0 write is issued leaves. The chunk of every slot."""
        chunks = []
        for slot in plan.slots:
            s = states[slot.envelope.session_id]
            if slot.admit:
                chunks.append(self.enter(s, slot, enter))
                continue
            c = next(c for c in s.in_flight if c.envelope == slot.envelope)
            c.step += 1
            if slot.is_write:
                s.in_flight.remove(c)
            chunks.append(c)
        return chunks

    def enter(self, s: SessionState, slot: Slot, enter: ChunkMaker) -> ChunkState:
        env = slot.envelope
        x, text, arrived = enter(s, slot)
        chunk = ChunkState(env, slot.sigmas, 1, x, text, scheduled_at=time.monotonic(), arrived=arrived)
        s.in_flight.append(chunk)
        if s.intake is None:
            s.demand -= 1
        s.undelivered += 1
        s.next_chunk_index += 1
        s.next_frame += self.config.chunk_frames
        s.next_video_frame += env.num_frames
        return chunk

    def delivered(self, s: SessionState, env: Envelope) -> None:
        """A chunk of the current epoch was handed out (decoded), in order."""
        s.undelivered -= 1
        s.delivered_video_frame = env.video_frame + env.num_frames

    def cut(self, s: SessionState) -> None:
        """Hard cut: a new epoch with an empty context. Chunks not yet handed out never will be, so the
        output timeline goes on from the last one that was (no gap, no overlap)."""
        s.epoch += 1
        s.in_flight.clear()
        s.next_frame = 0
        s.next_video_frame = s.delivered_video_frame
        s.undelivered = 0
        if s.intake is not None:
            s.intake.reset()


def fold(
    chunk: ChunkState,
    slot: Slot,
    x: torch.Tensor,
    sigma: torch.Tensor,
    velocity: torch.Tensor,
    sampler: FlowSampler,
) -> None:
    """A slot's result comes back: x [C, F, h, w] was its input at ``sigma`` ([1] tensor). After the
    last step the chunk holds x0 (for its σ=0 write); before it, the next step's input with fresh noise
    drawn from (seed, epoch, chunk, step). The σ=0 write's result is not used."""
    if slot.is_write:
        return
    x0 = sampler.x0(x[None], sigma, velocity[None])[0]
    if slot.last_step:
        chunk.x = x0
        return
    env, step = chunk.envelope, slot.step + 1
    noise = chunk_noise(env.params.seed, env.epoch, env.chunk_index, step, tuple(x.shape), x.dtype, x.device)
    chunk.x = sampler.noised(x0, chunk.sigmas[step], noise)
