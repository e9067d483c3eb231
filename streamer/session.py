"""One live session: a peer connection, its control channel, reorder, pacing and metrics.

Data flow of a session (DESIGN §3):
  bridge D_out ──► reorder (epoch, chunk_index) ──► frame buffer (bounded, blocks) ──► paced track
  v2v: remote track ──► chunker (newest wins) ──► the engine thread's feeder takes what it wants
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiortc import RTCDataChannel, RTCPeerConnection

from pipeline.commands import ParamsSet, SetParams
from pipeline.types import UserParams, shown, stale
from streamer.bridge import EngineBridge
from streamer.chunker import Chunker
from streamer.egress.webrtc import OutFrame, PacedVideoTrack
from streamer.guard import loads
from streamer.reorder import Reorder

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 16 * 1024  # also the data channels' a=max-message-size (streamer.rtc_internals)
CONTROL_WAITING = 256  # control messages waiting for their answer; past that one is answered "busy" at once
# the control messages and their fields besides "type": (allowed, required); any other field is refused
CONTROL_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "prompt": ({"prompt"}, {"prompt"}),
    "params": (set(UserParams.fields()), set()),
    "cut": (set(), set()),
}
SENT_LOG = 5_000  # frames kept in SessionMetrics.sent_log: ~5 minutes at 16 fps, ~1 MB


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class SentFrame(NamedTuple):
    """One frame handed to the session's track, for metrics, tests and the latency benchmark."""

    when: float  # time.monotonic() it left the track (aiortc encodes and sends it next)
    epoch: int
    chunk_index: int
    pts: int  # 90 kHz, on the session's output timeline
    scheduled_at: float  # its chunk entered the window (time.monotonic())


