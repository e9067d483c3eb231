"""Messages that cross module boundaries: plain dataclasses with shape, dtype and device noted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PTS_CLOCK = 90_000  # pts ticks per second (the RTP video clock)


def frame_pts(video_frame: int, fps: int) -> int:
    """The pts (90 kHz) of a video frame of a session's output timeline: the one rule, for a chunk's first
    frame (its envelope) and for each of its frames (the decode phase)."""
    return video_frame * PTS_CLOCK // fps


MAX_PROMPT_CHARS = 2000
SHOWN_DIGITS = 40  # an error message shows a number of more digits shortened
SHOWN_CHARS = 200  # and a text (a path, a prompt) or another value of a longer repr


def shown(value: Any) -> str:
    """A value as an error message names it: its repr, shortened when it is long, saying how long it was (an
    integer of 401 digits is ``100000000000…(401 digits)``, a prompt of 5000 characters its first 32)."""
    text = repr(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return text if len(text) <= SHOWN_DIGITS else f"{text[:12]}…({len(text.lstrip('-'))} digits)"
    if len(text) <= SHOWN_CHARS:
        return text
    if isinstance(value, str):
        return f"{value[:32]!r}…({len(value)} characters)"
    return f"{text[:32]}…({len(text)} characters of repr)"


def within(
    value: Any, low: float, high: float, *, integer: bool = False, low_open: bool = False, high_open: bool = False
) -> bool:
    """``value`` is a number (an int, or a finite float unless ``integer``; never a bool) in the range. Compared
    before any conversion: Python compares an int of any size with a float exactly, where ``float(10**401)``
    raises OverflowError. Every numeric parameter, on every path, is checked with this first."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    return above and below


@dataclass(frozen=True)
class UserParams:
    """Per-session parameters; they change only at chunk boundaries (a chunk keeps its snapshot)."""

    prompt: str = ""
    seed: int = 0  # seeds every chunk's noise together with (epoch, chunk_index, step)
    strength: float = 1.0  # v2v: the first sigma the input is noised to, in (0, 1]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={shown(self.prompt)} is not allowed: a string")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt of {len(self.prompt)} characters is not allowed: at most {MAX_PROMPT_CHARS}")
        try:
            self.prompt.encode("utf-8")  # the text encoder's tokenizer needs it; a lone surrogate cannot
        except UnicodeEncodeError as e:
            raise ValueError(
                f"prompt is not allowed: {self.prompt[e.start : e.end]!r} at position {e.start} is not a character "
                "(a lone surrogate); text must be valid Unicode"
            ) from None
        if not within(self.seed, 0, 2**63, integer=True, high_open=True):
            raise ValueError(f"seed={shown(self.seed)} is not allowed: an integer in [0, 2**63)")
        if not within(self.strength, 0, 1, low_open=True):
            raise ValueError(f"strength={shown(self.strength)} is not allowed: a number in (0, 1]")

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("prompt", "seed", "strength")

    def updated(self, changes: dict[str, Any]) -> UserParams:
        unknown = sorted(set(changes) - set(self.fields()))
        if unknown:
            names = ", ".join(shown(k) for k in unknown)
            raise ValueError(f"unknown user param(s) [{names}]; allowed: {list(self.fields())}")
        values = {name: getattr(self, name) for name in self.fields()}
        values.update(changes)
        return UserParams(**values)


def stale(epoch: int, current: int) -> bool:
    """The one rule every hop applies: anything of an older epoch than its session's current one is
    dropped where it is met (DESIGN §5). Engine, decode phase, stages, bridge, session and track call it."""
    return epoch < current


@dataclass(frozen=True)
class Envelope:
    """The identity that travels with a chunk through every hop."""

    session_id: str
    epoch: int  # bumps on a hard cut; anything of an older epoch is dropped where met
    chunk_index: int  # counts the session's chunks, across epochs
    frame_start: int  # latent frame index of the chunk's first latent frame, within its epoch
    video_frame: int  # the chunk's first video frame on the session's output timeline
    pts: int  # pts (90 kHz) of that frame
    num_frames: int  # video frames the chunk decodes to
    params: UserParams  # the user params the chunk was made with

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.session_id, self.epoch, self.chunk_index)

    def stale(self, current_epoch: int) -> bool:
        return stale(self.epoch, current_epoch)


@dataclass(frozen=True)
class DecodedChunk:
    """A finished chunk: video frames with their envelope and pts."""

    envelope: Envelope
    frames: np.ndarray = field(repr=False)  # uint8 [N, H, W, 3], on the CPU
    pts: tuple[int, ...]  # per frame, 90 kHz
    latents: Any = field(default=None, repr=False)  # x0 [C, F, h, w] torch tensor, when the engine keeps them
    scheduled_at: float = 0.0  # time.monotonic() when the chunk was scheduled (entered its window)
    arrived: tuple[float, ...] = ()  # v2v: time.monotonic() each input frame arrived at ingress; t2v: ()

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])
