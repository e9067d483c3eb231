"""v2v from a live source: read in real time by its own thread, the newest frames winning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamer.ingress import InputError, LiveSource, is_live
from tests.conftest import TINY_32, count_frames, run_streamer


class SlowSource:
    """Stands in for VideoFileSource: yields ``n`` numbered frames, ``gap`` seconds apart."""

    path = "test://numbers"

    def __init__(self, n: int, gap: float, fail: bool = False) -> None:
        self.n, self.gap, self.fail = n, gap, fail

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.gap)
            yield np.full((2, 2, 3), i, np.uint8)
        if self.fail:
            raise OSError("the camera went away")

    def close(self) -> None:
        pass


def test_a_lagging_consumer_gets_the_newest_frames_and_drops_are_counted():
    live = LiveSource(SlowSource(40, 0.005), max_frames=4)  # type: ignore[arg-type]
    time.sleep(0.5)  # the consumer is late: all 40 have arrived
    got = [int(f[0, 0, 0]) for f in live]
    assert got == [36, 37, 38, 39]  # the newest four, in order
    assert live.dropped == 36


def test_a_consumer_that_keeps_up_gets_every_frame_and_errors_surface():
    live = LiveSource(SlowSource(10, 0.01), max_frames=4)  # type: ignore[arg-type]
    assert [int(f[0, 0, 0]) for f in live] == list(range(10)) and live.dropped == 0
    broken = LiveSource(SlowSource(2, 0.0, fail=True), max_frames=4)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="the camera went away"):
        list(broken)


def test_the_feeder_takes_what_waits_and_waits_only_when_it_may():
    live = LiveSource(SlowSource(10, 0.02), max_frames=8)  # type: ignore[arg-type]
    assert live.take(4, wait=False) == []  # none there yet, and the engine has other work
    got = live.take(4, wait=True)  # nothing else to do: wait for them
    assert got is not None and [int(f[0, 0, 0]) for f, _ in got] == [0, 1, 2, 3]
    assert all(t > 0 for _, t in got)  # each with its arrival time
    rest = []
    while (more := live.take(4, wait=True)) is not None:
        rest += [int(f[0, 0, 0]) for f, _ in more]
    assert rest == list(range(4, 10))  # the last 2 after the end, then None
    assert live.take(4, wait=False) is None


def test_what_counts_as_live(tmp_path):
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    assert is_live(str(fifo)) and is_live("rtmp://127.0.0.1/live/cam") and is_live("/dev/video0")
    assert not is_live(str(tmp_path / "clip.mp4")) and not is_live("clip.mp4")


@pytest.mark.slow
def test_v2v_from_a_live_pipe(tmp_path):
    fifo = tmp_path / "feed.ts"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("live_writer.py")), str(fifo), "--seconds", "6"]
    )
    out = tmp_path / "out.mp4"
    r = run_streamer(
        "run",
        "--input",
        str(fifo),
        "--seconds",
        "2",
        "--out",
        str(out),
        *TINY_32,
        "--quiet",
        "--strength",
        "0.7",
        timeout=120,
    )
    writer.kill()
    writer.wait()
    assert r.returncode == 0, r.stderr
    assert "(live)" in r.stderr and "frames dropped (newest frames win)" in r.stderr
    assert count_frames(out) == 32  # 2 s at 16 fps


def test_the_server_chunker_never_blocks_gives_the_newest_and_wakes_the_engine():
    import av

    from streamer.chunker import Chunker

    woken = []
    chunker = Chunker(fps=10, width=16, height=16, max_frames=6, wake=lambda: woken.append(1))
    for i in range(5):
        chunker.add(av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 10, np.uint8), format="rgb24"), i * 0.1)
    assert len(woken) == 5  # every frame wakes the engine thread
    assert chunker.take(8, wait=True) == []  # fewer than asked: never waits (the engine thread serves others)
    got = chunker.take(3)
    assert got is not None and [int(f[0, 0, 0]) for f, _ in got] == [20, 30, 40] and chunker.dropped == 2  # newest
    chunker.ended = True
    assert chunker.take(1) is None
