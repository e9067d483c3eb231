"""Blocks balanced by measured cost: what each block, the embedding and the decoder cost, once, after a
warm-up; then contiguous block ranges that make the slowest stage as fast as it can be.

Stage 0 also embeds (and, for v2v, encodes); the last stage also runs the head and decodes, so it
gets fewer blocks when decoding is dear.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch

from pipeline.config import SystemConfig
from pipeline.models.loader import Models


def measure(config: SystemConfig, models: Models, ticks: int = 4) -> dict[str, Any]:
    """Seconds per tick of each block, of the rest of the DiT (embedding, head) and of the decode, for one
    t2v session with a full window, on this process's device (a GPU is synchronised around each block)."""
    from pipeline.commands import Demand, Open
    from pipeline.engine import Engine
    from pipeline.executor import local_executor

    dit = models.dit
    transformer = getattr(dit, "transformer", None)
    engine = Engine(config, models, executor=local_executor(config, models, "tick", threaded_decode=False))
    warm = (config.sink_frames + config.window_frames) // config.chunk_frames + config.steps + 2
    per_block: list[list[float]] = [[] for _ in range(dit.num_blocks)]
    hooks = []
    sync = torch.cuda.synchronize if dit.device.type == "cuda" else (lambda: None)
    started: dict[int, float] = {}
    measuring = [False]
    try:
        if transformer is not None:
            for i, block in enumerate(transformer.blocks):

                def before(_m: Any, _a: Any, i: int = i) -> None:
                    if measuring[0]:
                        sync()
                        started[i] = time.perf_counter()

                def after(_m: Any, _a: Any, _o: Any, i: int = i) -> None:
                    if measuring[0]:
                        sync()
                        per_block[i].append(time.perf_counter() - started[i])

                hooks += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
        sid = engine.apply(Open()).session_id
        engine.apply(Demand(sid, warm + ticks + config.steps + 2))
        while engine.stats.ticks < warm:
            engine.step()
        engine.timer.clear()
        measuring[0] = True
        while engine.stats.ticks < warm + ticks:
            engine.step()
        measuring[0] = False
        dit_s = statistics.median(engine.timer.seconds("dit"))
        decode = engine.timer.seconds("decode")
    finally:
        for h in hooks:
            h.remove()
        engine.close()
    blocks = [statistics.median(b) if b else dit_s / dit.num_blocks for b in per_block]
    return {
        "blocks_s": blocks,
        "rest_s": max(0.0, dit_s - sum(blocks)),  # embedding and head, with stage 0
        "decode_s": statistics.median(decode) if decode else 0.0,  # per tick of one session, with the last stage
        "dit_s": dit_s,
    }


def split_blocks(costs: dict[str, Any], stages: int) -> tuple[range, ...]:
    """Contiguous ranges, at least one block each, minimising the costliest stage (stage 0 carries the
    embedding and head, the last stage the decode)."""
    blocks: list[float] = costs["blocks_s"]
    n = len(blocks)
    if not 1 <= stages <= n:
        raise ValueError(f"stages={stages} is not allowed: from 1 to the model's {n} blocks")
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, a: int, b: int) -> float:
        extra = (costs["rest_s"] if stage == 0 else 0.0) + (costs["decode_s"] if stage == stages - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    inf = float("inf")
    # best[k][i]: the least max cost of stages 0..k-1 covering blocks 0..i-1; cut[k][i]: where stage k-1 starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], cost(k - 1, j, i))
                if value <= best[k][i]:  # a tie: the later stage the shorter (the last one decodes)
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    bounds.reverse()
    return tuple(range(a, b) for a, b in itertools.pairwise(bounds))
