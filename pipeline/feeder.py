"""The one input feeder: a v2v session's frames become Submit commands as the engine asks for them.

The server (frames from a WebRTC track), the CLI (a file or a live source) and the benchmarks all
feed a session with it: hand over exactly the frames the engine wants now (those that complete its
next input chunk, :class:`~pipeline.commands.InputNeed`), each with the time it arrived at ingress,
and nothing while enough input waits (the source decides what to drop: newest wins, upstream).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.commands import SessionStatus, Submit


class Feeder:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.given = 0  # frames handed over and taken

    def wanted(self, status: SessionStatus, limit: int | None = None) -> int:
        """Frames to hand over now. ``limit``: at most that many (e.g. up to a scripted event's frame);
        at a limit of 0 the chunk it falls in is still completed, so that no input is left half a chunk."""
        need = status.input
        n = need.wanted
        if limit is not None:
            if limit <= 0 and need.partial:
                limit = need.missing
            n = min(n, max(0, limit))
        return n

    def submit(self, frames: Sequence[np.ndarray], arrived: Sequence[float]) -> Submit:
        """The command that hands ``frames`` (uint8 [H, W, 3] each, oldest first) over."""
        return Submit(self.session_id, np.stack(list(frames)), tuple(float(t) for t in arrived))

    def taken(self, frames: int) -> None:
        self.given += frames
