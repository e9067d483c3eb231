"""The one feed loop: what each session wants, handed to it, one engine step, the chunks handed out.

The server's engine thread (``streamer.bridge``), the CLI (``streamer.run``) and the benchmarks all drive an
engine through a :class:`Feeder`; none of them asks the engine what it just did (a step returns it,
:class:`~pipeline.commands.StepOutput`) or writes this loop again. :meth:`Feeder.step`:

1. **wants**: from each session's status after the last step or command, with no query:
   - v2v: exactly the frames that complete its next input chunk (:class:`~pipeline.commands.InputNeed`), each
     with the time it arrived at ingress, and none while enough input waits; they come from the session's
     :class:`FrameSource` (the source decides what to drop: newest wins, upstream);
   - t2v: with ``ahead`` set, enough chunks asked for that ``ahead`` are asked and not yet handed out (else the
     caller's :class:`~pipeline.commands.Demand` commands decide, as the server's credits do);
   - ``until`` (either mode): nothing is started at or past that video frame (a scripted event, the end of a
     run); a v2v input chunk already begun is still completed, so that no input is left half a chunk;
2. **submit**: one ``Submit`` or ``Demand`` command per session that wants something;
3. **step**: one :meth:`~pipeline.engine.Engine.step` when there is work;
4. **hand out**: the step's output, chunks and statuses, returned to the caller.

A source may wait for its frames (``wait``) only when the engine has nothing else to do, so one session's
camera never holds up the others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, overload

import numpy as np

from pipeline.commands import (
    Close,
    Closed,
    Command,
    Cut,
    CutDone,
    Demand,
    Open,
    Opened,
    ParamsSet,
    Query,
    Result,
    SessionStatus,
    SetParams,
    StepOutput,
    Submit,
    Submitted,
)
from pipeline.engine import Engine
from pipeline.types import DecodedChunk

Frames = list[tuple[np.ndarray, float]]  # uint8 [H, W, 3] frames, oldest first, each with its arrival (monotonic s)


class FrameSource(Protocol):
    """A v2v session's input, as the feeder pulls it."""

    def take(self, n: int, wait: bool) -> Frames | None:
        """``n`` frames, the next ones (a live source keeps only recent ones: the newest win), or fewer when the
        source ends with them; ``[]`` when they are not there yet; None once it has ended and nothing is
        left. ``wait``: the engine has nothing else to do, so the call may block until they come."""
        ...


@dataclass
class Inlet:
    """How one session is fed."""

    source: FrameSource | None = None  # v2v: its frames
    ahead: int | None = None  # t2v: chunks kept asked for and not yet handed out (None: the caller's Demands)
    until: int | None = None  # nothing is started at or past this video frame (None: no limit)
    given: int = 0  # v2v: frames handed over and taken
    ended: bool = False  # v2v: the source has no more frames


class Feeder:
    """Feeds every session of ``engine`` and steps it; the caller's only way to drive the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inlets: dict[str, Inlet] = {}
        self.statuses: dict[str, SessionStatus] = {}  # as of the last step or command

    # ---- sessions ------------------------------------------------------------------------------

    def open(self, command: Open, source: FrameSource | None = None, ahead: int | None = None) -> Opened:
        """Open a session fed from ``source`` (v2v) or kept ``ahead`` chunks ahead (t2v)."""
        if command.mode == "v2v" and (source is None or ahead is not None):
            raise ValueError("a v2v session is fed by a source (its frames), not kept chunks ahead")
        if command.mode != "v2v" and source is not None:
            raise ValueError(f"a {command.mode} session is fed by demand (ahead, or Demand commands), not a source")
        if ahead is not None and ahead < 1:
            raise ValueError(f"ahead={ahead} is not allowed: at least one chunk")
        opened = self.apply(command)
        self.inlets[opened.session_id] = Inlet(source, ahead)
        return opened

    def until(self, session_id: str, video_frame: int | None) -> None:
        """Start nothing of the session at or past ``video_frame`` (None: no limit)."""
        self.inlets[session_id].until = video_frame

    def status(self, session_id: str) -> SessionStatus:
        """The session's status after the last step or command (nothing is asked of the engine)."""
        return self.statuses[session_id]

    def ended(self, session_id: str) -> bool:
        """A v2v session's source has no more frames."""
        return self.inlets[session_id].ended

    @overload
    def apply(self, command: Open) -> Opened: ...
    @overload
    def apply(self, command: Close) -> Closed: ...
    @overload
    def apply(self, command: Demand | Query) -> SessionStatus: ...
    @overload
    def apply(self, command: Submit) -> Submitted: ...
    @overload
    def apply(self, command: SetParams) -> ParamsSet: ...
    @overload
    def apply(self, command: Cut) -> CutDone: ...

    def apply(self, command: Command) -> Result:
        """A command, applied to the engine; the statuses follow it (an ``Open`` through here is a t2v session
        fed by the caller's ``Demand`` commands)."""
        result = self.engine.apply(command)
        match result:
            case Opened(session_id=sid, status=status):
                self.inlets.setdefault(sid, Inlet())
                self.statuses[sid] = status
            case Closed(session_id=sid):
                self.inlets.pop(sid, None)
                self.statuses.pop(sid, None)
            case SessionStatus(session_id=sid):
                self.statuses[sid] = result
            case CutDone(status=status) | Submitted(status=status):
                self.statuses[status.session_id] = status
            case ParamsSet() if isinstance(command, SetParams):
                self.statuses[command.session_id] = replace(self.statuses[command.session_id], params=result.params)
        return result

    # ---- the loop ------------------------------------------------------------------------------

    def step(self) -> StepOutput:
        """Hand every session what it wants, then one engine step (when there is work); what the step did."""
        for sid in list(self.inlets):
            self._feed(sid)
        if not self.engine.has_work():
            return StepOutput(None, (), dict(self.statuses), False)
        out = self.engine.step()
        self.statuses.update(out.sessions)
        return out

    def drain(self) -> list[DecodedChunk]:
        """Step until nothing is left to do; every chunk that came out."""
        out: list[DecodedChunk] = []
        while not (done := self.step()).idle:
            out += done.chunks
        return out

    def _wants(self, sid: str) -> int:
        """Frames (v2v) or chunks (t2v) the session wants now."""
        inlet, status = self.inlets[sid], self.statuses[sid]
        if inlet.source is not None:
            if inlet.ended:
                return 0
            need = status.input
            n = need.wanted
            if inlet.until is not None:
                limit = inlet.until - inlet.given
                if limit <= 0 and need.partial:
                    limit = need.missing  # the chunk it began is completed
                n = min(n, max(0, limit))
            return n
        if inlet.ahead is None:
            return 0
        n = inlet.ahead - status.demand - status.undelivered
        if inlet.until is not None:  # one chunk at a time: where the next one starts is known once this one has
            if status.demand or status.next_video_frame >= inlet.until:
                return 0
            n = min(n, 1)
        return max(0, n)

    def _feed(self, sid: str) -> None:
        inlet = self.inlets[sid]
        while n := self._wants(sid):
            if inlet.source is None:
                self.apply(Demand(sid, n))
                return
            frames = inlet.source.take(n, wait=not self.engine.has_work())
            if frames is None:
                inlet.ended = True
                return
            if not frames:
                return  # not there yet
            taken = self.apply(Submit(sid, np.stack([f for f, _ in frames]), tuple(float(t) for _, t in frames)))
            if not taken.taken:
                raise RuntimeError(f"the engine refused {len(frames)} frames it asked for (session {sid})")
            inlet.given += len(frames)
            if len(frames) < n:
                inlet.ended = True  # the source ended with them
                return
