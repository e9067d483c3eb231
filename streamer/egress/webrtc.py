"""WebRTC egress: a video track that hands frames to aiortc paced by their pts.

aiortc does not pace a track: it sends a frame as soon as ``recv()`` returns one (and encodes it in
a worker thread). Here ``recv()`` waits until the frame's presentation time on a clock anchored at
the first frame. A late frame moves the clock back by its lateness (the playout delay grows to what
the pipeline needs), so the frames of a chunk that arrive together still leave one frame interval
apart instead of in a burst. Frames of an epoch older than the session's current one are dropped
here too, the last hop before the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from aiortc import MediaStreamTrack

from pipeline.types import PTS_CLOCK

TIME_BASE = Fraction(1, PTS_CLOCK)


@dataclass(frozen=True)
class OutFrame:
    epoch: int
    chunk_index: int
    pts: int  # 90 kHz, on the session's output timeline
    rgb: np.ndarray  # uint8 [H, W, 3]
    ready: float  # time.monotonic() when its chunk was scheduled (entered its window): latency is from here


class PacedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(
        self,
        next_frame: Callable[[], Awaitable[OutFrame]],
        current_epoch: Callable[[], int],
        on_sent: Callable[[OutFrame, float], None],
        on_stale: Callable[[OutFrame], None],
        pace: bool = True,
    ) -> None:
        super().__init__()
        self._next_frame = next_frame
        self._epoch = current_epoch
        self._on_sent = on_sent
        self._on_stale = on_stale
        self.paced = pace  # False: send as fast as frames come (throughput measurements)
        self._anchor: float | None = None  # monotonic time of pts 0

    async def recv(self) -> av.VideoFrame:
        while True:
            item = await self._next_frame()
            if item.epoch >= self._epoch():
                break
            self._on_stale(item)
        due = item.pts / PTS_CLOCK
        now = time.monotonic()
        if self._anchor is None or now > self._anchor + due:  # first frame, or late: the clock moves back
            self._anchor = now - due
        delay = self._anchor + due - now
        if delay > 0 and self.paced:
            await asyncio.sleep(delay)
        if item.epoch < self._epoch():  # a cut was acknowledged while we waited
            self._on_stale(item)
            return await self.recv()
        frame = av.VideoFrame.from_ndarray(item.rgb, format="rgb24")
        frame.pts = item.pts
        frame.time_base = TIME_BASE
        self._on_sent(item, time.monotonic())
        return frame
