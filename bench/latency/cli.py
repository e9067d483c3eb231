"""``python -m bench.latency``: the arguments, the paths in turn, the report."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.latency.browser_path import CHROMIUM, RESULT_MARKER, browser_session, browser_unavailable, run_browser_path
from bench.latency.common import EXIT_FAILED, EXIT_WORSE, PATHS, in_engine_thread, load_config, run_async
from bench.latency.efficiency import measure_efficiency
from bench.latency.engine_path import run_engine_path, warm_up
from bench.latency.report import build_report, plot, print_comparison, print_table, read_report
from bench.latency.served import webrtc_path
from pipeline.config import SystemConfig
from pipeline.models.loader import Models, load_models
from streamer.rtc_internals import use_ice_addresses
from streamer.signaling import ice_addresses_for


def run_path(name: str, config: SystemConfig, models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """One path's result: its numbers, ``{"skipped": why}`` or ``{"error": what}``."""
    if name not in args.selected:
        return {"skipped": "not selected (--paths)"}
    print(f"bench.latency: {name} path ...", file=sys.stderr, flush=True)
    try:
        if name == "engine":
            return in_engine_thread(run_engine_path, config, models, args)
        if name == "webrtc":
            return run_async(webrtc_path(config, models, args))
        reason = browser_unavailable(args.chromium)
        return {"skipped": reason} if reason else run_browser_path(args)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every selected path in turn, one report."""
    config = load_config(args)
    host = (urlparse(args.server).hostname or "127.0.0.1") if args.server else "127.0.0.1"
    use_ice_addresses(ice_addresses_for(host, None))  # loopback only for a loopback server
    models = load_models(config, random_weights=args.random_weights)
    print(
        f"bench.latency: {config.model.name} {config.width}x{config.height} {args.mode} on {config.device}, "
        f"warm-up {in_engine_thread(warm_up, config, models, args.mode)} s",
        file=sys.stderr,
    )
    paths = {name: run_path(name, config, models, args) for name in PATHS}
    measured = None
    if args.rounds and args.mode == "t2v" and not args.server:
        print(f"bench.latency: efficiency, {args.rounds} rounds ...", file=sys.stderr, flush=True)
        measured = measure_efficiency(config, models, args.rounds, args.round_seconds)
    return build_report(paths, measured, config, args, argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--mode", choices=["t2v", "v2v"], default="t2v")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady state per path, after its first frame")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write a PNG here: latency over time and histogram per path")
    parser.add_argument("--server", default=None, help="URL of a running server for the webrtc path")
    parser.add_argument("--compare", default=None, help="an earlier report: print what got worse, exit 1 if any")
    parser.add_argument("--tolerance", type=float, default=0.2, help="relative change --compare lets pass")
    parser.add_argument("--from-json", default=None, help="read this report instead of measuring")
    parser.add_argument("--target-ms", type=float, default=250.0, help="latency deadline per frame")
    parser.add_argument("--paths", default=None, help="comma-separated subset of engine,webrtc,browser (default all)")
    parser.add_argument("--engine-source", choices=["max", "realtime"], default="max", help="v2v input, engine path")
    parser.add_argument(
        "--rounds", type=int, default=5, help="t2v efficiency: rounds of (engine alone, served) windows; 0: none"
    )
    parser.add_argument("--round-seconds", type=float, default=3.0, help="t2v efficiency: seconds per window")
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights (GPU speed runs)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--browser-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [p.strip() for p in (args.paths or ",".join(PATHS)).split(",") if p.strip()]
    unknown = sorted(set(names) - set(PATHS))
    if unknown or not names or args.seconds <= 0 or args.tolerance < 0:
        parser.error(
            f"--paths={args.paths!r}, --seconds={args.seconds}, --tolerance={args.tolerance}: paths are "
            f"{','.join(PATHS)}, seconds > 0, tolerance >= 0"
        )
    if args.rounds < 0 or args.round_seconds <= 0:
        parser.error(f"--rounds={args.rounds}, --round-seconds={args.round_seconds}: rounds >= 0, round seconds > 0")
    args.selected = set(names)
    return args


def refusal(args: argparse.Namespace) -> str | None:
    """Why this run cannot start: a browser asked for by name that cannot run, or no matplotlib for --plot."""
    if args.from_json is None and args.paths and "browser" in args.selected:
        reason = browser_unavailable(args.chromium)
        if reason:
            return f"--paths asks for the browser path, which cannot run here: {reason}"
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib (pip install matplotlib)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.browser_child:
        print(RESULT_MARKER + json.dumps(run_async(browser_session(args))), flush=True)
        return 0
    why = refusal(args)
    if why:
        print(f"bench.latency: {why}", file=sys.stderr)
        return EXIT_FAILED
    try:
        old = read_report(args.compare) if args.compare else None  # before measuring: a bad file fails fast
        report = read_report(args.from_json) if args.from_json else measure(args, argv)
    except ValueError as e:
        print(f"bench.latency: {e}", file=sys.stderr)
        return EXIT_FAILED
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    failed = [n for n, p in report["paths"].items() if "error" in p]
    worse = old is not None and print_comparison(report, old, args.compare, args.tolerance)
    if failed:
        print(f"bench.latency: failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_WORSE if worse else 0
