"""Live frames in, chunks out: resampled to the model's fps and size, newest frames winning.

A live source must never build latency: the chunker keeps at most ``max_frames`` frames waiting;
when the engine falls behind, the oldest are dropped (and counted), so what the engine gets next
is always recent. Frames are resampled in time by arrival: one frame is kept per 1/fps slot (the
newest seen in it), so a 30 fps camera feeds a 16 fps model without drift.
"""

from __future__ import annotations

import asyncio
from collections import deque

import av
import numpy as np

from streamer.ingress import fit


class Chunker:
    def __init__(self, fps: int, width: int, height: int, max_frames: int = 16) -> None:
        self.fps = fps
        self.width, self.height = width, height
        self.received = 0  # input frames seen
        self.dropped = 0  # frames dropped: resampled away does not count, falling behind does
        self._frames: deque[tuple[np.ndarray, float]] = deque()
        self._max = max_frames
        self._next_slot: float | None = None  # arrival time from which the next kept frame counts
        self._ready = asyncio.Event()

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
        self._frames.append((fit(frame, self.width, self.height), arrived))
        while len(self._frames) > self._max:
            self._frames.popleft()
            self.dropped += 1
        self._ready.set()

    async def take(self, n: int) -> list[tuple[np.ndarray, float]]:
        """``n`` consecutive frames, the newest ones, each with its arrival time: waits until there are
        n, drops (and counts) any older frames still waiting, so a lagging consumer skips ahead instead
        of falling behind."""
        while len(self._frames) < n:
            self._ready.clear()
            await self._ready.wait()
        while len(self._frames) > n:
            self._frames.popleft()
            self.dropped += 1
        frames = list(self._frames)
        self._frames.clear()
        return frames
