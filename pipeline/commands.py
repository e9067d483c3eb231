"""Commands: everything that changes the engine from outside, as data (DESIGN §6a).

Each command is a frozen dataclass; :meth:`pipeline.engine.Engine.apply` applies one between ticks and
returns its typed result. A command crosses a thread, a process or a node the same way (a closure
crosses none of them), and it says what is asked.

Bad input (an unknown session, a wrong mode, frames of the wrong shape, an unknown param) raises
``ValueError`` or ``KeyError`` naming the field and the value; expected pressure is a return value
(``Submitted.taken`` is False while enough input waits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.types import DecodedChunk, UserParams

MODES = ("t2v", "v2v")


@dataclass(frozen=True)
class Open:
    """Open a session; the result is :class:`Opened`."""

    params: UserParams = field(default_factory=UserParams)
    mode: str = "t2v"  # "t2v": chunks on demand; "v2v": chunks from submitted frames


@dataclass(frozen=True)
class Close:
    """Close a session and free what it holds (KV windows, codec caches, queued work); :class:`Closed`."""

    session_id: str


@dataclass(frozen=True)
class Demand:
    """t2v: ask for more chunks (``chunks`` added), or for exactly ``chunks`` not yet started
    (``exact``); :class:`SessionStatus`. Credits handed back by a consumer coalesce into one of these."""

    session_id: str
    chunks: int
    exact: bool = False


@dataclass(frozen=True)
class Submit:
    """v2v: input frames, newest last; :class:`Submitted` (``taken`` False: nothing was taken, the
    session already has enough input waiting; the caller decides what to drop)."""

    session_id: str
    frames: np.ndarray = field(repr=False)  # uint8 [N, H, W, 3] at the system's size, on the CPU
    arrived: tuple[float, ...]  # time.monotonic() each frame arrived at ingress: its identity starts there


@dataclass(frozen=True)
class SetParams:
    """Soft change: chunks started from now on use the new params, in-flight ones keep theirs;
    :class:`ParamsSet`."""

    session_id: str
    changes: tuple[tuple[str, Any], ...]  # (name, value) pairs, e.g. (("prompt", "waves"),)

    @staticmethod
    def of(session_id: str, **changes: Any) -> SetParams:
        return SetParams(session_id, tuple(changes.items()))


@dataclass(frozen=True)
class Cut:
    """Hard cut: the session's epoch moves on; everything of the old one (chunks in flight, input
    waiting, KV windows, codec caches, pending decodes) is dropped; :class:`CutDone`. ``demand`` (t2v):
    chunks to ask for in the new epoch, set in the same step (None: keep what was asked for)."""

    session_id: str
    demand: int | None = None


@dataclass(frozen=True)
class Query:
    """Where a session stands; :class:`SessionStatus`."""

    session_id: str


Command = Open | Close | Demand | Submit | SetParams | Cut | Query


# ---- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputNeed:
    """v2v: the one answer to "how many frames do you want" (t2v sessions: all zero)."""

    wanted: int  # frames to submit now: those completing the next chunk; 0 while enough input waits
    missing: int  # frames still missing before the next input chunk is complete
    partial: int  # frames already there of that chunk
    waiting: int  # input chunks complete and not yet started (encoded, or whole among the frames)


@dataclass(frozen=True)
class SessionStatus:
    session_id: str
    mode: str
    epoch: int
    next_chunk_index: int  # the next chunk to start
    next_video_frame: int  # its first video frame on the session's output timeline
    demand: int  # t2v: chunks asked for and not started
    denoising: int  # chunks in flight that are not clean yet
    in_flight: int  # chunks in the window, those waiting for their σ=0 write included
    undelivered: int  # chunks of this epoch started and not yet handed out by step() (denoising or decoding)
    decoding: int  # of those, clean and in the decode phase (or decoded and not yet handed out)
    input: InputNeed  # v2v input; zeros for t2v
    params: UserParams
    # chunks handed out later than a real-time player that started with the epoch's first chunk needed them;
    # each restarts that player's clock at the late chunk (a stall, as a viewer sees one), all epochs counted
    deadline_misses: int = 0


@dataclass(frozen=True)
class Opened:
    session_id: str
    status: SessionStatus


@dataclass(frozen=True)
class Closed:
    session_id: str


@dataclass(frozen=True)
class Submitted:
    taken: bool
    status: SessionStatus


@dataclass(frozen=True)
class ParamsSet:
    params: UserParams


@dataclass(frozen=True)
class CutDone:
    epoch: int  # the new epoch
    first_chunk_index: int  # its first chunk: reorder starts the epoch there
    status: SessionStatus


Result = Opened | Closed | SessionStatus | Submitted | ParamsSet | CutDone


@dataclass(frozen=True)
class StepOutput:
    """What one :meth:`~pipeline.engine.Engine.step` did, as data (vLLM's ``EngineCoreOutputs``): callers read
    this, and need not ask the engine again what it just did."""

    tick: int | None  # the tick this step issued (None: nothing could be scheduled; decodes may still have come)
    chunks: tuple[DecodedChunk, ...]  # decoded since the last step, of current epochs, in order per session
    sessions: Mapping[str, SessionStatus]  # every open session's status after the step
    busy: bool  # work is still in flight, waiting to start or being decoded (Engine.has_work after the step)

    @property
    def idle(self) -> bool:
        """Nothing was done and nothing is left: more comes only with more input or demand."""
        return self.tick is None and not self.chunks and not self.busy
