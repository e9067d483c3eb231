"""``--stages N`` from the command line: ``streamer run`` and ``streamer serve`` on a ring of gloo processes,
and a stage that dies or hangs is a clear error on every other one within 5 s."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

from bench.latency.served import open_client
from tests.conftest import ROOT, count_frames, free_port, run_streamer

pytestmark = pytest.mark.slow

DEEP = ["--config", "configs/tiny-deep.yaml", "--height", "32", "--width", "32"]
DETECT_S = 5.0  # the bound: every stage hears of a dead or hung one within this


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_two_or_three_stages_or_torchrun_make_exactly_the_video_of_one(tmp_path):
    """Through lossless outputs (FFV1 in .mkv, a PNG sequence), so one level of one pixel is a difference."""
    one, two, tr = tmp_path / "one.mkv", tmp_path / "two.mkv", tmp_path / "torchrun.mkv"
    (tmp_path / "three").mkdir()
    three = tmp_path / "three" / "%05d.png"
    args = ["run", *DEEP, "--frames", "21", "--prompt", "x", "--quiet"]
    r1 = run_streamer(*args, "--out", str(one))
    r2 = run_streamer(*args, "--stages", "2", "--out", str(two))
    r3 = run_streamer(*args, "--stages", "3", "--out", str(three))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    rt = subprocess.run(
        [*torchrun, "-m", "streamer", *args, "--stages", "2", "--out", str(tr)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    for r in (r1, r2, r3, rt):
        assert r.returncode == 0, r.stderr
    assert "2 stages (gloo): stage 0: blocks 0-" in r2.stderr and "2 stages (gloo)" in rt.stderr
    assert "3 stages (gloo)" in r3.stderr
    a = frames_of(one)
    assert a.shape == (21, 32, 32, 3) and a.std() > 5  # frames with something in them
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == [f"{i:05d}.png" for i in range(21)]
    for other in (two, three, tr):
        b = frames_of(other)
        assert b.shape == a.shape
        assert np.array_equal(a, b), (other, np.abs(a.astype(int) - b.astype(int)).max(), int((a != b).sum()))


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The stage processes ``proc`` spawned, by rank."""
    found = {}
    for child in psutil.Process(proc.pid).children():
        cmd = child.cmdline()
        if "pipeline.stages.worker" in cmd:
            found[int(cmd[cmd.index("--rank") + 1])] = child
    return found


def start_long_run(tmp_path: Path, stages: int) -> tuple[subprocess.Popen, dict[int, psutil.Process]]:
    out = tmp_path / "long.mp4"
    cmd = [sys.executable, "-m", "streamer", "run", *DEEP, "--stages", str(stages), "--seconds", "3600"]
    cmd += ["--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # the banner comes once every stage is up; then the progress bar
        if "frame/s" in line or line.count("|") >= 2:
            break
        assert time.monotonic() < deadline, line
    time.sleep(1.0)  # mid-stream
    found = workers(proc)
    assert sorted(found) == list(range(1, stages))
    return proc, found


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_stage_that_dies_or_hangs_is_a_clear_error_on_every_stage_within_5_s(tmp_path, how):
    proc, found = start_long_run(tmp_path, 3)
    victim, other = found[1], found[2]
    started = time.monotonic()
    if how == "kill":
        victim.send_signal(signal.SIGKILL)
    else:
        victim.send_signal(signal.SIGSTOP)
    exited: dict[str, float] = {}
    try:
        while len(exited) < 2 and time.monotonic() - started < DETECT_S + 15:
            if "cli" not in exited and proc.poll() is not None:
                exited["cli"] = time.monotonic() - started
            if "other" not in exited and not (other.is_running() and other.status() != psutil.STATUS_ZOMBIE):
                exited["other"] = time.monotonic() - started
            time.sleep(0.02)
        cli_s, other_s = exited.get("cli", float("inf")), exited.get("other", float("inf"))
    finally:
        for p in (victim, other):
            if p.is_running():
                p.kill()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == 4, err
    if how == "kill":
        assert f"stage 1 (pid {victim.pid}) exited with status -9" in err, err
    else:
        assert "stage 1 sent no heartbeat for" in err and "it died or hangs" in err, err
    assert "streamer: error: " in err and "generation stopped after" in err  # stage 0, the CLI
    assert "streamer stage 2: error: " in err  # the last stage, in its own words
    assert cli_s < DETECT_S + 1 and other_s < DETECT_S + 1, (cli_s, other_s)  # +1: the exit itself
    assert count_frames(tmp_path / "long.mp4") > 0  # what was made is a playable file


def test_serve_with_two_stages_streams_and_reports_a_dead_stage_in_health(tmp_path):
    config = tmp_path / "deep32.yaml"
    config.write_text((ROOT / "configs/tiny-deep.yaml").read_text().replace("128", "32"))
    port = free_port()
    cmd = [sys.executable, "-m", "streamer", "serve", "--config", str(config), "--port", str(port), "--stages", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_health(base, proc)
        assert health["status"] == "ok", health

        async def frames() -> int:
            client = await open_client(base, "t2v", None)
            try:
                for _ in range(8):
                    await asyncio.wait_for(client.track.recv(), 30)
                return 8
            finally:
                await client.pc.close()

        assert asyncio.run(frames()) == 8  # live video through both stages
        victim = workers(proc)[1]
        victim.kill()
        killed = time.monotonic()
        while (health := get_health(base))[0] != 503:
            assert time.monotonic() - killed < DETECT_S, health
            time.sleep(0.1)
        body = health[1]
        assert body["status"] == "error" and f"stage 1 (pid {victim.pid}) exited with status -9" in body["error"], body
        status, offer = post_offer(base)
        assert status == 503 and "the engine stopped" in offer["error"], offer  # not a 500, not a hang
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def get_health(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + "/api/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for_health(base: str, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 120
    while True:
        try:
            return get_health(base)[1]
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)


def post_offer(base: str) -> tuple[int, dict]:
    body = json.dumps({"sdp": "v=0\r\n", "type": "offer", "params": {}, "mode": "t2v"}).encode()
    request = urllib.request.Request(base + "/api/offer", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
