"""Where a tick's time goes: torch.profiler over a few steady-state ticks, top ops by self time.

python -m bench.profile --config configs/tiny.yaml [--sessions 1] [--ticks 3]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.commands import Demand, Open
from pipeline.config import load_system_config, replace
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.types import UserParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    config = load_system_config(args.config, device=args.device)
    config = replace(config, max_sessions=max(config.max_sessions, args.sessions))
    engine = Engine(config, load_models(config, random_weights=args.random_weights))
    warmup = args.warmup if args.warmup is not None else config.sink_frames + config.window_frames + config.steps + 1
    for i in range(args.sessions):
        sid = engine.apply(Open(UserParams(prompt=f"p{i}", seed=i))).session_id
        engine.apply(Demand(sid, warmup + args.ticks + 1))
    while engine.stats.ticks < warmup:
        engine.step()
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        while engine.stats.ticks < warmup + args.ticks:
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
