"""Engine benchmark: StreamBatch vs a plain sequential loop, and 1 vs N concurrent sessions.

    python -m bench.engine --config configs/tiny.yaml --json out.json

Every case runs the same engine on the same models; cases are interleaved round by round (A B C D,
A B C D, ...) so that a shared, noisy machine slows them alike, and the ratios are what to read.
"sequential" is the same work as StreamBatch (same plans, same visibility rule) with one forward
per slot. Reported per case: chunks/s, frames/s, ms per tick (median, p95) for the whole tick
(VAE encode/decode included) and for the DiT executor alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import load_system_config, replace
from pipeline.engine import Engine
from pipeline.executor import Executor, SlotInputs
from pipeline.models.loader import Models, load_models

PROMPTS = ["a red fox in snow", "waves at night", "a city from above", "rain on glass", "a forest path"]


class TimedExecutor:
    """Wraps an executor and records its wall time per call (synchronising a GPU)."""

    def __init__(self, inner: Executor, device: torch.device) -> None:
        self.inner = inner
        self.device = device
        self.seconds: list[float] = []

    def run(self, inputs: SlotInputs) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner.run(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - t0)
        return out


@dataclass
class Case:
    executor: str
    sessions: int
    tick_s: list[float] = field(default_factory=list)
    dit_s: list[float] = field(default_factory=list)
    chunks: int = 0
    frames: int = 0
    slots: int = 0

    @property
    def name(self) -> str:
        return f"{self.executor}/{self.sessions}"

    def summary(self) -> dict[str, float]:
        total = sum(self.tick_s)
        ms = sorted(t * 1000 for t in self.tick_s)
        dit = sorted(t * 1000 for t in self.dit_s)
        return {
            "sessions": self.sessions,
            "fps": self.frames / total,
            "chunks_per_s": self.chunks / total,
            "fps_per_session": self.frames / total / self.sessions,
            "ms_per_tick_median": statistics.median(ms),
            "ms_per_tick_p95": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
            "dit_ms_per_tick_median": statistics.median(dit),
            "slots_per_tick": self.slots / len(self.tick_s),
            "ticks": len(self.tick_s),
        }


def run_round(case: Case, models: Models, config, warmup: int, ticks: int) -> None:
    engine = Engine(config, models, executor=case.executor)
    timed = TimedExecutor(engine.executor, engine.device)
    engine.executor = timed
    for i in range(case.sessions):
        sid = engine.open_session({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
        engine.request(sid, warmup + ticks + 2 * config.steps)
    for _ in range(warmup):  # fills every window: T+1 slots per session from here on
        engine.step()
    timed.seconds.clear()
    slots_before = engine.stats.slots
    for _ in range(ticks):
        t0 = time.perf_counter()
        out = engine.step()
        case.tick_s.append(time.perf_counter() - t0)
        case.chunks += len(out)
        case.frames += sum(c.num_frames for c in out)
    case.dit_s += timed.seconds
    case.slots += engine.stats.slots - slots_before


def machine() -> dict[str, str | int]:
    info: dict[str, str | int] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions of the multi-session case")
    parser.add_argument("--ticks", type=int, default=12, help="measured ticks per case and round")
    parser.add_argument("--warmup", type=int, default=None, help="ticks before measuring (default: steps + 2)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights (GPU speed runs)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    args = parser.parse_args(argv)

    config = load_system_config(args.config, device=args.device, dtype=args.dtype, height=args.height, width=args.width)
    config = replace(config, max_sessions=max(config.max_sessions, args.sessions))
    models = load_models(config, random_weights=args.random_weights)
    warmup = args.warmup if args.warmup is not None else config.steps + 2
    cases = [Case(e, n) for n in (1, args.sessions) for e in ("streambatch", "sequential")]
    print(
        f"bench.engine: {config.model.name} {config.width}x{config.height} {config.dtype} on {config.device}, "
        f"{config.steps} steps, chunk_frames={config.chunk_frames}, context={config.context}",
        file=sys.stderr,
    )
    for round_ in range(args.rounds):
        for case in cases:
            run_round(case, models, config, warmup, args.ticks)
            print(f"  round {round_ + 1}/{args.rounds} {case.name}: done", file=sys.stderr)

    results = {c.name: c.summary() for c in cases}
    many = args.sessions
    sb, seq = results[f"streambatch/{many}"], results[f"sequential/{many}"]
    report = {
        "streambatch": sb,
        "sequential": seq,
        "speedup": sb["fps"] / seq["fps"],
        "dit_speedup": seq["dit_ms_per_tick_median"] / sb["dit_ms_per_tick_median"],
        "session_scaling": sb["fps"] / results["streambatch/1"]["fps"],
        "realtime_factor_1_session": results["streambatch/1"]["fps"] / config.fps,
        "cases": results,
        "config": config.summary() | {"random_weights": args.random_weights or config.model.weights == "random"},
        "machine": machine(),
        "command": " ".join(["python -m bench.engine", *(argv if argv is not None else sys.argv[1:])]),
    }
    header = f"{'case':<16}{'fps':>9}{'chunks/s':>10}{'ms/tick p50':>13}{'p95':>9}{'DiT ms p50':>12}{'slots':>7}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<16}{r['fps']:>9.2f}{r['chunks_per_s']:>10.2f}{r['ms_per_tick_median']:>13.1f}"
            f"{r['ms_per_tick_p95']:>9.1f}{r['dit_ms_per_tick_median']:>12.1f}{r['slots_per_tick']:>7.1f}"
        )
    print(
        f"StreamBatch / sequential ({many} sessions): {report['speedup']:.2f}x frames/s, "
        f"{report['dit_speedup']:.2f}x DiT time per tick"
    )
    print(f"{many} sessions / 1 session (StreamBatch): {report['session_scaling']:.2f}x frames/s")
    print(f"1 session: {report['realtime_factor_1_session']:.2f}x real time at {config.fps} fps")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
