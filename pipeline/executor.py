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

from pipeline.models.causal_wan import AttnBatch, CausalWan
from pipeline.scheduler import Slot
from pipeline.window import KVWindow, rope_positions


@dataclass
class SlotInputs:
    """Tensors of B slots, on the model's device."""

    slots: list[Slot]
    windows: list[KVWindow]  # the KV window of each slot's session
    x: torch.Tensor  # [B, C, F, h, w] model dtype: x at each slot's σ
    sigma: torch.Tensor  # [B] float32
    text: torch.Tensor  # [B, text_len, text_dim]

    def select(self, i: int) -> SlotInputs:
        return SlotInputs([self.slots[i]], [self.windows[i]], self.x[i : i + 1], self.sigma[i : i + 1], self.text[i : i + 1])


class WindowKV:
    """The KV windows of a batch of slots, seen as one padded batch per block."""

    def __init__(self, windows: list[KVWindow], slots: list[Slot], chunk_frames: int, defer: bool) -> None:
        device = windows[0].k.device
        self.windows = windows
        self.defer = defer
        self.pending: list[tuple[KVWindow, int, range, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.read_index = []
        self.write_frames = []
        self.write_index = []
        for w, s in zip(windows, slots):
            if not w.holds(s.context):
                missing = [f for f in s.context if w.held[w.position(f)] != f]
                raise RuntimeError(f"slot {s.envelope.key}@{s.step} reads frames {missing} not in its KV window")
            frames = range(s.envelope.frame_start, s.envelope.frame_start + chunk_frames)
            self.read_index.append(torch.tensor(w.positions(s.context), dtype=torch.long, device=device))
            self.write_frames.append(frames)
            self.write_index.append(torch.tensor(w.positions(frames), dtype=torch.long, device=device))
        tpf = windows[0].k.shape[2]
        self.lengths = [len(s.context) * tpf for s in slots]
        self.max_len = max(self.lengths)

    def read(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = [], []
        for w, idx, n in zip(self.windows, self.read_index, self.lengths):
            k, v = w.gather(block, idx)
            if n < self.max_len:
                pad = (0, 0, 0, 0, 0, self.max_len - n)
                k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)  # [B, Lc, H, D]

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for i, (w, frames, idx) in enumerate(zip(self.windows, self.write_frames, self.write_index)):
            if self.defer:
                self.pending.append((w, block, frames, idx, k[i], v[i]))
            else:
                w.scatter(block, frames, idx, k[i], v[i])

    def flush(self) -> None:
        for w, block, frames, idx, k, v in self.pending:
            w.scatter(block, frames, idx, k, v)
        self.pending.clear()

    def mask(self, own_tokens: int) -> torch.Tensor | None:
        """Key-padding mask [B, 1, 1, Lc + L], or None when no slot is padded."""
        if all(n == self.max_len for n in self.lengths):
            return None
        lengths = torch.tensor(self.lengths, device=self.read_index[0].device)
        ctx_ok = torch.arange(self.max_len, device=lengths.device)[None, :] < lengths[:, None]
        own_ok = torch.ones(len(self.lengths), own_tokens, dtype=torch.bool, device=lengths.device)
        return torch.cat([ctx_ok, own_ok], dim=1)[:, None, None, :]


def attn_batch(model: CausalWan, kv: WindowKV, slots: list[Slot], latent_hw: tuple[int, int], chunk_frames: int,
               sink: int, window: int) -> AttnBatch:
    """RoPE tables and mask of a batch of slots (positions: :func:`pipeline.window.rope_positions`)."""
    grid = model.grid(latent_hw)
    ctx_pos, own_pos = [], []
    n_ctx = max(len(s.context) for s in slots)
    for s in slots:
        ctx, own = rope_positions(s.envelope.frame_start, chunk_frames, sink, window)
        ctx_pos.append(list(ctx) + [0] * (n_ctx - len(ctx)))
        own_pos.append(list(own))
    q_rope = model.rope(torch.tensor(own_pos, dtype=torch.long), grid)
    ctx_rope = model.rope(torch.tensor(ctx_pos, dtype=torch.long).view(len(slots), n_ctx), grid) if n_ctx else None
    own_tokens = chunk_frames * grid[0] * grid[1]
    return AttnBatch(kv=kv, q_rope=q_rope, ctx_rope=ctx_rope, mask=kv.mask(own_tokens))


class Executor(Protocol):
    def run(self, inputs: SlotInputs) -> torch.Tensor:
        """Velocity of every slot: [B, C, F, h, w]; writes each slot's keys/values."""
        ...


class _Base:
    def __init__(self, model: CausalWan, latent_hw: tuple[int, int], chunk_frames: int, sink: int, window: int) -> None:
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
