"""The served path: a server made with ``create_app`` (or ``--server URL``) and an aiortc client on loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from bench import frameid
from bench.latency.common import (
    CAMERA_FPS,
    DEFINITIONS,
    MAX_RECORDS,
    PROMPT,
    Trace,
    distribution,
    http_json,
    stage_summary,
)
from pipeline.config import SystemConfig
from pipeline.engine import Engine
from pipeline.models.loader import Models
from pipeline.types import PTS_CLOCK
from streamer.app import STATE, ServerOptions, create_app
from streamer.rtc_internals import on_rtp_packet
from streamer.session import SentFrame


@dataclass
class Server:
    base: str
    app: web.Application | None  # None: a server elsewhere (--server URL)

    def engine(self) -> Engine | None:
        return None if self.app is None else self.app[STATE].bridge.engine  # type: ignore[union-attr]

    def sent(self, sid: str) -> list[SentFrame]:
        """Every frame the in-process server's session handed to its track (``SessionMetrics.sent_log``);
        read it while the session is open. Nothing for a server elsewhere."""
        session = None if self.app is None else self.app[STATE].sessions.get(sid)
        return [] if session is None else list(session.metrics.sent_log)


def sent_by_pts(sent: list[SentFrame]) -> dict[int, tuple[float, float]]:
    """pts -> (chunk scheduled, frame sent), epoch 0 (the benchmark never cuts)."""
    return {f.pts: (f.scheduled_at, f.when) for f in sent if f.epoch == 0}


@contextlib.asynccontextmanager
async def local_server(config: SystemConfig, models: Models, pace: bool = True) -> AsyncIterator[Server]:
    """``create_app`` on 127.0.0.1, a free port, the given models.
    ``pace=False``: tracks send frames as fast as they come (throughput, for efficiency)."""
    app = create_app(config, ServerOptions(pace=pace), models)
    runner = web.AppRunner(app)
    await runner.setup()  # starts the engine thread (cleanup_ctx)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield Server(f"http://127.0.0.1:{port}", app)
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


class PacketArrivals:
    """When the last packet (RTP marker) of each video frame reached the client, by RTP timestamp.

    aiortc's jitter buffer hands a frame to the decoder only when the next frame's first packet comes,
    so a frame leaves the client's track one frame interval (or a whole burst's gap) after it arrived;
    this records the arrival itself, by wrapping the receiver's packet handler."""

    def __init__(self) -> None:
        self.first: int | None = None  # RTP timestamp of the first frame: aiortc's receiver maps it to pts 0
        self.times: dict[int, float] = {}

    def attach(self, receiver: Any) -> None:
        on_rtp_packet(receiver, self._seen)

    def _seen(self, packet: Any) -> None:
        if packet.marker:
            self._record(packet.timestamp, time.monotonic())

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


async def run_webrtc(server: Server, config: SystemConfig, args: argparse.Namespace) -> dict:
    """One aiortc session against ``server``: TTFF, FPS, period, latency, the server's metrics."""
    camera = IdCamera(config.height, config.width) if args.mode == "v2v" else None
    client = await asyncio.wait_for(open_client(server.base, args.mode, camera), 30)
    try:
        receiving = receive(client.track, client.arrivals, args.seconds, camera is not None)
        frames = await asyncio.wait_for(receiving, args.seconds + 90)
        _, metrics = await http_json("GET", server.base + "/api/metrics")
        sent = server.sent(client.session_id)
    finally:
        await client.pc.close()
    trace = Trace(client.offered_at)
    trace.events.extend((r.when, 1) for r in frames)
    source, matches = match_frames(frames, camera, sent_by_pts(sent) if server.app else None)
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
    return result | server_side(server, sent)


def server_side(server: Server, sent: list[SentFrame]) -> dict[str, Any]:
    """What only an in-process server shows: its stage times and how evenly it sent the frames."""
    engine = server.engine()
    if engine is None:
        return {}
    sends = [f.when for f in sent]
    return {
        "server_send_period_ms": distribution([(b - a) * 1000 for a, b in itertools.pairwise(sends)]),
        "stages_ms": stage_summary(engine),
    }


async def webrtc_path(config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """The served path, against ``--server`` or a server made here."""
    if args.server:
        _, health = await http_json("GET", args.server.rstrip("/") + "/api/health")
        result = await run_webrtc(Server(args.server.rstrip("/"), None), config, args)
        return result | {"server_model": health.get("model")}
    async with local_server(config, models) as server:
        return await run_webrtc(server, config, args)
