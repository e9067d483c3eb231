"""Executors run the slots of a :class:`~pipeline.scheduler.TickPlan`; they decide nothing.

- :class:`StreamBatchExecutor`: every slot of the tick, from every session, in one batched
  forward. Within each block all slots read the KV window before any writes, so every slot sees
  the window as it stood at the end of the previous tick, as the visibility rule asks.
- :class:`SequentialExecutor`: one forward per slot with the writes held back until the tick ends:
  the same rule applied one slot at a time (the benchmark's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.models.causal_wan import AttnBatch, Denoiser, apply_rope
from pipeline.scheduler import Slot
from pipeline.window import KVWindow, sink_shift


@dataclass
class SlotInputs:
    """Tensors of B slots, on the model's device."""

    slots: list[Slot]
    windows: list[KVWindow]  # the KV window of each slot's session
    x: torch.Tensor  # [B, C, F, h, w] model dtype: x at each slot's σ
    sigma: torch.Tensor  # [B] float32
    text: torch.Tensor  # [B, text_len, text_dim]

    def select(self, i: int) -> SlotInputs:
        return SlotInputs(
            [self.slots[i]], [self.windows[i]], self.x[i : i + 1], self.sigma[i : i + 1], self.text[i : i + 1]
        )


class WindowKV:
    """The KV windows of a batch of slots, seen as one padded batch per block."""

    def __init__(self, windows: list[KVWindow], slots: list[Slot], chunk_frames: int, defer: bool) -> None:
        device = windows[0].k.device
        self.windows = windows
        self.defer = defer
        # sink frames lead each slot's context; turned forward by each slot's sink_shift at read
        self.sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sink_tokens = windows[0].sink * windows[0].k.shape[2]
        self.pending: list[tuple[KVWindow, int, range, torch.Tensor, torch.Tensor]] = []
        self.read_runs = []
        self.write_frames = []
        for w, s in zip(windows, slots, strict=True):
            if not w.holds(s.context):
                missing = [f for f in s.context if w.held[w.position(f)] != f]
                raise RuntimeError(f"slot {s.envelope.key}@{s.step} reads frames {missing} not in its KV window")
            self.read_runs.append(w.runs(s.context))
            self.write_frames.append(range(s.envelope.frame_start, s.envelope.frame_start + chunk_frames))
        self.device = device
        tpf = windows[0].k.shape[2]
        self.lengths = [len(s.context) * tpf for s in slots]
        self.max_len = max(self.lengths)

    def exchange(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather every slot's context straight into one [B, Lc + L, H, D] buffer (padding zeroed,
        own tokens last), then record the slots' own keys/values."""
        b, own, heads, dim = k.shape
        keys = k.new_empty(b, self.max_len + own, heads, dim)
        values = v.new_empty(b, self.max_len + own, heads, dim)
        for i, (w, runs, n) in enumerate(zip(self.windows, self.read_runs, self.lengths, strict=True)):
            w.gather_into(block, runs, keys[i, :n], values[i, :n])
            if n < self.max_len:
                keys[i, n : self.max_len] = 0
                values[i, n : self.max_len] = 0
        keys[:, self.max_len :] = k
        values[:, self.max_len :] = v
        if self.sink_rotation is not None:
            keys[:, : self.sink_tokens] = apply_rope(keys[:, : self.sink_tokens], self.sink_rotation)
        for i, (w, frames) in enumerate(zip(self.windows, self.write_frames, strict=True)):
            if self.defer:
                self.pending.append((w, block, frames, k[i], v[i]))
            else:
                w.scatter(block, frames, k[i], v[i])
        return keys, values

    def flush(self) -> None:
        for w, block, frames, k, v in self.pending:
            w.scatter(block, frames, k, v)
        self.pending.clear()

    def mask(self, own_tokens: int) -> torch.Tensor | None:
        """Key-padding mask [B, 1, 1, Lc + L], or None when no slot is padded."""
        if all(n == self.max_len for n in self.lengths):
            return None
        lengths = torch.tensor(self.lengths, device=self.device)
        ctx_ok = torch.arange(self.max_len, device=lengths.device)[None, :] < lengths[:, None]
        own_ok = torch.ones(len(self.lengths), own_tokens, dtype=torch.bool, device=lengths.device)
        return torch.cat([ctx_ok, own_ok], dim=1)[:, None, None, :]


def attn_batch(
    model: Denoiser,
    kv: WindowKV,
    slots: list[Slot],
    latent_hw: tuple[int, int],
    chunk_frames: int,
    sink: int,
    window: int,
) -> AttnBatch:
    """RoPE of the slots' own frames (absolute positions), the sink turn of each slot, the mask."""
    grid = model.grid(latent_hw)
    starts = [s.envelope.frame_start for s in slots]
    own = torch.tensor([list(range(f, f + chunk_frames)) for f in starts], dtype=torch.long)
    shifts = [sink_shift(f, sink, window) for f in starts]
    if sink and any(shifts):
        kv.sink_rotation = model.time_shift(torch.tensor(shifts, dtype=torch.long))
    own_tokens = chunk_frames * grid[0] * grid[1]
    return AttnBatch(kv=kv, q_rope=model.rope(own, grid), mask=kv.mask(own_tokens))


class Executor(Protocol):
    def run(self, inputs: SlotInputs) -> torch.Tensor:
        """Velocity of every slot: [B, C, F, h, w]; writes each slot's keys/values."""
        ...


class _Base:
    def __init__(self, model: Denoiser, latent_hw: tuple[int, int], chunk_frames: int, sink: int, window: int) -> None:
        self.model = model
        self.latent_hw = latent_hw
        self.chunk_frames = chunk_frames
        self.sink = sink
        self.window = window

    def _forward(self, inputs: SlotInputs, defer: bool) -> tuple[torch.Tensor, WindowKV]:
        kv = WindowKV(inputs.windows, inputs.slots, self.chunk_frames, defer)
        batch = attn_batch(self.model, kv, inputs.slots, self.latent_hw, self.chunk_frames, self.sink, self.window)
        return self.model(inputs.x, inputs.sigma, inputs.text, batch), kv


class StreamBatchExecutor(_Base):
    @torch.no_grad()
    def run(self, inputs: SlotInputs) -> torch.Tensor:
        velocity, _ = self._forward(inputs, defer=False)
        return velocity


class SequentialExecutor(_Base):
    @torch.no_grad()
    def run(self, inputs: SlotInputs) -> torch.Tensor:
        outs, kvs = [], []
        for i in range(len(inputs.slots)):
            velocity, kv = self._forward(inputs.select(i), defer=True)
            outs.append(velocity)
            kvs.append(kv)
        for kv in kvs:
            kv.flush()
        return torch.cat(outs)
