"""Our engine beside StreamDiffusionV2's stream-batch loop on the CPU: the same tiny DiT, DiT time only.

    python -m bench.peer_sdv2 --json out.json [--rounds N] [--context stream]

The peer (github: chenfengxu714/StreamDiffusionV2) runs unmodified from its source as the package registry has
it (``bench.peers.sdv2.source``: fetched once into ``.cache/peers``; ``$SDV2_SRC`` overrides), driven by
``bench.peers.sdv2.driver``: its own ``CausalStreamInferencePipeline.inference_stream``, one DiT forward over
T slots per call, with its 984,256-parameter ``CausalWanModel`` (dim 128 = 4 heads x 32, ffn 256, 4 layers,
text_len 512).

Ours runs the ``sdv2-tiny`` preset (the same architecture in diffusers' layout) through today's engine:
``Open``/``Demand`` via ``Engine.apply``, ``Engine.step``, the DiT timed by the engine's own
``PhaseTimer`` (phase ``dit``: embed, blocks and head of each forward). Geometry as the peer's v2v
config: 128x128, 1 latent frame per chunk, 3 sink frames + 3 rolling (their KV cache of 6 frames),
timesteps [700, 500] and [700, 500, 400, 200].

Per round and step count, the peer and ours (each context rule, and each lever setting with
``--levers on,off``) take turns call by call: one peer call, then one tick of each of ours, so that a
shared machine slows them alike. Reported: chunks per second of DiT time
(ours: finished chunks per tick / median DiT ms per tick; the peer: one chunk per call / median ms per
call) and their ratio ours/peer per round, with the median over rounds per rule and step count.
A rule the config rejects (``per-step`` before it exists) is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.peers.sdv2.driver import Geometry, Peer, PeerStream, time_calls
from bench.peers.sdv2.source import RegistryUnreachable, peer_source
from pipeline.commands import Demand, Open
from pipeline.config import CONTEXTS, ConfigError, SystemConfig, build_system_config
from pipeline.engine import Engine
from pipeline.models.loader import Models, load_models
from pipeline.stages.local import local_executor
from pipeline.types import UserParams

STEPS = {2: [700, 500], 4: [700, 500, 400, 200]}
LEVERS = {"on": {}, "off": {"text_kv_cache": False, "rope_cache": False}}


class PeerRun:
    """The peer's stream-batch loop for one step count; ``run`` times each ``inference_stream`` call and calls
    ``between()`` after each, outside the timed region."""

    def __init__(self, peer: Peer, steps: int) -> None:
        self.stream = PeerStream(peer, Geometry(steps=steps))
        self.steps = steps

    def run(self, warmup: int, iters: int, between: Callable[[], None]) -> dict[str, Any]:
        ms = sorted(t * 1000 for t in time_calls(self.stream, warmup, iters, between))
        return {
            "engine": "sdv2",
            "steps": self.steps,
            "median_ms_per_call": statistics.median(ms),
            "p10_ms_per_call": ms[len(ms) // 10],
            "chunks_per_s": 1000.0 / statistics.median(ms),  # one finished chunk per call
            "slots_per_forward": self.steps,
            "params": self.stream.params,
        }


def our_config(context: str, steps: int, levers: str) -> tuple[SystemConfig | None, str]:
    """The system config of one case, or None and why the config rejects it."""
    data: dict[str, Any] = {
        "model": "sdv2-tiny",
        "height": 128,
        "width": 128,
        "chunk_frames": 1,
        "context": context,
        "sink_frames": 3,
        "window_frames": 3,
        "timesteps": STEPS[steps],
        "max_sessions": 1,
        "decode_phase": "inline",
    }
    data |= LEVERS[levers]
    try:
        return build_system_config(data), ""
    except ConfigError as e:
        return None, str(e)


class OurStream:
    """One t2v session of our engine; ``tick`` runs one tick, ``result`` reads the engine's DiT timer."""

    def __init__(self, config: SystemConfig, models: Models, ticks: int) -> None:
        self.config, self.models = config, models
        self.engine = Engine(config, models, executor=local_executor(config, models, "tick", threaded_decode=False))
        sid = self.engine.apply(Open(UserParams(prompt="a red fox in snow", seed=0))).session_id
        self.engine.apply(Demand(sid, ticks + 2 * config.steps + 2))
        self.start = (0, 0, 0)

    def tick(self) -> None:
        before = self.engine.stats.ticks
        while self.engine.stats.ticks == before:
            self.engine.step()

    def measure_from_here(self) -> None:
        self.engine.timer.clear()
        stats = self.engine.stats
        self.start = (stats.ticks, stats.chunks_out, stats.slots)

    def result(self) -> dict[str, Any]:
        stats = self.engine.stats
        ticks = stats.ticks - self.start[0]
        dit_ms = sorted(t * 1000 for t in self.engine.timer.seconds("dit"))
        self.engine.close()
        chunks_per_tick = (stats.chunks_out - self.start[1]) / ticks
        median = statistics.median(dit_ms)
        return {
            "engine": "ours",
            "context": self.config.context,
            "steps": self.config.steps,
            "median_dit_ms_per_tick": median,
            "p10_dit_ms_per_tick": dit_ms[len(dit_ms) // 10],
            "chunks_per_tick": chunks_per_tick,
            "chunks_per_s": chunks_per_tick * 1000.0 / median,
            "slots_per_tick": (stats.slots - self.start[2]) / ticks,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_sdv2", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--context", default=",".join(CONTEXTS), help=f"our context rules, comma list of {CONTEXTS}")
    parser.add_argument("--steps", default="2,4", help="step counts, comma list of 2 and 4")
    parser.add_argument(
        "--levers", default="on", help="our speed levers (text K/V cache, RoPE cache): on, off or on,off"
    )
    parser.add_argument("--iters", type=int, default=30, help="measured calls / ticks per case and round")
    parser.add_argument("--warmup", type=int, default=8, help="calls / ticks before measuring")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both engines")
    args = parser.parse_args(argv)
    contexts = [c for c in args.context.split(",") if c]
    steps_list = [int(s) for s in args.steps.split(",") if s]
    levers = [v for v in args.levers.split(",") if v]
    for name, values, allowed in (
        ("context", contexts, CONTEXTS),
        ("steps", steps_list, STEPS),
        ("levers", levers, LEVERS),
    ):
        if not values or any(v not in allowed for v in values):
            parser.error(f"--{name}={values} is not allowed: a comma list of {list(allowed)}")

    try:
        peer = Peer(peer_source())
    except (RegistryUnreachable, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"bench.peer_sdv2: the peer's source: {e}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    cases: dict[tuple[str, int, str], tuple[SystemConfig, Models]] = {}
    skipped: dict[str, str] = {}
    for context in contexts:
        for steps in steps_list:
            for lever in levers:
                config, why = our_config(context, steps, lever)
                if config is None:
                    skipped[context] = why
                    print(
                        f"bench.peer_sdv2: context {context!r} skipped, the config rejects it: {why}", file=sys.stderr
                    )
                    continue
                cases[(context, steps, lever)] = (config, load_models(config))
    print(
        f"bench.peer_sdv2: {args.rounds} rounds x steps {steps_list} x peer + ours {sorted({c[0] for c in cases})} "
        f"levers {levers}, {args.iters} measured ticks each, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for steps in steps_list:
            peer_run = PeerRun(peer, steps)
            mine = {key: OurStream(*case, args.warmup + args.iters) for key, case in cases.items() if key[1] == steps}
            calls = 0

            def between(mine: dict[tuple[str, int, str], OurStream] = mine) -> None:
                nonlocal calls
                calls += 1
                for ours in mine.values():  # one tick of each of ours after each peer call
                    if calls == args.warmup + 1:
                        ours.measure_from_here()
                    ours.tick()

            theirs = peer_run.run(args.warmup, args.iters, between) | {"round": round_}
            rows.append(theirs)
            line = [f"round {round_ + 1} steps {steps}: sdv2 {theirs['chunks_per_s']:.1f} chunks/s"]
            for (context, _, lever), ours in mine.items():
                row = ours.result() | {"round": round_, "levers": lever}
                row["ratio_over_peer"] = row["chunks_per_s"] / theirs["chunks_per_s"]
                row["ratio_over_peer_p10"] = (row["chunks_per_tick"] / row["p10_dit_ms_per_tick"]) * theirs[
                    "p10_ms_per_call"
                ]
                rows.append(row)
                line.append(f"{context}/{lever} {row['chunks_per_s']:.1f} ({row['ratio_over_peer']:.2f}x)")
            print(", ".join(line), file=sys.stderr, flush=True)

    summary: dict[str, Any] = {}
    for context, steps, lever in cases:
        case_rows = [
            r
            for r in rows
            if r["engine"] == "ours" and (r["context"], r["steps"], r["levers"]) == (context, steps, lever)
        ]
        ratios = [r["ratio_over_peer"] for r in case_rows]
        summary[f"{context}/levers-{lever}/steps{steps}"] = {
            "ours_over_peer_chunks_per_s_median": statistics.median(ratios),
            "per_round": ratios,
            "ours_over_peer_p10_median": statistics.median(r["ratio_over_peer_p10"] for r in case_rows),
            "ours_chunks_per_s_median": statistics.median(r["chunks_per_s"] for r in case_rows),
            "peer_chunks_per_s_median": statistics.median(
                r["chunks_per_s"] for r in rows if r["engine"] == "sdv2" and r["steps"] == steps
            ),
        }
    print(f"{'rule/levers/steps':<32}{'ours/peer':>10}{'ours ch/s':>11}{'peer ch/s':>11}")
    for name, s in summary.items():
        print(
            f"{name:<32}{s['ours_over_peer_chunks_per_s_median']:>9.2f}x"
            f"{s['ours_chunks_per_s_median']:>11.1f}{s['peer_chunks_per_s_median']:>11.1f}"
        )
    for context, why in skipped.items():
        print(f"{context}: skipped ({why})")
    if args.json:
        report = {
            "summary": summary,
            "skipped": skipped,
            "rows": rows,
            "configs": {f"{c}/levers-{v}/steps{s}": cfg.summary() for (c, s, v), (cfg, _) in cases.items()},
            "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "nproc": os.cpu_count()},
            "command": " ".join(["python -m bench.peer_sdv2", *(argv if argv is not None else sys.argv[1:])]),
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
