"""``streamer run``: generate into files and live streams (t2v, or v2v with ``--input``).

Exit status: 0 done; 2 bad input (the message names the field, path or URL and the value); 3 an
output failed (a stream that could not connect, or was lost for longer than ``--retry-seconds``; a
file that could not be written, its partial file removed at once): the others go on, and generation
stops when none is left;
4 a stage of ``--stages N`` died, hung or failed (every file is finished and playable, with the frames
made until then); 130 interrupted by SIGINT/SIGTERM, after finishing a playable file of every frame
generated so far.

By job: :mod:`.arguments` (every flag checked, the outputs checked, before anything is loaded), the input
(:mod:`streamer.ingress`: files and live sources the feeder pulls from), :mod:`.outputs` (sinks in their
threads, released in real time where a stream needs it) and :mod:`.loop` (the one feeder, the prompt
schedule, stop and failure); this module puts them together.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

from pipeline.config import ConfigError, load_system_config
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.models.text import WordTokenizer
from pipeline.stages.transport import StageFailure
from pipeline.start import make_executor
from pipeline.types import UserParams
from streamer.convert import model_flags
from streamer.egress.file import OutputError
from streamer.flags import MAX_SECONDS, check_flag
from streamer.ingress import InputError, LiveSource, open_input
from streamer.plan import memory_gate
from streamer.prompts import PromptScriptError, load_prompts
from streamer.run.arguments import (
    check_numbers,
    check_stage_timeout,
    check_stages,
    check_targets,
    parse_split,
    parse_timesteps,
)
from streamer.run.loop import StopFlag, generate
from streamer.run.outputs import describe, open_sinks

EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 4
EXIT_OUTPUT_FAILED = 3
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_BAD_INPUT", "check_stage_timeout", "check_stages", "cmd_run", "parse_split"]


def cmd_run(args: argparse.Namespace) -> int:
    try:
        if not args.out and not args.memory_plan:
            raise OutputError("give at least one --out (a .mp4/.webm/.mkv file, DIR/%05d.png or an rtmp:// URL)")
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
