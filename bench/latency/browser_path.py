"""The browser path: Debian's Chromium, headless, driven by Playwright on the demo page, in a subprocess
under ``unshare -n`` (a network namespace with only ``lo``) that also runs its own server."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.browser import CHROMIUM_ARGS, bring_loopback_up
from bench.latency.common import (
    DEFINITIONS,
    MAX_RECORDS,
    ROOT,
    Trace,
    distribution,
    http_json,
    in_engine_thread,
    load_config,
    stage_summary,
)
from bench.latency.engine_path import warm_up
from bench.latency.served import Server, local_server, sent_by_pts
from pipeline.models.loader import load_models
from streamer.app import STATE
from streamer.rtc_internals import recorded_rtp_origins, sender_ssrcs, use_ice_addresses

CHROMIUM = "/usr/bin/chromium"


RESULT_MARKER = "BENCH_LATENCY_BROWSER_RESULT "


COLLECT_JS = """(max) => {
    const video = document.getElementById('video');
    const bench = window.__bench = { frames: [], start: null };
    const onFrame = (now, m) => {
        if (bench.frames.length < max) {
            bench.frames.push([m.presentationTime, m.receiveTime ?? null, m.rtpTimestamp ?? null,
                               m.presentedFrames, m.processingDuration ?? null]);
        }
        video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
}"""


START_JS = "() => { window.__bench.start = performance.now(); document.getElementById('start').click(); }"


SPAN_JS = """(ms) => {
    const f = window.__bench.frames;
    return f.length >= 3 && f[f.length - 1][0] - f[0][0] >= ms;
}"""


STATS_JS = """async () => {
    let out = null;
    (await window.demo.pc.getStats()).forEach(r => {
        if (r.type === 'inbound-rtp' && r.kind === 'video') out = r;
    });
    return out;
}"""


def browser_unavailable(chromium: str) -> str | None:
    """Why the browser path cannot run here, or None."""
    if not Path(chromium).exists():
        return f"{chromium} is missing (Debian package chromium; .ci/run installs it)"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare for a network namespace with only loopback"
    if importlib.util.find_spec("playwright") is None:
        return "needs the playwright package (pip install -e '.[dev]')"
    return None


def rtp_origin(server: Server, sid: str, values: list[int]) -> int | None:
    """The video sender's RTP timestamp origin: the recorded draw that is none of its SSRCs."""
    if server.app is None or sid not in server.app[STATE].sessions:
        return None
    senders = [s for s in server.app[STATE].sessions[sid].pc.getSenders() if s.kind == "video"]
    if len(senders) != 1:
        return None
    candidates = [v for v in values if v not in sender_ssrcs(senders[0])]
    return candidates[0] if len(candidates) == 1 else None


async def clock_offset_ms(page: Any) -> tuple[float, float]:
    """(page ``performance.now()`` - ``time.monotonic()``, in ms; the round trip it was measured in)."""
    best: tuple[float, float] | None = None
    for _ in range(9):
        t0 = time.monotonic()
        now = await page.evaluate("performance.now()")
        t1 = time.monotonic()
        sample = (now - (t0 + t1) / 2 * 1000, (t1 - t0) * 1000)
        if best is None or sample[1] < best[1]:
            best = sample
    assert best is not None
    return best


def page_stats(r: dict[str, Any] | None) -> dict[str, Any]:
    """The inbound-rtp video record of ``getStats()``, with its means per frame in ms."""
    if not r:
        return {}
    keys = ("framesDecoded", "framesReceived", "framesDropped", "framesPerSecond", "freezeCount", "jitter")
    out = {k: r.get(k) for k in keys}
    decoded, emitted = r.get("framesDecoded") or 0, r.get("jitterBufferEmittedCount") or 0
    out["jitter_buffer_ms"] = round(1000 * r.get("jitterBufferDelay", 0) / emitted, 2) if emitted else None
    out["decode_ms"] = round(1000 * r.get("totalDecodeTime", 0) / decoded, 2) if decoded else None
    out["processing_ms"] = round(1000 * r.get("totalProcessingDelay", 0) / decoded, 2) if decoded else None
    return out


def browser_latency(
    frames: list[list[Any]], offset_ms: float, origin: int | None, sent: dict[int, tuple[float, float]]
) -> dict[str, Any]:
    """(presented, ms since chunk scheduled) per presented frame matched by RTP timestamp, and its parts."""
    latency, server, network, render = [], [], [], []
    for presented, received, rtp, _, _ in frames:
        rec = None if origin is None or rtp is None else sent.get((rtp - origin) % (1 << 32))
        if rec is None:
            continue
        scheduled, sent_at = rec
        when = (presented - offset_ms) / 1000
        latency.append((when, (when - scheduled) * 1000))
        server.append((sent_at - scheduled) * 1000)
        if received is not None:
            network.append((received - offset_ms) - sent_at * 1000)
            render.append(presented - received)
    parts = {"server_ms": distribution(server), "sent_to_received_ms": distribution(network)}
    return {"latency": latency, "parts": parts | {"received_to_presented_ms": distribution(render)}}


@dataclass
class PageRun:
    """What the page gave: presented frames (page clock, ms), when Start was clicked, its stats."""

    frames: list[list[Any]]  # [presentationTime, receiveTime, rtpTimestamp, presentedFrames, processingDuration]
    start: float
    stats: dict[str, Any] | None
    session_id: str
    offset_ms: float  # page clock - time.monotonic(), ms
    sync_rtt_ms: float
    errors: list[str]


async def run_page(page: Any, base: str, args: argparse.Namespace) -> PageRun:
    """Start the demo page's session (``#mode``, ``#start``), collect ``--seconds`` of presented frames."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(base + "/")
    await page.evaluate(COLLECT_JS, MAX_RECORDS)
    await page.select_option("#mode", args.mode)
    await page.evaluate(START_JS)
    await page.wait_for_function("document.body.dataset.state === 'connected'", timeout=30_000)
    await page.wait_for_function(SPAN_JS, arg=args.seconds * 1000, timeout=(args.seconds + 60) * 1000)
    frames, start = await page.evaluate("[window.__bench.frames, window.__bench.start]")
    stats = await page.evaluate(STATS_JS)
    sid = await page.evaluate("window.demo.sessionId")
    offset, rtt = await clock_offset_ms(page)
    return PageRun(frames, start, stats, sid, offset, rtt, errors)


def page_result(run: PageRun, matched: dict[str, Any], metrics: dict[str, Any], target_ms: float) -> dict[str, Any]:
    """The browser path's numbers from the page's frames, the RTP-matched latency and the server's metrics."""
    trace = Trace((run.start - run.offset_ms) / 1000)
    previous = run.frames[0][3] - 1
    for f in run.frames:
        trace.events.append(((f[0] - run.offset_ms) / 1000, f[3] - previous))
        previous = f[3]
    trace.latency.extend(matched["latency"])
    result = trace.summary(target_ms, "frame")
    stats = page_stats(run.stats)
    session_metrics = metrics.get("sessions", {}).get(run.session_id) or {}
    parts = [
        (session_metrics.get("latency_ms") or {}).get("p50"),
        stats.get("jitter_buffer_ms"),
        stats.get("decode_ms"),
    ]
    result.update(
        latency_source="rtp_match" if matched["latency"] else "none",
        latency_definition=DEFINITIONS["rtp_match"],
        latency_parts=matched["parts"],
        latency_estimate_ms=None if None in parts else round(sum(x for x in parts if x is not None), 1),
        frames_matched=len(matched["latency"]),
        get_stats=stats,
        clock_sync_rtt_ms=round(run.sync_rtt_ms, 3),
        server_metrics=session_metrics,
        page_errors=run.errors,
    )
    return result


async def drive_page(page: Any, server: Server, args: argparse.Namespace, rtp: list[int]) -> dict:
    """The page's run, matched frame by frame against what the server sent."""
    run = await run_page(page, server.base, args)
    _, metrics = await http_json("GET", server.base + "/api/metrics")
    origin = rtp_origin(server, run.session_id, rtp)
    matched = browser_latency(run.frames, run.offset_ms, origin, sent_by_pts(server.sent(run.session_id)))
    return page_result(run, matched, metrics, args.target_ms)


async def browser_session(args: argparse.Namespace) -> dict[str, Any]:
    """Inside the namespace: bring lo up, serve, drive Chromium; the browser path's result."""
    from playwright.async_api import async_playwright

    bring_loopback_up()
    use_ice_addresses(["127.0.0.1"])
    config = load_config(args)
    models = load_models(config, random_weights=args.random_weights)
    in_engine_thread(warm_up, config, models, args.mode)
    with recorded_rtp_origins() as rtp:
        async with local_server(config, models) as server, async_playwright() as p:
            browser = await p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 760})
                result = await drive_page(page, server, args, rtp)
                result["chromium"] = browser.version
            finally:
                await browser.close()
            engine = server.engine()
            if engine is not None:
                result["stages_ms"] = stage_summary(engine)
    return result


def run_browser_path(args: argparse.Namespace) -> dict[str, Any]:
    """This script again, as ``--browser-child``, under ``unshare -n``; its last marked line is the result."""
    cmd = ["unshare", "-n", "--", sys.executable, "-m", "bench.latency", "--browser-child"]
    cmd += ["--config", args.config, "--mode", args.mode, "--seconds", str(args.seconds)]
    cmd += ["--target-ms", str(args.target_ms), "--chromium", args.chromium]
    cmd += ["--random-weights"] if args.random_weights else []
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            cmd += [f"--{name}", str(getattr(args, name))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150 + 3 * args.seconds)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(f"the browser session exited with status {proc.returncode}: {proc.stderr[-2000:]}")
