"""``streamer`` command line: ``streamer run`` (files and live streams) and ``streamer serve``.

Exit status: 0 done; 2 bad input (the message names the field, path or URL and the value); 3 an
output failed; 4 a stage failed (``--stages``); 130 interrupted by SIGINT/SIGTERM (files are finished
and playable).

``--stages N`` spreads the transformer's blocks over N processes started here; under ``torchrun`` the
same command runs on every rank, rank 0 as the CLI or server and the others as its stages.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from pipeline.config import CONFIG_DIR, ConfigError, load_system_config
from streamer.bridge import MAX_D_IN, MAX_D_OUT
from streamer.convert import add_checkpoint_flags, add_convert_parser, model_flags
from streamer.flags import check_flag
from streamer.plan import add_memory_flags, memory_gate
from streamer.run import EXIT_BAD_INPUT, check_stage_timeout, check_stages, cmd_run, parse_split

DEFAULT_CONFIG = str(CONFIG_DIR / "demo.yaml")  # the trained model; tiny (random weights) is for plumbing


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as asyncio's create_server binds them:
    ``""`` is every interface, SO_REUSEADDR, IPv6 sockets IPv6 only); OSError from the first that fails."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvloop
    from aiohttp import web

    from streamer.app import ServerOptions, create_app
    from streamer.guard import normal_origin
    from streamer.rtc_internals import use_consent_interval, use_ice_addresses
    from streamer.signaling import ice_addresses_for

    try:
        config = load_system_config(args.config, max_sessions=args.max_sessions, **model_flags(args))
        check_flag("--port", args.port, 1, 65535, "1..65535", integer=True)
        check_flag("--consent-interval", args.consent_interval, 1, 30, "1 to 30 seconds", integer=True)
        check_flag("--connect-timeout", args.connect_timeout, 0, 60, "more than 0, at most 60 s", low_open=True)
        check_flag("--d-in", args.d_in, 1, MAX_D_IN, f"an integer from 1 to {MAX_D_IN}", integer=True)
        check_flag("--d-out", args.d_out, 1, MAX_D_OUT, f"an integer from 1 to {MAX_D_OUT}", integer=True)
        check_stage_timeout(args.stage_timeout)
        for origin in args.allow_origin or ():
            normal_origin(origin)
        split = parse_split(args.split)
        check_stages(args.stages, split, config.model.num_layers)
        options = ServerOptions(
            stages=args.stages,
            split=split,
            stage_timeout=args.stage_timeout,
            ice_servers=args.ice_server or [],
            d_in=args.d_in,
            d_out=args.d_out,
            connect_timeout=args.connect_timeout,
            host=args.host,
            allow_hosts=tuple(args.allow_host or ()),
            allow_origins=tuple(args.allow_origin or ()),
        )
        status = memory_gate(config, args, args.stages, split)  # before any weight is loaded
    except (ConfigError, ValueError) as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if status is not None:
        return status
    try:  # bound here, before the banner: a busy port is one line, not a banner and a traceback
        socks = listen(args.host, args.port)
    except OSError as e:
        why = e.strerror or str(e)
        where = f"[{args.host}]" if ":" in args.host else args.host
        print(f"streamer: error: cannot listen on {where}:{args.port}: {why[:1].lower()}{why[1:]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    addresses = ice_addresses_for(args.host, args.ice_address)
    use_ice_addresses(addresses)
    use_consent_interval(args.consent_interval)
    print(
        f"streamer: serving {config.model.name} {config.width}x{config.height} @ {config.fps} fps on "
        f"http://{args.host}:{args.port}/ (ICE addresses {addresses}, ICE servers {options.ice_servers})",
        file=sys.stderr,
    )
    web.run_app(create_app(config, options), sock=socks, loop=uvloop.new_event_loop(), print=None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Streaming, real-time video generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate a video file (t2v, or v2v from --input)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="system config (default: demo, the trained model)")
    run.add_argument("--prompt", default="", help="text prompt")
    run.add_argument("--prompts", default=None, help="a YAML schedule of prompts and cuts over time")
    run.add_argument("--seconds", type=float, default=5.0, help="seconds of video to generate (default 5)")
    run.add_argument("--frames", type=int, default=None, help="frames to generate (overrides --seconds)")
    run.add_argument(
        "--out",
        action="append",
        default=[],
        help="a .mp4 (H.264) or .webm (VP9) file, or rtmp://host/app/key; repeatable",
    )
    run.add_argument("--also-record", action="append", default=[], help="a file that gets every frame, also")
    run.add_argument("--retry-seconds", type=float, default=10.0, help="how long a stream output retries (default 10)")
    run.add_argument("--keyframe-seconds", type=float, default=2.0, help="stream keyframe interval (default 2)")
    run.add_argument("--fps", type=int, default=None, help="override the config's frames per second")
    run.add_argument("--input", default=None, help="v2v: a video file or anything PyAV opens")
    run.add_argument("--seed", type=int, default=0, help="same seed, same frames")
    run.add_argument("--strength", type=float, default=1.0, help="v2v: noise the input to this sigma, (0, 1]")
    run.add_argument("--model", default=None, help="weights: a local folder (diffusers Wan layout) or hub id")
    add_checkpoint_flags(run)
    run.add_argument("--height", type=int, default=None, help="override the config's height")
    run.add_argument("--width", type=int, default=None, help="override the config's width")
    run.add_argument("--device", default=None, help="override the config's device (cpu, cuda, cuda:N)")
    run.add_argument("--dtype", default=None, help="override the config's dtype")
    add_decoder_flags(run)
    run.add_argument("--timesteps", default=None, help="override the denoising timesteps, e.g. 700,500,400,200")
    run.add_argument("--context", default=None, help="override the visibility rule: stream or clean")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_stage_flags(run)
    add_memory_flags(run)
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve the live demo page and the WebRTC API")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="system config (default: demo, the trained model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--model", default=None, help="weights: a local folder or hub id")
    add_checkpoint_flags(serve)
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None)
    add_decoder_flags(serve)
    serve.add_argument("--max-sessions", type=int, default=None, help="sessions served at once")
    serve.add_argument("--ice-server", action="append", help="STUN/TURN URL to offer (default: none)")
    serve.add_argument(
        "--ice-address", action="append", help="local address ICE may offer (default: loopback for a loopback host)"
    )
    serve.add_argument(
        "--consent-interval",
        type=int,
        default=1,
        help="seconds between ICE consent checks; 6 missed: the client is gone (default 1: noticed within 7.2 s)",
    )
    serve.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to connect (ICE and DTLS) after its answer, else its slot is freed (default 10)",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        help="a web origin (https://host[:port]) that may use the API, with CORS headers; repeatable "
        "(default: the server's own origin only)",
    )
    serve.add_argument(
        "--allow-host",
        action="append",
        help="another name clients may reach the server by (the Host header), e.g. behind a proxy; repeatable",
    )
    serve.add_argument("--d-in", type=int, default=64, help="bound of the command queue to the engine")
    serve.add_argument(
        "--d-out", type=int, default=2, help="decoded chunks waiting per session (t2v: the fewest chunks asked ahead)"
    )
    add_stage_flags(serve)
    add_memory_flags(serve)
    serve.set_defaults(func=cmd_serve)
    add_convert_parser(sub)
    return parser


def add_decoder_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decoder", default=None, help="frames from latents: wan (the Wan VAE, default) or taehv (the tiny decoder)"
    )
    parser.add_argument(
        "--decoder-path",
        default=None,
        help="taehv's weights, taew2_1.pth from github.com/madebyollin/taehv (random presets: seeded random if absent)",
    )


def add_stage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stages",
        type=int,
        default=1,
        help="spread the transformer's blocks over N processes (a GPU each; on a CPU, N processes), started "
        "here; under torchrun, the number of ranks (default 1: this process alone)",
    )
    parser.add_argument(
        "--split", default=None, help="blocks per stage, e.g. 16,14 (default: balanced by measured cost)"
    )
    parser.add_argument(
        "--stage-timeout",
        type=float,
        default=2.5,
        help="seconds without a stage's heartbeat, or in one micro-batch, before it counts as dead or hung "
        "(default 2.5)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if torchrun_rank() not in (None, 0):
        return stage_worker(args)
    return int(args.func(args))


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


def stage_worker(args: argparse.Namespace) -> int:
    """Under torchrun every rank runs this same command; all but rank 0 become stages of its ring."""
    from pipeline.stages.launch import run_worker, torchrun_ring

    try:
        config = load_system_config(args.config, **model_flags(args))
    except ConfigError as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ring = torchrun_ring(config)
    assert ring is not None
    return run_worker(ring)


if __name__ == "__main__":
    sys.exit(main())
