"""A causal Wan DiT: diffusers' ``WanTransformer3DModel`` weights and blocks, driven chunk by chunk.

What is ours: the self-attention processor (installed on every block's ``attn1`` with
``set_attn_processor``) that reads earlier frames' keys/values from a KV window and writes its own,
RoPE that starts at each slot's frame position, and a forward split into ``embed`` ->
``run_blocks(range)`` -> ``head`` so a pipeline stage can own a contiguous range of blocks.

RoPE: frame positions are absolute frame indices (within an epoch), computed exactly for any
index (no table to run past); keys are stored rotated, once, when written. Sink frames are the one
exception, turned forward in time at read (see :mod:`pipeline.window`).

Shapes: B slots, C latent channels, F latent frames per chunk, h x w latent pixels,
L = F·(h/ph)·(w/pw) tokens per slot, Lc context tokens, H heads, D head dim, E = H·D model dim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention

from pipeline.models.attention import CrossAttnProcessor, TextKVCache, attend

ROPE_CACHE_FRAMES = 4096  # frame indices whose time cos/sin are kept on the device (22 numbers each)


class KVAccess(Protocol):
    """Where a batch of slots finds its context and leaves its own keys/values, per block."""

    def exchange(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Given the slots' own keys (rotated at their frame positions) and values, [B, L, H, D],
        record them and return what the slots attend to: [context ; own], [B, Lc + L, H, D]."""
        ...


@dataclass
class AttnBatch:
    """Everything the self-attention of one forward needs besides hidden states.

    Passed to each block in place of diffusers' ``rotary_emb``; the block hands it to ``attn1``.
    """

    kv: KVAccess | None  # None: no cache (a full forward over all frames)
    q_rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin of the slots' own tokens: [B, L, 1, D/2]
    mask: torch.Tensor | None  # bool [B, 1, 1 or L, Lc + L], True = may attend; None = all
    # per slot, how many of its keys are real (context, then its own tokens; padding after): see attend()
    key_lengths: tuple[int, ...] | None = None
    # per slot, what names its text states (the prompt) for the text K/V cache; None: not cached
    text_keys: tuple[Hashable, ...] | None = None
    # per slot, its time input as a number (Slot.model_time): one time embedding per value; None: one per slot
    time_keys: tuple[Hashable, ...] | None = None


