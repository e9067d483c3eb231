"""``streamer run``'s loop: the one feeder (:class:`pipeline.feeder.Feeder`) drives the engine, the prompt
schedule's events land on chunk boundaries, frames go to the outputs; stops between steps on a signal, when
every output has failed, or when a stage failed."""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

from tqdm import tqdm

from pipeline.commands import Close, Cut, Open, SetParams
from pipeline.engine import Engine
from pipeline.feeder import Feeder, FrameSource
from pipeline.stages.transport import StageFailure
from pipeline.types import UserParams
from streamer.egress.outputs import OutputThread
from streamer.prompts import PromptEvent, PromptScript
from streamer.run.outputs import Release


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop between ticks; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def generate(
    engine: Engine,
    params: UserParams,
    source: FrameSource | None,
    total: int,
    outputs: list[OutputThread],
    stop: StopFlag,
    bar: tqdm,
    realtime: bool = False,
    script: PromptScript | None = None,
) -> tuple[int, StageFailure | None]:
    """Run the engine until ``total`` frames are made, the input ends, ``stop`` is set, every output has
    failed, or a stage failed; returns the frames made and the stage failure, if any.

    ``realtime`` (a live stream among the outputs): frames go to the outputs at most ``LEAD_SECONDS`` ahead
    of the wall clock (:class:`~streamer.run.outputs.Release`), and generation waits while any are held back.
    ``script``: prompt changes and cuts at the first chunk boundary at or after their time. Nothing is
    started past the next event (the feeder's ``until``); a cut waits for the chunks before it to be handed
    out, so it falls exactly there and nothing of the old epoch is lost or carried over."""
    config = engine.config
    feeder = Feeder(engine)
    if source is not None:
        sid = feeder.open(Open(params, "v2v"), source).session_id
    else:
        sid = feeder.open(Open(params, "t2v"), ahead=engine.pipeline_depth + 1).session_id
    events = [e for e in (script.events if script else ()) if e.at > 0]
    release = Release(outputs, config.fps, realtime)
    made = 0
    start = time.perf_counter()
    while (made < total or release.held) and not stop and any(out.error is None for out in outputs):
        release.release()
        if release.held:  # ahead of the clock: wait until they are due
            time.sleep(min(release.wait(), 0.1))
            continue
        status = feeder.status(sid)
        boundary = min(total, script.frame_of(events[0], config.fps)) if events and script else total
        if events and status.next_video_frame >= boundary and not (events[0].cut and status.undelivered):
            apply_event(feeder, sid, events.pop(0), status.next_video_frame, config.fps)  # a cut: once they are out
            continue
        feeder.until(sid, boundary)
        try:
            out = feeder.step()
        except StageFailure as e:  # what was made still goes out; the run ends with the stage's error
            release.release(everything=True)
            return made, e
        if out.idle:
            break  # the input ended, or every chunk asked for is out
        for chunk in out.chunks:
            frames = chunk.frames[: total - made]
            release.add(frames)
            made += len(frames)
            bar.update(len(frames))
            bar.set_postfix_str(f"{made / config.fps / (time.perf_counter() - start):.2f}x real time", refresh=False)
    release.release(everything=True)  # stopped by a signal or an output: what was made still goes out
    feeder.apply(Close(sid))
    return made, None


def apply_event(feeder: Feeder, sid: str, event: PromptEvent, frame: int, fps: int) -> None:
    what = []
    if event.cut:
        done = feeder.apply(Cut(sid))
        what.append(f"cut (epoch {done.epoch})")
    if event.prompt is not None:
        feeder.apply(SetParams.of(sid, prompt=event.prompt))
        what.append(f"prompt {event.prompt!r}")
    tqdm.write(
        f"streamer: at frame {frame} ({frame / fps:.2f} s; line {event.line} asked for {event.at:g} s): "
        + ", ".join(what),
        file=sys.stderr,
    )
