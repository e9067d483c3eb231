"""Clients of the server under test: peer processes (``bench.soak.peer``), aiortc clients in this process,
raw offers, and a watcher of ``/api/health`` while something is going on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.latency.served import Client, open_client
from bench.soak.server import ROOT, Served, parse

READY_SECONDS = 120.0  # a peer process must have imported everything within this


class Peer:
    """A ``bench.soak.peer`` process; started ahead of time, released with :meth:`go`."""

    def __init__(self, proc: asyncio.subprocess.Process, role: str) -> None:
        self.proc = proc
        self.role = role
        self.is_ready = False

    @classmethod
    async def start(cls, role: str, seconds: float, size: int | None = None) -> Peer:
        cmd = [sys.executable, "-m", "bench.soak.peer", role, "--seconds", str(seconds)]
        if size is not None:
            cmd += ["--bytes", str(size)]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return cls(proc, role)

    async def line(self, prefix: str, bound: float) -> str:
        """The rest of the next line that starts with ``prefix`` (other lines are skipped)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + bound
        while True:
            left = deadline - time.monotonic()
            raw = await asyncio.wait_for(self.proc.stdout.readline(), max(0.01, left))
            if not raw:
                raise RuntimeError(f"peer {self.role} ended (exit {await self.proc.wait()}) before {prefix!r}")
            text = raw.decode(errors="replace").strip()
            if text.startswith(prefix):
                return text[len(prefix) :].strip()

    async def go(self, base: str) -> None:
        """Wait until it has imported everything, then let it play its role against ``base``."""
        if not self.is_ready:
            await self.line("ready", READY_SECONDS)
            self.is_ready = True
        await self.tell(f"go {base}")

    async def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def end(self) -> int:
        """SIGKILL (a stopped process too) and reap it."""
        self.signal(signal.SIGKILL)
        return await self.proc.wait()


@contextlib.asynccontextmanager
async def peers() -> AsyncIterator[list[Peer]]:
    """A list to put peers in; every one is killed and reaped on the way out."""
    started: list[Peer] = []
    try:
        yield started
    finally:
        for p in started:
            await p.end()


async def connect(base: str, bound: float = 30.0) -> Client:
    """A connected t2v client in this process (the caller closes its pc)."""
    return await asyncio.wait_for(open_client(base, "t2v", None), bound)


async def frames(client: Client, n: int, bound: float = 30.0) -> list[float]:
    """When each of the next ``n`` frames came out of the client's track."""
    out = []
    for _ in range(n):
        await asyncio.wait_for(client.track.recv(), bound)
        out.append(time.monotonic())
    return out


async def real_offer_works(served: Served, bound: float = 30.0) -> dict[str, Any]:
    """Whether a real client can connect and get 3 frames now, and how long that took."""
    started = time.monotonic()
    try:
        client = await connect(served.base, bound)
    except Exception as e:
        return {"ok": False, "seconds": round(time.monotonic() - started, 3), "error": f"{type(e).__name__}: {e}"}
    try:
        await frames(client, 3, bound)
        return {"ok": True, "seconds": round(time.monotonic() - started, 3)}
    except Exception as e:
        return {"ok": False, "seconds": round(time.monotonic() - started, 3), "error": f"{type(e).__name__}: {e}"}
    finally:
        await client.pc.close()


async def post_offer(
    http: aiohttp.ClientSession, base: str, sdp: str, params: str = '{"prompt": "soak"}'
) -> tuple[int, Any]:
    """POST a t2v offer with ``sdp`` and ``params`` (JSON text, sent as written); the status and the body
    (JSON, else its text)."""
    offer = f'{{"sdp": {json.dumps(sdp)}, "type": "offer", "params": {params}, "mode": "t2v"}}'
    headers = {"Content-Type": "application/json"}
    async with http.post(base + "/api/offer", data=offer.encode(), headers=headers) as r:
        return r.status, parse(await r.text())


@dataclass
class HealthWatch:
    """``/api/health`` every ``period`` s while a block runs: what it said and how long it took."""

    served: Served
    period: float = 0.5
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and len(self.seen) < 10_000:
            t0 = time.monotonic()
            h = await self.served.health()
            self.seen.append(
                {"status": h["status"], "free_slots": h.get("free_slots"), "ms": (time.monotonic() - t0) * 1e3}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.period)

    def summary(self) -> dict[str, Any]:
        statuses = sorted({s["status"] for s in self.seen})
        full = [s["status"] for s in self.seen if s["free_slots"] == 0]
        return {
            "polls": len(self.seen),
            "statuses": statuses,
            "status_when_full": sorted(set(full)),
            "unanswered": sum(1 for s in self.seen if s["status"] == "unreachable"),
            "max_ms": round(max((s["ms"] for s in self.seen), default=0.0), 1),
        }


@contextlib.asynccontextmanager
async def watching_health(served: Served) -> AsyncIterator[HealthWatch]:
    watch = HealthWatch(served)
    stop = asyncio.Event()
    task = asyncio.create_task(watch.run(stop))
    try:
        yield watch
    finally:
        stop.set()
        await task
