"""System efficiency: what the served path delivers ÷ what the engine alone does, measured side by side.

t2v: frames/s through the whole served path (engine thread, bridge, reorder, track, VP8, RTP, to an aiortc
client in a process of its own, as a viewer elsewhere) with the track's real-time pacing off, ÷ frames/s
of the engine alone (``step()`` in a loop on a thread, the pipeline kept full). The same with the client
in this process (sharing the server's GIL and event loop) is measured too: ``efficiency_inline_client``.

On a shared machine the speed of the CPU itself moves by 10-25 % from one ten-second window to the next,
more than serving costs. So they are measured in short windows taken in turn (engine, served, served,
engine, ...) and each efficiency is the median of the per-round ratios. The CPU time per frame of this
process (the server's) is kept for each window too: what serving costs per frame, whatever the machine's
speed at the time.

v2v is paced by its input (a camera), so there it is the paced served FPS ÷ min(engine FPS, the model's
fps), from the paths themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from asyncio.subprocess import PIPE
from dataclasses import asdict, dataclass
from typing import Any

from bench.latency.common import PROMPT, ROOT, in_engine_thread, run_async
from bench.latency.served import Server, local_server, open_client
from pipeline.commands import Close, Open
from pipeline.config import SystemConfig
from pipeline.engine import Engine
from pipeline.feeder import Feeder
from pipeline.models.loader import Models
from pipeline.types import UserParams
from streamer.app import STATE

CLIENTS = ("process", "inline")


def warm_frames(config: SystemConfig) -> int:
    """Frames a served window lets through before it starts: a t2v session starts with few credits and
    gains one per chunk that came late (``streamer.bridge.Credits``), so its pipeline is full only after
    about ``steps`` chunks, and full ticks only ``steps`` ticks later; the engine-alone window starts full."""
    return config.frames_for_chunk(first=False) * (2 * config.steps + 2)


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
    try:
        feeder = Feeder(engine)
        sid = feeder.open(Open(UserParams(prompt=PROMPT, seed=0)), ahead=engine.pipeline_depth + 2).session_id
        while engine.stats.ticks < engine.pipeline_depth + 2:
            feeder.step()
        meter = Meter()
        while meter.elapsed() < seconds:
            meter.frames += sum(c.num_frames for c in feeder.step().chunks)
        feeder.apply(Close(sid))
    finally:
        engine.close()
    return meter.window()


async def served_window(config: SystemConfig, models: Models, seconds: float, client: str) -> Window:
    """A fresh server with pacing off and one aiortc t2v client, ``process`` (its own process) or ``inline``
    (in this one); frames out of the client's track."""
    async with local_server(config, models, pace=False) as server:
        measure = inline_client if client == "inline" else client_process
        return await measure(server, seconds, warm_frames(config))


async def inline_client(server: Server, seconds: float, warm: int) -> Window:
    client = await asyncio.wait_for(open_client(server.base, "t2v", None), 30)
    try:
        for _ in range(warm):
            await asyncio.wait_for(client.track.recv(), 60)
        meter = Meter()
        while meter.elapsed() < seconds:
            await asyncio.wait_for(client.track.recv(), 60)
            meter.frames += 1
        return meter.window()
    finally:
        await client.pc.close()


async def client_process(server: Server, seconds: float, warm: int) -> Window:
    """The client's frames/s; CPU per frame of this (the server's) process over a window of the same
    length, frames counted as the server's track sent them."""
    cmd = [sys.executable, "-m", "bench.latency.client_process", server.base, str(seconds), str(warm)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=PIPE, stderr=PIPE)
    try:
        sent = await asyncio.wait_for(server_window(server, seconds, warm), 120)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the client process exited with status {proc.returncode}: {err.decode()[-2000:]}")
    seen = json.loads(out.decode().splitlines()[-1])
    return Window(seen["fps"], seen["frames"], seen["seconds"], sent.cpu_ms_per_frame)


async def server_window(server: Server, seconds: float, warm: int) -> Window:
    """Frames the server's one session sent over ``seconds``, after its first ``warm``, and its CPU."""

    def sent() -> int:
        sessions = list(server.app[STATE].sessions.values()) if server.app is not None else []
        return sessions[0].metrics.frames_out if sessions else 0

    while sent() < warm:
        await asyncio.sleep(0.01)
    meter, first = Meter(), sent()
    while meter.elapsed() < seconds:
        await asyncio.sleep(0.01)
    meter.frames = sent() - first
    return meter.window()


def measure_efficiency(config: SystemConfig, models: Models, rounds: int, seconds: float) -> dict[str, Any]:
    """``rounds`` × (engine alone, served to a client process, served to an inline client), each window
    ``seconds`` long; the ratios to the engine alone of the same round, and their medians.

    ``efficiency`` is the client-process one (a viewer runs elsewhere); the inline client shows what a
    client in the server's own process, sharing its GIL, costs on top."""
    for client in CLIENTS:  # not counted: the first served session of a run pays one-off costs
        run_async(served_window(config, models, 1.0, client))
    rows = []
    for r in range(rounds):
        alone = in_engine_thread(engine_window, config, models, seconds)
        row: dict[str, Any] = {"engine": asdict(alone)}
        for client in CLIENTS:
            served = run_async(served_window(config, models, seconds, client))
            row[client] = asdict(served) | {"ratio": round(served.fps / alone.fps, 4)}
        rows.append(row)
        print(
            f"bench.latency: efficiency round {r + 1}/{rounds}: engine {alone.fps:.2f} fps; served "
            + ", ".join(f"{c} client {row[c]['fps']:.2f} fps (ratio {row[c]['ratio']:.3f})" for c in CLIENTS),
            file=sys.stderr,
            flush=True,
        )

    def median(side: str, key: str) -> float:
        return round(statistics.median(row[side][key] for row in rows), 4)

    return {
        "efficiency": median("process", "ratio"),
        "efficiency_inline_client": median("inline", "ratio"),
        "fps": {side: median(side, "fps") for side in ("engine", *CLIENTS)},
        "cpu_ms_per_frame": {side: median(side, "cpu_ms_per_frame") for side in ("engine", *CLIENTS)},
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
            "efficiency_definition": "median over rounds of served throughput (pacing off, client process) "
            "/ engine-alone fps",
            "efficiency_detail": measured,
        }
    definition = f"served fps / min(engine-alone fps, {fps} fps real time)" if capped is not None else None
    return {"efficiency": capped, "efficiency_capped": capped, "efficiency_definition": definition}
