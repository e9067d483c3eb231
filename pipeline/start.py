"""Starting an engine's executor: this process alone, or a ring of stages with blocks balanced by measured cost.

Measuring runs a short local engine (a t2v session with a full window), so this sits a floor above both the
engine and the stages (``pipeline/stages`` never builds an engine).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.commands import Open
from pipeline.config import SystemConfig
from pipeline.engine import Engine
from pipeline.feeder import Feeder
from pipeline.models.loader import Models
from pipeline.stages.launch import STAGE_TIMEOUT_S, start_ring, torchrun_ring
from pipeline.stages.local import LocalExecutor, local_executor
from pipeline.stages.ring import RingExecutor


def make_executor(
    config: SystemConfig,
    models: Models,
    stages: int = 1,
    split: Sequence[int] | None = None,
    timeout: float = STAGE_TIMEOUT_S,
    log: Any = None,
) -> LocalExecutor | RingExecutor:
    """The engine's executor for ``stages``: this process alone (1), or a ring (:func:`start_ring`) whose blocks
    are ``split`` or balanced by :func:`measure`."""
    if stages == 1 and torchrun_ring(config) is None:
        if split is not None:
            raise ValueError(f"split={','.join(map(str, split))} is not allowed with one stage")
        return local_executor(config, models)
    costs = measure(config, models) if split is None else None
    return start_ring(config, models, stages, split=split, costs=costs, timeout=timeout, log=log)


def measure(config: SystemConfig, models: Models, ticks: int = 4) -> dict[str, Any]:
    """Seconds per tick of each block, of the rest of the DiT (embedding, head) and of the decode, for one
    t2v session with a full window, on this process's device (a GPU is synchronised around each block)."""
    from pipeline.stages.local import local_executor

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
        feeder = Feeder(engine)
        feeder.open(Open(), ahead=engine.pipeline_depth + 1)
        while engine.stats.ticks < warm:
            feeder.step()
        engine.timer.clear()
        measuring[0] = True
        while engine.stats.ticks < warm + ticks:
            feeder.step()
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
