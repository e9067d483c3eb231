"""The engine alone, the ceiling: ``Engine.step()`` in a loop on a thread of its own, as the server runs it."""

from __future__ import annotations

import argparse
import time
from collections import deque
from typing import Any

from bench import frameid
from bench.latency.common import DEFINITIONS, PROMPT, Trace, stage_summary
from pipeline.commands import Close, Open
from pipeline.config import SystemConfig
from pipeline.engine import Engine
from pipeline.feeder import Feeder, Frames
from pipeline.models.loader import Models
from pipeline.types import DecodedChunk, UserParams


class Camera:
    """v2v input for the engine alone: numbered frames from a synthetic source at the model's fps, a
    :class:`pipeline.feeder.FrameSource` the one feeder pulls from, as the server's and the CLI's sources are.

    ``max``: a frame is made the moment the engine wants it (the ceiling: no camera wait). ``realtime``:
    frame k exists from t0 + k/fps on; the newest waiting frames win, as the server's chunker does."""

    def __init__(self, config: SystemConfig, realtime: bool) -> None:
        self.height, self.width, self.fps = config.height, config.width, config.fps
        self.realtime = realtime
        self.t0: float | None = None
        self.made = 0  # source frames made
        self.accepted = 0  # frames handed to the engine: output frame k is accepted frame k
        self.dropped = 0  # realtime: frames the engine never took (newer ones won)
        self.waiting: deque[tuple[int, float]] = deque(maxlen=4 * config.frames_for_chunk(first=False))
        self.source_index: dict[int, int] = {}  # accepted index -> source index; popped on output

    def _capture(self, now: float) -> None:
        assert self.t0 is not None
        due = int((now - self.t0) * self.fps) + 1
        for k in range(self.made, due):
            if len(self.waiting) == self.waiting.maxlen:
                self.dropped += 1
            self.waiting.append((k, self.t0 + k / self.fps))
        self.made = max(self.made, due)

    def _batch(self, want: int, wait: bool) -> list[tuple[int, float]]:
        """The ``want`` frames to hand over now, each (source index, arrival); none while they are not made
        yet, unless ``wait`` (the engine has nothing else to do: sleep until they are)."""
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        if not self.realtime:
            batch = [(self.made + i, now) for i in range(want)]
            self.made += want
            return batch
        self._capture(now)
        if len(self.waiting) < want:
            if not wait:
                return []
            time.sleep(max(0.0, self.t0 + (self.made + want - len(self.waiting) - 1) / self.fps - now))
            self._capture(time.monotonic())
        batch = list(self.waiting)[-want:]
        self.dropped += len(self.waiting) - len(batch)
        self.waiting.clear()
        return batch

    def take(self, n: int, wait: bool) -> Frames:
        batch = self._batch(n, wait)
        for k, _ in batch:
            self.source_index[self.accepted] = k
            self.accepted += 1
        return [(frameid.draw(k, self.height, self.width), t) for k, t in batch]


def record_chunk(trace: Trace, chunk: DecodedChunk, now: float, camera: Camera | None) -> int:
    """One chunk out: its event, each frame's latency (from its arrival at ingress, v2v; from the chunk
    being scheduled, t2v); returns how many frames carried their id back."""
    trace.events.append((now, chunk.num_frames))
    matched = 0
    for j in range(chunk.num_frames):
        if camera is None:
            born = chunk.scheduled_at
        else:
            born = chunk.arrived[j]
            source_index = camera.source_index.pop(chunk.envelope.video_frame + j)
            matched += frameid.read(chunk.frames[j]) == source_index % frameid.MAX_ID
        trace.latency.append((now, (now - born) * 1000))
    return matched


def feed(config: SystemConfig, engine: Engine, mode: str, camera: Camera | None) -> tuple[Feeder, str]:
    """The session, opened through the one feeder: fed by ``camera`` (v2v), or kept ``steps + 2`` chunks ahead
    (t2v: every slot of the pipeline busy)."""
    feeder = Feeder(engine)
    command = Open(UserParams(prompt=PROMPT, seed=0), mode)
    opened = feeder.open(command, camera) if camera is not None else feeder.open(command, ahead=config.steps + 2)
    return feeder, opened.session_id


def warm_up(config: SystemConfig, models: Models, mode: str) -> float:
    """A throwaway session of ``steps + 3`` ticks, so that first-call costs stay out of the numbers."""
    engine = Engine(config, models, max_input_chunks=1)
    try:
        feeder, _ = feed(config, engine, mode, Camera(config, realtime=False) if mode == "v2v" else None)
        t0 = time.perf_counter()
        while engine.stats.ticks < config.steps + 3:
            feeder.step()
        return round(time.perf_counter() - t0, 3)
    finally:
        engine.close()


def engine_loop(feeder: Feeder, camera: Camera | None, trace: Trace, seconds: float) -> int:
    """Steps of the one feeder until ``seconds`` of steady state; frames with their ids back."""
    deadline = trace.start + 60 + 4 * seconds
    ids = 0
    while not trace.spans(seconds):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine put out {len(trace.events)} chunks before the deadline")
        out = feeder.step()
        now = time.monotonic()
        for chunk in out.chunks:
            ids += record_chunk(trace, chunk, now, camera)
    return ids


def run_engine_path(config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """The engine alone: one session, ``step()`` in a loop until ``--seconds`` of steady state."""
    engine = Engine(config, models, max_input_chunks=1)  # as the live server
    try:
        camera = Camera(config, realtime=args.engine_source == "realtime") if args.mode == "v2v" else None
        trace = Trace(time.monotonic())
        feeder, sid = feed(config, engine, args.mode, camera)
        ids = engine_loop(feeder, camera, trace, args.seconds)
        feeder.apply(Close(sid))
    finally:
        engine.close()
    result = trace.summary(args.target_ms, "chunk")
    result.update(
        latency_source=f"engine_{args.mode}",
        latency_definition=DEFINITIONS[f"engine_{args.mode}"],
        chunks=len(trace.events),
        stages_ms=stage_summary(engine),
    )
    if camera is not None:
        result.update(source=args.engine_source, input_dropped=camera.dropped, frames_with_their_id=ids)
    return result
