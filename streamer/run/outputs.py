"""``streamer run``'s outputs: the sinks, each in its own thread (:mod:`streamer.egress.outputs`), and the
release of frames to them (at once, or in real time where a live stream is among them)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque

import numpy as np

from pipeline.config import SystemConfig
from streamer.egress.file import FileWriter, PngSequence, is_sequence
from streamer.egress.outputs import OutputReport, OutputThread, Sink
from streamer.egress.rtmp import RtmpWriter
from streamer.run.arguments import Target

FILE_QUEUE_SECONDS = 10.0  # a file's queue: every frame is kept unless encoding lags 10 s behind
STREAM_QUEUE_SECONDS = 1.0  # a live stream's queue: it stays within a second of now
LEAD_SECONDS = 0.5  # with a live stream, generation runs at most this far ahead of the wall clock


class Release:
    """Hands generated frames to the outputs: at once, or (``realtime``: a live stream among them) at most
    ``LEAD_SECONDS`` ahead of a wall clock that starts with the first frame, so a stream's queue holds what
    it should send next, not what it must drop. The engine may hand over several chunks at once (decoded
    while the loop waited); they wait here, not in the stream's queue."""

    def __init__(self, outputs: list[OutputThread], fps: int, realtime: bool) -> None:
        self.outputs, self.fps, self.realtime = outputs, fps, realtime
        self.held: deque[np.ndarray] = deque()
        self.sent = 0  # frames handed to the outputs
        self.first: float | None = None  # when the first frames went

    def add(self, frames: np.ndarray) -> None:
        self.held.append(frames)
        self.release()

    def wait(self) -> float:
        """Seconds until the next held frames are due."""
        if not self.held or self.first is None:
            return 0.0
        return max(0.0, self.first + self.sent / self.fps - LEAD_SECONDS - time.perf_counter())

    def release(self, everything: bool = False) -> None:
        while self.held and (everything or not self.realtime or self.wait() == 0.0):
            frames = self.held.popleft()
            self.first = self.first or time.perf_counter()
            for out in self.outputs:
                out.put(frames)
            self.sent += len(frames)


def open_sinks(targets: list[Target], config: SystemConfig, args: argparse.Namespace) -> list[OutputThread]:
    """Files open at once; streams connect now (retrying up to --retry-seconds) so that a receiver
    started a little later still gets the stream from its first frame."""
    threads: list[OutputThread] = []

    def failed(name: str, error: str) -> None:
        left = "no output is left: stopping" if all(th.error for th in threads) else "going on without it"
        print(f"streamer: output {name} failed: {error}; {left}", file=sys.stderr)

    try:
        for t in targets:
            sink: Sink
            if t.stream:
                rtmp = RtmpWriter(
                    t.where, config.width, config.height, config.fps, args.keyframe_seconds, args.retry_seconds
                )
                rtmp.connect()
                sink, seconds = rtmp, STREAM_QUEUE_SECONDS
            else:
                size = (config.width, config.height)
                sink = PngSequence(t.where, *size) if is_sequence(t.where) else FileWriter(t.where, *size, config.fps)
                seconds = FILE_QUEUE_SECONDS
            threads.append(OutputThread(sink, capacity=max(8, round(seconds * config.fps)), on_error=failed))
    except BaseException:
        for th in threads:
            th.abort()
        raise
    return threads


def describe(report: OutputReport) -> str:
    text = f"{report.name}: {report.frames} frames"
    if report.dropped:
        text += f", {report.dropped} dropped ({report.policy})"
    if report.error:
        text += f", FAILED: {report.error}"
    return text
