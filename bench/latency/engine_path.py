"""The engine alone, the ceiling: ``Engine.step()`` in a loop on a thread of its own, as the server runs it."""

from __future__ import annotations

import argparse
import time
from collections import deque
from typing import Any

from bench import frameid
from bench.latency.common import DEFINITIONS, PROMPT, Trace, stage_summary
from pipeline.commands import Close, Demand, Open, Query
from pipeline.config import SystemConfig
from pipeline.engine import Engine
from pipeline.feeder import Feeder
from pipeline.models.loader import Models
from pipeline.types import DecodedChunk, UserParams


class Camera:
    """v2v input for the engine alone: numbered frames from a synthetic source at the model's fps, handed
    over by the one feeder (:class:`pipeline.feeder.Feeder`), as the server and the CLI do.

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
        self.source_index: dict[int, int] = {}  # accepted index -> source index; popped on output

    def _capture(self, now: float) -> None:
        assert self.t0 is not None
        due = int((now - self.t0) * self.fps) + 1
        for k in range(self.made, due):
            if len(self.waiting) == self.waiting.maxlen:
                self.dropped += 1
            self.waiting.append((k, self.t0 + k / self.fps))
        self.made = max(self.made, due)

    def _batch(self, engine: Engine, want: int) -> list[tuple[int, float]] | None:
        """The ``want`` frames to submit now, each (source index, arrival), or None to let the engine tick first."""
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

    def feed(self, engine: Engine, feeder: Feeder) -> None:
        """Give the engine the frames it wants now (in real time: wait for them when nothing can run)."""
        if self.t0 is None:
            self.t0 = time.monotonic()
        want = feeder.wanted(engine.apply(Query(feeder.session_id)))
        batch = self._batch(engine, want) if want else None
        if not batch:
            return
        frames = [frameid.draw(k, self.height, self.width) for k, _ in batch]
        if engine.apply(feeder.submit(frames, [t for _, t in batch])).taken:
            feeder.taken(len(batch))
            for k, _ in batch:
                self.source_index[self.accepted] = k
                self.accepted += 1


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


def warm_up(config: SystemConfig, models: Models, mode: str) -> float:
    """A throwaway session of ``steps + 3`` ticks, so that first-call costs stay out of the numbers."""
    engine = Engine(config, models, max_input_chunks=1)
    try:
        sid = engine.apply(Open(UserParams(prompt=PROMPT), mode)).session_id
        camera = Camera(config, realtime=False) if mode == "v2v" else None
        if camera is None:
            engine.apply(Demand(sid, config.steps + 3))
        feeder = Feeder(sid)
        t0 = time.perf_counter()
        while engine.stats.ticks < config.steps + 3:
            if camera is not None:
                camera.feed(engine, feeder)
            engine.step()
        return round(time.perf_counter() - t0, 3)
    finally:
        engine.close()


def engine_loop(engine: Engine, sid: str, camera: Camera | None, trace: Trace, seconds: float) -> int:
    """``step()`` until ``seconds`` of steady state, feeding (v2v) or asking for chunks (t2v); frames with ids back."""
    deadline = trace.start + 60 + 4 * seconds
    feeder = Feeder(sid)
    ids = 0
    while not trace.spans(seconds):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine put out {len(trace.events)} chunks before the deadline")
        if camera is not None:
            camera.feed(engine, feeder)
        out = engine.step()
        now = time.monotonic()
        for chunk in out:
            ids += record_chunk(trace, chunk, now, camera)
        if camera is None and out:
            engine.apply(Demand(sid, len(out)))
    return ids


def run_engine_path(config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """The engine alone: one session, ``step()`` in a loop until ``--seconds`` of steady state."""
    engine = Engine(config, models, max_input_chunks=1)  # as the live server
    try:
        camera = Camera(config, realtime=args.engine_source == "realtime") if args.mode == "v2v" else None
        trace = Trace(time.monotonic())
        sid = engine.apply(Open(UserParams(prompt=PROMPT, seed=0), args.mode)).session_id
        if camera is None:
            engine.apply(Demand(sid, config.steps + 2))  # enough to keep every slot of the pipeline busy
        ids = engine_loop(engine, sid, camera, trace, args.seconds)
        engine.apply(Close(sid))
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
