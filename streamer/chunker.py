"""Live frames in, chunks out: resampled to the model's fps and size, newest frames winning.

A live source must never build latency: the chunker keeps at most ``max_frames`` frames waiting;
when the engine falls behind, the oldest are dropped (and counted), so what the engine gets next
is always recent. Frames are resampled in time by arrival: one frame is kept per 1/fps slot (the
newest seen in it), so a 30 fps camera feeds a 16 fps model without drift.

The event loop adds frames; the engine's thread takes them, as the one feeder pulls from any source
(:class:`pipeline.feeder.FrameSource`): ``take`` never blocks, and ``wake`` (the bridge's) tells the engine
thread that frames came, so an idle engine starts on them at once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import av
import numpy as np

from pipeline.feeder import Frames
from streamer.ingress import fit


class Chunker:
    def __init__(
        self, fps: int, width: int, height: int, max_frames: int = 16, wake: Callable[[], None] | None = None
    ) -> None:
        self.fps = fps
        self.width, self.height = width, height
        self.received = 0  # input frames seen
        self.dropped = 0  # frames dropped: resampled away does not count, falling behind does
        self._frames: deque[tuple[np.ndarray, float]] = deque()
        self._max = max_frames
        self._next_slot: float | None = None  # arrival time from which the next kept frame counts
        self._lock = threading.Lock()  # add (the event loop) and take (the engine thread)
        self._wake = wake
        self.ended = False  # the remote track ended: what is left is taken, then take says so

    def add(self, frame: av.VideoFrame, arrived: float) -> None:
        """One input frame (any size/format), with its arrival time (monotonic seconds)."""
        self.received += 1
        if self._next_slot is not None and arrived < self._next_slot:
            return  # within the current 1/fps slot: resampled away
        self._next_slot = (
            arrived + 1.0 / self.fps
            if self._next_slot is None
            else max(self._next_slot + 1.0 / self.fps, arrived - 0.5 / self.fps)
        )
        rgb = fit(frame, self.width, self.height)
        with self._lock:
            self._frames.append((rgb, arrived))
            while len(self._frames) > self._max:
                self._frames.popleft()
                self.dropped += 1
        if self._wake is not None:
            self._wake()

    def take(self, n: int, wait: bool = False) -> Frames | None:
        """``n`` consecutive frames, the newest ones, each with its arrival time, dropping (and counting) any
        older frames still waiting, so a lagging consumer skips ahead instead of falling behind; ``[]`` while
        fewer than ``n`` wait (never blocks, whatever ``wait`` says: the engine thread serves every session).
        None once the track has ended (a part chunk left over is dropped)."""
        with self._lock:
            if len(self._frames) < n:
                return None if self.ended else []
            while len(self._frames) > n:
                self._frames.popleft()
                self.dropped += 1
            frames = list(self._frames)
            self._frames.clear()
            return frames
