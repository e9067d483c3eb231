"""RTMP push: H.264 in FLV through PyAV, low-latency settings, paced in real time by pts.

Connecting retries with backoff (0.5 s doubling to 4 s) for ``retry_seconds``; a receiver that
drops the connection mid-stream is reconnected the same way, each new connection starting with a
keyframe. While disconnected, frames are dropped for this output only (other outputs, such as
``--also-record``, get every frame). Past ``retry_seconds`` without a connection the output fails
with a message naming the URL and the last error.
"""

from __future__ import annotations

import contextlib
import sys
import time
from fractions import Fraction
from urllib.parse import urlsplit

import av
import numpy as np

from streamer.egress.file import OutputError

SCHEMES = ("rtmp", "rtmps")


def is_stream_url(target: str) -> bool:
    return "://" in target


def check_rtmp_url(url: str) -> str:
    """``rtmp://host[:port]/app/key``; anything else is an error naming the URL and what is missing."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise OutputError(f"output {url!r}: scheme {parts.scheme!r} is not supported; use rtmp:// or rtmps://")
    if not parts.hostname:
        raise OutputError(f"output {url!r} has no host: rtmp://host[:port]/app/key")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise OutputError(f"output {url!r} has a port that is not a number") from None
    path = [p for p in parts.path.split("/") if p]
    if len(path) < 2:
        raise OutputError(f"output {url!r} needs an application and a stream key: rtmp://host[:port]/app/key")
    return url


class RtmpWriter:
    """Encode and push frames to one RTMP URL, in real time."""

    def __init__(
        self,
        url: str,
        width: int,
        height: int,
        fps: int,
        keyframe_seconds: float = 2.0,
        retry_seconds: float = 10.0,
        log: bool = True,
    ) -> None:
        self.url = check_rtmp_url(url)
        self.name = url
        self.width, self.height, self.fps = width, height, fps
        self.gop = max(1, round(keyframe_seconds * fps))
        self.retry_seconds = retry_seconds
        self.log = log
        self.connections = 0  # successful connections so far
        self.dropped_offline = 0  # frames dropped while reconnecting
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._pts = 0
        self._anchor: float | None = None  # monotonic time of the frame with _due_index 0
        self._due_index = 0
        self._offline_since: float | None = None
        self._next_try = 0.0
        self._backoff = 0.5

    def _say(self, message: str) -> None:
        if self.log:
            print(f"streamer: {self.url}: {message}", file=sys.stderr)

    def connect(self) -> None:
        """Connect now, retrying with backoff for ``retry_seconds``; raises OutputError past it."""
        start = time.monotonic()
        delay = 0.5
        while True:
            try:
                self._open()
                return
            except (av.FFmpegError, OSError) as e:
                if time.monotonic() - start + delay > self.retry_seconds:
                    raise OutputError(
                        f"output {self.url!r}: cannot connect ({e}); gave up after {self.retry_seconds:g} s"
                    ) from None
                self._say(f"cannot connect ({e}); retrying in {delay:g} s")
                time.sleep(delay)
                delay = min(4.0, delay * 2)

    def _open(self) -> None:
        # flush_packets: every packet goes on the wire at once (low latency, and a vanished receiver
        # shows as a write error now, not when a 32 KiB buffer fills); timeout: a dead peer fails in 5 s.
        container = av.open(
            self.url, mode="w", format="flv", container_options={"flush_packets": "1"}, timeout=(10.0, 5.0)
        )
        stream = container.add_stream("libx264", rate=self.fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = self.width, self.height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, self.fps)
        stream.options = {"preset": "veryfast", "tune": "zerolatency", "g": str(self.gop), "bf": "0", "threads": "1"}
        try:
            container.start_encoding()  # PyAV connects lazily: make the handshake (and its failure) happen now
        except BaseException:
            with contextlib.suppress(av.FFmpegError, OSError):
                container.close()
            raise
        self._container, self._stream = container, stream
        self._pts = 0
        self.connections += 1
        if self.connections > 1:
            self._say(f"reconnected ({self.dropped_offline} frames dropped while offline)")
        self._offline_since = None
        self._backoff = 0.5

    def _disconnect(self, why: str) -> None:
        if self._container is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                self._container.close()
        self._container = self._stream = None
        now = time.monotonic()
        self._offline_since = self._offline_since or now
        self._next_try = now + self._backoff
        self._say(f"connection lost ({why}); reconnecting for up to {self.retry_seconds:g} s")

    def _pace(self) -> None:
        """Sleep until the next frame is due on a real-time clock (re-anchored after a stall)."""
        now = time.monotonic()
        if self._anchor is None or now - (self._anchor + self._due_index / self.fps) > 0.5:
            self._anchor, self._due_index = now, 0
        delay = self._anchor + self._due_index / self.fps - now
        if delay > 0:
            time.sleep(delay)
        self._due_index += 1

    def write(self, frames: np.ndarray) -> None:
        for rgb in frames:
            self._pace()
            if self._container is None and not self._reconnect():
                self.dropped_offline += 1
                continue
            assert self._container is not None and self._stream is not None
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._pts
            self._pts += 1
            try:
                self._container.mux(self._stream.encode(frame))
            except (av.FFmpegError, OSError) as e:
                self.dropped_offline += 1
                self._disconnect(str(e))

    def _reconnect(self) -> bool:
        now = time.monotonic()
        assert self._offline_since is not None
        if now - self._offline_since > self.retry_seconds:
            raise OutputError(f"output {self.url!r}: connection lost and not back after {self.retry_seconds:g} s")
        if now < self._next_try:
            return False
        try:
            self._open()
            return True
        except (av.FFmpegError, OSError):
            self._backoff = min(4.0, self._backoff * 2)
            self._next_try = now + self._backoff
            return False

    def close(self) -> None:
        if self._container is None or self._stream is None:
            return
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
            self._container = None

    def abort(self) -> None:
        if self._container is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                self._container.close()
            self._container = None