@dataclass
class SessionMetrics:
    started: float = field(default_factory=time.monotonic)  # offer received
    first_frame: float | None = None
    sent: deque[float] = field(default_factory=lambda: deque(maxlen=600))  # send times of recent frames
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # chunk scheduled -> frame sent, s
    sent_log: deque[SentFrame] = field(default_factory=lambda: deque(maxlen=SENT_LOG))
    chunks_out: int = 0
    frames_out: int = 0
    frames_dropped: int = 0  # stale output frames (a cut); input drops are the chunker's

    def fps_out(self, window: float = 2.0) -> float:
        now = time.monotonic()
        return sum(1 for t in self.sent if now - t <= window) / window

    def as_json(self, epoch: int, reorder_skipped: int, input_dropped: int) -> dict[str, Any]:
        lat = [x * 1000 for x in self.latency]
        return {
            "fps_out": round(self.fps_out(), 2),
            "ttff_ms": None if self.first_frame is None else round((self.first_frame - self.started) * 1000, 1),
            "latency_ms": {k: percentile(lat, q) for k, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
            "epoch": epoch,
            "chunks_out": self.chunks_out,
            "frames_out": self.frames_out,
            "frames_dropped": self.frames_dropped + input_dropped,
            "chunks_skipped": reorder_skipped,
        }


class Session:
    """Created by the app on an offer; ``close()`` releases everything it holds."""

    def __init__(
        self,
        bridge: EngineBridge,
        pc: RTCPeerConnection,
        mode: str,
        frame_rate: int,
        frame_size: tuple[int, int],
        frames_per_chunk: int,
        reorder_wait: float = 1.0,
        pace: bool = True,
    ) -> None:
        self.bridge = bridge
        self.pc = pc
        self.mode = mode
        self.frame_rate = frame_rate
        self.frame_size = frame_size  # (height, width)
        self.sid = ""
        self.epoch = 0
        self.metrics = SessionMetrics()
        self.reorder: Reorder[Any] = Reorder(max_wait=reorder_wait)
        # One chunk's frames: the pump blocks on it, so chunks wait in D_out, where a cut can drop them.
        self.frames: asyncio.Queue[OutFrame] = asyncio.Queue(maxsize=frames_per_chunk)
        self.track = PacedVideoTrack(self.frames.get, lambda: self.epoch, self._sent, self._stale, pace)
        height, width = frame_size
        # v2v: where the remote track's frames wait for the engine thread's feeder (it wakes that thread)
        self.chunker = Chunker(frame_rate, width, height, wake=bridge.wake) if mode == "v2v" else None
        self.reading = False  # the remote track is being read
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = asyncio.Event()
        self.connected = asyncio.Event()  # ICE and DTLS are up (pc.connectionState reached "connected")
        self.control: RTCDataChannel | None = None
        self._control_waiting = 0  # control messages being answered
        self.cut_acked: float | None = None  # when the last cut was acknowledged (monotonic)

    async def open(self, params: dict[str, Any]) -> str:
        """The engine session; ValueError naming the field for bad params, SessionLimitError past the limit."""
        self.sid = await self.bridge.open_session(UserParams().updated(params), self.mode, self.chunker)
        self.spawn(self._pump(), "pump")
        return self.sid

    def spawn(self, coro: Any, name: str) -> None:
        """Run ``coro`` as a task this session owns: cancelled and awaited by :meth:`close`."""
        task = asyncio.create_task(coro, name=f"{self.sid}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s task %s failed", self.sid, task.get_name(), exc_info=task.exception())

    # ---- output -------------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Chunks from the bridge, through reorder, into the paced frame buffer."""
        while True:
            deadline = self.reorder.deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Paced, the frames buffered here play for this long: a chunk later than that stalls the video.
            lead = self.frames.qsize() / self.frame_rate if self.track.paced else 0.0
            chunk = await self.bridge.get_chunk(self.sid, timeout, lead)
            now = time.monotonic()
            if chunk is None:
                ready = self.reorder.poll(now)
            else:
                ready = self.reorder.push(chunk.envelope.epoch, chunk.envelope.chunk_index, chunk, now)
            for c in ready:
                if c.envelope.stale(self.epoch):
                    self.metrics.frames_dropped += c.num_frames
                    continue
                self.metrics.chunks_out += 1
                env = c.envelope
                for rgb, pts in zip(c.frames, c.pts, strict=True):
                    await self.frames.put(OutFrame(env.epoch, env.chunk_index, pts, rgb, c.scheduled_at, now))

    def _sent(self, frame: OutFrame, when: float) -> None:
        if self.metrics.first_frame is None:
            self.metrics.first_frame = when
        self.metrics.sent.append(when)
        self.metrics.frames_out += 1
        self.metrics.latency.append(when - frame.ready)
        self.metrics.sent_log.append(SentFrame(when, frame.epoch, frame.chunk_index, frame.pts, frame.ready))

    def _stale(self, frame: OutFrame) -> None:
        self.metrics.frames_dropped += 1

    def flush_stale(self) -> None:
        """Drop buffered frames of older epochs (after a cut)."""
        keep = []
        while not self.frames.empty():
            f = self.frames.get_nowait()
            if stale(f.epoch, self.epoch):
                self.metrics.frames_dropped += 1
            else:
                keep.append(f)
        for f in keep:
            self.frames.put_nowait(f)

    # ---- input (v2v) --------------------------------------------------------------------------

    def attach_input(self, track: Any) -> None:
        """Read the remote track into the chunker, which the engine thread's feeder takes the newest frames
        from when the engine wants them (the one feeder, as the CLI and the benchmarks use it)."""
        if self.chunker is None or self.reading:
            return
        self.reading = True
        self.spawn(self._read_input(track), "ingress")

    async def _read_input(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        assert self.chunker is not None
        try:
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    self.chunker.add(frame, time.monotonic())
        finally:
            self.chunker.ended = True
            self.bridge.wake()

    # ---- control channel ----------------------------------------------------------------------

    def attach_control(self, channel: RTCDataChannel) -> None:
        """Answer every message of the control channel. At most ``CONTROL_WAITING`` wait for their
        answer at once; a message past that is answered "busy" at once. One over ``MAX_CONTROL_BYTES``
        is refused before it is reassembled (:mod:`streamer.rtc_internals`): answered, and the channel closed."""
        self.control = channel

        @channel.on("message")
        def on_message(message: Any) -> None:
            if self._control_waiting >= CONTROL_WAITING:
                busy = f"busy: {CONTROL_WAITING} control messages are waiting for their answer; this one was dropped"
                self._reply(channel, {"type": "error", "message": busy})
                return
            self._control_waiting += 1
            self.spawn(self._control(channel, message), "control")

        @channel.on("oversized")
        def on_oversized(seen: int) -> None:
            message = f"a control message must be at most {MAX_CONTROL_BYTES} bytes (got {seen}+); channel closed"
            self._reply(channel, {"type": "error", "message": message})
            channel.close()

    @staticmethod
    def _reply(channel: RTCDataChannel, reply: dict[str, Any]) -> None:
        if channel.readyState == "open":
            channel.send(json.dumps(reply))

    async def _control(self, channel: RTCDataChannel, message: Any) -> None:
        try:
            reply = await self.handle_control(message)
        except Exception as e:  # a bug or a stopped engine: still an answer; logged
            log.exception("session %s: control message failed", self.sid)
            reply = {"type": "error", "message": f"the server could not apply it: {type(e).__name__}"}
        finally:
            self._control_waiting -= 1
        self._reply(channel, reply)

    async def handle_control(self, message: Any) -> dict[str, Any]:
        """One control message -> its answer: {"type": "ack", "epoch", ...} or {"type": "error", ...}."""
        try:
            if isinstance(message, bytes) or len(message.encode()) > MAX_CONTROL_BYTES:
                raise ValueError(f"a control message must be JSON text of at most {MAX_CONTROL_BYTES} bytes")
            msg = loads(message, "control message")
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ValueError('a control message is a JSON object with a "type"')
            kind = msg["type"]
            if kind not in CONTROL_FIELDS:
                raise ValueError(f"type={shown(kind)} is not allowed: one of {sorted(CONTROL_FIELDS)}")
            allowed, required = CONTROL_FIELDS[kind]
            if unknown := sorted(set(msg) - allowed - {"type"}):
                names = ", ".join(shown(k) for k in unknown)
                raise ValueError(
                    f"unknown field(s) [{names}] in a {kind} message; allowed besides type: {sorted(allowed)}"
                )
            if missing := sorted(required - set(msg)):
                raise ValueError(f"a {kind} message needs the field(s) {missing}")
            if kind == "prompt":
                done: ParamsSet = await self.bridge.apply(SetParams.of(self.sid, prompt=msg["prompt"]))
                return {"type": "ack", "of": "prompt", "epoch": self.epoch, "prompt": done.params.prompt}
            if kind == "params":
                changes = {k: v for k, v in msg.items() if k != "type"}
                UserParams().updated(changes)  # validate before it reaches the engine thread
                done = await self.bridge.apply(SetParams.of(self.sid, **changes))
                return {"type": "ack", "of": "params", "epoch": self.epoch, "params": done.params.__dict__}
            epoch, first = await self.bridge.cut(self.sid)
            self.epoch = epoch
            self.reorder.start_epoch(epoch, first)
            self.flush_stale()
            self.cut_acked = time.monotonic()
            return {"type": "ack", "of": "cut", "epoch": epoch}
        except (ValueError, TypeError, KeyError) as e:
            return {"type": "error", "message": str(e)}

    # ---- end ----------------------------------------------------------------------------------

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]  # close() may run in one of them
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.track.stop()
        await self.pc.close()
        if self.sid:
            await self.bridge.close_session(self.sid)
