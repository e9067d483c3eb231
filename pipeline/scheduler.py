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
- ``per-step`` (StreamDiffusionV2's, :mod:`pipeline.perstep`): an epoch's first chunk runs its T steps
  alone; then one chunk per tick as ``stream``, T slots per tick, no σ=0 write (a chunk leaves after its
  last step). With the first chunk after it, phantom chunks of zeros enter levels 1..T-1 (their
  zeroed stream batch), computed and never decoded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import SystemConfig
from pipeline.sampling import FlowSampler, strength_sigmas, table_sigma
from pipeline.state import ChunkState, SessionState
from pipeline.types import Envelope, frame_pts
from pipeline.window import context_frames

# ε of a chunk entering a step: (envelope, step, shape) -> tensor (the engine's keyed noise by default).
NoiseSource = Callable[[Envelope, int, tuple[int, ...]], torch.Tensor]

# Makes an admitted chunk's first input: (x [C, F, h, w], text [Lt, Dt], its input frames' arrival);
# a phantom's (per-step pipeline fill) x is zeros.
ChunkMaker = Callable[["SessionState", "Slot"], tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]]


@dataclass(frozen=True)
class Slot:
    """One (chunk, step) to compute in a tick."""

    envelope: Envelope  # the chunk's identity, with its user-param snapshot
    step: int  # 0..T-1: a denoising step; T: the σ=0 write of a clean chunk (its output is unused)
    sigma: float  # noise level of the slot's input (0.0 for the σ=0 write)
    sigmas: tuple[float, ...]  # the chunk's whole table (sigma == sigmas[step] for a denoising step)
    admit: bool  # True: the chunk enters the window with this slot (its x is made from noise/input)
    context: tuple[int, ...]  # latent frames of the same epoch it reads from the KV window (stream, clean)
    frames: int = 1  # latent frames of its chunk
    times: tuple[float, ...] = ()  # the model's time input at each step, aligned with sigmas (): 1000·σ

    @property
    def model_time(self) -> float:
        """The model's time input (its timestep embedding) of this slot."""
        return self.times[self.step] if self.step < len(self.times) else 1000.0 * self.sigma

    @property
    def phantom(self) -> bool:
        return self.envelope.chunk_index < 0

    @property
    def decodes(self) -> bool:
        """Its result is a chunk's x0 that goes to the decoder (a phantom's never does)."""
        return self.last_step and not self.phantom

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
        self.times = config.model_times()
        self.per_step = config.context == "per-step"

    @property
    def depth(self) -> int:
        """Chunks one t2v session holds in flight when its pipeline is full: one per step (stream),
        one (clean). Fewer leave slots of the StreamBatch empty."""
        return 1 if self.config.context == "clean" else len(self.sigmas)

    def admits(self, s: SessionState) -> bool:
        if not s.has_input():
            return False
        if self.config.context == "clean" or (self.per_step and s.next_frame == 0):
            return not s.in_flight
        if self.per_step and any(c.envelope.frame_start == 0 for c in s.in_flight):
            return False  # the epoch's first chunk runs its steps alone
        return all(c.step > 0 for c in s.in_flight)  # at most one new chunk per tick

    def schedule_of(self, s: SessionState) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """A new chunk's sigmas and model time inputs: the table, or for v2v scaled by its strength."""
        if s.mode != "v2v":
            return self.sigmas, self.times
        if self.config.timestep_rule == "table":
            scale = min(1.0, s.params.strength / self.sigmas[0])
            times = tuple(t * scale for t in self.times)
            return tuple(table_sigma(t, self.config.flow_shift) for t in times), times
        sigmas = strength_sigmas(self.sigmas, s.params.strength)
        return sigmas, tuple(1000.0 * x for x in sigmas)

    def new_envelope(self, s: SessionState) -> Envelope:
        first = s.next_frame == 0
        n = self.config.frames_for_chunk(first)
        env = Envelope(
            session_id=s.session_id,
            epoch=s.epoch,
            chunk_index=s.next_chunk_index,
            frame_start=s.next_frame,
            video_frame=s.next_video_frame,
            pts=frame_pts(s.next_video_frame, self.config.fps),
            num_frames=n,
            params=s.params,
        )
        return env

    def _context(self, frame_start: int) -> tuple[int, ...]:
        if self.per_step:
            return ()  # the per-step caches hold what each level sees (pipeline/perstep.py)
        return context_frames(frame_start, self.config.sink_frames, self.config.window_frames)

    def schedule(self, tick: int, states: list[SessionState]) -> TickPlan:
        cfg = self.config
        slots: list[Slot] = []
        for s in states:
            for c in s.in_flight:
                f0, frames = c.envelope.frame_start, cfg.latent_frames(c.envelope.frame_start)
                slots.append(Slot(c.envelope, c.step, c.sigma, c.sigmas, False, self._context(f0), frames, c.times))
            if self.admits(s):
                env = self.new_envelope(s)
                sigmas, times = self.schedule_of(s)
                f0, frames = env.frame_start, cfg.latent_frames(env.frame_start)
                slots.append(Slot(env, 0, sigmas[0], sigmas, True, self._context(f0), frames, times))
                if self.per_step and f0 == cfg.first_frames and len(sigmas) > 1:
                    for level in range(1, len(sigmas)):  # the pipeline fill: phantoms of zeros above it
                        ghost = dataclasses.replace(env, chunk_index=-level, num_frames=0)
                        slots.append(Slot(ghost, level, sigmas[level], sigmas, True, (), frames, times))
        return TickPlan(tick=tick, slots=tuple(slots))

    # ---- the update step ------------------------------------------------------------------------

    def commit(self, plan: TickPlan, states: dict[str, SessionState], enter: ChunkMaker) -> list[ChunkState]:
        """The plan is issued: admitted chunks enter (``enter`` makes their first x and text), the others
        move to their next step, a chunk whose σ=0 write is issued leaves. The chunk of every slot."""
        chunks = []
        for slot in plan.slots:
            s = states[slot.envelope.session_id]
            if slot.admit:
                c = self.enter(s, slot, enter)
            else:
                c = next(c for c in s.in_flight if c.envelope == slot.envelope)
                c.step += 1
            if slot.is_write or (self.per_step and slot.last_step):
                s.in_flight.remove(c)  # it leaves with its σ=0 write (per-step, which has none: its last step)
            chunks.append(c)
        return chunks

    def enter(self, s: SessionState, slot: Slot, enter: ChunkMaker) -> ChunkState:
        env = slot.envelope
        x, text, arrived = enter(s, slot)
        if slot.phantom:  # a pipeline-fill slot (per-step): no place in the session's counts
            phantom = ChunkState(env, slot.sigmas, slot.step + 1, x, text, times=slot.times)
            s.in_flight.append(phantom)
            return phantom
        chunk = ChunkState(
            env, slot.sigmas, 1, x, text, times=slot.times, scheduled_at=time.monotonic(), arrived=arrived
        )
        s.in_flight.append(chunk)
        if s.intake is None:
            s.demand -= 1
        s.undelivered += 1
        s.next_chunk_index += 1
        s.next_frame += slot.frames
        s.next_video_frame += env.num_frames
        return chunk

    def delivered(self, s: SessionState, env: Envelope, now: float) -> None:
        """A chunk of the current epoch was handed out (decoded), in order, at ``now`` (seconds). Its deadline:
        when a real-time player that started with the epoch's first chunk reaches its first frame; a chunk
        later than that is a miss, and the player restarts from it (as a stalled video does)."""
        s.undelivered -= 1
        s.delivered_video_frame = env.video_frame + env.num_frames
        if s.played_from is not None:
            since, frame = s.played_from
            if now <= since + (env.video_frame - frame) / self.config.fps:
                return
            s.deadline_misses += 1
        s.played_from = (now, env.video_frame)

    def cut(self, s: SessionState) -> None:
        """Hard cut: a new epoch with an empty context. Chunks not yet handed out never will be, so the
        output timeline goes on from the last one that was (no gap, no overlap)."""
        s.epoch += 1
        s.in_flight.clear()
        s.next_frame = 0
        s.next_video_frame = s.delivered_video_frame
        s.undelivered = 0
        s.played_from = None  # the new epoch's first chunk starts the player again
        if s.intake is not None:
            s.intake.reset()


def fold(
    chunk: ChunkState,
    slot: Slot,
    x: torch.Tensor,
    sigma: torch.Tensor,
    x0: torch.Tensor,
    sampler: FlowSampler,
    noise: NoiseSource,
) -> None:
    """A slot's result comes back: x [C, F, h, w] was its input at ``sigma`` ([1] tensor), ``x0`` [C, F, h, w]
    what the last stage read from the model's output. After the last step the chunk holds x0 (for its σ=0
    write); before it, the next step's input, with fresh noise from ``noise`` (the engine's, keyed by seed,
    epoch, chunk and step) where the sampler uses any. The σ=0 write's result is not used."""
    if slot.is_write:
        return
    if slot.last_step:
        chunk.x = x0
        return
    step = slot.step + 1
    fresh = noise(chunk.envelope, step, tuple(x.shape))[None] if sampler.fresh_noise else None
    chunk.x = sampler.next_input(x[None], sigma, x0[None], chunk.sigmas[step], fresh)[0]
