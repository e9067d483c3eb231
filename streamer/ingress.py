"""Frames in: a video file (or anything PyAV opens), resampled to the model's fps and size, as the sources
the one feeder pulls from (:class:`pipeline.feeder.FrameSource`: ``take(n, wait)``).

Resampling in time keeps, for output frame k at time k/fps, the newest input frame shown at or
before that time (frames are repeated or skipped as the rates differ). In space the picture is
centre-cropped to the output's aspect ratio, then scaled.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import av
import numpy as np

from pipeline.config import SystemConfig
from pipeline.feeder import Frames


class InputError(ValueError):
    """An input that cannot be opened or decoded: the message names it and why."""


def crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the largest centred region of the source with the destination's aspect."""
    if src_w * dst_h > dst_w * src_h:  # source is wider: crop the sides
        w = (src_h * dst_w) // dst_h
        return (src_w - w) // 2, 0, w, src_h
    h = (src_w * dst_h) // dst_w
    return 0, (src_h - h) // 2, src_w, h


def fit(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """One decoded frame -> uint8 [height, width, 3], centre-cropped and scaled.

    Scales first (swscale, keeping the aspect ratio) so that the crop copies a small picture."""
    x, y, w, h = crop_box(frame.width, frame.height, width, height)
    if (w, h) == (frame.width, frame.height):
        return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    # the whole frame at the scale that makes the crop box exactly width x height
    sw, sh = round(frame.width * width / w), round(frame.height * height / h)
    rgb = frame.reformat(width=sw, height=sh, format="rgb24").to_ndarray()
    x0, y0 = round(x * width / w), round(y * height / h)
    x0, y0 = min(x0, sw - width), min(y0, sh - height)
    return np.ascontiguousarray(rgb[y0 : y0 + height, x0 : x0 + width])


class VideoFileSource:
    """Iterate an input's video frames as uint8 [H, W, 3] at ``fps``."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int) -> None:
        self.path = str(path)
        self.width, self.height, self.fps = width, height, fps
        try:
            self._container = av.open(self.path)
        except (av.FFmpegError, OSError) as e:
            raise InputError(f"input {self.path!r} cannot be opened: {e}") from None
        if not self._container.streams.video:
            self._container.close()
            raise InputError(f"input {self.path!r} has no video stream")
        self._frames = self._decode()
        self._timed: Iterator[tuple[np.ndarray, float]] | None = None
        try:
            self._first: np.ndarray | None = next(self._frames)
        except StopIteration:
            self._container.close()
            raise InputError(f"input {self.path!r} has no decodable video frame") from None

    def _decode(self) -> Iterator[np.ndarray]:
        stream = self._container.streams.video[0]
        k = 0  # next output frame
        start: float | None = None
        latest: av.VideoFrame | None = None  # newest input frame, fitted only when emitted
        fitted: np.ndarray | None = None
        try:
            for i, frame in enumerate(self._container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / self.fps
                start = t if start is None else start
                while latest is not None and k / self.fps < t - start - 1e-6:
                    fitted = fitted if fitted is not None else fit(latest, self.width, self.height)
                    yield fitted
                    k += 1
                latest, fitted = frame, None
        except av.FFmpegError as e:
            if latest is None:
                raise InputError(f"input {self.path!r} cannot be decoded: {e}") from None
            # a damaged tail: keep what was readable
        if latest is not None:
            yield fitted if fitted is not None else fit(latest, self.width, self.height)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._frames

    def timed(self) -> Iterator[tuple[np.ndarray, float]]:
        """Each frame with the time it was read (a file has no other arrival)."""
        return ((frame, time.monotonic()) for frame in self)

    def take(self, n: int, wait: bool) -> Frames | None:
        """The next ``n`` frames (fewer at the end; None after it): a file is read as fast as it is asked."""
        if self._timed is None:
            self._timed = self.timed()
        frames = list(itertools.islice(self._timed, n))
        return frames or None

    def close(self) -> None:
        self._container.close()


LIVE_SCHEMES = ("rtmp", "rtmps", "rtsp", "http", "https", "udp", "tcp", "srt")


def is_live(path: str) -> bool:
    """A stream URL, a capture device or a pipe: read in real time, not as fast as we like."""
    if urlsplit(path).scheme in LIVE_SCHEMES or path.startswith("/dev/"):
        return True
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class LiveSource:
    """A live input read by its own thread as fast as it arrives. At most ``max_frames`` wait for the
    engine; when it falls behind the oldest are dropped (counted), so the newest frames win and a
    live source never builds latency."""

    def __init__(self, source: VideoFileSource, max_frames: int) -> None:
        self.source = source
        self.path = source.path
        self.dropped = 0
        self._frames: deque[tuple[np.ndarray, float]] = deque()  # each with the time the reader got it
        self._max = max_frames
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._read, name="live-input", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self.source:
                if self._stop:
                    break
                with self._cond:
                    self._frames.append((frame, time.monotonic()))
                    while len(self._frames) > self._max:
                        self._frames.popleft()
                        self.dropped += 1
                    self._cond.notify()
        except BaseException as e:  # reported to the consumer, which stops
            self._error = e
        finally:
            self.source.close()  # here, in the thread that decodes: never under a running decode
            with self._cond:
                self._ended = True
                self._cond.notify()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (frame for frame, _ in self.timed())

    def take(self, n: int, wait: bool) -> Frames | None:
        """The next ``n`` frames waiting (the reader keeps at most ``max_frames``: older ones were dropped);
        ``[]`` while fewer than ``n`` wait, unless ``wait`` (the engine has nothing else to do), which blocks
        until they come; what is left once the input ends, then None."""
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: len(self._frames) >= n or self._ended)
            if len(self._frames) >= n:
                return [self._frames.popleft() for _ in range(n)]
            if not self._ended:
                return []
            if self._error is not None:
                raise InputError(f"input {self.path!r} failed: {self._error}")
            rest = list(self._frames)
            self._frames.clear()
            return rest or None

    def timed(self) -> Iterator[tuple[np.ndarray, float]]:
        """Each frame with the time it arrived (time.monotonic() when the reader thread got it)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._frames) or self._ended)
                if self._frames:
                    item = self._frames.popleft()
                elif self._error is not None:
                    raise InputError(f"input {self.path!r} failed: {self._error}")
                else:
                    return
            yield item

    def close(self) -> None:
        """Ask the reader to stop; it closes the input itself after its current frame. A live
        input that has stalled may keep it waiting: it is a daemon thread and ends with the process."""
        self._stop = True
        self._thread.join(timeout=5)


def open_input(path: str, config: SystemConfig) -> VideoFileSource | LiveSource:
    """A file is read as fast as the engine takes it; a live input (a stream URL, a device, a pipe)
    in real time by its own thread, keeping at most one second of frames."""
    source = VideoFileSource(path, config.width, config.height, config.fps)
    return LiveSource(source, max_frames=config.fps) if is_live(path) else source
