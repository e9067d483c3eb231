"""What every path shares: the statistics, per-stage timers, the engine thread and the event loop."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from pipeline.config import SystemConfig, load_system_config
from pipeline.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("engine", "webrtc", "browser")
PROMPT = "a lighthouse on a cliff at dusk, waves"
CAMERA_FPS = 30  # aiortc's VideoStreamTrack clock: the webrtc client's camera
MAX_RECORDS = 20_000  # per-frame records kept per path (~20 minutes at 16 fps)
EXIT_WORSE, EXIT_FAILED = 1, 2
T = TypeVar("T")


DEFINITIONS = {
    "engine_t2v": "chunk scheduled (entered its window) -> chunk out of Engine.step()",
    "engine_v2v": "input frame submitted (max) or made by the source (realtime) -> the same frame out of step()",
    "frame_id": "client camera frame made -> the same frame (id read from its pixels) received back",
    "pts_match": "chunk scheduled at the server -> frame received by the aiortc client (matched by pts)",
    "server_metrics": "chunk scheduled -> frame sent, the server's percentiles from /api/metrics (no max)",
    "rtp_match": "chunk scheduled at the server -> frame presented by Chromium (matched by RTP timestamp)",
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list, as the server's ``/api/metrics`` computes it."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def distribution(values: list[float]) -> dict[str, Any]:
    """p50/p95/p99/max/mean and the count of ``values``; None everywhere when there are none."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "n": 0}
    qs = {k: round(percentile(values, q), 2) for k, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
    return {**qs, "max": round(max(values), 2), "mean": round(statistics.fmean(values), 2), "n": len(values)}


def steady_fps(events: list[tuple[float, int]]) -> float | None:
    """Frames out after the first output event, divided by the time since it."""
    if len(events) < 2 or events[-1][0] <= events[0][0]:
        return None
    return round(sum(n for _, n in events[1:]) / (events[-1][0] - events[0][0]), 3)


def miss_rate(latency_ms: list[float], target_ms: float) -> float | None:
    """The share of frames later than ``target_ms``."""
    if not latency_ms:
        return None
    return round(sum(1 for x in latency_ms if x > target_ms) / len(latency_ms), 4)


@dataclass
class Trace:
    """What one path put out, bounded: (when, frames) per output event and (when, ms) per frame."""

    start: float  # TTFF's t = 0
    events: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    latency: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))

    def spans(self, seconds: float) -> bool:
        """Whether at least three outputs and ``seconds`` of steady state were seen."""
        return len(self.events) >= 3 and self.events[-1][0] - self.events[0][0] >= seconds

    def summary(self, target_ms: float, period_of: str) -> dict[str, Any]:
        """The path's common numbers, per-frame latency over time included (``series``)."""
        events, lat = list(self.events), [ms for _, ms in self.latency]
        first = events[0][0] if events else self.start
        gaps = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(events)]
        period = distribution(gaps)
        return {
            "ttff_ms": round((first - self.start) * 1000, 1) if events else None,
            "fps": steady_fps(events),
            "frames": sum(n for _, n in events),
            "duration_s": round(events[-1][0] - first, 3) if events else 0.0,
            "period_ms": {"of": period_of, "p50": period["p50"], "p95": period["p95"], "max": period["max"]},
            "latency_ms": distribution(lat),
            "deadline_miss_rate": miss_rate(lat, target_ms),
            "series": {
                "t_s": [round(t - first, 4) for t, _ in self.latency],
                "latency_ms": [round(ms, 2) for _, ms in self.latency],
            },
        }


def stage_summary(engine: Engine) -> dict[str, Any]:
    """ms per call of the engine's phases, from its own timer (``dit``, ``decode``, ``encode``; on a GPU
    timed with CUDA events), and per tick (``tick``: a step that issued a tick)."""
    out = {"tick": distribution([s * 1000 for s in engine.stats.tick_seconds])}
    out.update({name: distribution([s * 1000 for s in engine.timer.seconds(name)]) for name in engine.timer.names()})
    return out


def in_engine_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread of its own, as the server's EngineBridge runs the engine: torch's intra-op
    threading differs between the main thread and others, so the engine alone runs where the server's does."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") as pool:
        return pool.submit(fn, *args).result()


async def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """One request; the status and the JSON body."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.request(method, url, json=body) as r:
        return r.status, await r.json()


def load_config(args: argparse.Namespace) -> SystemConfig:
    return load_system_config(args.config, height=args.height, width=args.width)


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop, as ``streamer serve`` runs the server (asyncio's loop without it)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
