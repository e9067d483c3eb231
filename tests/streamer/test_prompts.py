"""`streamer run --prompts`: prompt changes and cuts on a schedule, in real subprocesses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import TINY_32, run_streamer

SMALL = [*TINY_32, "--quiet", "--frames", "40"]

pytestmark = pytest.mark.slow


def run_schedule(schedule_path: Path, out: Path) -> subprocess.CompletedProcess:
    return run_streamer("run", "--prompts", str(schedule_path), "--out", str(out), *SMALL, timeout=180)


def run(tmp_path: Path, name: str, schedule: str) -> tuple[np.ndarray, str]:
    (tmp_path / f"{name}.yaml").write_text(schedule)
    out = tmp_path / f"{name}.mp4"
    r = run_schedule(tmp_path / f"{name}.yaml", out)
    assert r.returncode == 0, r.stderr
    with av.open(str(out)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24").astype(np.float64) for f in c.decode(video=0)])
    return frames, r.stderr


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_a_scheduled_cut_falls_at_its_time_and_shares_nothing_with_before(tmp_path):
    cut = "- at: 0\n  prompt: {p}\n- at: 1.0\n  cut: true\n  prompt: after\n"
    soft = "- at: 0\n  prompt: {p}\n- at: 1.0\n  prompt: after\n"
    a, said = run(tmp_path, "a", cut.format(p="a red fox"))
    b, _ = run(tmp_path, "b", cut.format(p="grey rain"))
    # 1 s at 16 fps is frame 16; chunks start at frames 1, 5, 9, 13, 17: the first boundary after it
    assert "at frame 17 (1.06 s; line 3 asked for 1 s): cut (epoch 1), prompt 'after'" in said
    assert len(a) == len(b) == 40
    assert diff(a[:17], b[:17]) > 1.0  # before the cut the two prompts show
    assert diff(a[17:], b[17:]) == 0.0  # after it nothing of before is left: the same frames exactly
    # without the cut, the window carries the earlier prompt's frames into what follows
    c, said = run(tmp_path, "c", soft.format(p="a red fox"))
    d, _ = run(tmp_path, "d", soft.format(p="grey rain"))
    assert "at frame 17 (1.06 s; line 3 asked for 1 s): prompt 'after'" in said
    assert diff(c[17:], d[17:]) > 1.0


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("- at: 2\n  prompt: b\n- at: 1\n  prompt: a\n", "line 3: at=1 is not after line 1 (at=2)"),
        ("- at: 0\n  prompt: a\n  colour: red\n", "line 1: unknown key 'colour'"),
        ("- at: -1\n  prompt: a\n", "line 1: at=-1 is negative"),
        ("[1, 2", "invalid YAML"),
        ("[" * 3000 + "]" * 3000, "line 1: nested more than 32 levels deep"),
        ("- " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "line 1: nested more than 32 levels deep"),
    ],
)
def test_a_bad_schedule_is_refused_with_its_line_and_nothing_is_written(tmp_path, schedule, message):
    (tmp_path / "s.yaml").write_text(schedule)
    r = run_schedule(tmp_path / "s.yaml", tmp_path / "out.mp4")
    assert r.returncode == 2, r.stderr
    assert f"streamer: error: {tmp_path / 's.yaml'}: " in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
