"""The server under test: ``python -m streamer serve`` in a process of its own, watched from outside.

Its memory, threads and open files are read with psutil on its pid, so nothing the clients do in the
harness's process counts against it; readiness, free slots and sessions come from its own API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 120.0  # the server must answer /api/health within this after it is started
STOP_SECONDS = 20.0  # SIGINT, then SIGKILL after this
POLL_SECONDS = 0.1  # how often a wait polls the server


@dataclass(frozen=True)
class ServerSpec:
    """How the server under test is started (the same for every scenario of a run)."""

    root: Path  # the checkout it runs from (its working directory and first import path)
    config: str  # system config, relative to root
    size: tuple[int, int] | None  # (height, width) instead of the config's (a copy of it is served)
    max_sessions: int
    consent_interval: int  # seconds between ICE consent checks
    connect_timeout: float | None  # --connect-timeout; None: the server has no such flag

    @property
    def connect_deadline(self) -> float:
        """Seconds the server gives a client to connect: the flag's value, else the documented default."""
        return 10.0 if self.connect_timeout is None else self.connect_timeout

    def config_file(self, folder: Path) -> str:
        """The config to serve: the given one, or a copy in ``folder`` with the frame size changed
        (``streamer serve`` has no --height/--width)."""
        if self.size is None:
            return self.config
        data = yaml.safe_load((self.root / self.config).read_text())
        data["height"], data["width"] = self.size
        path = folder / f"{Path(self.config).stem}-{self.size[0]}x{self.size[1]}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)


def serve_flags(root: Path) -> str:
    """``streamer serve --help`` of the checkout at ``root``: which flags it has."""
    cmd = [sys.executable, "-m", "streamer", "serve", "--help"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, env=server_env(root)).stdout


def server_env(root: Path) -> dict[str, str]:
    """The environment of a process that runs ``root``'s code, not this checkout's (``-m`` looks in cwd)."""
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Sample:
    rss_mib: float
    threads: int
    fds: int


class Served:
    """A running server: its URL, its process and one HTTP session for polling it."""

    def __init__(self, spec: ServerSpec, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.spec = spec
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.proc = proc
        self.ps = psutil.Process(proc.pid)
        self.log = log
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    def sample(self) -> Sample:
        with self.ps.oneshot():
            return Sample(round(self.ps.memory_info().rss / 2**20, 2), self.ps.num_threads(), self.ps.num_fds())

    async def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``: the status and the JSON body (its text if it is not JSON)."""
        async with self.http.get(self.base + path) as r:
            text = await r.text()
        return r.status, parse(text)

    async def health(self) -> dict[str, Any]:
        """``/api/health`` with ``free_slots`` (worked out where the server does not report it) and
        ``http_status``; ``{"status": "unreachable"}`` when it does not answer."""
        try:
            status, body = await self.get("/api/health")
        except (aiohttp.ClientError, TimeoutError) as e:
            return {"status": "unreachable", "http_status": None, "error": type(e).__name__}
        if not isinstance(body, dict):
            return {"status": "not json", "http_status": status}
        body.setdefault("free_slots", body.get("max_sessions", 0) - body.get("sessions", 0))
        return body | {"http_status": status}

    async def session_ids(self) -> set[str]:
        _, body = await self.get("/api/metrics")
        return set(body.get("sessions", {})) if isinstance(body, dict) else set()

    async def wait_gone(self, sids: set[str], since: float, bound: float) -> dict[str, float | None]:
        """Seconds from ``since`` until each session of ``sids`` left ``/api/metrics``; None for those
        still there ``bound`` seconds after ``since``."""
        gone: dict[str, float | None] = dict.fromkeys(sids)
        while time.monotonic() < since + bound:
            now = await self.session_ids()
            for sid in sids - now:
                if gone[sid] is None:
                    gone[sid] = round(time.monotonic() - since, 3)
            if all(v is not None for v in gone.values()):
                break
            await asyncio.sleep(POLL_SECONDS)
        return gone

    async def wait_idle(self, bound: float) -> bool:
        """Whether every slot is free within ``bound`` seconds."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if (await self.health()).get("sessions") == 0:
                return True
            await asyncio.sleep(POLL_SECONDS)
        return False

    def log_errors(self) -> int:
        """Tracebacks and ERROR lines in the server's log so far (a handler that failed, a task that died)."""
        text = self.log.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if line.startswith("Traceback") or " ERROR " in line)


def parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (``streamer serve`` refuses port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(spec: ServerSpec, log_dir: Path | None = None) -> AsyncIterator[Served]:
    """Start the server on 127.0.0.1 and a free port, wait until ``/api/health`` answers, stop it after."""
    port = free_port()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    cmd = [sys.executable, "-m", "streamer", "serve", "--config", spec.config_file(log_dir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--max-sessions", str(spec.max_sessions)]
    cmd += ["--consent-interval", str(spec.consent_interval)]
    if spec.connect_timeout is not None:
        cmd += ["--connect-timeout", str(spec.connect_timeout)]
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=spec.root, env=server_env(spec.root), stdout=out, stderr=subprocess.STDOUT)
    served = Served(spec, port, proc, log)
    try:
        deadline = time.monotonic() + START_SECONDS
        while (await served.health()).get("http_status") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server did not start (exit {proc.poll()}): {tail}")
            await asyncio.sleep(0.2)
        yield served
    finally:
        await served.http.close()
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT (the server closes every session and stops its engine), SIGKILL if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
