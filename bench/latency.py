"""Latency benchmark: the engine alone, the served WebRTC path and a real browser, in one run.

    python -m bench.latency --config configs/tiny.yaml --mode t2v --seconds 10 --json out.json --plot out.png
    python -m bench.latency --config configs/passthrough.yaml --mode v2v --seconds 10 --json out.json
    python -m bench.latency --from-json new.json --compare old.json     # regression check only, no measuring

Paths, measured one after the other in this order (``--paths``), each for ``--seconds`` of steady state
(counted from its first frame out), one session, the same config and the same model weights:

- ``engine``: the engine alone in this process, ``step()`` in a loop (the ceiling), on a thread of its own as
  the server's engine runs (torch's intra-op threads behave differently on the main thread: on a busy
  2-core machine the main thread ran the same ticks up to 8x slower). t2v: chunks are asked for ahead
  (the pipeline stays full). v2v: numbered frames (``bench.frameid``) from a synthetic source
  of the model's fps; ``--engine-source max`` (default) makes them the moment the engine wants input,
  so neither throughput nor latency waits for a camera; ``realtime`` makes frame k at t0 + k/fps and
  the newest waiting frames win, as the server's chunker does. Stage times: the DiT executor and the
  VAE decode/encode, timed per call (``StageTimes``), and the whole tick (``engine.stats``).
- ``webrtc``: a server made with ``create_app`` in this process on 127.0.0.1, port 0 (or ``--server
  URL``), and an aiortc client on loopback with an empty ICE server list. t2v receives; v2v sends
  numbered frames at 30 fps (aiortc's ``VideoStreamTrack`` clock) and reads the ids back.
- ``browser``: Debian's Chromium, headless, driven by Playwright on the demo page, in a subprocess under
  ``unshare -n`` (a network namespace with only ``lo``) that also runs its own server: the browser
  cannot reach anything else, so ``--server`` does not apply to it. Needs root, ``unshare``, Chromium
  and Playwright; without them the path is skipped with the reason (an error when asked for by name).

How each number is measured (per path; times are ``time.monotonic()`` unless said otherwise):

- ``ttff_ms``: engine: ``open_session`` -> first chunk out of ``step()``; webrtc: offer POSTed -> first
  frame out of the client track's ``recv()``; browser: ``#start`` clicked -> first frame presented
  (``requestVideoFrameCallback``'s ``presentationTime``), both on the page's clock.
- ``fps``: frames out after the first output / time since the first output (engine: chunks out of
  ``step()``; webrtc: frames received; browser: ``presentedFrames`` counted by Chromium).
- ``period_ms``: time between consecutive outputs (engine: chunks; webrtc: frames received; browser:
  frames presented), p50/p95/max.
- ``latency_ms`` (p50/p95/p99/max, nearest rank as ``/api/metrics``) and ``latency_source``:
  - engine t2v: chunk scheduled (``scheduled_at``) -> chunk out; engine v2v: input frame submitted
    (max) or made by the source (realtime) -> the same frame out (frame k out is input frame k).
  - ``frame_id`` (webrtc v2v where frames survive the model, e.g. ``configs/passthrough.yaml``): the
    client's camera frame made -> the same frame, id read from its pixels, received back. Exact.
  - ``pts_match`` (webrtc t2v, and v2v where the model does not keep the ids, e.g. ``tiny``): chunk
    scheduled at the in-process server -> frame received by the client, frames matched by pts (the
    server's sends are recorded per frame by wrapping ``Session._sent``).
  - ``server_metrics`` (``--server URL`` when ids are not readable): the server's own p50/p95/p99 of
    chunk scheduled -> frame sent, from ``/api/metrics``; no per-frame data, no max.
  - ``rtp_match`` (browser): chunk scheduled at the server -> frame presented by Chromium, matched by RTP
    timestamp (the sender's random RTP origin is recorded), page clock mapped onto ``time.monotonic()``
    by the sample of ``performance.now()`` with the shortest round trip. ``latency_estimate_ms`` adds
    the server's p50 to ``getStats()``'s mean jitter-buffer delay and decode time instead.
- ``deadline_miss_rate``: the share of frames whose latency is over ``--target-ms``.
- ``latency_parts`` (webrtc, browser): where the time goes. aiortc's jitter buffer hands a frame on only
  when the next frame's first packet arrives, so the webrtc path also times each frame's last packet
  (``latency_to_arrival_ms``, ``ttff_arrival_ms``) and the hold (``client_jitter_buffer_ms``); with an
  in-process server, ``server_ms`` (chunk scheduled -> frame sent) and ``server_send_period_ms``.
  Browser: ``server_ms``, ``sent_to_received_ms`` and ``received_to_presented_ms`` (rVFC receiveTime).
- ``stages_ms``: ms per call of the DiT executor, VAE decode/encode and whole ticks (the server's engine
  for webrtc and browser, which run the same StageTimes wrappers).

Top level: the webrtc path's numbers (what a client is served), ``efficiency`` = served FPS / engine-alone
FPS (same config, same run) and ``efficiency_capped`` = served FPS / min(engine FPS, the model's fps): the
server paces by pts, so it never serves faster than real time. Exit status: 0; 1 when ``--compare``
finds something worse beyond ``--tolerance``; 2 for bad arguments, or a path that could not run or failed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import aiohttp
import av
import numpy as np
import torch
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from bench import frameid
from bench.browser import CHROMIUM_ARGS, bring_loopback_up
from bench.engine import machine as base_machine
from pipeline.config import SystemConfig, load_system_config
from pipeline.engine import Engine
from pipeline.models.loader import Models, load_models
from pipeline.types import PTS_CLOCK, DecodedChunk
from streamer.app import STATE, ServerOptions, create_app
from streamer.session import Session
from streamer.signaling import ice_addresses_for, use_ice_addresses

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
PATHS = ("engine", "webrtc", "browser")
PROMPT = "a lighthouse on a cliff at dusk, waves"
CHROMIUM = "/usr/bin/chromium"
CAMERA_FPS = 30  # aiortc's VideoStreamTrack clock: the webrtc client's camera
MAX_RECORDS = 20_000  # per-frame records kept per path (~20 minutes at 16 fps)
RESULT_MARKER = "BENCH_LATENCY_BROWSER_RESULT "
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


# ---- statistics -----------------------------------------------------------------------------------


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


# ---- stage timers ---------------------------------------------------------------------------------


class StageTimes:
    """Wall time per call of the engine's stages: the DiT executor and the VAE's decode and encode."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, deque[float]] = {
            name: deque(maxlen=MAX_RECORDS) for name in ("dit", "vae_decode", "vae_encode")
        }

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed into ``name``, synchronising a GPU first (as bench.engine's TimedExecutor)."""
        sink, device = self.seconds[name], self.device

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sink.append(time.perf_counter() - t0)
            return out

        return timed

    def summary(self, tick_seconds: Iterable[float]) -> dict[str, Any]:
        """ms per call of each stage seen, and per whole tick (schedule, DiT, update, decode)."""
        out = {"tick": distribution([s * 1000 for s in tick_seconds])}
        out.update({name: distribution([s * 1000 for s in v]) for name, v in self.seconds.items() if v})
        return out


class _Timed:
    """A proxy that times some methods of ``inner`` and passes everything else through."""

    def __init__(self, inner: Any, stages: StageTimes, methods: dict[str, str]) -> None:
        self._inner = inner
        for method, stage in methods.items():
            setattr(self, method, stages.wrap(stage, getattr(inner, method)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def timed_models(models: Models, stages: StageTimes) -> Models:
    """The same models (shared weights) with the VAE's decode and encode timed; ``models`` is left as it is."""
    vae = _Timed(models.vae, stages, {"decode": "vae_decode", "encode": "vae_encode"})
    return dataclasses.replace(models, vae=vae)  # type: ignore[arg-type]


def time_executor(engine: Engine, stages: StageTimes) -> None:
    """Time the engine's DiT executor (one call per tick)."""
    engine.executor = _Timed(engine.executor, stages, {"run": "dit"})  # type: ignore[assignment]


# ---- the engine alone -----------------------------------------------------------------------------


class Feeder:
    """v2v input for the engine alone: numbered frames from a synthetic source at the model's fps.

    ``max``: a frame is made the moment the engine wants it (the ceiling: no camera wait). ``realtime``:
    frame k exists from t0 + k/fps on; the newest waiting frames win, as the server's chunker does."""

    def __init__(self, config: SystemConfig, realtime: bool) -> None:
        self.height, self.width, self.fps = config.height, config.width, config.fps
        self.realtime = realtime
        self.t0: float | None = None
        self.made = 0  # source frames made
        self.accepted = 0  # frames the engine took: output frame k is accepted frame k
        self.dropped = 0  # realtime: frames the engine never took (newer ones won)
        self.waiting: deque[tuple[int, float]] = deque(maxlen=4 * config.frames_for_chunk(first=False))
        self.born: dict[int, tuple[int, float]] = {}  # accepted index -> (source index, time); popped on output

    def _capture(self, now: float) -> None:
        assert self.t0 is not None
        due = int((now - self.t0) * self.fps) + 1
        for k in range(self.made, due):
            if len(self.waiting) == self.waiting.maxlen:
                self.dropped += 1
            self.waiting.append((k, self.t0 + k / self.fps))
        self.made = max(self.made, due)

    def _batch(self, engine: Engine, want: int) -> list[tuple[int, float]] | None:
        """The ``want`` frames to submit now, or None to let the engine tick first."""
        now = time.monotonic()
        if not self.realtime:
            batch = [(self.made + i, now) for i in range(want)]
            self.made += want
            return batch
        self._capture(now)
        if len(self.waiting) < want:
            if engine.has_work():
                return None
            assert self.t0 is not None
            time.sleep(max(0.0, self.t0 + (self.made + want - len(self.waiting) - 1) / self.fps - now))
            self._capture(time.monotonic())
        batch = list(self.waiting)[-want:]
        self.dropped += len(self.waiting) - len(batch)
        self.waiting.clear()
        return batch

    def feed(self, engine: Engine, sid: str) -> None:
        """Give the engine the frames it wants now (in real time: wait for them when nothing can run)."""
        if self.t0 is None:
            self.t0 = time.monotonic()
        want = engine.wants_frames(sid)
        batch = self._batch(engine, want) if want else None
        if not batch:
            return
        frames = np.stack([frameid.draw(k, self.height, self.width) for k, _ in batch])
        if engine.submit(sid, frames):
            for k, t in batch:
                self.born[self.accepted] = (k, t)
                self.accepted += 1


def record_chunk(trace: Trace, chunk: DecodedChunk, now: float, feeder: Feeder | None) -> int:
    """One chunk out: its event, each frame's latency; returns how many frames carried their id back."""
    trace.events.append((now, chunk.num_frames))
    matched = 0
    for j in range(chunk.num_frames):
        if feeder is None:
            born = chunk.scheduled_at
        else:
            source_index, born = feeder.born.pop(chunk.envelope.video_frame + j)
            matched += frameid.read(chunk.frames[j]) == source_index % frameid.MAX_ID
        trace.latency.append((now, (now - born) * 1000))
    return matched


def in_engine_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread of its own, as the server's EngineBridge runs the engine: torch's intra-op
    threading differs between the main thread and others, so the engine alone runs where the server's does."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") as pool:
        return pool.submit(fn, *args).result()


def warm_up(config: SystemConfig, models: Models, mode: str) -> float:
    """A throwaway session of ``steps + 3`` ticks, so that first-call costs stay out of the numbers."""
    engine = Engine(config, models, max_input_chunks=1)
    sid = engine.open_session({"prompt": PROMPT}, mode)
    feeder = Feeder(config, realtime=False) if mode == "v2v" else None
    if feeder is None:
        engine.request(sid, config.steps + 3)
    t0 = time.perf_counter()
    for _ in range(config.steps + 3):
        if feeder is not None:
            feeder.feed(engine, sid)
        engine.step()
    return round(time.perf_counter() - t0, 3)


def engine_loop(engine: Engine, sid: str, feeder: Feeder | None, trace: Trace, seconds: float) -> int:
    """``step()`` until ``seconds`` of steady state, feeding (v2v) or asking for chunks (t2v); frames with ids back."""
    deadline = trace.start + 60 + 4 * seconds
    ids = 0
    while not trace.spans(seconds):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine put out {len(trace.events)} chunks before the deadline")
        if feeder is not None:
            feeder.feed(engine, sid)
        out = engine.step()
        now = time.monotonic()
        for chunk in out:
            ids += record_chunk(trace, chunk, now, feeder)
        if feeder is None and out:
            engine.request(sid, len(out))
    return ids


def run_engine_path(config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """The engine alone: one session, ``step()`` in a loop until ``--seconds`` of steady state."""
    stages = StageTimes(models.dit.device)
    engine = Engine(config, timed_models(models, stages), max_input_chunks=1)  # as the live server
    time_executor(engine, stages)
    feeder = Feeder(config, realtime=args.engine_source == "realtime") if args.mode == "v2v" else None
    trace = Trace(time.monotonic())
    sid = engine.open_session({"prompt": PROMPT, "seed": 0}, args.mode)
    if feeder is None:
        engine.request(sid, config.steps + 2)  # enough to keep every slot of the pipeline busy
    ids = engine_loop(engine, sid, feeder, trace, args.seconds)
    engine.close_session(sid)
    result = trace.summary(args.target_ms, "chunk")
    result.update(
        latency_source=f"engine_{args.mode}",
        latency_definition=DEFINITIONS[f"engine_{args.mode}"],
        chunks=len(trace.events),
        stages_ms=stages.summary(engine.stats.tick_seconds),
    )
    if feeder is not None:
        result.update(source=args.engine_source, input_dropped=feeder.dropped, frames_with_their_id=ids)
    return result


# ---- the served path: an aiortc client ------------------------------------------------------------


class SentFrames:
    """Every frame the in-process server's sessions hand to their tracks, recorded per (session, pts)."""

    def __init__(self) -> None:
        self.records: deque[tuple[str, int, int, float, float]] = deque(maxlen=MAX_RECORDS)

    @contextlib.contextmanager
    def installed(self) -> Iterator[SentFrames]:
        """Wrap ``Session._sent`` (the track's callback, bound when a session is made) while inside."""
        original = Session._sent
        records = self.records

        def _sent(session: Session, frame: Any, when: float) -> None:
            original(session, frame, when)
            records.append((session.sid, frame.epoch, frame.pts, frame.ready, when))

        Session._sent = _sent  # type: ignore[method-assign, assignment]
        try:
            yield self
        finally:
            Session._sent = original  # type: ignore[method-assign]

    def by_pts(self, sid: str) -> dict[int, tuple[float, float]]:
        """pts -> (chunk scheduled, frame sent) of the session's frames (epoch 0: the bench never cuts)."""
        return {pts: (ready, sent) for s, epoch, pts, ready, sent in self.records if s == sid and epoch == 0}

    def send_times(self, sid: str) -> list[float]:
        """When the server handed each of the session's frames to its track, in order."""
        return [sent for s, _, _, _, sent in self.records if s == sid]


@dataclass
class Server:
    base: str
    app: web.Application | None  # None: a server elsewhere (--server URL)
    stages: StageTimes | None = None

    def engine(self) -> Engine | None:
        return None if self.app is None else self.app[STATE].bridge.engine  # type: ignore[union-attr]


@contextlib.asynccontextmanager
async def local_server(config: SystemConfig, models: Models, pace: bool = True) -> AsyncIterator[Server]:
    """``create_app`` on 127.0.0.1, a free port, the given models with their stages timed.
    ``pace=False``: tracks send frames as fast as they come (throughput, for efficiency)."""
    stages = StageTimes(models.dit.device)
    app = create_app(config, ServerOptions(pace=pace), timed_models(models, stages))
    runner = web.AppRunner(app)
    await runner.setup()  # starts the engine thread (cleanup_ctx)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        server = Server(f"http://127.0.0.1:{port}", app, stages)
        time_executor(server.engine(), stages)  # type: ignore[arg-type]  # no session yet: the thread idles
        yield server
    finally:
        await runner.cleanup()


class IdCamera(VideoStreamTrack):
    """A camera stand-in at 30 fps whose every frame carries its number in pixels; remembers when each was made."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.n = 0
        self.made_at: dict[int, float] = {}  # id (n mod 2048) -> time made: bounded by the id space

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(frameid.draw(self.n, self.height, self.width), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.made_at[self.n % frameid.MAX_ID] = time.monotonic()
        self.n += 1
        return frame


async def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """One request; the status and the JSON body."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.request(method, url, json=body) as r:
        return r.status, await r.json()


class PacketArrivals:
    """When the last packet (RTP marker) of each video frame reached the client, by RTP timestamp.

    aiortc's jitter buffer hands a frame to the decoder only when the next frame's first packet comes,
    so a frame leaves the client's track one frame interval (or a whole burst's gap) after it arrived;
    this records the arrival itself, by wrapping the receiver's packet handler."""

    def __init__(self) -> None:
        self.first: int | None = None  # RTP timestamp of the first frame: aiortc's receiver maps it to pts 0
        self.times: dict[int, float] = {}

    def attach(self, receiver: Any) -> None:
        original = receiver._handle_rtp_packet

        async def handle(packet: Any, arrival_time_ms: int) -> None:
            if packet.marker:
                self._record(packet.timestamp, time.monotonic())
            await original(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = handle

    def _record(self, timestamp: int, when: float) -> None:
        if self.first is None:
            self.first = timestamp
        self.times.setdefault(timestamp, when)  # a retransmission keeps the first arrival
        if len(self.times) > MAX_RECORDS:
            del self.times[next(iter(self.times))]

    def at(self, pts: int) -> float | None:
        """Arrival of the frame aiortc hands out with ``pts``."""
        return None if self.first is None else self.times.get((self.first + pts) % (1 << 32))


@dataclass
class Client:
    pc: RTCPeerConnection
    track: Any
    session_id: str
    offered_at: float  # when the offer was POSTed
    arrivals: PacketArrivals


def new_peer(camera: IdCamera | None) -> tuple[RTCPeerConnection, PacketArrivals, asyncio.Future[Any]]:
    """An aiortc peer with no ICE servers, recvonly (t2v) or sending ``camera`` (v2v); its packet arrivals
    and the future of the server's track."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("control")
    if camera is None:
        pc.addTransceiver("video", direction="recvonly")
    else:
        pc.addTrack(camera)
    arrivals = PacketArrivals()
    arrivals.attach(pc.getTransceivers()[0].receiver)
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track: Any) -> None:
        if not got.done():
            got.set_result(track)

    return pc, arrivals, got


async def open_client(base: str, mode: str, camera: IdCamera | None) -> Client:
    """Offer, answer, the server's track: a connected client (the caller closes its pc)."""
    pc, arrivals, got = new_peer(camera)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        offered_at = time.monotonic()
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "params": {"prompt": PROMPT}, "mode": mode}
        status, body = await http_json("POST", base + "/api/offer", offer)
        if status != 200:
            raise RuntimeError(f"/api/offer answered {status}: {body}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        track = await asyncio.wait_for(got, 10)
    except BaseException:
        await pc.close()
        raise
    return Client(pc, track, body["session_id"], offered_at, arrivals)


@dataclass(frozen=True)
class Received:
    when: float  # out of the client's track
    arrived: float | None  # its last packet reached the client
    pts: int  # 90 kHz, relative to the first frame received (aiortc's receiver maps the RTP origin to 0)
    frame_id: int | None


async def receive(track: Any, arrivals: PacketArrivals, seconds: float, read_ids: bool) -> list[Received]:
    """Frames from ``track`` until ``seconds`` after the first one (at least three)."""
    out: deque[Received] = deque(maxlen=MAX_RECORDS)
    while len(out) < 3 or out[-1].when - out[0].when < seconds:
        frame = await track.recv()
        now = time.monotonic()
        pts = round(frame.pts * Fraction(frame.time_base) * PTS_CLOCK)
        fid = frameid.read(frame.to_ndarray(format="rgb24")) if read_ids else None
        out.append(Received(now, arrivals.at(pts), pts, fid))
    return list(out)


@dataclass(frozen=True)
class Match:
    frame: Received
    born: float  # the camera made it (frame_id), or its chunk was scheduled (pts_match)
    sent: float | None = None  # the server handed it to its track (pts_match)


def match_frames(
    frames: list[Received], camera: IdCamera | None, sent: dict[int, tuple[float, float]] | None
) -> tuple[str, list[Match]]:
    """The best latency the run allows: frame ids where they survive, else pts matching, else none."""
    if camera is not None:
        by_id = [Match(r, camera.made_at[r.frame_id]) for r in frames if r.frame_id in camera.made_at]
        if len(by_id) >= len(frames) / 2:
            return "frame_id", by_id
    if sent is not None:
        first = min(sent) if sent else 0  # the server's first pts: aiortc's receiver counts from it
        matched = [(r, sent.get(r.pts + first)) for r in frames]
        return "pts_match", [Match(r, rec[0], rec[1]) for r, rec in matched if rec is not None]
    return "server_metrics", []


def latency_parts(matches: list[Match]) -> dict[str, Any]:
    """Where a served frame's time goes: to its arrival at the client, the server's share, aiortc's hold."""
    arrived = [(m, m.frame.arrived) for m in matches if m.frame.arrived is not None]
    parts = {
        "latency_to_arrival_ms": distribution([(t - m.born) * 1000 for m, t in arrived]),
        "client_jitter_buffer_ms": distribution([(m.frame.when - t) * 1000 for m, t in arrived]),
    }
    sent = [(m.born, m.sent, t) for m, t in arrived if m.sent is not None]
    if sent:
        parts["server_ms"] = distribution([(s - born) * 1000 for born, s, _ in sent])
        parts["sent_to_arrival_ms"] = distribution([(t - s) * 1000 for _, s, t in sent])
    return parts


def from_server_metrics(result: dict[str, Any], metrics: dict[str, Any] | None) -> None:
    """No per-frame latency: take the server's own percentiles (no max, no miss rate)."""
    lat = (metrics or {}).get("latency_ms") or {}
    qs = {k: None if lat.get(k) is None else round(lat[k], 2) for k in ("p50", "p95", "p99")}
    result["latency_ms"] = qs | {"max": None, "mean": None, "n": 0}
    result["deadline_miss_rate"] = None


async def run_webrtc(server: Server, config: SystemConfig, sent: SentFrames, args: argparse.Namespace) -> dict:
    """One aiortc session against ``server``: TTFF, FPS, period, latency, the server's metrics."""
    camera = IdCamera(config.height, config.width) if args.mode == "v2v" else None
    client = await asyncio.wait_for(open_client(server.base, args.mode, camera), 30)
    try:
        receiving = receive(client.track, client.arrivals, args.seconds, camera is not None)
        frames = await asyncio.wait_for(receiving, args.seconds + 90)
        _, metrics = await http_json("GET", server.base + "/api/metrics")
    finally:
        await client.pc.close()
    trace = Trace(client.offered_at)
    trace.events.extend((r.when, 1) for r in frames)
    source, matches = match_frames(frames, camera, sent.by_pts(client.session_id) if server.app else None)
    trace.latency.extend((m.frame.when, (m.frame.when - m.born) * 1000) for m in matches)
    result = trace.summary(args.target_ms, "frame")
    session_metrics = metrics.get("sessions", {}).get(client.session_id)
    if source == "server_metrics":
        from_server_metrics(result, session_metrics)
    arrived = [r.arrived for r in frames if r.arrived is not None]
    result.update(
        latency_source=source,
        latency_definition=DEFINITIONS[source],
        frames_matched=len(matches),
        ttff_arrival_ms=round((arrived[0] - client.offered_at) * 1000, 1) if arrived else None,
        latency_parts=latency_parts(matches),
        server=server.base,
        server_metrics=session_metrics,
        server_engine=metrics.get("engine"),
        camera_fps=CAMERA_FPS if camera is not None else None,
    )
    return result | server_side(server, sent, client.session_id)


def server_side(server: Server, sent: SentFrames, sid: str) -> dict[str, Any]:
    """What only an in-process server shows: its stage times and how evenly it sent the frames."""
    engine = server.engine()
    if engine is None or server.stages is None:
        return {}
    sends = sent.send_times(sid)
    return {
        "server_send_period_ms": distribution([(b - a) * 1000 for a, b in itertools.pairwise(sends)]),
        "stages_ms": server.stages.summary(engine.stats.tick_seconds),
    }


async def webrtc_path(config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """The served path, against ``--server`` or a server made here."""
    sent = SentFrames()
    if args.server:
        _, health = await http_json("GET", args.server.rstrip("/") + "/api/health")
        result = await run_webrtc(Server(args.server.rstrip("/"), None), config, sent, args)
        return result | {"server_model": health.get("model")}
    with sent.installed():
        async with local_server(config, models) as server:
            result = await run_webrtc(server, config, sent, args)
    if args.mode == "t2v":
        async with local_server(config, models, pace=False) as server:
            result["throughput_fps"] = await served_throughput(server, args.seconds)
    return result


async def served_throughput(server: Server, seconds: float) -> float:
    """t2v frames/s through the whole served path (engine thread, bridge, reorder, track, VP8, RTP,
    the client's decoder) with the track's real-time pacing off: what the system can serve."""
    client = await asyncio.wait_for(open_client(server.base, "t2v", None), 30)
    try:
        for _ in range(8):  # warm-up: the pipeline fills, the encoder settles
            await asyncio.wait_for(client.track.recv(), 60)
        start, frames = time.monotonic(), 0
        while time.monotonic() - start < max(2.0, seconds / 2):
            await asyncio.wait_for(client.track.recv(), 60)
            frames += 1
        return round(frames / (time.monotonic() - start), 3)
    finally:
        await client.pc.close()


# ---- the browser: Chromium in a namespace with only loopback --------------------------------------

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


@contextlib.contextmanager
def recorded_rtp_origins() -> Iterator[list[int]]:
    """Record aiortc's random RTP numbers (a sender's SSRCs and its timestamp origin) while inside.

    aiortc sends a frame of pts p with RTP timestamp origin + p; the origin is drawn in the sender's RTP
    loop and kept nowhere else, so it is recorded here to match Chromium's frames to the server's."""
    import aiortc.rtcrtpsender as module

    original = module.random32
    values: list[int] = []

    def recording() -> int:
        value = original()
        if len(values) < 64:
            values.append(value)
        return value

    module.random32 = recording
    try:
        yield values
    finally:
        module.random32 = original


def rtp_origin(server: Server, sid: str, values: list[int]) -> int | None:
    """The video sender's RTP timestamp origin: the recorded draw that is none of its SSRCs."""
    if server.app is None or sid not in server.app[STATE].sessions:
        return None
    senders = [s for s in server.app[STATE].sessions[sid].pc.getSenders() if s.kind == "video"]
    if len(senders) != 1:
        return None
    candidates = [v for v in values if v not in (senders[0]._ssrc, senders[0]._rtx_ssrc)]
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


async def drive_page(page: Any, server: Server, args: argparse.Namespace, sent: SentFrames, rtp: list[int]) -> dict:
    """The page's run, matched frame by frame against what the server sent."""
    run = await run_page(page, server.base, args)
    _, metrics = await http_json("GET", server.base + "/api/metrics")
    origin = rtp_origin(server, run.session_id, rtp)
    matched = browser_latency(run.frames, run.offset_ms, origin, sent.by_pts(run.session_id))
    return page_result(run, matched, metrics, args.target_ms)


async def browser_session(args: argparse.Namespace) -> dict[str, Any]:
    """Inside the namespace: bring lo up, serve, drive Chromium; the browser path's result."""
    from playwright.async_api import async_playwright

    bring_loopback_up()
    use_ice_addresses(["127.0.0.1"])
    config = load_config(args)
    models = load_models(config)
    in_engine_thread(warm_up, config, models, args.mode)
    sent = SentFrames()
    with sent.installed(), recorded_rtp_origins() as rtp:
        async with local_server(config, models) as server, async_playwright() as p:
            browser = await p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 760})
                result = await drive_page(page, server, args, sent, rtp)
                result["chromium"] = browser.version
            finally:
                await browser.close()
            engine = server.engine()
            if engine is not None and server.stages is not None:
                result["stages_ms"] = server.stages.summary(engine.stats.tick_seconds)
    return result


def run_browser_path(args: argparse.Namespace) -> dict[str, Any]:
    """This script again, as ``--browser-child``, under ``unshare -n``; its last marked line is the result."""
    cmd = ["unshare", "-n", "--", sys.executable, "-m", "bench.latency", "--browser-child"]
    cmd += ["--config", args.config, "--mode", args.mode, "--seconds", str(args.seconds)]
    cmd += ["--target-ms", str(args.target_ms), "--chromium", args.chromium]
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            cmd += [f"--{name}", str(getattr(args, name))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150 + 3 * args.seconds)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(f"the browser session exited with status {proc.returncode}: {proc.stderr[-2000:]}")


# ---- the report -----------------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> SystemConfig:
    return load_system_config(args.config, height=args.height, width=args.width)


def config_json(config: SystemConfig, args: argparse.Namespace) -> dict[str, Any]:
    return {"file": args.config, **config.summary()}


def machine(paths: dict[str, Any]) -> dict[str, Any]:
    import aiortc

    info: dict[str, Any] = {**base_machine(), "cpu_count": os.cpu_count(), "aiortc": aiortc.__version__}
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine skews every number
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")  # with cores busy, 2 threads can be slower than 1
    if "chromium" in paths.get("browser", {}):
        info["chromium"] = paths["browser"]["chromium"]
    return info


def efficiency(paths: dict[str, Any], fps: int) -> dict[str, Any]:
    """System efficiency: what the served path delivers ÷ what the engine alone does.

    t2v: served throughput (pacing off, so the served path is not capped at real time) ÷ engine FPS.
    v2v, or a server elsewhere: the served path is capped by its real-time input or pacing, so the paced
    served FPS ÷ min(engine FPS, the model's fps). ``efficiency_capped`` is the latter in every mode."""
    webrtc = paths.get("webrtc", {})
    served, alone, throughput = webrtc.get("fps"), paths.get("engine", {}).get("fps"), webrtc.get("throughput_fps")
    if not served or not alone:
        return {"efficiency": None, "efficiency_capped": None, "efficiency_definition": None}
    capped = round(served / min(alone, fps), 4)
    if throughput:
        definition = "served throughput with pacing off / engine-alone fps"
        return {
            "efficiency": round(throughput / alone, 4),
            "efficiency_capped": capped,
            "efficiency_definition": definition,
        }
    definition = f"served fps / min(engine-alone fps, {fps} fps real time)"
    return {"efficiency": capped, "efficiency_capped": capped, "efficiency_definition": definition}


def build_report(paths: dict[str, Any], config: SystemConfig, args: argparse.Namespace, argv: list[str]) -> dict:
    """The JSON: the served (webrtc) path's numbers on top, every path's detail under ``paths``."""
    served = paths.get("webrtc", {})
    latency = served.get("latency_ms") or distribution([])
    return {
        "schema": SCHEMA,
        "mode": args.mode,
        "target_ms": args.target_ms,
        "ttff_ms": served.get("ttff_ms"),
        "fps": served.get("fps"),
        "latency_ms": {k: latency.get(k) for k in ("p50", "p95", "p99", "max")},
        "deadline_miss_rate": served.get("deadline_miss_rate"),
        "latency_source": served.get("latency_source"),
        **efficiency(paths, config.fps),
        "realtime_fps": config.fps,
        "paths": paths,
        "config": config_json(config, args),
        "machine": machine(paths),
        "command": " ".join(["python -m bench.latency", *argv]),
    }


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """One line per path, then efficiency and stage times."""
    print(
        f"{'path':<9}{'ttff ms':>9}{'fps':>8}{'period':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'miss':>7}  source"
    )
    for name in PATHS:
        p = report["paths"].get(name, {})
        if "fps" not in p:
            print(f"{name:<9}  {'skipped: ' + p['skipped'] if 'skipped' in p else 'error: ' + str(p.get('error'))}")
            continue
        lat = p["latency_ms"]
        print(
            f"{name:<9}{fmt(p['ttff_ms']):>9}{fmt(p['fps'], 2):>8}{fmt(p['period_ms']['p50']):>8}{fmt(lat['p50']):>9}"
            f"{fmt(lat['p95']):>9}{fmt(lat['p99']):>9}{fmt(lat['max']):>9}{fmt(p['deadline_miss_rate'], 2):>7}"
            f"  {p['latency_source']}"
        )
    print(
        f"efficiency ({report.get('efficiency_definition')}): {fmt(report['efficiency'], 3)}; "
        f"against min(engine, {report['realtime_fps']} fps real time): {fmt(report['efficiency_capped'], 3)}"
    )
    for name in PATHS:
        stages = report["paths"].get(name, {}).get("stages_ms")
        if stages:
            print(f"{name} ms per call, p50: " + ", ".join(f"{k} {fmt(v['p50'])}" for k, v in stages.items()))


# ---- plot and compare -----------------------------------------------------------------------------


def plot(report: dict[str, Any], out: str) -> None:
    """Per path, latency over time and its histogram (Agg backend, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PATHS), 2, figsize=(12, 3.2 * len(PATHS)), squeeze=False)
    target = report["target_ms"]
    for (ax_t, ax_h), name in zip(axes, PATHS, strict=True):
        p = report["paths"].get(name, {})
        s = p.get("series") or {}
        ax_t.set_title(f"{name}: latency over time ({p.get('latency_source', '-')})", fontsize=10)
        ax_h.set_title(f"{name}: latency histogram", fontsize=10)
        if not s.get("latency_ms"):
            why = p.get("skipped") or p.get("error") or "no per-frame latency"
            ax_t.text(0.5, 0.5, why[:90], ha="center", va="center", transform=ax_t.transAxes, fontsize=8)
            ax_h.axis("off")
            continue
        ax_t.plot(s["t_s"], s["latency_ms"], ".", markersize=3)
        ax_t.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target:g} ms")
        ax_t.set_xlabel("s since the first frame")
        ax_t.set_ylabel("ms")
        ax_t.legend(loc="upper right", fontsize=8)
        ax_h.hist(s["latency_ms"], bins=40)
        ax_h.axvline(target, color="tab:red", linestyle="--", linewidth=1)
        ax_h.set_xlabel("ms")
        ax_h.set_ylabel("frames")
    cfg = report["config"]
    fig.suptitle(f"bench.latency: {cfg['model']} {cfg['width']}x{cfg['height']} {report['mode']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# (dotted key, +1 when higher is worse / -1 when lower is worse, floor under |old| for the relative change)
COMPARED: list[tuple[str, int, float]] = [
    ("ttff_ms", +1, 1.0),
    ("fps", -1, 0.5),
    ("latency_ms.p50", +1, 1.0),
    ("latency_ms.p95", +1, 1.0),
    ("latency_ms.p99", +1, 1.0),
    ("deadline_miss_rate", +1, 0.05),
    ("efficiency", -1, 0.01),
] + [
    (f"paths.{p}.{key}", sign, floor)
    for p in ("engine", "browser")
    for key, sign, floor in (
        ("ttff_ms", +1, 1.0),
        ("fps", -1, 0.5),
        ("latency_ms.p50", +1, 1.0),
        ("latency_ms.p95", +1, 1.0),
    )
]


def lookup(report: dict[str, Any], key: str) -> float | None:
    value: Any = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def compare(new: dict[str, Any], old: dict[str, Any], tolerance: float) -> tuple[list[str], list[str]]:
    """(what got worse, every compared line). Worse: moved the bad way by more than tolerance x max(|old|, floor)."""
    worse, lines = [], []
    for key, sign, floor in COMPARED:
        a, b = lookup(old, key), lookup(new, key)
        if a is None or b is None:
            continue
        change = (b - a) / max(abs(a), floor)
        verdict = "worse" if sign * change > tolerance else "better" if -sign * change > tolerance else "same"
        line = f"{key:<28}{a:>12.3f}{b:>12.3f}{change:>+10.1%}  {verdict}"
        lines.append(line)
        if verdict == "worse":
            worse.append(line)
    return worse, lines


def print_comparison(new: dict[str, Any], old: dict[str, Any], old_path: str, tolerance: float) -> bool:
    """Print the comparison; True when something got worse."""
    for what in ("mode", "config"):
        if new.get(what) != old.get(what):
            print(f"note: {what} differs from {old_path}: {old.get(what)} -> {new.get(what)}")
    worse, lines = compare(new, old, tolerance)
    print(f"\ncompared with {old_path} (tolerance {tolerance:.0%}):")
    print(f"{'metric':<28}{'old':>12}{'new':>12}{'change':>10}")
    print("\n".join(lines))
    print(f"{len(worse)} worse" + (":\n" + "\n".join(worse) if worse else ""))
    return bool(worse)


# ---- main -----------------------------------------------------------------------------------------


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop, as ``streamer serve`` runs the server (asyncio's loop without it)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_path(name: str, config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """One path's result: its numbers, ``{"skipped": why}`` or ``{"error": what}``."""
    if name not in args.selected:
        return {"skipped": "not selected (--paths)"}
    print(f"bench.latency: {name} path ...", file=sys.stderr, flush=True)
    try:
        if name == "engine":
            return in_engine_thread(run_engine_path, config, models, args)
        if name == "webrtc":
            return run_async(webrtc_path(config, models, args))
        reason = browser_unavailable(args.chromium)
        return {"skipped": reason} if reason else run_browser_path(args)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every selected path in turn, one report."""
    config = load_config(args)
    host = (urlparse(args.server).hostname or "127.0.0.1") if args.server else "127.0.0.1"
    use_ice_addresses(ice_addresses_for(host, None))  # loopback only for a loopback server
    models = load_models(config)
    print(
        f"bench.latency: {config.model.name} {config.width}x{config.height} {args.mode} on {config.device}, "
        f"warm-up {in_engine_thread(warm_up, config, models, args.mode)} s",
        file=sys.stderr,
    )
    paths = {name: run_path(name, config, models, args) for name in PATHS}
    return build_report(paths, config, args, argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--mode", choices=["t2v", "v2v"], default="t2v")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady state per path, after its first frame")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write a PNG here: latency over time and histogram per path")
    parser.add_argument("--server", default=None, help="URL of a running server for the webrtc path")
    parser.add_argument("--compare", default=None, help="an earlier report: print what got worse, exit 1 if any")
    parser.add_argument("--tolerance", type=float, default=0.2, help="relative change --compare lets pass")
    parser.add_argument("--from-json", default=None, help="read this report instead of measuring")
    parser.add_argument("--target-ms", type=float, default=250.0, help="latency deadline per frame")
    parser.add_argument("--paths", default=None, help="comma-separated subset of engine,webrtc,browser (default all)")
    parser.add_argument("--engine-source", choices=["max", "realtime"], default="max", help="v2v input, engine path")
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--browser-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [p.strip() for p in (args.paths or ",".join(PATHS)).split(",") if p.strip()]
    unknown = sorted(set(names) - set(PATHS))
    if unknown or not names or args.seconds <= 0 or args.tolerance < 0:
        parser.error(
            f"--paths={args.paths!r}, --seconds={args.seconds}, --tolerance={args.tolerance}: paths are "
            f"{','.join(PATHS)}, seconds > 0, tolerance >= 0"
        )
    args.selected = set(names)
    return args


def read_report(path: str) -> dict[str, Any]:
    """A report written by ``--json``; ValueError naming the file when it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} cannot be read as a report: {e}") from None
    if not isinstance(report, dict) or "paths" not in report:
        raise ValueError(f"{path!r} is not a bench.latency report (no 'paths')")
    return report


def refusal(args: argparse.Namespace) -> str | None:
    """Why this run cannot start: a browser asked for by name that cannot run, or no matplotlib for --plot."""
    if args.from_json is None and args.paths and "browser" in args.selected:
        reason = browser_unavailable(args.chromium)
        if reason:
            return f"--paths asks for the browser path, which cannot run here: {reason}"
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib (pip install matplotlib)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.browser_child:
        print(RESULT_MARKER + json.dumps(run_async(browser_session(args))), flush=True)
        return 0
    why = refusal(args)
    if why:
        print(f"bench.latency: {why}", file=sys.stderr)
        return EXIT_FAILED
    try:
        old = read_report(args.compare) if args.compare else None  # before measuring: a bad file fails fast
        report = read_report(args.from_json) if args.from_json else measure(args, argv)
    except ValueError as e:
        print(f"bench.latency: {e}", file=sys.stderr)
        return EXIT_FAILED
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    failed = [n for n, p in report["paths"].items() if "error" in p]
    worse = old is not None and print_comparison(report, old, args.compare, args.tolerance)
    if failed:
        print(f"bench.latency: failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_WORSE if worse else 0


if __name__ == "__main__":
    sys.exit(main())
