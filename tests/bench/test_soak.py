"""bench.soak's short run through its command line: every scenario held to issue 10's guarantees.

One run of ``python -m bench.soak --short`` (a real ``streamer serve`` subprocess per scenario, tiny at
32x32, clients on loopback) feeds every test; each test fails with the figures of its scenario.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.soak import checks
from bench.soak.churn import figures, slope_per_100
from bench.soak.cli import EXIT_CHECK_FAILED
from bench.soak.corpus import CONTROL_LIMIT, corpus, prompt_of_bytes
from bench.soak.offers import strip_candidates

ROOT = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SEED, RANDOM_CASES, BIG_BYTES = 3, 20, 10_000_000


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak")
    cmd = [sys.executable, "-m", "bench.soak", "--short", "--height", "32", "--width", "32", "--seed", str(SEED)]
    cmd += ["--fuzz-random", str(RANDOM_CASES), "--big-bytes", str(BIG_BYTES), "--json", str(out / "soak.json")]
    if HAS_MATPLOTLIB:
        cmd += ["--plot", str(out / "soak.png")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, EXIT_CHECK_FAILED), proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "soak.json").read_text())
    assert (proc.returncode == EXIT_CHECK_FAILED) == bool(report["failed_checks"]), proc.stdout
    return {"dir": out, "report": report, "stdout": proc.stdout}


def scenario(soak: dict[str, Any], name: str, *only: str) -> dict[str, Any]:
    """The scenario's figures; it ran, and its checks (``bench.soak.checks``; ``only`` these) passed."""
    s = soak["report"]["scenarios"][name]
    assert "error" not in s, s["error"]
    assert set(only) <= set(s["checks"]), only
    failed = {n: c for n, c in s["checks"].items() if not c["passed"] and (not only or n in only)}
    detail = {k: s[k] for k in ("failures", "first_unhealthy", "stopped") if s.get(k)}  # fuzz: which messages
    assert not failed, f"{name}: {failed}\n{detail}\n{soak['stdout']}"
    return s


@pytest.mark.slow
def test_churn_frees_every_slot_and_leaves_nothing_behind(soak: dict[str, Any]) -> None:
    c = scenario(soak, "churn")
    assert c["cycles"] == 3 and c["clients"] == 9 and len(c["rows"]) == 3
    for row in c["rows"]:  # every kind of end, every cycle: freed within 15 s, a clean close at once
        assert all(t is not None and t <= checks.VANISHED_S for t in row["free_s"].values()), row
        assert row["free_s"]["clean"] < 3, row
    assert c["threads"]["last"] <= c["threads"]["start"] + checks.THREADS_SLACK
    assert c["rss_growth_mib"] < checks.RSS_GROWTH_MIB and c["log_errors"] == 0


@pytest.mark.slow
def test_a_long_stream_plays_in_real_time_without_stalls(soak: dict[str, Any]) -> None:
    s = scenario(soak, "stream")
    fps = soak["report"]["server"]["fps"]
    assert s["seconds"] == 15 and len(s["frames_per_window"]) == 15
    assert s["frames"] >= checks.MIN_FPS_SHARE * fps * 15 and s["worst_gap_s"] <= checks.STREAM_GAP_S
    assert s["fps"] <= (1 + checks.MAX_FPS_EXCESS) * fps  # the video plays at its speed, not faster


@pytest.mark.slow
def test_every_hostile_control_message_is_answered(soak: dict[str, Any]) -> None:
    f = scenario(soak, "fuzz", "every message answered", "server alive")
    cases = corpus(SEED, RANDOM_CASES)
    assert f["sent"] == len(cases) and f["passed"] == f["sent"] and f["seed"] == SEED, f["failures"]
    assert f["stopped"] is None and f["sessions_lost"] == 0 and f["health_after"] == "ok"
    assert f["over_limit"]["sent"] == sum(c.over_limit for c in cases) >= 5
    wanted = {"deep", "not_json", "wrong_types", "unknown", "nan", "binary", "non_utf8", "empty", "valid", "limit"}
    assert wanted <= set(f["by_category"])


