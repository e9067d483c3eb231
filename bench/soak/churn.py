"""Session churn: cycles of a clean close, a SIGKILLed client and a dropped peer.

A cycle connects three clients side by side: one in this process that closes cleanly, and two peer
processes (``bench.soak.peer receive``), one SIGKILLed after it received frames (no goodbye) and one
stopped with SIGSTOP (its network just stops: no consent answers, no DTLS close) and killed only
once the server has freed its slot. All three end at the same moment, and the cycle waits until each
session has left ``/api/metrics`` (the three waits overlap, so a cycle takes as long as the slowest).

Per cycle: the time from each client's end (its ``close()``, its SIGKILL, its SIGSTOP) until its slot
was free, then the server's RSS, threads and open files. One cycle before the measured ones warms up
(its figures are the start). Peer processes take seconds to import, so
the next cycle's are started while this one runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import statistics
import time
from typing import Any

from bench.latency.served import Client
from bench.soak.clients import Peer, connect, frames, peers
from bench.soak.server import Served, ServerSpec, serving

KINDS = ("clean", "kill", "drop")
FREE_BOUND = 40.0  # seconds a cycle waits for its slots; the guarantee is 15 s
PEER_SECONDS = 300.0  # a peer process ends by itself after this, whatever happens


async def connected(served: Served) -> Client:
    client = await connect(served.base)
    await frames(client, 3)
    return client


async def cycle(served: Served, kill: Peer, drop: Peer) -> dict[str, Any]:
    """One cycle with the two (started) peers: each kind's time to free, then the server's figures."""
    t0 = time.monotonic()
    await kill.go(served.base)
    await drop.go(served.base)
    client, kill_sid, drop_sid = await asyncio.gather(connected(served), kill.line("sid", 60), drop.line("sid", 60))
    ended = {}
    kill.signal(signal.SIGKILL)
    ended[kill_sid] = time.monotonic()
    drop.signal(signal.SIGSTOP)
    ended[drop_sid] = time.monotonic()
    ended[client.session_id] = time.monotonic()
    await client.pc.close()
    connect_s = round(min(ended.values()) - t0, 3)
    waits = [served.wait_gone({sid}, since, FREE_BOUND) for sid, since in ended.items()]
    gone = {k: v for d in await asyncio.gather(*waits) for k, v in d.items()}
    await drop.end()  # killed only now, after the server gave up on it
    await kill.end()
    free = {"kill": gone[kill_sid], "drop": gone[drop_sid], "clean": gone[client.session_id]}
    return {"connected_s": connect_s, "free_s": free} | dataclasses.asdict(served.sample())


async def churn(spec: ServerSpec, cycles: int) -> dict[str, Any]:
    """``cycles`` cycles; the figures and every cycle's row."""
    async with peers() as started:

        async def two() -> tuple[Peer, Peer]:
            pair = (await Peer.start("receive", PEER_SECONDS), await Peer.start("receive", PEER_SECONDS))
            started.extend(pair)
            return pair

        spare = await two()  # they import while the server starts
        async with serving(spec) as served:
            rows: list[dict[str, Any]] = []
            for i in range(-1, cycles):  # cycle -1 warms up: the server's one-time allocations are not growth
                now, spare = spare, (await two() if i + 1 < cycles else spare)  # the next cycle's import meanwhile
                rows.append({"cycle": i, **await cycle(served, *now)})
            return figures(rows[0], rows[1:]) | {"log_errors": served.log_errors()}


def slope_per_100(ys: list[float]) -> float | None:
    """Least-squares slope of ``ys`` against the cycle number, per 100 cycles."""
    if len(ys) < 2:
        return None
    return round(statistics.linear_regression(range(len(ys)), ys).slope * 100, 3)


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def figures(warm_up: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary; ``warm_up`` is the row of the cycle before the measured ones (the start). RSS moves
    by tens of MiB from one cycle to the next (the allocator keeps freed memory for a while), so growth
    is the median of the last third of the cycles less the start, and the slope is given over the second
    half of the cycles too (a plateau reached early shows there as ~0)."""
    start = warm_up
    by_kind = {}
    for kind in KINDS:
        times = [r["free_s"][kind] for r in rows if r["free_s"][kind] is not None]
        by_kind[kind] = {"max_s": max(times, default=None), "median_s": median(times)}
    freed = [t for r in rows for t in r["free_s"].values() if t is not None]
    rss = [r["rss_mib"] for r in rows]
    tail = rss[len(rss) - max(1, len(rss) // 3) :]
    last = rows[-1]
    return {
        "cycles": len(rows),
        "clients": 3 * len(rows),
        "not_freed": 3 * len(rows) - len(freed),
        "free_bound_s": FREE_BOUND,
        "max_free_s": max(freed, default=None),
        "median_free_s": median(freed),
        "by_kind": by_kind,
        "rss_mib": {"start": start["rss_mib"], "last": last["rss_mib"], "max": max(rss), "tail_median": median(tail)},
        "rss_growth_mib": round(statistics.median(tail) - start["rss_mib"], 2),
        "rss_slope_mib_per_100_cycles": slope_per_100(rss),
        "rss_slope_second_half_mib_per_100_cycles": slope_per_100(rss[len(rss) // 2 :]),
        "warm_up": warm_up,
        "threads": {"start": start["threads"], "last": last["threads"], "max": max(r["threads"] for r in rows)},
        "fds": {"start": start["fds"], "last": last["fds"], "max": max(r["fds"] for r in rows)},
        "rows": rows,
    }
