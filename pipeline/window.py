"""The KV window of a session for a range of blocks (DESIGN §2, §5); chunks in flight live in pipeline/state.py.

KV window layout, per owned block: ``sink_frames`` positions that hold latent frames
``0..sink-1`` for ever, then a ring of ``window_frames + (steps+1)·chunk_frames`` positions for the
latest frames and the frames in flight. Frame ``f >= sink`` lives at ``sink + (f - sink) % ring``;
eviction is overwriting, never a copy. A :class:`KVWindow` holds only the blocks it is given
(``blocks``), so a pipeline stage owns the KV windows of its own block range.

Context of a slot whose chunk starts at latent frame ``f``: the sink frames before it and the
latest ``window_frames`` frames before ``f`` (see :func:`context_frames`).

RoPE (StreamingLLM's cache positions, computed cheaply): every key is rotated once, when written,
at its absolute frame index, and queries at theirs, so a query sees every window frame at its true
distance. Sink frames would drift ever further away; they are turned forward in time at read by
:func:`sink_shift` (the frames evicted between sink and window), so a sink frame always sits right
before the window, at most sink + window + chunk_frames frames from any query: an endless stream
never leaves the distances the model knows, and nothing jumps when the window starts to roll.
"""

from __future__ import annotations

import torch


def context_frames(frame_start: int, sink: int, window: int) -> tuple[int, ...]:
    """Latent frames a chunk starting at ``frame_start`` reads: sink frames, then the window."""
    return tuple(range(min(sink, frame_start))) + tuple(range(max(sink, frame_start - window), frame_start))


def sink_shift(frame_start: int, sink: int, window: int) -> int:
    """Frames by which a chunk starting at ``frame_start`` sees the sink turned forward in time:
    the frames evicted between the sink and the window."""
    return max(0, frame_start - sink - window)


class KVWindow:
    """Keys (rotated at their frame positions) and values of one session's recent frames, for a
    range of blocks.

    k, v: [n_blocks, capacity, tokens_per_frame, H, D] on the model's device and dtype.
    """

    def __init__(
        self,
        blocks: range,
        sink: int,
        window: int,
        in_flight_frames: int,
        tokens_per_frame: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.blocks = blocks
        self.sink = sink
        self.window = window
        self.ring = window + in_flight_frames
        self.capacity = sink + self.ring
        shape = (len(blocks), self.capacity, tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.held = [-1] * self.capacity  # latent frame held at each position, -1 = empty

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def position(self, frame: int) -> int:
        return frame if frame < self.sink else self.sink + (frame - self.sink) % self.ring

    def positions(self, frames: tuple[int, ...] | range) -> list[int]:
        return [self.position(f) for f in frames]

    def holds(self, frames: tuple[int, ...]) -> bool:
        return all(self.held[self.position(f)] == f for f in frames)

    def reset(self) -> None:
        """Forget every frame (a hard cut); memory is kept for the next epoch."""
        self.held = [-1] * self.capacity

    def runs(self, frames: tuple[int, ...] | range) -> tuple[tuple[int, int], ...]:
        """Positions of ``frames`` as (start, count) runs of consecutive positions: the sink, then
        the window in at most two pieces (where the ring wraps). Copying runs is a plain memcpy,
        several times faster on a GPU than a gather by index."""
        out: list[list[int]] = []
        for p in self.positions(frames):
            if out and out[-1][0] + out[-1][1] == p:
                out[-1][1] += 1
            else:
                out.append([p, 1])
        return tuple((a, n) for a, n in out)

    def gather_into(
        self, block: int, runs: tuple[tuple[int, int], ...], k_out: torch.Tensor, v_out: torch.Tensor
    ) -> None:
        """Copy k, v of the frames at ``runs`` into ``k_out``, ``v_out``: [n·tokens_per_frame, H, D]."""
        b = block - self.blocks.start
        tpf = self.k.shape[2]
        at = 0
        for start, count in runs:
            n = count * tpf
            k_out[at : at + n] = self.k[b, start : start + count].flatten(0, 1)
            v_out[at : at + n] = self.v[b, start : start + count].flatten(0, 1)
            at += n

    def gather(self, block: int, frames: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of ``frames``: [n·tokens_per_frame, H, D] (new tensors)."""
        n = len(frames) * self.k.shape[2]
        k = self.k.new_empty(n, *self.k.shape[3:])
        v = self.v.new_empty(n, *self.v.shape[3:])
        self.gather_into(block, self.runs(frames), k, v)
        return k, v

    def scatter(self, block: int, frames: range, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``frames``; k, v: [len(frames)·tokens_per_frame, H, D]."""
        b = block - self.blocks.start
        tpf = self.k.shape[2]
        at = 0
        for start, count in self.runs(frames):
            self.k[b, start : start + count] = k[at : at + count * tpf].unflatten(0, (count, tpf))
            self.v[b, start : start + count] = v[at : at + count * tpf].unflatten(0, (count, tpf))
            at += count * tpf
        if block == self.blocks.start:
            for f, p in zip(frames, self.positions(frames), strict=True):
                self.held[p] = f
