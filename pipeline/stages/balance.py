"""Blocks balanced by measured cost: contiguous block ranges that make the slowest stage as fast as it can be,
from what each block, the embedding and the decoder cost (measured once, after a warm-up, by
:func:`pipeline.start.measure`, which runs an engine: a floor above the stages).

Stage 0 also embeds (and, for v2v, encodes); the last stage also runs the head and decodes, so it
gets fewer blocks when decoding is dear.
"""

from __future__ import annotations

import itertools
from typing import Any


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
