"""The one decider: each tick, the windows of all sessions become a frozen :class:`TickPlan`.

Visibility rules (DESIGN §4):

- ``stream``: a session admits a new chunk every tick while it has input, so T chunks are in flight
  (one per step) plus the σ=0 write of the chunk that left clean last tick: T+1 slots per tick.
  Every slot reads the KV window as it stood at the end of the previous tick.
- ``clean``: a session admits a chunk only when nothing of it is in flight (its previous chunk has
  finished and written its σ=0 keys/values), so a session has one slot per tick.

The scheduler reads windows and never changes them; the engine's update step applies the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import SystemConfig
from pipeline.sampling import strength_sigmas
from pipeline.types import PTS_CLOCK, Envelope
from pipeline.window import SessionWindow, context_frames


@dataclass(frozen=True)
class Slot:
    """One (chunk, step) to compute in a tick."""

    envelope: Envelope  # the chunk's identity, with its user-param snapshot
    step: int  # 0..T-1: a denoising step; T: the σ=0 write of a clean chunk (its output is unused)
    sigma: float  # noise level of the slot's input (0.0 for the σ=0 write)
    sigmas: tuple[float, ...]  # the chunk's whole table (sigma == sigmas[step] for a denoising step)
    admit: bool  # True: the chunk enters the window with this slot (its x is made from noise/input)
    context: tuple[int, ...]  # latent frames of the same epoch it reads from the KV window
    stage: int = 0  # the stage that runs it (one process: 0)

    @property
    def last_step(self) -> bool:
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

    def admits(self, w: SessionWindow) -> bool:
        if not w.has_input():
            return False
        if self.config.context == "clean":
            return not w.in_flight
        return all(c.step > 0 for c in w.in_flight)  # at most one new chunk per tick

    def new_envelope(self, w: SessionWindow) -> tuple[Envelope, tuple[float, ...]]:
        first = w.next_frame == 0
        n = self.config.frames_for_chunk(first)
        env = Envelope(
            session_id=w.session_id,
            epoch=w.epoch,
            chunk_index=w.next_chunk_index,
            frame_start=w.next_frame,
            video_frame=w.next_video_frame,
            pts=w.next_video_frame * PTS_CLOCK // self.config.fps,
            num_frames=n,
            params=w.params,
        )
        sigmas = strength_sigmas(self.sigmas, w.params.strength) if w.mode == "v2v" else self.sigmas
        return env, sigmas

    def schedule(self, tick: int, windows: list[SessionWindow]) -> TickPlan:
        cfg = self.config
        slots: list[Slot] = []
        for w in windows:
            for c in w.in_flight:
                ctx = context_frames(c.envelope.frame_start, cfg.sink_frames, cfg.window_frames)
                slots.append(Slot(c.envelope, c.step, c.sigma, c.sigmas, admit=False, context=ctx))
            if self.admits(w):
                env, sigmas = self.new_envelope(w)
                ctx = context_frames(env.frame_start, cfg.sink_frames, cfg.window_frames)
                slots.append(Slot(env, 0, sigmas[0], sigmas, admit=True, context=ctx))
        return TickPlan(tick=tick, slots=tuple(slots))
