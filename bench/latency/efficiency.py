"""System efficiency: what the served path delivers ÷ what the engine alone does, measured side by side.

t2v: frames/s through the whole served path (engine thread, bridge, reorder, track, VP8, RTP, the aiortc
client's decoder, in this process) with the track's real-time pacing off, ÷ frames/s of the engine alone
(``step()`` in a loop on a thread, the pipeline kept full). On a shared machine the speed of the CPU
itself moves by 10-25 % from one ten-second window to the next, more than serving costs. So the two are
measured in short windows taken in turn (engine, served, engine, served, ...) and ``efficiency`` is the
median of the per-round ratios. The process CPU time per frame on each side is kept too: what serving
costs per frame, whatever the machine's speed at the time.

v2v is paced by its input (a camera), so there it is the paced served FPS ÷ min(engine FPS, the model's
fps), from the paths themselves.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.latency.common import PROMPT, in_engine_thread, run_async
from bench.latency.served import local_server, open_client
from pipeline.config import SystemConfig
from pipeline.engine import Engine
from pipeline.models.loader import Models

WARM_FRAMES = 8  # served: frames let through before a window starts (the pipeline fills, the encoder settles)


@dataclass(frozen=True)
class Window:
    fps: float
    frames: int
    seconds: float
    cpu_ms_per_frame: float  # user + system time of this whole process (every thread) per frame


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Meter:
    """Frames counted over a window of wall time, with the process's CPU time."""

    def __init__(self) -> None:
        self.t0, self.cpu0, self.frames = time.monotonic(), cpu_seconds(), 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def window(self) -> Window:
        seconds, cpu = self.elapsed(), cpu_seconds() - self.cpu0
        return Window(
            fps=round(self.frames / seconds, 3),
            frames=self.frames,
            seconds=round(seconds, 3),
            cpu_ms_per_frame=round(1000 * cpu / max(1, self.frames), 2),
        )


def engine_window(config: SystemConfig, models: Models, seconds: float) -> Window:
    """The engine alone, one t2v session, chunks asked for ahead; counted after the pipeline is full."""
    engine = Engine(config, models, max_input_chunks=1)
    sid = engine.open_session({"prompt": PROMPT, "seed": 0}, "t2v")
    engine.request(sid, engine.pipeline_depth + 2)
    for _ in range(engine.pipeline_depth + 2):
        engine.request(sid, len(engine.step()))
    meter = Meter()
    while meter.elapsed() < seconds:
        out = engine.step()
        engine.request(sid, len(out))
        meter.frames += sum(c.num_frames for c in out)
    engine.close_session(sid)
    return meter.window()


async def served_window(config: SystemConfig, models: Models, seconds: float) -> Window:
    """A fresh server with pacing off and one aiortc t2v client; frames out of the client's track."""
    async with local_server(config, models, pace=False) as server:
        client = await open_client(server.base, "t2v", None)
        try:
            for _ in range(WARM_FRAMES):
                await client.track.recv()
            meter = Meter()
            while meter.elapsed() < seconds:
                await client.track.recv()
                meter.frames += 1
            return meter.window()
        finally:
            await client.pc.close()


def measure_efficiency(config: SystemConfig, models: Models, rounds: int, seconds: float) -> dict[str, Any]:
    """``rounds`` × (engine window, served window), each ``seconds`` long; the ratios and their median."""
    rows = []
    for r in range(rounds):
        alone = in_engine_thread(engine_window, config, models, seconds)
        served = run_async(served_window(config, models, seconds))
        ratio = round(served.fps / alone.fps, 4)
        rows.append({"engine": asdict(alone), "served": asdict(served), "ratio": ratio})
        print(
            f"bench.latency: efficiency round {r + 1}/{rounds}: engine {alone.fps:.2f} fps, "
            f"served {served.fps:.2f} fps, ratio {ratio:.3f}",
            file=sys.stderr,
            flush=True,
        )

    def median(side: str, key: str) -> float:
        return round(statistics.median(row[side][key] for row in rows), 3)

    return {
        "efficiency": round(statistics.median(row["ratio"] for row in rows), 4),
        "engine_fps": median("engine", "fps"),
        "served_fps": median("served", "fps"),
        "cpu_ms_per_frame": {side: median(side, "cpu_ms_per_frame") for side in ("engine", "served")},
        "window_s": seconds,
        "rounds": rows,
    }


def summary(paths: dict[str, Any], measured: dict[str, Any] | None, fps: int) -> dict[str, Any]:
    """The report's top-level efficiency fields. ``efficiency_capped`` (every mode): the paced served FPS ÷
    min(engine FPS, the model's fps), since the server never serves faster than real time."""
    served, alone = paths.get("webrtc", {}).get("fps"), paths.get("engine", {}).get("fps")
    capped = round(served / min(alone, fps), 4) if served and alone else None
    if measured is not None:
        return {
            "efficiency": measured["efficiency"],
            "efficiency_capped": capped,
            "efficiency_definition": "median over rounds of served throughput (pacing off) / engine-alone fps",
            "efficiency_detail": measured,
        }
    definition = f"served fps / min(engine-alone fps, {fps} fps real time)" if capped is not None else None
    return {"efficiency": capped, "efficiency_capped": capped, "efficiency_definition": definition}
