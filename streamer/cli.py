"""``streamer`` command line: ``streamer run`` generates a video file (t2v, or v2v with ``--input``).

Exit status: 0 done; 2 bad input (the message names the field or path and the value); 130
interrupted by SIGINT/SIGTERM, after finishing a playable file of every frame generated so far.
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

import numpy as np
from tqdm import tqdm

from pipeline.config import CONFIG_DIR, ConfigError, SystemConfig, load_system_config
from pipeline.engine import Engine
from pipeline.types import UserParams
from streamer.egress.file import FileWriter, OutputError, check_output_path
from streamer.ingress import InputError, VideoFileSource

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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


def chunks_for(config: SystemConfig, frames: int) -> int:
    """t2v chunks that make at least ``frames`` video frames."""
    first = config.frames_for_chunk(first=True)
    return 1 + max(0, math.ceil((frames - first) / config.frames_for_chunk(first=False)))


def feed(engine: Engine, sid: str, source: Iterator[np.ndarray], budget: list[int]) -> bool:
    """v2v: give the engine the frames it wants now; False once the source or budget is spent."""
    while budget[0] > 0 and (n := engine.wants_frames(sid)):
        frames = list(itertools.islice(source, min(n, budget[0])))
        if frames:
            engine.submit(sid, np.stack(frames))
            budget[0] -= len(frames)
        if len(frames) < n:
            return False
    return budget[0] > 0


def generate(
    engine: Engine,
    params: UserParams,
    source: VideoFileSource | None,
    total: int,
    writer: FileWriter,
    stop: StopFlag,
    bar: tqdm,
) -> int:
    """Run the engine until ``total`` frames are written, the input ends, or ``stop`` is set."""
    config = engine.config
    if source is None:
        sid = engine.open_session(params, mode="t2v")
        engine.request(sid, chunks_for(config, total))
        more_input = False
    else:
        sid = engine.open_session(params, mode="v2v")
        frames_in = iter(source)
        budget = [total]
        more_input = feed(engine, sid, frames_in, budget)
    start = time.perf_counter()
    while writer.frames < total and not stop:
        if source is not None and more_input:
            more_input = feed(engine, sid, frames_in, budget)
        if not engine.has_work():
            break
        for chunk in engine.step():
            frames = chunk.frames[: total - writer.frames]
            writer.write(frames)
            bar.update(len(frames))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{writer.frames / config.fps / elapsed:.2f}x real time", refresh=False)
    engine.close_session(sid)
    return writer.frames


def parse_timesteps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--timesteps={text!r} is not allowed: comma-separated numbers, e.g. 700,500,400,200"
        ) from None


def cmd_run(args: argparse.Namespace) -> int:
    try:
        out = check_output_path(args.out)
        config = load_system_config(
            args.config,
            model_source=args.model,
            height=args.height,
            width=args.width,
            device=args.device,
            dtype=args.dtype,
            context=args.context,
            timesteps=parse_timesteps(args.timesteps),
        )
        params = UserParams(prompt=args.prompt, seed=args.seed, strength=args.strength)
        if args.frames is not None and args.frames < 1:
            raise ValueError(f"--frames={args.frames} is not allowed: at least 1")
        if args.seconds <= 0:
            raise ValueError(f"--seconds={args.seconds} is not allowed: more than 0")
        total = args.frames if args.frames is not None else max(1, round(args.seconds * config.fps))
        source = VideoFileSource(args.input, config.width, config.height, config.fps) if args.input else None
        engine = Engine(config)
    except (ConfigError, OutputError, InputError, ValueError) as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    mode = f"v2v from {args.input}" if source else "t2v"
    print(
        f"streamer: {config.model.name} ({engine.models.source}) {mode}, {config.width}x{config.height} "
        f"@ {config.fps} fps, {config.steps} steps, context={config.context}, {total} frames -> {out}",
        file=sys.stderr,
    )
    writer = FileWriter(out, config.width, config.height, config.fps)
    stop = StopFlag()
    bar = tqdm(total=total, unit="frame", desc="generating", file=sys.stderr, disable=args.quiet)
    t0 = time.perf_counter()
    try:
        frames = generate(engine, params, source, total, writer, stop, bar)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        stop.restore()
        if source is not None:
            source.close()
    writer.close()
    elapsed = time.perf_counter() - t0
    seconds = frames / config.fps
    summary = (
        f"{frames} frames ({seconds:.2f} s of video) to {out} in {elapsed:.2f} s: {seconds / elapsed:.2f}x real time"
    )
    if stop:
        print(f"streamer: interrupted by signal {stop.signal}; wrote {summary}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"streamer: wrote {summary}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvloop
    from aiohttp import web

    from streamer.app import ServerOptions, create_app
    from streamer.signaling import ice_addresses_for, use_consent_interval, use_ice_addresses

    try:
        config = load_system_config(
            args.config, model_source=args.model, device=args.device, dtype=args.dtype, max_sessions=args.max_sessions
        )
        if not 0 < args.port < 65536:
            raise ValueError(f"--port={args.port} is not allowed: 1..65535")
        if not 1 <= args.consent_interval <= 30:
            raise ValueError(f"--consent-interval={args.consent_interval} is not allowed: 1 to 30 seconds")
    except (ConfigError, ValueError) as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    addresses = ice_addresses_for(args.host, args.ice_address)
    use_ice_addresses(addresses)
    use_consent_interval(args.consent_interval)
    options = ServerOptions(ice_servers=args.ice_server or [], d_in=args.d_in, d_out=args.d_out)
    print(
        f"streamer: serving {config.model.name} {config.width}x{config.height} @ {config.fps} fps on "
        f"http://{args.host}:{args.port}/ (ICE addresses {addresses}, ICE servers {options.ice_servers})",
        file=sys.stderr,
    )
    web.run_app(create_app(config, options), host=args.host, port=args.port, loop=uvloop.new_event_loop(), print=None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Streaming, real-time video generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate a video file (t2v, or v2v from --input)")
    run.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"), help="system config (default: tiny)")
    run.add_argument("--prompt", default="", help="text prompt")
    run.add_argument("--seconds", type=float, default=5.0, help="seconds of video to generate (default 5)")
    run.add_argument("--frames", type=int, default=None, help="frames to generate (overrides --seconds)")
    run.add_argument("--out", required=True, help="output file: .mp4 (H.264) or .webm (VP9)")
    run.add_argument("--input", default=None, help="v2v: a video file or anything PyAV opens")
    run.add_argument("--seed", type=int, default=0, help="same seed, same frames")
    run.add_argument("--strength", type=float, default=1.0, help="v2v: noise the input to this sigma, (0, 1]")
    run.add_argument("--model", default=None, help="weights: a local folder (diffusers Wan layout) or hub id")
    run.add_argument("--height", type=int, default=None, help="override the config's height")
    run.add_argument("--width", type=int, default=None, help="override the config's width")
    run.add_argument("--device", default=None, help="override the config's device (cpu, cuda, cuda:N)")
    run.add_argument("--dtype", default=None, help="override the config's dtype")
    run.add_argument("--timesteps", default=None, help="override the denoising timesteps, e.g. 700,500,400,200")
    run.add_argument("--context", default=None, help="override the visibility rule: stream or clean")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve the live demo page and the WebRTC API")
    serve.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"), help="system config (default: tiny)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--model", default=None, help="weights: a local folder or hub id")
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--max-sessions", type=int, default=None, help="sessions served at once")
    serve.add_argument("--ice-server", action="append", help="STUN/TURN URL to offer (default: none)")
    serve.add_argument(
        "--ice-address", action="append", help="local address ICE may offer (default: loopback for a loopback host)"
    )
    serve.add_argument(
        "--consent-interval", type=int, default=2, help="seconds between ICE consent checks (6 missed: client gone)"
    )
    serve.add_argument("--d-in", type=int, default=64, help="bound of the command queue to the engine")
    serve.add_argument("--d-out", type=int, default=2, help="decoded chunks waiting per session")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
