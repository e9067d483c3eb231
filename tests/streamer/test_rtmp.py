"""RTMP push against a real receiver on 127.0.0.1 (PyAV/FFmpeg in listen mode, in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_32, count_frames, free_port, run_streamer

RECEIVER = Path(__file__).with_name("rtmp_receiver.py")
SMALL = [*TINY_32, "--quiet"]

pytestmark = pytest.mark.slow


def receiver(url: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(RECEIVER), url, *extra], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    time.sleep(0.5)  # bound and accepting
    return proc


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def run(*args: str) -> subprocess.CompletedProcess:
    return run_streamer("run", *args, *SMALL, timeout=180)


def test_every_frame_reaches_the_receiver_at_size_and_rate(tmp_path):
    url = f"rtmp://127.0.0.1:{free_port()}/live/test"
    rx = receiver(url)
    r = run("--frames", "40", "--out", url, "--out", str(tmp_path / "copy.mp4"))
    assert r.returncode == 0, r.stderr
    got = result(rx)
    assert got["frames"] == 40 and got["sizes"] == [[32, 32]] and got["rate"] == 16.0
    assert got["keyframes"] >= 2  # a keyframe every 2 s (32 frames)
    assert count_frames(tmp_path / "copy.mp4") == 40  # several outputs at once


def test_a_receiver_started_late_gets_the_stream_after_a_retry(tmp_path):
    url = f"rtmp://127.0.0.1:{free_port()}/live/late"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", "--frames", "24", "--out", url, "--retry-seconds", "30", *SMALL],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    said = ""
    while "cannot connect" not in said:  # wait until the sender has failed once and is retrying
        line = proc.stderr.readline()
        assert line, said
        said += line
    assert "retrying in" in said
    rx = receiver(url)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, said + err
    assert result(rx)["frames"] == 24


def test_a_receiver_that_vanishes_does_not_stop_the_run_or_the_recording(tmp_path):
    url = f"rtmp://127.0.0.1:{free_port()}/live/gone"
    rx = receiver(url)
    record = tmp_path / "record.mp4"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamer",
            "run",
            "--frames",
            "96",
            "--out",
            url,
            "--also-record",
            str(record),
            "--retry-seconds",
            "1",
            *SMALL,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    said = ""
    while "-> rtmp://" not in said:  # after the memory plan, this line comes once the stream is connected
        line = proc.stderr.readline()
        assert line, said
        said += line
    time.sleep(2.0)
    rx.kill()  # the receiver vanishes mid-stream
    rx.communicate()
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 3, said + err  # the stream output failed, and the run said so
    assert "connection lost" in err and "FAILED" in err
    assert count_frames(record) == 96  # every frame generated is in the recording


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("rtmp://127.0.0.1", "needs an application and a stream key"),
        ("rtmp:///live/key", "has no host"),
        ("rtmp://127.0.0.1:port/live/key", "port that is not a number"),
        ("srt://127.0.0.1:9000/live/key", "scheme 'srt' is not supported"),
    ],
)
def test_malformed_urls_are_refused_before_any_work(tmp_path, url, message):
    r = run("--out", url, "--also-record", str(tmp_path / "r.mp4"))
    assert r.returncode == 2 and message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_receiver_is_a_clear_error_and_leaves_nothing(tmp_path):
    url = f"rtmp://127.0.0.1:{free_port()}/live/nobody"
    r = run("--out", url, "--also-record", str(tmp_path / "r.mp4"), "--retry-seconds", "1")
    assert r.returncode == 3
    assert f"output {url!r}: cannot connect" in r.stderr and "gave up after 1 s" in r.stderr
    assert list(tmp_path.iterdir()) == []
