"""Stages: the simulator for S = 1..8, and real gloo rings of S = 1, 2 on this machine, in one run.

    python -m bench.stages --json out.json --plot out.png

- **Simulator** (:mod:`pipeline.stages.simulator`): one stream session, T steps, balanced stages (the
  model's per-slot cost split evenly), with and without a link time per hop. Throughput against S x
  one stage, TTFF, the bubble fraction against the derived bound, the OverlapScore, and how long each
  simulation took on this machine.
- **Real** (``--config``, default tiny-deep: a transformer that outweighs its decoder): the engine
  with this process alone (S = 1) and with a ring of S = 2 gloo processes (``start_ring``, as
  ``--stages 2``), rounds interleaved (1, 2, 1, 2, ...). Frames/s in steady state, TTFF (open -> first
  chunk out), the split the ring chose. On a CPU the S processes share the machine's cores (each
  takes its part), so this measures what the ring costs and what it buys on one machine; on GPUs each
  stage has a device of its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.commands import Demand, Open
from pipeline.config import load_system_config
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.stages.launch import start_ring
from pipeline.stages.local import local_executor
from pipeline.stages.simulator import SimConfig, Simulator, bubble_bound
from pipeline.start import measure
from pipeline.types import UserParams


def simulated(steps: int, link_s: float, per_slot: float = 0.01) -> list[dict[str, Any]]:
    rows = []
    one = None
    for stages in range(1, 9):
        cfg = SimConfig(stages=stages, steps=steps, stage_s=(per_slot / stages,) * stages, link_s=link_s, chunks=80)
        t0 = time.perf_counter()
        r = Simulator(cfg).run()
        ms = (time.perf_counter() - t0) * 1000
        one = one or r.throughput
        rows.append(
            {
                "stages": stages,
                "throughput_chunks_per_s": round(r.throughput, 3),
                "vs_s_times_one": round(r.throughput / (stages * one), 4),
                "ttff_s": round(r.ttff_s, 4),
                "period_s": round(r.period_s, 5),
                "bubble": round(r.bubble, 4),
                "bubble_bound": round(bubble_bound(cfg), 4),
                "overlap_score": round(r.overlap_score, 4),
                "deadlock": r.deadlock,
                "sim_ms": round(ms, 2),
            }
        )
    return rows


def real_round(config: Any, stages: int, seconds: float, warm_chunks: int) -> dict[str, Any]:
    models = load_models(config)
    t0 = time.perf_counter()
    executor = (
        local_executor(config, models)
        if stages == 1
        else start_ring(config, models, stages, costs=measure(config, models))
    )
    start_s = time.perf_counter() - t0
    engine = Engine(config, models, executor=executor)
    try:
        opened = time.monotonic()
        sid = engine.apply(Open(UserParams(prompt="a forest path", seed=0))).session_id
        engine.apply(Demand(sid, 10_000))
        chunks, frames = 0, 0
        first: float | None = None
        counted: float | None = None
        while True:
            out = engine.step()
            now = time.monotonic()
            for c in out.chunks:
                chunks += 1
                first = first or now
                if chunks == warm_chunks:
                    counted = now
                elif counted is not None:
                    frames += c.num_frames
            if counted is not None and now - counted >= seconds:
                break
        split = [f"{b.start}-{b.stop - 1}" for b in executor.blocks]
        assert first is not None
        row = {
            "stages": stages,
            "fps": round(frames / (now - counted), 3),
            "ttff_s": round(first - opened, 3),
            "ring_start_s": round(start_s, 2),
            "split": split,
            "ticks": engine.stats.ticks,
        }
        costs = getattr(executor, "costs", None)
        if costs:  # what the simulator makes of the same split and measured costs (no transfer time)
            row["costs"] = costs
            row["simulated_fps"] = round(predicted_fps(config, executor.blocks, costs), 3)
        return row
    finally:
        engine.close()


def predicted_fps(config: Any, blocks: tuple[range, ...], costs: dict[str, Any]) -> float:
    """Frames/s the simulator gives for this split: each stage's measured block time per tick (for the
    T+1 slots of one session), plus the embedding on stage 0, the decode within the last stage."""
    slots = config.steps + 1
    per_slot = [sum(costs["blocks_s"][i] for i in b) / slots for b in blocks]
    per_slot[0] += costs["rest_s"] / slots
    sim = SimConfig(
        stages=len(blocks),
        steps=config.steps,
        stage_s=tuple(per_slot),
        decode_s=costs["decode_s"],
        decode="thread" if config.threaded_decode else "inline",
        chunks=60,
    )
    r = Simulator(sim).run()
    return r.throughput * config.frames_for_chunk(first=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny-deep.yaml")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the real runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="steady-state seconds per real run")
    parser.add_argument("--real", default="1,2", help="stage counts of the real runs ('' for none)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"simulator": {}, "real": {}}
    for steps, link in ((4, 0.0), (4, 0.002), (2, 0.0), (1, 0.0)):
        report["simulator"][f"T={steps},link={link}"] = simulated(steps, link)
        print(f"simulated T={steps}, link {link * 1000:g} ms per hop (per slot 10 ms of model):", file=sys.stderr)
        for r in report["simulator"][f"T={steps},link={link}"]:
            print(
                f"  S={r['stages']}: {r['vs_s_times_one']:.3f} of S x one stage, bubble {r['bubble']:.3f} "
                f"(bound {r['bubble_bound']:.3f}), TTFF {r['ttff_s'] * 1000:.1f} ms, OverlapScore "
                f"{r['overlap_score']:.2f}, {r['sim_ms']:.1f} ms to simulate",
                file=sys.stderr,
            )

    counts = [int(s) for s in args.real.split(",") if s]
    if counts:
        config = load_system_config(args.config, height=args.height, width=args.width)
        runs: dict[int, list[dict[str, Any]]] = {s: [] for s in counts}
        for round_ in range(args.rounds):
            for stages in counts:
                r = real_round(config, stages, args.seconds, warm_chunks=config.steps + 4)
                runs[stages].append(r)
                print(f"  round {round_ + 1} S={stages}: {r}", file=sys.stderr)
        report["real"] = {
            "config": config.summary(),
            "runs": {str(s): v for s, v in runs.items()},
            "fps_median": {str(s): statistics.median(r["fps"] for r in v) for s, v in runs.items()},
            "ttff_median_s": {str(s): statistics.median(r["ttff_s"] for r in v) for s, v in runs.items()},
        }
        if 1 in runs:
            base = report["real"]["fps_median"]["1"]
            fps = report["real"]["fps_median"]
            report["real"]["fill"] = {s: round(f / (int(s) * base), 3) for s, f in fps.items()}  # of S x one
            report["real"]["speedup"] = {s: round(f / base, 3) for s, f in fps.items()}
            real = report["real"]
            print(f"real: fps {real['fps_median']}, vs one stage {real['speedup']}", file=sys.stderr)
    report["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    report["command"] = " ".join(["python -m bench.stages", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def plot(report: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b, ax_f) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, rows in report["simulator"].items():
        s = [r["stages"] for r in rows]
        ax_t.plot(s, [r["vs_s_times_one"] for r in rows], marker="o", label=name)
        ax_b.plot(s, [r["bubble"] for r in rows], marker="o", label=f"{name} (simulated)")
        ax_b.plot(s, [r["bubble_bound"] for r in rows], linestyle="--", color="grey", linewidth=1)
        ax_f.plot(s, [r["ttff_s"] * 1000 for r in rows], marker="o", label=name)
    ax_t.axhline(0.95, color="tab:red", linestyle=":", linewidth=1, label="0.95")
    ax_t.set_title("simulated throughput / (S x one stage)", fontsize=10)
    ax_b.set_title("bubble fraction (dashed: the derived bound)", fontsize=10)
    ax_f.set_title("TTFF, ms (10 ms of model per slot)", fontsize=10)
    real = report.get("real", {})
    if real.get("speedup"):  # on one machine's CPU the S processes share its cores: against one process, not S
        s = [int(k) for k in real["speedup"]]
        label = "real gloo, this machine: fps / one process"
        ax_t.plot(s, [real["speedup"][str(k)] for k in s], marker="s", color="black", label=label)
    for ax in (ax_t, ax_b, ax_f):
        ax.set_xlabel("stages S")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench.stages on {report['machine']['platform']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
