"""``streamer run``: generate into files and live streams (t2v, or v2v with ``--input``).

Exit status: 0 done; 2 bad input (the message names the field, path or URL and the value); 3 an
output failed (a stream that could not connect, or was lost for longer than ``--retry-seconds``; a
file that could not be written, its partial file removed at once): the others go on, and generation
stops when none is left;
4 a stage of ``--stages N`` died, hung or failed (every file is finished and playable, with the frames
made until then); 130 interrupted by SIGINT/SIGTERM, after finishing a playable file of every frame
generated so far.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import numpy as np
from tqdm import tqdm

from pipeline.commands import Close, Cut, CutDone, Demand, Open, Query, SessionStatus, SetParams
from pipeline.config import MAX_FPS, MAX_SIZE, ConfigError, SystemConfig, load_system_config
from pipeline.engine import Engine
from pipeline.feeder import Feeder
from pipeline.models.loader import load_models
from pipeline.models.text import WordTokenizer
from pipeline.stages.launch import make_executor
from pipeline.stages.transport import StageFailure
from pipeline.types import UserParams
from streamer.convert import model_flags
from streamer.egress.file import FileWriter, OutputError, PngSequence, check_output_path, is_sequence
from streamer.egress.outputs import OutputReport, OutputThread, Sink
from streamer.egress.rtmp import RtmpWriter, check_rtmp_url, is_stream_url
from streamer.flags import MAX_SECONDS, check_flag
from streamer.ingress import InputError, LiveSource, VideoFileSource, is_live
from streamer.plan import memory_gate
from streamer.prompts import PromptEvent, PromptScript, PromptScriptError, load_prompts

EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 4
EXIT_OUTPUT_FAILED = 3
EXIT_INTERRUPTED = 130

FILE_QUEUE_SECONDS = 10.0  # a file's queue: every frame is kept unless encoding lags 10 s behind
STREAM_QUEUE_SECONDS = 1.0  # a live stream's queue: it stays within a second of now
LEAD_SECONDS = 0.5  # with a live stream, generation runs at most this far ahead of the wall clock

MAX_STAGE_TIMEOUT = 600  # seconds a stage may go without a heartbeat
MAX_RETRY_SECONDS = 3600
MAX_KEYFRAME_SECONDS = 60


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


@dataclass(frozen=True)
class Target:
    """One ``--out``/``--also-record`` destination, checked before any work starts."""

    where: str  # a file path or a stream URL
    stream: bool  # True for rtmp:// URLs


def open_input(path: str, config: SystemConfig) -> VideoFileSource | LiveSource:
    """A file is read as fast as the engine takes it; a live input (a stream URL, a device, a pipe)
    in real time by its own thread, keeping at most one second of frames."""
    source = VideoFileSource(path, config.width, config.height, config.fps)
    return LiveSource(source, max_frames=config.fps) if is_live(path) else source


def check_numbers(args: argparse.Namespace) -> None:
    """Every number flag in its range, nan and inf never; ValueError naming the flag and the value."""
    check_flag(
        "--seconds", args.seconds, 0, MAX_SECONDS, f"a finite number more than 0, at most {MAX_SECONDS} (365 days)",
        low_open=True,
    )  # fmt: skip
    check_flag("--frames", args.frames, 1, math.inf, "an integer from 1", integer=True)
    check_flag(
        "--retry-seconds", args.retry_seconds, 0, MAX_RETRY_SECONDS, f"a finite number from 0 to {MAX_RETRY_SECONDS}"
    )
    check_flag(
        "--keyframe-seconds", args.keyframe_seconds, 0, MAX_KEYFRAME_SECONDS,
        f"a finite number more than 0, at most {MAX_KEYFRAME_SECONDS}", low_open=True,
    )  # fmt: skip
    check_flag("--strength", args.strength, 0, 1, "a number in (0, 1]", low_open=True)
    check_flag("--fps", args.fps, 1, MAX_FPS, f"an integer from 1 to {MAX_FPS}", integer=True)
    check_flag("--seed", args.seed, 0, 2**63, "an integer in [0, 2**63)", integer=True, high_open=True)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_flag(flag, value, 1, MAX_SIZE, f"an integer from 1 to {MAX_SIZE}", integer=True)
    check_stage_timeout(args.stage_timeout)


def check_stage_timeout(seconds: float) -> None:
    check_flag(
        "--stage-timeout", seconds, 0, MAX_STAGE_TIMEOUT, f"more than 0, at most {MAX_STAGE_TIMEOUT} s", low_open=True
    )


def check_targets(outs: list[str], also_record: list[str], input_: str | None = None) -> list[Target]:
    """The outputs, each checked; refused (OutputError) where two are one file, or one is the input file.

    Files are compared as files, not as spellings (``a.mp4``, ``./a.mp4``, a symlink or a hard link to
    it are one file); stream URLs as written. Nothing is written before this passes."""
    wheres = [*outs, *also_record]
    input_key = file_identity(path) if input_ is not None and (path := input_file(input_)) is not None else None
    seen: dict[tuple[object, ...], str] = {}
    for where in wheres:
        key = ("stream", where) if is_stream_url(where) else file_identity(where)
        if key == input_key:
            raise OutputError(
                f"output {where!r} is the same file as the input {input_!r}; writing it would destroy the input"
            )
        if key in seen:
            what = "stream" if key[0] == "stream" else "file"
            raise OutputError(f"outputs {seen[key]!r} and {where!r} are the same {what}; each output needs its own")
        seen[key] = where
    return [
        Target(check_rtmp_url(where), stream=True)
        if is_stream_url(where)
        else Target(str(check_output_path(where)), stream=False)
        for where in wheres
    ]


def input_file(where: str) -> str | None:
    """The file path an ``--input`` reads, or None for a stream URL or a pipe (no file to protect)."""
    if where.startswith("file:"):  # FFmpeg's file protocol: the rest is the path
        return where.removeprefix("file:")
    if is_stream_url(where) or where.startswith("pipe:"):
        return None
    return where


def file_identity(path: str) -> tuple[object, ...]:
    """What ``path`` names as a file: its device and inode where it exists (a symlink or a hard link to a
    file is that file); else the real path, folders and symlinks resolved (also a dangling symlink's target)."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def chunks_for(config: SystemConfig, frames: int) -> int:
    """t2v chunks that make at least ``frames`` video frames."""
    first = config.frames_for_chunk(first=True)
    return 1 + max(0, math.ceil((frames - first) / config.frames_for_chunk(first=False)))


def feed(
    engine: Engine,
    feeder: Feeder,
    status: SessionStatus,
    source: Iterator[tuple[np.ndarray, float]],
    limit: int,
) -> bool:
    """v2v: hand over the frames the engine wants now, at most ``limit`` (the one feeder's rule);
    True when the source has ended."""
    before = feeder.given
    while n := feeder.wanted(status, limit - (feeder.given - before)):
        taken = list(itertools.islice(source, n))
        if taken:
            result = engine.apply(feeder.submit([f for f, _ in taken], [t for _, t in taken]))
            if not result.taken:
                raise RuntimeError(f"the engine refused {len(taken)} frames it asked for")
            feeder.taken(len(taken))
            status = result.status
        if len(taken) < n:
            return True
    return False


class Release:
    """Hands generated frames to the outputs: at once, or (``realtime``: a live stream among them) at most
    ``LEAD_SECONDS`` ahead of a wall clock that starts with the first frame, so a stream's queue holds what
    it should send next, not what it must drop. The engine may hand over several chunks at once (decoded
    while the loop waited); they wait here, not in the stream's queue."""

    def __init__(self, outputs: list[OutputThread], fps: int, realtime: bool) -> None:
        self.outputs, self.fps, self.realtime = outputs, fps, realtime
        self.held: deque[np.ndarray] = deque()
        self.sent = 0  # frames handed to the outputs
        self.first: float | None = None  # when the first frames went

    def add(self, frames: np.ndarray) -> None:
        self.held.append(frames)
        self.release()

    def wait(self) -> float:
        """Seconds until the next held frames are due."""
        if not self.held or self.first is None:
            return 0.0
        return max(0.0, self.first + self.sent / self.fps - LEAD_SECONDS - time.perf_counter())

    def release(self, everything: bool = False) -> None:
        while self.held and (everything or not self.realtime or self.wait() == 0.0):
            frames = self.held.popleft()
            self.first = self.first or time.perf_counter()
            for out in self.outputs:
                out.put(frames)
            self.sent += len(frames)


def generate(
    engine: Engine,
    params: UserParams,
    source: VideoFileSource | LiveSource | None,
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
    of the wall clock (:class:`Release`), and generation waits while any are held back.
    ``script``: prompt changes and cuts at the first chunk boundary at or after their time. Chunks
    are started only up to the next event; a cut waits for the chunks before it to be handed out, so
    it falls exactly there and nothing of the old epoch is lost or carried over."""
    config = engine.config
    mode = "v2v" if source is not None else "t2v"
    sid = engine.apply(Open(params, mode)).session_id
    feeder = Feeder(sid)
    frames_in = source.timed() if source is not None else iter(())
    events = [e for e in (script.events if script else ()) if e.at > 0]
    release = Release(outputs, config.fps, realtime)
    made, ended = 0, source is None
    start = time.perf_counter()
    while (made < total or release.held) and not stop and any(out.error is None for out in outputs):
        release.release()
        if release.held:  # ahead of the clock: wait until they are due
            time.sleep(min(release.wait(), 0.1))
            continue
        status: SessionStatus = engine.apply(Query(sid))
        boundary = min(total, script.frame_of(events[0], config.fps)) if events and script else total
        if events and status.next_video_frame >= boundary:  # every chunk before the event has started
            event = events[0]
            if event.cut and status.undelivered:
                pass  # let them finish first
            else:
                apply_event(engine, sid, event, status.next_video_frame, config.fps)
                events.pop(0)
                continue
        elif mode == "t2v" and status.demand == 0 and status.next_video_frame < boundary:
            engine.apply(Demand(sid, 1))
        elif mode == "v2v" and not ended:
            ended = feed(engine, feeder, status, frames_in, boundary - feeder.given)
        if not engine.has_work():
            break
        try:
            chunks = engine.step()
        except StageFailure as e:  # what was made still goes out; the run ends with the stage's error
            release.release(everything=True)
            return made, e
        for chunk in chunks:
            frames = chunk.frames[: total - made]
            release.add(frames)
            made += len(frames)
            bar.update(len(frames))
            bar.set_postfix_str(f"{made / config.fps / (time.perf_counter() - start):.2f}x real time", refresh=False)
    release.release(everything=True)  # stopped by a signal or an output: what was made still goes out
    engine.apply(Close(sid))
    return made, None


def apply_event(engine: Engine, sid: str, event: PromptEvent, frame: int, fps: int) -> None:
    what = []
    if event.cut:
        done: CutDone = engine.apply(Cut(sid))
        what.append(f"cut (epoch {done.epoch})")
    if event.prompt is not None:
        engine.apply(SetParams.of(sid, prompt=event.prompt))
        what.append(f"prompt {event.prompt!r}")
    tqdm.write(
        f"streamer: at frame {frame} ({frame / fps:.2f} s; line {event.line} asked for {event.at:g} s): "
        + ", ".join(what),
        file=sys.stderr,
    )


def open_sinks(targets: list[Target], config: SystemConfig, args: argparse.Namespace) -> list[OutputThread]:
    """Files open at once; streams connect now (retrying up to --retry-seconds) so that a receiver
    started a little later still gets the stream from its first frame."""
    threads: list[OutputThread] = []

    def failed(name: str, error: str) -> None:
        left = "no output is left: stopping" if all(th.error for th in threads) else "going on without it"
        print(f"streamer: output {name} failed: {error}; {left}", file=sys.stderr)

    try:
        for t in targets:
            sink: Sink
            if t.stream:
                rtmp = RtmpWriter(
                    t.where, config.width, config.height, config.fps, args.keyframe_seconds, args.retry_seconds
                )
                rtmp.connect()
                sink, seconds = rtmp, STREAM_QUEUE_SECONDS
            else:
                size = (config.width, config.height)
                sink = PngSequence(t.where, *size) if is_sequence(t.where) else FileWriter(t.where, *size, config.fps)
                seconds = FILE_QUEUE_SECONDS
            threads.append(OutputThread(sink, capacity=max(8, round(seconds * config.fps)), on_error=failed))
    except BaseException:
        for th in threads:
            th.abort()
        raise
    return threads


def describe(report: OutputReport) -> str:
    text = f"{report.name}: {report.frames} frames"
    if report.dropped:
        text += f", {report.dropped} dropped ({report.policy})"
    if report.error:
        text += f", FAILED: {report.error}"
    return text


def cmd_run(args: argparse.Namespace) -> int:
    try:
        if not args.out and not args.memory_plan:
            raise OutputError("give at least one --out (a .mp4/.webm file or an rtmp:// URL)")
        check_numbers(args)
        targets = check_targets(args.out, args.also_record or [], args.input)
        config = load_system_config(
            args.config,
            height=args.height,
            width=args.width,
            context=args.context,
            timesteps=parse_timesteps(args.timesteps),
            fps=args.fps,
            **model_flags(args),
        )
        script = load_prompts(args.prompts) if args.prompts else None
        prompt = (script.initial_prompt() if script else None) or args.prompt
        params = UserParams(prompt=prompt, seed=args.seed, strength=args.strength)
        most = MAX_SECONDS * config.fps
        check_flag("--frames", args.frames, 1, most, f"an integer from 1 to {most} (365 days at {config.fps} fps)")
        total = args.frames if args.frames is not None else max(1, round(args.seconds * config.fps))
        split = parse_split(args.split)
        check_stages(args.stages, split, config.model.num_layers)
        if (status := memory_gate(config, args, args.stages, split)) is not None:  # before any weight is loaded
            return status
        models = load_models(config)
        check_stages(args.stages, split, models.dit.num_blocks)
        source = open_input(args.input, config) if args.input else None
    except (ConfigError, OutputError, InputError, PromptScriptError, ValueError) as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        executor = make_executor(config, models, args.stages, split, args.stage_timeout, log=say)
    except StageFailure as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        if source is not None:
            source.close()
        return EXIT_STAGE_FAILED
    engine = Engine(config, models, executor=executor)
    mode = f"v2v from {args.input}{' (live)' if isinstance(source, LiveSource) else ''}" if source else "t2v"
    names = ", ".join(t.where for t in targets)
    print(
        f"streamer: {config.model.name} ({engine.models.source}) {mode}, {config.width}x{config.height} "
        f"@ {config.fps} fps, {config.steps} steps, context={config.context}, {total} frames -> {names}",
        file=sys.stderr,
    )
    tokenizer = getattr(models.text, "tokenizer", None)
    if isinstance(tokenizer, WordTokenizer) and (unknown := tokenizer.unknown(params.prompt)):
        print(
            f"streamer: warning: the {config.model.name} model does not know the word(s) {unknown} of the prompt; "
            f"it knows: {', '.join(tokenizer.words)}",
            file=sys.stderr,
        )
    try:
        outputs = open_sinks(targets, config, args)
    except OutputError as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        if source is not None:
            source.close()
        engine.close()
        return EXIT_OUTPUT_FAILED
    stop = StopFlag()
    bar = tqdm(total=total, unit="frame", desc="generating", file=sys.stderr, disable=args.quiet)
    t0 = time.perf_counter()
    try:
        realtime = any(t.stream for t in targets)
        made, failure = generate(engine, params, source, total, outputs, stop, bar, realtime, script)
    except BaseException:
        for out in outputs:
            out.abort()
        raise
    finally:
        bar.close()
        stop.restore()
        engine.close()
        if source is not None:
            source.close()
    reports = [out.finish() for out in outputs]
    elapsed = time.perf_counter() - t0
    seconds = made / config.fps
    summary = f"{made} frames ({seconds:.2f} s of video) in {elapsed:.2f} s: {seconds / elapsed:.2f}x real time"
    for r in reports:
        print(f"streamer:   {describe(r)}", file=sys.stderr)
    if isinstance(source, LiveSource):
        print(f"streamer:   input: {source.dropped} frames dropped (newest frames win)", file=sys.stderr)
    if failure is not None:
        print(f"streamer: error: {failure}; generation stopped after {summary}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_STAGE_FAILED)  # the files are finished; gloo's teardown would wait for the stage that is gone
    if all(r.error for r in reports):
        print(f"streamer: error: every output failed; generation stopped after {summary}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    if stop:
        print(f"streamer: interrupted by signal {stop.signal}; generated {summary}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"streamer: generated {summary}", file=sys.stderr)
    return EXIT_OUTPUT_FAILED if any(r.error for r in reports) else 0


def say(message: str) -> None:
    print(f"streamer: {message}", file=sys.stderr)


def parse_split(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"--split={text!r} is not allowed: blocks per stage, e.g. 16,14") from None


def check_stages(stages: int, split: list[int] | None, num_blocks: int) -> None:
    check_flag("--stages", stages, 1, num_blocks, f"from 1 to the model's {num_blocks} blocks (one each)", integer=True)
    if split is not None and (len(split) != stages or min(split) < 1 or sum(split) != num_blocks):
        raise ValueError(
            f"--split={','.join(map(str, split))} is not allowed: {stages} counts of at least 1 block adding up to "
            f"the model's {num_blocks}"
        )


def parse_timesteps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--timesteps={text!r} is not allowed: comma-separated numbers, e.g. 700,500,400,200"
        ) from None
