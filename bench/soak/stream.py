"""One long t2v stream: frames per 1-s window, the gaps between frames, the server's memory as it goes."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from typing import Any

from bench.latency.served import Client
from bench.soak.clients import connect
from bench.soak.server import ServerSpec, serving

STALL_S = 0.5  # a gap between two frames received longer than this is a stall
WINDOW_S = 1.0
RECV_BOUND = 30.0  # one frame may take this long before the stream counts as dead


async def receive_for(client: Client, seconds: float, sink: list[float]) -> None:
    """Append to ``sink`` when each frame comes out of the track, for ``seconds`` after the first one."""
    await asyncio.wait_for(client.track.recv(), RECV_BOUND)
    sink.append(time.monotonic())
    while sink[-1] - sink[0] < seconds:
        await asyncio.wait_for(client.track.recv(), RECV_BOUND)
        sink.append(time.monotonic())


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def per_window(times: list[float], start: float, seconds: float) -> list[int]:
    """Frames in each ``WINDOW_S`` window from ``start`` on, ``seconds`` long in all."""
    counts = [0] * max(1, int(seconds // WINDOW_S))
    for t in times:
        i = int((t - start) // WINDOW_S)
        if 0 <= i < len(counts):
            counts[i] += 1
    return counts


def gap_figures(times: list[float]) -> dict[str, Any]:
    g = gaps(times)
    return {
        "frames": len(times),
        "worst_gap_s": round(max(g), 3) if g else None,
        "median_gap_s": round(statistics.median(g), 4) if g else None,
        "stalls": sum(1 for x in g if x > STALL_S),
    }


async def long_stream(spec: ServerSpec, seconds: float) -> dict[str, Any]:
    """One client receiving for ``seconds``; RSS of the server once a window."""
    async with serving(spec) as served:
        client = await connect(served.base)
        times: list[float] = []
        rss: list[float] = []
        task = asyncio.create_task(receive_for(client, seconds, times))
        try:
            while not task.done() and len(rss) < seconds / WINDOW_S + 120:
                rss.append(served.sample().rss_mib)
                await asyncio.wait({task}, timeout=WINDOW_S)
            await task
        finally:
            task.cancel()
            await client.pc.close()
        counts = per_window(times, times[0], seconds)
        return {
            "seconds": seconds,
            "stall_threshold_s": STALL_S,
            **gap_figures(times),
            "fps": round((len(times) - 1) / (times[-1] - times[0]), 2),
            "frames_per_window": counts,
            "min_window_frames": min(counts),
            "rss_mib": rss,
            "log_errors": served.log_errors(),
        }