@pytest.mark.slow
def test_a_huge_message_from_one_client_does_not_stall_another(soak: dict[str, Any]) -> None:
    big = scenario(soak, "fuzz", "big message refused before it is reassembled", "no stall from another client")[
        "big_message"
    ]
    assert big["bytes"] == BIG_BYTES and (big["answer"] == "error" or big["closed"])
    assert big["answer_s"] < checks.BIG_REFUSAL_S  # refused at its first fragments, not after 10 MB
    assert big["victim_during"]["frames"] > 10 and big["victim_during"]["worst_gap_s"] < checks.OTHER_CLIENT_GAP_S, big


@pytest.mark.slow
def test_no_offer_abuse_holds_a_slot_or_the_server(soak: dict[str, Any]) -> None:
    o = scenario(soak, "offers")
    c, h, s = o["concurrent"], o["held"], o["slow_bodies"]
    assert c["offers"] == 12 and c["succeeded"] == c["free_slots_before"] == 4 and set(c["statuses"]) == {"200", "503"}
    assert h["held"] == 4 and set(h["free_s"]) == {"abandoned", "candidate-less", "nominate-less"}
    assert h["max_free_s"] <= h["connect_deadline_s"] + checks.CONNECT_SLACK_S
    assert not h["real_offer_while_held"]["ok"]  # every slot was held: the abuse did fill them
    assert s["sockets"] == 3 and all(a in ("408", "closed") for a in s["answers"])
    assert o["restarted_after"] == [] and all(
        o[p]["real_offer_after"]["ok"] for p in ("concurrent", "held", "slow_bodies")
    )


@pytest.mark.slow
def test_the_report_and_the_plot(soak: dict[str, Any]) -> None:
    r = soak["report"]
    assert r["command"].startswith("python -m bench.soak --short") and r["short"] is True
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu_model"] and r["harness_git"]["commit"]
    assert r["server"]["size"] == "32x32" and r["server"]["connect_timeout_flag"]
    assert set(r["scenarios"]) == {"churn", "stream", "fuzz", "offers"}
    if not HAS_MATPLOTLIB:
        pytest.skip("--plot needs matplotlib, which is not installed")
    with Image.open(soak["dir"] / "soak.png") as img:
        assert img.format == "PNG" and img.width >= 800 and img.height >= 500
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20


def test_the_corpus_is_fixed_by_its_seed_and_sized_at_the_limit() -> None:
    assert [c.payload for c in corpus(1, 30)] == [c.payload for c in corpus(1, 30)]
    assert [c.payload for c in corpus(1, 30)] != [c.payload for c in corpus(2, 30)]
    for n, char in ((CONTROL_LIMIT, "x"), (CONTROL_LIMIT, "\u00e9"), (CONTROL_LIMIT + 1, "x")):
        message = prompt_of_bytes(n, char)
        assert len(message.encode()) == n and json.loads(message)["type"] == "prompt"
    limit = {c.name: c.over_limit for c in corpus(1, 0) if c.category == "limit"}
    assert not limit["16384 bytes"] and not limit["16384 bytes of 2-byte chars"] and limit["16385 bytes"]


def test_churn_figures_and_candidate_stripping() -> None:
    rows = [
        {"cycle": i, "free_s": {"clean": 0.1, "kill": 8.0, "drop": None if i == 2 else 9.0}}
        | {"rss_mib": 500.0 + 2 * i, "threads": 10, "fds": 15}
        for i in range(3)
    ]
    f = figures({"rss_mib": 500.0, "threads": 10, "fds": 15}, rows)
    assert f["not_freed"] == 1 and f["max_free_s"] == 9.0 and f["by_kind"]["drop"]["max_s"] == 9.0
    assert f["rss_slope_mib_per_100_cycles"] == pytest.approx(200.0) and slope_per_100([1.0]) is None
    sdp = "v=0\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\nm=video 9\r\n"
    assert strip_candidates(sdp) == "v=0\r\nm=video 9\r\n"
