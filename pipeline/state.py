"""What the engine keeps for each session and each chunk in flight; changed only by the scheduler's
update step (:mod:`pipeline.scheduler`) and the engine's commands.

A chunk's place in its schedule (``step``) moves on when its slot is *issued*; its value (``x``) when
the slot's result comes back. In one process both happen in the same tick; when slots travel a ring of
stages, a chunk may wait for its result while the next tick is being planned (``x`` is None then).
The KV windows live with the stages that own the blocks (:mod:`pipeline.stages.stage`), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.intake import Intake
from pipeline.types import Envelope, UserParams


@dataclass
class ChunkState:
    """One chunk in flight: its latents move through the steps, then one σ=0 write."""

    envelope: Envelope
    sigmas: tuple[float, ...]  # this chunk's noise levels (t2v: the table; v2v: scaled by strength)
    step: int  # next step to issue; == len(sigmas) when only its σ=0 write is left
    x: torch.Tensor | None  # [C, F, h, w] input of its next slot (x at sigmas[step]; x0 once clean); None: on the way
    text: torch.Tensor  # [text_len, text_dim] conditioning of its prompt
    times: tuple[float, ...] = ()  # the model's time input at each step, aligned with sigmas (() : 1000·σ)
    scheduled_at: float = 0.0  # time.monotonic() when it entered the window (latency is measured from it)
    arrived: tuple[float, ...] = ()  # v2v: arrival of each of its input frames at ingress

    @property
    def sigma(self) -> float:
        return self.sigmas[self.step] if self.step < len(self.sigmas) else 0.0

    @property
    def phantom(self) -> bool:
        """A per-step pipeline-fill slot of zeros (pipeline/perstep.py): computed, never decoded."""
        return self.envelope.chunk_index < 0

    @property
    def clean(self) -> bool:
        return self.step >= len(self.sigmas)

    @property
    def ready(self) -> bool:
        """Its next slot's input is here (not on its way back from the stages)."""
        return self.x is not None


@dataclass
class SessionState:
    """Everything the engine keeps for one session."""

    session_id: str
    mode: str  # "t2v" or "v2v"
    params: UserParams  # current user params; new chunks snapshot them
    intake: Intake | None = None  # v2v: input frames, encoder cache, encoded chunks
    epoch: int = 0
    next_chunk_index: int = 0  # counts across epochs
    next_frame: int = 0  # next chunk's first latent frame, within the epoch
    next_video_frame: int = 0  # output timeline: first video frame of the next chunk
    delivered_video_frame: int = 0  # output timeline: the frame after the last chunk handed out
    undelivered: int = 0  # chunks started in this epoch and not yet handed out (denoising or decoding)
    in_flight: list[ChunkState] = field(default_factory=list)  # oldest first
    demand: int = 0  # t2v: chunks asked for and not yet started
    # a real-time player of the output (the deadline of each chunk handed out): (when, video frame) it was at
    # when it last (re)started, None before the epoch's first chunk; the chunks that came too late for it
    played_from: tuple[float, int] | None = None
    deadline_misses: int = 0

    def has_input(self) -> bool:
        if self.intake is not None:
            return self.intake.has_chunk()
        return self.demand > 0
