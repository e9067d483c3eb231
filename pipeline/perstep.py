"""The ``per-step`` visibility rule: StreamDiffusionV2's system, reproduced exactly (DESIGN §4).

Each step level keeps a KV cache of its own: the slot at level ``i`` writes its keys/values there
and reads them back, so a chunk at level ``i`` sees earlier chunks as they were at level ``i``.
There is no σ=0 write pass. What the rule owes to StreamDiffusionV2 (``causal_model.py``,
``causal_stream_inference.py``), kept as they have it so that their outputs can be reproduced
(``python -m bench.parity``):

- **The cache** of a level and block is a buffer of ``sink + window`` frames' tokens. It fills in
  order; once full, a new chunk overwrites the slot named by the head of an *eviction queue* of
  end positions. The queue is fed while the cache fills (each chunk's end position plus one chunk,
  their ``rolling_end``) and turns round on eviction: the head is popped and appended again unless
  it lies within the sink, so the rolling frames after the sink are overwritten in turn.
- **Adaptive sink**: before a one-frame chunk is written, the cosine similarity of its mean key and
  value with each sink frame's is taken; under ``adaptive_sink`` the least similar sink frame's end
  goes to the head of the queue, so the next eviction replaces that sink frame.
- **Positions**: keys are rotated once, at their frame position, when written; there is no turn of
  the sink at read. With ``rope_refresh`` R, positions wrap: a chunk that would start at R starts at
  ``sink + window - chunk`` instead (their ``t_refresh``), and counts on from there.
- **An epoch's first chunk** (their ``prepare``) runs its steps alone and writes every level's cache:
  after it, each level holds its last step's keys, as their one cache copied to every level.
- **Pipeline fill**: while the first chunks climb the levels, the levels above them run on zeros
  (their stream batch starts zeroed), as *phantom* chunks that are never decoded. They matter only
  through the adaptive sink (their keys are overwritten when the real chunk reaches that level).

The state of the queue depends on each block's keys, so it is kept per level and block; a stage
keeps it for its own blocks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_position(frame_start: int, cache_frames: int, chunk_frames: int, refresh: int) -> int:
    """The frame position a chunk starting at latent frame ``frame_start`` is rotated at (and, in
    tokens, the position its cache write is computed from). ``refresh`` 0: no wrap."""
    if not refresh or frame_start < refresh:
        return frame_start
    back = cache_frames - chunk_frames  # where a wrapped chunk starts
    return back + (frame_start - refresh) % (refresh - back)


class StepCaches:
    """One session's per-step KV caches for a range of blocks: ``levels`` caches of ``frames`` frames.

    k, v: [levels, n_blocks, frames · tokens_per_frame, H, D] on the model's device and dtype.
    """

    def __init__(
        self,
        blocks: range,
        levels: int,
        frames: int,
        sink: int,
        adaptive_sink: float,
        tokens_per_frame: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.blocks = blocks
        self.levels = levels
        self.sink = sink
        self.adaptive_sink = adaptive_sink
        self.tpf = tokens_per_frame
        self.size = frames * tokens_per_frame
        shape = (levels, len(blocks), self.size, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.reset()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        """A new epoch: every cache empty, its counters and queue at their start."""
        n = len(self.blocks)
        self.global_end = [[0] * n for _ in range(self.levels)]  # token end of the last write (their global_end_index)
        self.local_end = [[0] * n for _ in range(self.levels)]  # tokens of the buffer in use (local_end_index)
        self.queue: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(self.levels)]  # evict_idx
        self.k.zero_()
        self.v.zero_()

    def used_after(self, level: int, start: int, n: int) -> int:
        """Tokens a write of ``n`` tokens at ``start`` leaves in use in ``level``'s caches: the same for
        every block (the counters do not depend on the keys), so known before the forward."""
        b = 0
        end = start + n
        if end > self.size or self.local_end[level][b] >= self.size:
            return self.size
        return self.local_end[level][b] + end - self.global_end[level][b]

    def write(self, level: int, block: int, start: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write a chunk's keys (rotated) and values, [n, H, D], at token position ``start`` into the
        cache of ``level``; returns the tokens the slot then attends to (the buffer's first ones)."""
        b = block - self.blocks.start
        queue = self.queue[level][b]
        n, size, tpf = k.shape[0], self.size, self.tpf
        cache_k, cache_v = self.k[level, b], self.v[level, b]
        sink_tokens = self.sink * tpf
        end = start + n
        if sink_tokens > 0 and self.adaptive_sink > -1 and n <= tpf:
            k_sim = F.cosine_similarity(
                cache_k[:sink_tokens].reshape(self.sink, tpf, -1).mean(1), k.reshape(1, tpf, -1).mean(1), dim=-1
            )
            v_sim = F.cosine_similarity(
                cache_v[:sink_tokens].reshape(self.sink, tpf, -1).mean(1), v.reshape(1, tpf, -1).mean(1), dim=-1
            )
            sim = (k_sim + v_sim) / 2
            if sim.min() < self.adaptive_sink:
                queue.insert(0, (int(torch.argmin(sim)) + 1) * tpf)
        if end > size or self.local_end[level][b] >= size:
            if not queue:
                raise RuntimeError(f"per-step cache of block {block}, level {level}: full with nothing to evict")
            target = queue.pop(0)
            if target > sink_tokens:
                queue.append(target)
            cache_k[target - n : target] = k
            cache_v[target - n : target] = v
            used = size
        else:
            used = self.local_end[level][b] + end - self.global_end[level][b]
            rolling_end = end + n
            if sink_tokens < rolling_end <= size and (not queue or queue[-1] != rolling_end):
                queue.append(rolling_end)
            cache_k[used - n : used] = k
            cache_v[used - n : used] = v
        self.global_end[level][b] = end
        self.local_end[level][b] = used
        return used


class PerStepKV:
    """The per-step caches of a micro-batch's slots, seen as one padded batch per block (a KVAccess).

    Each slot writes first and then reads its level's cache, its own keys among them, as their code
    does; slots of one session sit at different levels, so no slot sees another's write of this tick.
    """

    def __init__(
        self, caches: list[StepCaches], levels: list[int], starts: list[int], broadcast: list[bool], own_tokens: int
    ) -> None:
        self.caches = caches
        self.levels = levels
        self.starts = starts  # per slot: token position of its write
        self.broadcast = broadcast  # per slot: an epoch's first chunk writes every level
        self.lengths = [c.used_after(lv, st, own_tokens) for c, lv, st in zip(caches, levels, starts, strict=True)]

    def exchange(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, (c, level, start) in enumerate(zip(self.caches, self.levels, self.starts, strict=True)):
            for other in range(c.levels) if self.broadcast[i] else (level,):
                used = c.write(other, block, start, k[i], v[i])
                assert used == self.lengths[i]
        top, b = max(self.lengths), len(self.lengths)
        keys = k.new_zeros(b, top, *k.shape[2:])
        values = v.new_zeros(b, top, *v.shape[2:])
        for i, (c, level, n) in enumerate(zip(self.caches, self.levels, self.lengths, strict=True)):
            keys[i, :n] = c.k[level, block - c.blocks.start, :n]
            values[i, :n] = c.v[level, block - c.blocks.start, :n]
        return keys, values
