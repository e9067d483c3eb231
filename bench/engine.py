"""Engine benchmark: StreamBatch vs a plain sequential loop, 1 vs N sessions, the decode phase on and off.

    python -m bench.engine --config configs/tiny.yaml --json out.json

Every case runs the same engine code on the same models; cases are interleaved round by round (A B C
D, A B C D, ...) so that a shared, noisy machine slows them alike, and the ratios are what to read.

- ``streambatch``: every slot of a tick in one batched forward; ``sequential``: the same plans and
  visibility rule with one forward per slot (the baseline).
- decode ``thread``: the decode phase in its own thread (a tick costs about max(DiT, decode)); decode
  ``inline``: decoded within the tick (DiT + decode). The StreamBatch/sequential ratio is taken with
  the decode inline, as it was measured before the decode phase existed.

Reported per case: frames/s, chunks/s, ms per tick (median, p95), and the engine's own phase times
read from ``engine.timer``: DiT ms per tick (the mean; its forwards summed) and decode ms per call.
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
from typing import Any

import torch

from pipeline.commands import Demand, Open
from pipeline.config import SystemConfig, load_system_config, replace
from pipeline.engine import Engine
from pipeline.models.loader import Models, load_models
from pipeline.stages.local import local_executor
from pipeline.types import UserParams

PROMPTS = ["a red fox in snow", "waves at night", "a city from above", "rain on glass", "a forest path"]
BATCHING = {"streambatch": "tick", "sequential": "slot"}


@dataclass
class Case:
    executor: str  # "streambatch" or "sequential"
    sessions: int
    decode: str  # "thread" or "inline"
    tick_s: list[float] = field(default_factory=list)
    dit_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    chunks: int = 0
    frames: int = 0
    slots: int = 0
    ticks: int = 0

    @property
    def name(self) -> str:
        return f"{self.executor}/{self.sessions}/{self.decode}"

    def summary(self) -> dict[str, float]:
        ms = sorted(t * 1000 for t in self.tick_s)
        return {
            "sessions": self.sessions,
            "fps": self.frames / self.wall_s,
            "chunks_per_s": self.chunks / self.wall_s,
            "fps_per_session": self.frames / self.wall_s / self.sessions,
            "ms_per_tick_median": statistics.median(ms),
            "ms_per_tick_p95": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
            "dit_ms_per_tick": sum(self.dit_s) / self.ticks * 1000,  # one forward (StreamBatch) or one per slot
            "decode_ms_per_call_median": statistics.median(self.decode_s) * 1000 if self.decode_s else 0.0,
            "slots_per_tick": self.slots / self.ticks,
            "ticks": self.ticks,
        }


def run_round(case: Case, models: Models, config: SystemConfig, warmup: int, ticks: int) -> None:
    executor = local_executor(config, models, BATCHING[case.executor], threaded_decode=case.decode == "thread")
    engine = Engine(config, models, executor=executor)
    try:
        for i in range(case.sessions):
            sid = engine.apply(Open(UserParams(prompt=PROMPTS[i % len(PROMPTS)], seed=i))).session_id
            engine.apply(Demand(sid, warmup + ticks + 2 * config.steps))
        while engine.stats.ticks < warmup:  # fills every window: T+1 slots per session from here on
            engine.step()
        engine.timer.clear()
        ticks0, slots0 = engine.stats.ticks, engine.stats.slots
        start = time.perf_counter()
        while engine.stats.ticks < ticks0 + ticks:
            t0 = time.perf_counter()
            before = engine.stats.ticks
            out = engine.step()
            if engine.stats.ticks > before:
                case.tick_s.append(time.perf_counter() - t0)
            case.chunks += len(out.chunks)
            case.frames += sum(c.num_frames for c in out.chunks)
        if models.dit.device.type == "cuda":
            torch.cuda.synchronize()
        case.wall_s += time.perf_counter() - start
        case.ticks += engine.stats.ticks - ticks0
        case.slots += engine.stats.slots - slots0
        case.dit_s += engine.timer.seconds("dit")
        case.decode_s += engine.timer.seconds("decode")
    finally:
        engine.close()


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
    many = args.sessions
    cases = [
        Case(executor, n, decode)
        for n in (1, many)
        for executor, decode in (("streambatch", "thread"), ("streambatch", "inline"), ("sequential", "inline"))
    ]
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
    default = "thread" if config.threaded_decode else "inline"
    sb, seq = results[f"streambatch/{many}/inline"], results[f"sequential/{many}/inline"]
    report: dict[str, Any] = {
        "streambatch": sb,
        "sequential": seq,
        "speedup": sb["fps"] / seq["fps"],
        "dit_speedup": seq["dit_ms_per_tick"] / sb["dit_ms_per_tick"],
        "session_scaling": results[f"streambatch/{many}/{default}"]["fps"] / results[f"streambatch/1/{default}"]["fps"],
        "realtime_factor_1_session": results[f"streambatch/1/{default}"]["fps"] / config.fps,
        "default_decode_phase": default,  # what the config runs (auto: a thread on a GPU, inline on a CPU)
        "decode_phase": {
            f"{n}": {
                "fps_thread_over_inline": results[f"streambatch/{n}/thread"]["fps"]
                / results[f"streambatch/{n}/inline"]["fps"],
                "tick_over_dit_thread": results[f"streambatch/{n}/thread"]["ms_per_tick_median"]
                / results[f"streambatch/{n}/thread"]["dit_ms_per_tick"],
                "tick_over_dit_inline": results[f"streambatch/{n}/inline"]["ms_per_tick_median"]
                / results[f"streambatch/{n}/inline"]["dit_ms_per_tick"],
            }
            for n in (1, many)
        },
        "cases": results,
        "config": config.summary() | {"random_weights": args.random_weights or config.model.weights == "random"},
        "machine": machine(),
        "command": " ".join(["python -m bench.engine", *(argv if argv is not None else sys.argv[1:])]),
    }
    header = (
        f"{'case':<24}{'fps':>9}{'chunks/s':>10}{'ms/tick p50':>13}{'p95':>9}{'DiT ms':>9}{'decode ms':>11}{'slots':>7}"
    )
    print(header)
    for name, r in results.items():
        print(
            f"{name:<24}{r['fps']:>9.2f}{r['chunks_per_s']:>10.2f}{r['ms_per_tick_median']:>13.1f}"
            f"{r['ms_per_tick_p95']:>9.1f}{r['dit_ms_per_tick']:>9.1f}{r['decode_ms_per_call_median']:>11.1f}"
            f"{r['slots_per_tick']:>7.1f}"
        )
    print(
        f"StreamBatch / sequential ({many} sessions, decode inline): {report['speedup']:.2f}x frames/s, "
        f"{report['dit_speedup']:.2f}x DiT time per tick"
    )
    for n, d in report["decode_phase"].items():
        print(
            f"decode phase ({n} session(s)): thread / inline {d['fps_thread_over_inline']:.2f}x frames/s; "
            f"tick / DiT {d['tick_over_dit_thread']:.2f} (thread), {d['tick_over_dit_inline']:.2f} (inline)"
        )
    print(f"{many} sessions / 1 session (StreamBatch, decode {default}): {report['session_scaling']:.2f}x frames/s")
    print(f"1 session (decode {default}): {report['realtime_factor_1_session']:.2f}x real time at {config.fps} fps")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