class Denoiser(Protocol):
    """What executors need of a model: :class:`CausalWan`, or the passthrough stand-in."""

    num_blocks: int
    heads: int
    head_dim: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]: ...

    def rope(self, positions: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def time_shift(self, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def embed(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        text: torch.Tensor,
        text_keys: tuple[Hashable, ...] | None = None,
        time_keys: tuple[Hashable, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """time [B]: the timestep input (1000·σ) -> hidden [B, L, E], temb [B, E], timestep_proj [B, 6, E],
        text states [B, Lt, E]."""
        ...

    def run_blocks(
        self, hidden: torch.Tensor, enc: torch.Tensor, tproj: torch.Tensor, batch: AttnBatch, blocks: range
    ) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """Velocity [B, C, F, h, w] of slots x [B, C, F, h, w] at noise levels sigma [B]."""
        ...


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs of the head dim, as diffusers' Wan does. x: [B, L, H, D]."""
    cos, sin = rope
    x1, x2 = x.unflatten(-1, (-1, 2)).to(cos.dtype).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def patch_embed(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Wan's patch embedding (a Conv3d whose stride is its kernel) as the linear map it is: x [B, C, F, h, w] ->
    tokens [B, L, E] in the conv's (frame, row, column) order. A linear map computes every token alone, so a
    slot's tokens do not depend on the other slots of its micro-batch; the CPU's Conv3d picks its algorithm by
    batch size (a slot batched with two others moved by up to 6e-7, enough to flip a pixel by one level), and
    a ring of stages, which runs a tick as several micro-batches, must give the frames of one process."""
    pt, ph, pw = conv.kernel_size
    if tuple(conv.stride) != (pt, ph, pw) or conv.padding != (0, 0, 0):
        raise ValueError(f"patch embedding {conv}: stride must equal the kernel and padding be 0")
    b, c, f, h, w = x.shape
    patches = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    patches = patches.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)  # [B, L, C·pt·ph·pw]
    return F.linear(patches, conv.weight.flatten(1), conv.bias)


class CausalWanAttnProcessor:
    """Self-attention over [KV-window context ; the slot's own tokens], for one block."""

    def __init__(self, block_index: int, backend: str = "sdpa") -> None:
        self.block_index = block_index
        self.backend = backend  # pipeline.models.attention.BACKENDS

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: AttnBatch | None = None,
    ) -> torch.Tensor:
        batch = rotary_emb
        if not isinstance(batch, AttnBatch):
            raise TypeError("CausalWanAttnProcessor needs an AttnBatch; call CausalWan, not the diffusers model")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, H, D]
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        keys, values = apply_rope(k, batch.q_rope), v
        if batch.kv is not None:
            keys, values = batch.kv.exchange(self.block_index, keys, values)  # [B, Lc + L, H, D]
        out = attend(apply_rope(q, batch.q_rope), keys, values, batch.mask, self.backend, batch.key_lengths)
        out = out.flatten(2).type_as(q)  # [B, L, E]
        return attn.to_out[0](out)


class CausalWan(torch.nn.Module):
    """Velocity of a batch of slots, each with its own σ, text and frame positions.

    Speed levers, each giving the same numbers on or off (tests): ``text_kv_cache`` (attn2's text
    keys/values once per prompt and block, for slots whose ``AttnBatch.text_keys`` name them; the
    ``text_cache_prompts`` latest prompts kept), ``rope_cache`` (RoPE tables kept on the device: time
    cos/sin per frame index, space per latent grid), ``attention`` (the kernel: sdpa, flash2/3/4).
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        attention: str = "sdpa",
        text_kv_cache: bool = True,
        rope_cache: bool = True,
        text_cache_prompts: int = 8,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.transformer = transformer
        cfg = transformer.config
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)  # type: ignore[assignment]
        self.heads: int = cfg.num_attention_heads
        self.head_dim: int = cfg.attention_head_dim
        self.num_blocks = len(transformer.blocks)
        self.text_cache = TextKVCache(text_cache_prompts) if text_kv_cache else None
        self._cross = [CrossAttnProcessor(i, self.text_cache, attention) for i in range(self.num_blocks)]
        transformer.set_attn_processor(
            {f"blocks.{i}.attn1.processor": CausalWanAttnProcessor(i, attention) for i in range(self.num_blocks)}
            | {f"blocks.{i}.attn2.processor": self._cross[i] for i in range(self.num_blocks)}
        )
        rope = transformer.rope
        self.rope_theta = 10000.0  # WanRotaryPosEmbed's default, which WanTransformer3DModel uses
        self._t_half = rope.t_dim // 2
        # Time frequencies, exact (float64): cos/sin of any frame index are computed, not looked up.
        self._t_freqs = 1.0 / self.rope_theta ** (torch.arange(0, rope.t_dim, 2, dtype=torch.float64) / rope.t_dim)
        # Space uses diffusers' table (interleaved pairs: take every other column).
        cos, sin = rope.freqs_cos[:, 0::2], rope.freqs_sin[:, 1::2]  # [max_len, D/2]
        half = [rope.t_dim // 2, rope.h_dim // 2, rope.w_dim // 2]
        _, self._h_cos, self._w_cos = cos.split(half, dim=1)
        _, self._h_sin, self._w_sin = sin.split(half, dim=1)
        # rope_cache: time cos/sin per frame index and space tables per grid, on the device, in rope_dtype
        self.rope_cache = rope_cache
        self._time_trig_cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._space_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    def rope_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _time_trig(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of frame index ``p``'s time angles, [t_dim/2] on the device in rope_dtype. Made one
        frame at a time from float64 on the CPU, so a frame's values never depend on its batch."""
        hit = self._time_trig_cache.get(p) if self.rope_cache else None
        if hit is not None:
            self._time_trig_cache.move_to_end(p)
            return hit
        angles = float(p) * self._t_freqs  # [t/2] float64
        hit = (angles.cos().to(self.device, self.rope_dtype()), angles.sin().to(self.device, self.rope_dtype()))
        if self.rope_cache:
            self._time_trig_cache[p] = hit
            if len(self._time_trig_cache) > ROPE_CACHE_FRAMES:
                self._time_trig_cache.popitem(last=False)
        return hit

    def _space(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the h and w axes of every token of a frame: [hp·wp, (D - t_dim)/2]."""
        hit = self._space_cache.get(grid) if self.rope_cache else None
        if hit is not None:
            return hit
        hp, wp = grid
        parts = []
        for h_tab, w_tab in ((self._h_cos, self._w_cos), (self._h_sin, self._w_sin)):
            h = h_tab[:hp].to(self.device, self.rope_dtype()).view(hp, 1, -1).expand(hp, wp, -1)
            w = w_tab[:wp].to(self.device, self.rope_dtype()).view(1, wp, -1).expand(hp, wp, -1)
            parts.append(torch.cat([h, w], dim=-1).reshape(hp * wp, -1))
        hit = (parts[0], parts[1])
        if self.rope_cache:
            self._space_cache[grid] = hit
        return hit

    def rope(self, positions: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for every token of frames at ``positions`` ([B, n] ints): [B, n·hp·wp, 1, D/2]."""
        hp, wp = grid
        if hp > self._h_cos.shape[0] or wp > self._w_cos.shape[0]:
            raise ValueError(f"latent grid {hp}x{wp} is larger than the RoPE table ({self._h_cos.shape[0]})")
        b, n = positions.shape
        trig = [self._time_trig(p) for p in positions.flatten().tolist()]
        out = []
        for k, space in enumerate(self._space(grid)):
            t = torch.stack([tr[k] for tr in trig]).view(b * n, 1, -1).expand(b * n, hp * wp, -1)
            s = space.view(1, hp * wp, -1).expand(b * n, hp * wp, -1)
            out.append(torch.cat([t, s], dim=-1).view(b, n * hp * wp, 1, -1))
        return out[0], out[1]

    def time_shift(self, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin that turn rotated keys ``shifts`` frames forward in time ([B] ints): [B, 1, 1, D/2].

        RoPE rotations compose: R(p + s) = R(s)·R(p); the space axes are left as they are."""
        trig = [self._time_trig(s) for s in shifts.tolist()]
        rest = self.head_dim // 2 - self._t_half
        out = []
        for k, fill in enumerate((1.0, 0.0)):
            t = torch.stack([tr[k] for tr in trig])  # [B, t/2]
            out.append(torch.cat([t, t.new_full((len(trig), rest), fill)], dim=1).view(-1, 1, 1, self.head_dim // 2))
        return out[0], out[1]

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        _, ph, pw = self.patch_size
        return latent_hw[0] // ph, latent_hw[1] // pw

    def embed(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        text: torch.Tensor,
        text_keys: tuple[Hashable, ...] | None = None,
        time_keys: tuple[Hashable, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, C, F, h, w], time [B] (the timestep input: 1000·σ, or the raw timestep under the
        ``table`` rule), text [B, Lt, text_dim] -> hidden [B, L, E], temb [B, E], timestep_proj [B, 6, E],
        text states [B, Lt, E]. With the text cache on and ``text_keys`` naming each slot's text (its
        prompt), the text states are made once per prompt (the text embedder over Lt tokens), not per slot;
        ``time_keys`` (each slot's time input as a number) likewise makes each time embedding once per value."""
        t = self.transformer
        hidden = patch_embed(t.patch_embedding, x)  # [B, L, E]
        text = text.to(self.dtype)
        if self.text_cache is None or text_keys is None:
            temb, tproj, enc, _ = t.condition_embedder(time.to(torch.float32), text)
            return hidden, temb, tproj.unflatten(1, (6, -1)), enc
        if len(text_keys) != len(text):
            raise ValueError(f"{len(text_keys)} text keys for a batch of {len(text)} slots")
        temb, tproj = self.time_embedding(time, time_keys)
        states = {}
        for i, key in enumerate(text_keys):
            if key not in states:
                hit = self.text_cache.states(key)
                if hit is None:
                    hit = t.condition_embedder.text_embedder(text[i : i + 1])[0]
                    self.text_cache.keep_states(key, hit)
                states[key] = hit
        if len(states) == 1:
            (one,) = states.values()
            enc = one.expand(len(text), *one.shape)
        else:
            enc = torch.stack([states[k] for k in text_keys])
        return hidden, temb, tproj.unflatten(1, (6, -1)), enc

    def time_embedding(
        self, time: torch.Tensor, keys: tuple[Hashable, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """temb [B, E] and timestep_proj [B, 6·E] of each slot's time input [B] (diffusers' condition embedder,
        its time part), each computed alone: the CPU's GEMM rounds a row differently for 1 to 11 rows than for
        more, so a slot's embedding would otherwise depend on how many slots share its micro-batch. ``keys``
        (each slot's time input as a number) compute each distinct value once; without them, every slot."""
        ce = self.transformer.condition_embedder
        dtype = next(iter(ce.time_embedder.parameters())).dtype
        slots: tuple[Hashable, ...] = keys if keys is not None else tuple(range(len(time)))
        made: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, key in enumerate(slots):
            if key not in made:
                one = time[i : i + 1].to(torch.float32)
                temb = ce.time_embedder(ce.timesteps_proj(one).to(dtype)).to(self.dtype)
                made[key] = (temb, ce.time_proj(ce.act_fn(temb)))
        return torch.cat([made[k][0] for k in slots]), torch.cat([made[k][1] for k in slots])

    def run_blocks(
        self, hidden: torch.Tensor, enc: torch.Tensor, tproj: torch.Tensor, batch: AttnBatch, blocks: range
    ) -> torch.Tensor:
        for i in blocks:
            self._cross[i].text_keys = batch.text_keys  # attn2 is called by the block with the text states only
            try:
                hidden = self.transformer.blocks[i](hidden, enc, tproj, batch)  # type: ignore[arg-type]
            finally:
                self._cross[i].text_keys = None
        return hidden

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """hidden [B, L, E] -> velocity [B, C, F, h, w]; temb [B, E], or per token [B, L, E] (forward_frames)."""
        t = self.transformer
        b, _, f, h, w = shape
        pt, ph, pw = self.patch_size
        if temb.ndim == 3:
            shift, scale = (t.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        else:
            shift, scale = (t.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = t.proj_out(hidden)  # [B, L, C·pt·ph·pw]
        out = out.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor,
        batch: AttnBatch,
        time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden, temb, tproj, enc = self.embed(x, sigma.to(torch.float32) * 1000.0 if time is None else time, text)
        hidden = self.run_blocks(hidden, enc, tproj, batch, range(self.num_blocks))
        return self.head(hidden, temb, tuple(x.shape))

    def forward_frames(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        text: torch.Tensor,
        positions: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity of every frame of x [B, C, F, h, w], each frame at its own time input, time [B, F] (1000·σ),
        in one forward: frame q attends to frame k where ``visible`` [F, F] (bool) says so (default: k <= q),
        at RoPE frame positions ``positions`` [F] (default 0..F-1).

        What training uses (pipeline/train/demo.py): a frame's keys and values are those a chunk-by-chunk
        stream would have written for it at that noise level and with that context, so one forward trains
        every frame of a sequence against the context a visibility rule shows it (DESIGN §4). Teacher forcing
        for ``clean``: the clean frames, then the same frames noised, each noisy frame seeing the clean ones
        before it and itself (two frames may share a position)."""
        t = self.transformer
        b, _, f, h, w = x.shape
        grid = self.grid((h, w))
        tokens = grid[0] * grid[1]
        hidden = patch_embed(t.patch_embedding, x)  # [B, L, E]
        temb, tproj, _, _ = t.condition_embedder(time.flatten().float(), text[:1, :1].to(self.dtype))
        enc = t.condition_embedder.text_embedder(text.to(self.dtype))
        temb = temb.unflatten(0, (b, f)).repeat_interleave(tokens, dim=1)  # [B, L, E]
        tproj = tproj.unflatten(0, (b, f)).unflatten(2, (6, -1)).repeat_interleave(tokens, dim=1)  # [B, L, 6, E]
        if visible is None:
            visible = torch.ones(f, f, dtype=torch.bool).tril()
        mask = visible.to(x.device).repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
        if positions is None:
            positions = torch.arange(f)
        batch = AttnBatch(kv=None, q_rope=self.rope(positions.view(1, f).expand(b, f), grid), mask=mask[None, None])
        hidden = self.run_blocks(hidden, enc, tproj, batch, range(self.num_blocks))
        return self.head(hidden, temb, tuple(x.shape))

    def full_forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        """One forward over all F frames with a block-causal mask (chunk j sees chunks <= j).

        The KV-cached chunk-by-chunk forward must equal this (tests)."""
        b, _, f, h, w = x.shape
        grid = self.grid((h, w))
        tokens = grid[0] * grid[1]
        chunk_of = torch.arange(f, device=x.device).repeat_interleave(tokens) // chunk_frames  # [L]
        mask = (chunk_of[None, :] <= chunk_of[:, None]).view(1, 1, f * tokens, f * tokens)
        positions = torch.arange(f).view(1, f).expand(b, f)
        return self(x, sigma, text, AttnBatch(kv=None, q_rope=self.rope(positions, grid), mask=mask))
