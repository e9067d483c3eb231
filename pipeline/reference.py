"""The visibility rules as a plain loop, one slot at a time: the reference every executor must match.

It shares only the model and the pure functions (sigmas, noise, context frames, RoPE positions)
with the engine; no scheduler, ring buffer, padding, masks or batching. Keys/values are kept per
(chunk, step) for ever, so the rule can be read straight off DESIGN §4:

- ``stream``: chunk j at step i sees chunk j-d as written by its step ``min(i + d - 1, W)``
  (W = T, the σ=0 write). This assumes the session admits one chunk per tick from its first tick,
  which is what the engine does for a t2v session with enough demand.
- ``clean``: chunk j sees every earlier chunk as written at σ=0.
"""

from __future__ import annotations

import torch

from pipeline.config import SystemConfig
from pipeline.models.causal_wan import AttnBatch, CausalWan, apply_rope
from pipeline.sampling import FlowSampler, chunk_noise
from pipeline.types import UserParams
from pipeline.window import context_frames, sink_shift

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # block -> k, v: [L, H, D] before RoPE


class ListKV:
    """Context given as explicit per-frame tensors for one slot; records the slot's own writes."""

    def __init__(self, context: list[KV], sink_frames: int, sink_rotation: tuple[torch.Tensor, torch.Tensor] | None):
        self.context = context  # one entry per context frame, oldest first (sink frames first)
        self.sink_frames = sink_frames  # how many of them are sink frames
        self.sink_rotation = sink_rotation  # turns sink keys forward in time; None = as stored
        self.written: KV = {}

    def exchange(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.written[block] = (k[0], v[0])
        ks = [c[block][0] for c in self.context]
        if self.sink_rotation is not None:
            rot = self.sink_rotation
            ks = [apply_rope(key[None], rot)[0] if i < self.sink_frames else key for i, key in enumerate(ks)]
        return torch.cat([*ks, k[0]])[None], torch.cat([*(c[block][1] for c in self.context), v[0]])[None]


def forward_one(
    model: CausalWan,
    config: SystemConfig,
    x: torch.Tensor,
    sigma: float,
    text: torch.Tensor,
    frame_start: int,
    context: list[KV],
) -> tuple[torch.Tensor, KV]:
    """Velocity of one slot (x [C, F, h, w]) given its context frames' k/v; returns its own k/v."""
    cf, sink, window = config.chunk_frames, config.sink_frames, config.window_frames
    grid = model.grid(config.latent_size)
    shift = sink_shift(frame_start, sink, window)
    rotation = model.time_shift(torch.tensor([shift])) if shift else None
    kv = ListKV(context, min(sink, frame_start), rotation)
    own = torch.tensor([list(range(frame_start, frame_start + cf))])
    batch = AttnBatch(kv=kv, q_rope=model.rope(own, grid), mask=None)
    sig = torch.tensor([sigma], dtype=torch.float32, device=model.device)
    velocity = model(x[None], sig, text[None], batch)[0]
    return velocity, kv.written


def split_frames(written: KV, chunk_frames: int) -> list[KV]:
    """A chunk's k/v split into per-frame entries."""
    per = {b: (k.chunk(chunk_frames), v.chunk(chunk_frames)) for b, (k, v) in written.items()}
    return [{b: (per[b][0][f], per[b][1][f]) for b in per} for f in range(chunk_frames)]


@torch.no_grad()
def reference_session(
    model: CausalWan,
    text_encoder: object,
    config: SystemConfig,
    params: UserParams,
    chunks: int,
    epoch: int = 0,
    first_chunk_index: int = 0,
    sampler: FlowSampler | None = None,
) -> list[torch.Tensor]:
    """x0 latents [C, F, h, w] of the first ``chunks`` chunks of a t2v session under config.context, with
    ``sampler``'s update rule between steps (the model's: fresh noise, or the ODE step)."""
    sampler = sampler or FlowSampler()
    sigmas = config.sigmas()
    steps = len(sigmas)
    cf = config.chunk_frames
    shape = (config.model.latent_channels, cf, *config.latent_size)
    dtype, device = model.dtype, model.device
    text = text_encoder(params.prompt).to(dtype)  # type: ignore[operator]
    versions: dict[tuple[int, int], list[KV]] = {}  # (chunk, step or W) -> per-frame k/v
    outputs = []
    for j in range(chunks):
        ci = first_chunk_index + j
        f0 = j * cf
        frames = context_frames(f0, config.sink_frames, config.window_frames)

        def context_at(i: int, frames: tuple[int, ...] = frames, j: int = j) -> list[KV]:
            ctx = []
            for f in frames:
                owner = f // cf
                d = j - owner
                version = min(i + d - 1, steps) if config.context == "stream" else steps
                ctx.append(versions[(owner, version)][f - owner * cf])
            return ctx

        x = chunk_noise(params.seed, epoch, ci, 0, shape, dtype, device)
        for i in range(steps):
            output, written = forward_one(model, config, x, sigmas[i], text, f0, context_at(i))
            versions[(j, i)] = split_frames(written, cf)
            sigma = torch.tensor([sigmas[i]], device=device)
            x0 = sampler.x0(x[None], sigma, output[None])[0]
            if i + 1 < steps:
                fresh = None
                if sampler.fresh_noise:
                    fresh = chunk_noise(params.seed, epoch, ci, i + 1, shape, dtype, device)[None]
                x = sampler.next_input(x[None], sigma, x0[None], sigmas[i + 1], fresh)[0]
        outputs.append(x0)
        _, written = forward_one(model, config, x0, 0.0, text, f0, context_at(steps))
        versions[(j, steps)] = split_frames(written, cf)
    return outputs
