"""``python -m bench.soak``: the arguments, the scenarios in turn against a fresh server each, the report."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from bench.soak import checks
from bench.soak.churn import churn
from bench.soak.fuzz import big_message, fuzz
from bench.soak.offers import offers
from bench.soak.report import SCHEMA, failed_checks, git, machine, plot, print_summary
from bench.soak.server import ROOT, ServerSpec, serve_flags
from bench.soak.stream import long_stream
from streamer.rtc_internals import use_ice_addresses

SCENARIOS = ("churn", "stream", "fuzz", "offers")
EXIT_CHECK_FAILED, EXIT_FAILED = 1, 2
LONG = {"cycles": 40, "stream_seconds": 300.0, "fuzz_random": 1500}
SHORT = {"cycles": 3, "stream_seconds": 15.0, "fuzz_random": 20}


def scenario(name: str, spec: ServerSpec, args: argparse.Namespace) -> tuple[Callable[[], Awaitable[Any]], float]:
    """The scenario's coroutine function and the most seconds it may take (a safety net: every loop
    inside is bounded on its own)."""
    if name == "churn":
        return lambda: churn(spec, args.cycles), 120.0 + 120.0 * args.cycles
    if name == "stream":
        return lambda: long_stream(spec, args.stream_seconds), 180.0 + args.stream_seconds

    async def fuzz_and_big() -> dict[str, Any]:
        return await fuzz(spec, args.seed, args.fuzz_random) | {"big_message": await big_message(spec, args.big_bytes)}

    if name == "fuzz":
        return fuzz_and_big, 600.0 + 10.0 * args.fuzz_random
    return lambda: offers(spec), 900.0


async def run_one(name: str, spec: ServerSpec, args: argparse.Namespace, server: dict[str, Any]) -> dict[str, Any]:
    """One scenario's figures and checks, or ``{"error": what}``."""
    print(f"bench.soak: {name} ...", file=sys.stderr, flush=True)
    coro, bound = scenario(name, spec, args)
    started = time.monotonic()
    try:
        figures = await asyncio.wait_for(coro(), bound)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "wall_s": round(time.monotonic() - started, 1)}
    return figures | {"wall_s": round(time.monotonic() - started, 1), "checks": checks.evaluate(name, figures, server)}


def server_info(spec: ServerSpec, flagged: bool) -> dict[str, Any]:
    config = yaml.safe_load((spec.root / spec.config).read_text())
    height, width = spec.size or (config["height"], config["width"])
    return {
        "root": os.path.relpath(spec.root, ROOT) if spec.root.is_relative_to(ROOT) else "another checkout (git_commit)",
        **{f"git_{k}": v for k, v in git(spec.root).items()},
        "config": spec.config,
        "size": f"{width}x{height}",
        "fps": config["fps"],
        "max_sessions": spec.max_sessions,
        "consent_interval_s": spec.consent_interval,
        "connect_timeout_s": spec.connect_deadline,
        "connect_timeout_flag": flagged,  # False: the server has no --connect-timeout (its default assumed)
    }


async def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    use_ice_addresses(["127.0.0.1"])  # this process's clients offer loopback candidates only
    root = Path(args.server_root).resolve()
    flagged = "--connect-timeout" in serve_flags(root)
    size = (args.height, args.width)
    spec = ServerSpec(
        root, args.config, size, args.max_sessions, args.consent_interval, args.connect_timeout if flagged else None
    )
    server = server_info(spec, flagged)
    started = time.monotonic()
    scenarios = {}
    for name in SCENARIOS:
        if name in args.selected:
            scenarios[name] = await run_one(name, spec, args, server)
    return {
        "schema": SCHEMA,
        "short": args.short,
        "command": " ".join(["python -m bench.soak", *argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.monotonic() - started, 1),
        "harness_git": git(ROOT),
        "server": server,
        "machine": machine(),
        "scenarios": scenarios,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write a PNG here: churn per cycle, the long stream, the fuzz")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)")
    parser.add_argument("--short", action="store_true", help=f"the test-sized run: {SHORT}")
    parser.add_argument("--cycles", type=int, default=None, help=f"churn cycles (long {LONG['cycles']})")
    parser.add_argument(
        "--stream-seconds", type=float, default=None, help=f"long stream (long {LONG['stream_seconds']})"
    )
    parser.add_argument("--fuzz-random", type=int, default=None, help=f"random fuzz cases (long {LONG['fuzz_random']})")
    parser.add_argument("--big-bytes", type=int, default=10_000_000, help="the big control message's size")
    parser.add_argument("--seed", type=int, default=1, help="fuzz corpus seed")
    parser.add_argument("--server-root", default=str(ROOT), help="the checkout the server runs from (default this one)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="system config, relative to --server-root")
    parser.add_argument(
        "--height",
        type=int,
        default=64,
        help="frame height served (a copy of the config; default 64: on 2 cores the "
        "tiny model's 128x128 cannot serve two sessions in real time, and every gap would be the CPU's)",
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max-sessions", type=int, default=4)
    parser.add_argument("--consent-interval", type=int, default=1, help="the server's --consent-interval")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="the server's, where it has the flag")
    args = parser.parse_args(argv)
    for key, value in (SHORT if args.short else LONG).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in (args.only or ",".join(SCENARIOS)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown or not names:
        parser.error(f"--only={args.only!r}: scenarios are {','.join(SCENARIOS)}")
    if (
        args.cycles < 1
        or args.stream_seconds <= 0
        or args.fuzz_random < 0
        or args.big_bytes < 1
        or args.max_sessions < 3
    ):
        parser.error(
            f"--cycles={args.cycles}, --stream-seconds={args.stream_seconds}, --fuzz-random={args.fuzz_random}, "
            f"--big-bytes={args.big_bytes}, --max-sessions={args.max_sessions}: cycles >= 1, seconds > 0, "
            "random cases >= 0, bytes >= 1, max sessions >= 3 (a churn cycle holds three)"
        )
    args.selected = set(names)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("bench.soak: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return EXIT_FAILED
    report = asyncio.run(measure(args, argv))
    report["failed_checks"] = failed_checks(report)
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
    errors = [n for n, s in report["scenarios"].items() if "error" in s]
    if errors:
        print(f"bench.soak: failed to run: {', '.join(errors)}", file=sys.stderr)
        return EXIT_FAILED
    if report["failed_checks"]:
        print(f"bench.soak: {len(report['failed_checks'])} checks failed", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0
