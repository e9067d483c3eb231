"""The server: aiohttp on uvloop, WebRTC through aiortc, the demo page from web/.

Routes: ``GET /`` (the demo page and its files), ``POST /api/offer``, ``GET /api/health``,
``GET /api/metrics``. The engine lives behind an :class:`~streamer.bridge.EngineBridge` started and
stopped with the app (``cleanup_ctx``); every session is closed, and its memory freed, when its
client goes away or the server stops.

Nothing a client does holds the server (the guarantees in the README): a slot is taken with no await
between the check and the take; a session whose client has not connected (ICE and DTLS) within
``connect_timeout`` is closed; a connected client that vanishes is noticed by ICE consent checks
(``rtc_internals.use_consent_interval``); requests pass :mod:`streamer.guard` (Host, Origin, bodies) and
control messages :mod:`streamer.rtc_internals` (size, before reassembly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection

from pipeline.config import REPO_ROOT, SystemConfig
from pipeline.engine import Engine, SessionLimitError
from pipeline.models.loader import Models, load_models
from pipeline.models.text import WordTokenizer
from pipeline.start import make_executor
from streamer.bridge import EngineBridge
from streamer.guard import BODY_SECONDS, Access, error, middleware, normal_origin, read_json, server_names
from streamer.rtc_internals import bound_messages
from streamer.session import MAX_CONTROL_BYTES, Session
from streamer.signaling import BadRequest, Offer, interface_addresses, parse_offer, rtc_configuration

log = logging.getLogger(__name__)

WEB_DIR = REPO_ROOT / "web"
MAX_BODY_BYTES = 256 * 1024


@dataclass
class ServerOptions:
    ice_servers: list[str] = field(default_factory=list)  # empty: never contact an outside STUN server
    d_in: int = 64  # commands waiting for the engine thread
    d_out: int = 2  # decoded chunks waiting per session (t2v: the fewest credits, see bridge.Credits)
    reorder_wait: float = 1.0  # seconds reorder waits for a missing chunk before skipping it
    max_input_chunks: int = 1  # v2v: encoded input chunks waiting in the engine (live: keep it small)
    pace: bool = True  # tracks send frames at their pts; False: as fast as they come (throughput benchmarks)
    web_dir: Path = WEB_DIR
    connect_timeout: float = 10.0  # seconds from the answer to ICE and DTLS connected; then the slot is freed
    body_timeout: float = BODY_SECONDS  # seconds an offer's body may take to arrive (then 408)
    host: str = "127.0.0.1"  # the address the server is bound to: Host headers must name it (see guard)
    allow_hosts: tuple[str, ...] = ()  # more names for Host headers (--allow-host), e.g. behind a proxy
    allow_origins: tuple[str, ...] = ()  # foreign origins allowed, with CORS headers (--allow-origin)
    stages: int = 1  # the transformer's blocks over this many processes (--stages)
    split: list[int] | None = None  # blocks per stage (--split); None: balanced by measured cost
    stage_timeout: float = 2.5  # seconds without a stage's heartbeat before it counts as dead

    def __post_init__(self) -> None:
        if not (isinstance(self.connect_timeout, (int, float)) and 0 < self.connect_timeout <= 60):
            raise ValueError(f"connect_timeout={self.connect_timeout!r} is not allowed: more than 0, at most 60 s")


@dataclass
class ServerState:
    config: SystemConfig
    options: ServerOptions
    models: Models | None
    bridge: EngineBridge | None = None
    sessions: dict[str, Session] = field(default_factory=dict)  # open ones, until their engine session is closed
    reserved: set[object] = field(default_factory=set)  # slots of offers being answered, until listed in sessions
    closing: set[int] = field(default_factory=set)  # id() of sessions being closed
    words: list[str] | None = None  # a closed-vocabulary model's words (demo), shown by the page

    @property
    def max_sessions(self) -> int:
        return self.config.max_sessions

    @property
    def free_slots(self) -> int:
        return max(0, self.max_sessions - len(self.reserved) - len(self.sessions))


STATE = web.AppKey("state", ServerState)


async def offer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    assert state.bridge is not None
    if not state.bridge.alive:  # a stage died, say: no offer can be served, whatever it holds
        return error(503, f"the engine stopped: {state.bridge.failure or 'shutting down'}")
    body = await read_json(request, MAX_BODY_BYTES, state.options.body_timeout)
    try:
        parsed = parse_offer(body)
    except BadRequest as e:
        return error(400, str(e))
    if state.free_slots == 0:  # checked and taken with no await in between: N offers at once open at most N
        return error(503, f"the server serves its limit of {state.max_sessions} sessions; try again later")
    slot = object()
    state.reserved.add(slot)
    try:
        return await answer(state, parsed, slot)
    finally:
        state.reserved.discard(slot)


async def answer(state: ServerState, parsed: Offer, slot: object) -> web.Response:
    """Open the session of an offer whose ``slot`` is reserved; the slot passes to ``state.sessions``."""
    assert state.bridge is not None
    pc = RTCPeerConnection(rtc_configuration(state.options.ice_servers))
    cfg = state.config
    session = Session(
        state.bridge,
        pc,
        parsed.mode,
        cfg.fps,
        (cfg.height, cfg.width),
        cfg.frames_for_chunk(first=False),
        state.options.reorder_wait,
        state.options.pace,
    )

    @pc.on("datachannel")
    def on_datachannel(channel: Any) -> None:
        if channel.label == "control" and session.control is None:
            session.attach_control(channel)
        else:  # one control channel per session; nothing else is listened to
            log.warning("session %s: data channel %r refused", session.sid, channel.label)
            channel.close()

    @pc.on("track")
    def on_track(track: Any) -> None:
        if track.kind == "video" and parsed.mode == "v2v" and not session.reading:
            session.attach_input(track)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState == "connected":
            session.connected.set()
        elif pc.connectionState in ("failed", "closed"):
            await drop(state, session)

    try:
        await pc.setRemoteDescription(parsed.description)
    except Exception as e:  # aiortc raises ValueError, KeyError, ... on SDP it cannot use
        await pc.close()
        return error(400, f"sdp cannot be used: {type(e).__name__}: {e}")
    try:
        sid = await session.open(parsed.params)
    except SessionLimitError as e:
        await pc.close()
        return error(503, str(e))
    except ValueError as e:
        await pc.close()
        return error(400, str(e))
    state.sessions[sid] = session
    state.reserved.discard(slot)
    try:
        pc.addTrack(session.track)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:
        await drop(state, session)
        return error(400, f"sdp cannot be answered: {type(e).__name__}: {e}")
    session.spawn(expire_unless_connected(state, session, state.options.connect_timeout), "connect-deadline")
    log.info("session %s opened (%s)", sid, parsed.mode)
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session_id": sid})


async def expire_unless_connected(state: ServerState, session: Session, seconds: float) -> None:
    """Free the slot of a client that does not connect (ICE and DTLS) within ``seconds`` of its answer:
    one that went away, sent no candidates, or never nominates a pair."""
    try:
        await asyncio.wait_for(session.connected.wait(), seconds)
    except TimeoutError:
        log.warning("session %s did not connect within %g s; closed", session.sid, seconds)
        await drop(state, session)


async def drop(state: ServerState, session: Session) -> None:
    """Close ``session``; its slot is free once its engine session is closed (called from anywhere, once or more)."""
    if id(session) in state.closing or session.closed.is_set():
        return
    state.closing.add(id(session))
    try:
        await session.close()
    finally:
        state.closing.discard(id(session))
        if state.sessions.get(session.sid) is session:
            del state.sessions[session.sid]
    log.info("session %s closed", session.sid)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.bridge is not None and state.bridge.alive
    free = state.free_slots
    body: dict[str, Any] = {
        "status": ("ok" if free else "degraded") if ok else "error",  # degraded: no slot for a new session
        "model": state.config.model.name,
        "sessions": len(state.sessions),
        "max_sessions": state.max_sessions,
        "free_slots": free,
    }
    if state.words is not None:
        body["words"] = state.words  # the only words the model knows (the demo's caption grammar)
    if state.bridge is not None and state.bridge.failure is not None:
        body["error"] = state.bridge.failure  # e.g. which stage died
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    assert state.bridge is not None
    sessions = {
        sid: s.metrics.as_json(s.epoch, s.reorder.stats.skipped, s.chunker.dropped if s.chunker else 0)
        for sid, s in state.sessions.items()
    }
    engine = {
        "ticks_per_s": round(state.bridge.stats.ticks_per_s(), 2),
        "ticks": state.bridge.stats.ticks,
        "sessions": len(state.sessions),
        "queue_depths": state.bridge.queue_depths(),
    }
    return web.json_response({"sessions": sessions, "engine": engine})


def static_files(web_dir: Path) -> list[web.RouteDef]:
    """The demo page: index.html at / and its files beside it (a fixed list, no directory walk)."""

    def serve(path: Path) -> Any:
        async def handler(_: web.Request) -> web.FileResponse:
            return web.FileResponse(path)

        return handler

    routes = [web.get("/", serve(web_dir / "index.html"))]
    for path in sorted(web_dir.iterdir()):
        if path.is_file() and path.name != "index.html":
            routes.append(web.get(f"/{path.name}", serve(path)))
    return routes


def create_app(
    config: SystemConfig, options: ServerOptions | None = None, models: Models | None = None
) -> web.Application:
    options = options or ServerOptions()
    access = Access(
        server_names(options.host, interface_addresses(), options.allow_hosts),
        frozenset(normal_origin(o) for o in options.allow_origins),
    )
    bound_messages(MAX_CONTROL_BYTES)  # control messages: advertised and enforced on receive
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[middleware(access)])
    app[STATE] = ServerState(config=config, options=options, models=models)
    api = [web.post("/api/offer", offer), web.get("/api/health", health), web.get("/api/metrics", metrics)]
    app.add_routes([*api, *static_files(app[STATE].options.web_dir)])
    app.cleanup_ctx.append(engine_context)
    return app


async def engine_context(app: web.Application) -> AsyncIterator[None]:
    """Start the engine thread with the app; on shutdown close every session, then stop it."""
    state, options = app[STATE], app[STATE].options
    models = state.models if state.models is not None else load_models(state.config)
    tokenizer = getattr(models.text, "tokenizer", None)
    state.words = list(tokenizer.words) if isinstance(tokenizer, WordTokenizer) else None
    executor = await asyncio.to_thread(
        make_executor, state.config, models, options.stages, options.split, options.stage_timeout, log.info
    )
    engine = Engine(state.config, models, executor=executor, max_input_chunks=options.max_input_chunks)
    state.bridge = EngineBridge(engine, d_in=options.d_in, d_out=options.d_out)
    await state.bridge.start()
    yield
    for session in list(state.sessions.values()):
        await drop(state, session)
    await state.bridge.stop()
