"""bench.latency through its command line: every path in short mode, the JSON, the plot and --compare."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.latency.browser_path import CHROMIUM, browser_unavailable
from bench.latency.common import PATHS, distribution, steady_fps
from bench.latency.report import compare

ROOT = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_bench(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m bench.latency ARGS`` from the repository root."""
    cmd = [sys.executable, "-m", "bench.latency", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


def assert_latency(latency: dict[str, Any]) -> None:
    """Positive and ordered: p50 <= p95 <= p99 <= max."""
    values = [latency[k] for k in ("p50", "p95", "p99", "max")]
    assert all(v is not None and v > 0 for v in values), latency
    assert values == sorted(values), latency


@pytest.fixture(scope="module")
def t2v(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short run of every path (the browser's where this machine can run it): tiny, t2v, 32x32."""
    out = tmp_path_factory.mktemp("latency")
    args: list[str | Path] = ["--config", "configs/tiny.yaml", "--mode", "t2v", "--seconds", "3"]
    args += ["--height", "32", "--width", "32", "--rounds", "2", "--round-seconds", "1", "--json", out / "run.json"]
    if HAS_MATPLOTLIB:
        args += ["--plot", out / "run.png"]
    proc = run_bench(*args)
    assert proc.returncode == 0, output(proc)
    return {"dir": out, "report": json.loads((out / "run.json").read_text()), "stdout": proc.stdout}


@pytest.mark.slow
def test_the_report_has_every_field_with_sane_values(t2v: dict[str, Any]) -> None:
    r = t2v["report"]
    assert r["mode"] == "t2v" and r["target_ms"] == 250 and set(r["paths"]) == set(PATHS)
    assert r["ttff_ms"] > 0 and r["fps"] > 0 and r["efficiency"] > 0 and r["efficiency_capped"] > 0
    assert_latency(r["latency_ms"])
    assert 0 <= r["deadline_miss_rate"] <= 1 and r["latency_source"] == "pts_match"
    assert r["config"]["model"] == "tiny" and r["config"]["height"] == 32 and r["machine"]["cpu_count"] >= 1
    assert r["command"].startswith("python -m bench.latency --config configs/tiny.yaml")
    for name in ("engine", "webrtc"):
        p = r["paths"][name]
        assert p["fps"] > 0 and p["ttff_ms"] > 0 and p["frames"] > 3 and p["duration_s"] >= 3, (name, p)
        assert_latency(p["latency_ms"])
        assert p["period_ms"]["p50"] > 0 and len(p["series"]["t_s"]) == len(p["series"]["latency_ms"]) > 0
        assert {"tick", "dit", "decode"} <= set(p["stages_ms"]), p["stages_ms"]
    served = r["paths"]["webrtc"]
    assert r["fps"] == served["fps"] and r["latency_ms"]["p50"] == served["latency_ms"]["p50"]
    assert served["server_metrics"]["frames_out"] > 0 and served["server_engine"]["ticks"] > 0
    assert served["frames_matched"] == served["frames"]  # every frame received was matched to its send
    assert served["latency_parts"]["sent_to_arrival_ms"]["p50"] >= 0
    # t2v: efficiency is the median over rounds of the served path's throughput (pacing off) over the engine
    # alone, the client in its own process; the same with the client inline is reported beside it
    detail = r["efficiency_detail"]
    assert len(detail["rounds"]) == 2 and detail["window_s"] == 1
    for row in detail["rounds"]:
        assert row["engine"]["frames"] > 0 and row["engine"]["cpu_ms_per_frame"] > 0
        for client in ("process", "inline"):
            window = row[client]
            assert window["frames"] > 0 and window["cpu_ms_per_frame"] > 0, row
            assert window["ratio"] == pytest.approx(window["fps"] / row["engine"]["fps"], rel=1e-3)
    mean = {c: sum(row[c]["ratio"] for row in detail["rounds"]) / 2 for c in ("process", "inline")}
    assert r["efficiency"] == pytest.approx(mean["process"], rel=1e-3)  # the median of two
    assert detail["efficiency_inline_client"] == pytest.approx(mean["inline"], rel=1e-3)
    assert r["efficiency_capped"] == pytest.approx(served["fps"] / min(r["paths"]["engine"]["fps"], 16), rel=1e-3)
    assert r["efficiency_definition"].startswith("median over rounds of served throughput")
    assert "efficiency rounds (1 s windows): client process" in t2v["stdout"]


@pytest.mark.slow
def test_the_browser_path(t2v: dict[str, Any]) -> None:
    reason = browser_unavailable(CHROMIUM)
    browser = t2v["report"]["paths"]["browser"]
    if reason:
        assert browser == {"skipped": reason}  # the harness says why in the JSON
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert "error" not in browser, browser
    assert browser["fps"] > 0 and browser["ttff_ms"] > 0 and browser["page_errors"] == []
    assert browser["latency_source"] == "rtp_match" and browser["frames_matched"] > 3
    assert_latency(browser["latency_ms"])
    stats = browser["get_stats"]
    assert stats["framesDecoded"] > 3 and stats["jitter_buffer_ms"] is not None and stats["decode_ms"] is not None
    assert browser["chromium"] and t2v["report"]["machine"]["chromium"] == browser["chromium"]


@pytest.mark.slow
def test_the_plot_is_a_png_with_a_picture(t2v: dict[str, Any]) -> None:
    if not HAS_MATPLOTLIB:
        pytest.skip("--plot needs matplotlib, which is not installed")
    with Image.open(t2v["dir"] / "run.png") as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 600
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # axes, points, bars: not a blank canvas


@pytest.mark.slow
def test_compare_passes_against_itself_and_fails_against_a_better_run(t2v: dict[str, Any]) -> None:
    run = t2v["dir"] / "run.json"
    same = run_bench("--from-json", run, "--compare", run)
    assert same.returncode == 0, output(same)
    assert "0 worse" in same.stdout

    better = copy.deepcopy(t2v["report"])
    better["fps"] *= 2
    better["efficiency"] *= 2
    better["ttff_ms"] /= 2
    better["latency_ms"] = {k: v / 2 for k, v in better["latency_ms"].items()}
    (t2v["dir"] / "better.json").write_text(json.dumps(better))
    worse = run_bench("--from-json", run, "--compare", t2v["dir"] / "better.json")
    assert worse.returncode == 1, output(worse)
    for key in ("fps", "efficiency", "ttff_ms", "latency_ms.p50"):
        assert any(line.startswith(key) and line.endswith("worse") for line in worse.stdout.splitlines()), key


@pytest.mark.slow
def test_v2v_passthrough_reads_frame_ids_back(tmp_path: Path) -> None:
    out = tmp_path / "v2v.json"
    args = ["--config", "configs/passthrough.yaml", "--mode", "v2v", "--seconds", "3", "--paths", "engine,webrtc"]
    proc = run_bench(*args, "--json", out)
    assert proc.returncode == 0, output(proc)
    r = json.loads(out.read_text())
    assert r["paths"]["browser"] == {"skipped": "not selected (--paths)"}
    engine, served = r["paths"]["engine"], r["paths"]["webrtc"]
    assert engine["frames_with_their_id"] == engine["frames"] > 3  # the engine alone gives every frame back
    assert {"dit", "decode", "encode"} <= set(engine["stages_ms"])
    assert served["latency_source"] == "frame_id" and served["frames_matched"] >= served["frames"] / 2
    assert_latency(r["latency_ms"])
    assert 20 < r["latency_ms"]["p50"] < 2000  # a chunk is 4 frames: the camera alone takes ~190 ms to fill one
    assert r["fps"] > 0 and r["efficiency"] > 0
    # v2v: the input is real time, so efficiency is the served FPS against min(engine, real time)
    assert "throughput_fps" not in served
    assert r["efficiency"] == pytest.approx(served["fps"] / min(engine["fps"], 16), rel=1e-3)


@pytest.mark.slow
def test_a_browser_asked_for_by_name_that_cannot_run_is_an_error(tmp_path: Path) -> None:
    proc = run_bench("--paths", "browser", "--chromium", tmp_path / "no-chromium", "--seconds", "3")
    assert proc.returncode == 2 and "cannot run here" in proc.stderr and "no-chromium" in proc.stderr


def test_distribution_is_ordered_and_empty_safe() -> None:
    d = distribution([5.0, 1.0, 3.0, 2.0, 100.0, 4.0])
    assert d["p50"] <= d["p95"] <= d["p99"] <= d["max"] == 100.0 and d["n"] == 6
    assert distribution([]) == {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "n": 0}
    assert steady_fps([(0.0, 1), (0.5, 4), (1.0, 4)]) == 8.0  # frames after the first output / time since it
    assert steady_fps([(0.0, 1)]) is None


def test_compare_directions_and_tolerance() -> None:
    old = {"fps": 16.0, "ttff_ms": 500.0, "latency_ms": {"p50": 200.0}, "efficiency": 0.8, "deadline_miss_rate": 0.0}
    assert compare(old, old, 0.2)[0] == []
    slower = {**old, "fps": 12.0, "latency_ms": {"p50": 230.0}}  # fps -25 %: worse; latency +15 %: within 20 %
    worse, lines = compare(slower, old, 0.2)
    assert len(worse) == 1 and worse[0].startswith("fps") and len(lines) == 5
    faster = {**old, "fps": 32.0, "ttff_ms": 100.0, "deadline_miss_rate": 0.005}  # better; a miss rate near 0
    assert compare(faster, old, 0.2)[0] == []
    assert compare({**old, "deadline_miss_rate": 0.5}, old, 0.2)[0][0].startswith("deadline_miss_rate")
