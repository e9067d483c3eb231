"""WebRTC egress: a video track that hands frames to aiortc paced by their pts.

aiortc does not pace a track: it sends a frame as soon as ``recv()`` returns one (and encodes it in
a worker thread). Here ``recv()`` waits until the frame's presentation time on a clock anchored at
the first frame (:class:`Playout`), so the frames of a chunk that arrive together still leave one
frame interval apart instead of in a burst. Frames of an epoch older than the session's current one
are dropped here too, the last hop before the wire.
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

from pipeline.types import PTS_CLOCK, stale

TIME_BASE = Fraction(1, PTS_CLOCK)


@dataclass(frozen=True)
class OutFrame:
    epoch: int
    chunk_index: int
    pts: int  # 90 kHz, on the session's output timeline
    rgb: np.ndarray  # uint8 [H, W, 3]
    ready: float  # time.monotonic() when its chunk was scheduled (entered its window): latency is from here
    arrived: float  # time.monotonic() when its chunk reached the session: the earliest it could be sent


class Playout:
    """When each frame is sent: at its pts on a clock anchored at the first frame, with a delay that
    follows what the pipeline needs.

    A frame that comes later than its time moves the clock back by its lateness (the delay grows at
    once: no frame is ever held back to catch up). A delay grown by a hiccup would otherwise stay for
    the rest of the session, so it also shrinks: when every frame of the last ``window`` seconds came
    at least ``margin`` earlier than its time, the clock moves forward by the smallest such slack less
    ``margin``, at most ``max_step`` at a time (a few frames leave close together, then the pace is
    even again), and never by more than it has moved back since the first frame. Frames that always
    come early (a t2v session keeps a chunk in hand) are no reason to play faster than real time:
    only a delay that a hiccup added is taken back, so over a session the video plays at its fps."""

    def __init__(self, margin: float = 0.03, window: float = 2.0, max_step: float = 0.1) -> None:
        self.margin, self.window, self.max_step = margin, window, max_step
        self.anchor: float | None = None  # time of pts 0
        self._since = 0.0  # start of the current window
        self._slack = float("inf")  # the least slack seen in it
        self.added = 0.0  # how far late frames moved the clock back, less what was taken back since

    def send_time(self, at: float, arrived: float, now: float) -> float:
        """When to send the frame presented ``at`` seconds after the first, which arrived at ``arrived``
        and is asked for ``now`` (all ``time.monotonic()``)."""
        if self.anchor is None or now > self.anchor + at:  # first frame, or late: the clock moves back
            if self.anchor is not None:
                self.added += now - (self.anchor + at)
            self.anchor, self._since, self._slack = now - at, now, float("inf")
            return now
        self._slack = min(self._slack, self.anchor + at - arrived)
        if now - self._since >= self.window:
            if self._slack > self.margin and self.added > 0:
                step = min(self._slack - self.margin, self.max_step, self.added)
                self.anchor -= step
                self.added -= step
            self._since, self._slack = now, float("inf")
        return max(now, self.anchor + at)


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
        self.playout = Playout()

    async def recv(self) -> av.VideoFrame:
        while True:
            item = await self._next_frame()
            if not stale(item.epoch, self._epoch()):
                break
            self._on_stale(item)
        now = time.monotonic()
        delay = self.playout.send_time(item.pts / PTS_CLOCK, item.arrived, now) - now
        if delay > 0 and self.paced:
            await asyncio.sleep(delay)
        if stale(item.epoch, self._epoch()):  # a cut was acknowledged while we waited
            self._on_stale(item)
            return await self.recv()
        frame = av.VideoFrame.from_ndarray(item.rgb, format="rgb24")
        frame.pts = item.pts
        frame.time_base = TIME_BASE
        self._on_sent(item, time.monotonic())
        return frame
