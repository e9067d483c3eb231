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

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention


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
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> hidden [B, L, E], temb [B, E], timestep_proj [B, 6, E], text states [B, Lt, E]."""
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


class CausalWanAttnProcessor:
    """Self-attention over [KV-window context ; the slot's own tokens], for one block."""

    def __init__(self, block_index: int) -> None:
        self.block_index = block_index

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
        out = F.scaled_dot_product_attention(
            apply_rope(q, batch.q_rope).transpose(1, 2),  # [B, H, L, D]
            keys.transpose(1, 2),  # [B, H, Lc + L, D]
            values.transpose(1, 2),
            attn_mask=batch.mask,
        )
        out = out.transpose(1, 2).flatten(2).type_as(q)  # [B, L, E]
        return attn.to_out[0](out)


class CausalWan(torch.nn.Module):
    """Velocity of a batch of slots, each with its own σ, text and frame positions."""

    def __init__(self, transformer: WanTransformer3DModel) -> None:
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)  # type: ignore[assignment]
        self.heads: int = cfg.num_attention_heads
        self.head_dim: int = cfg.attention_head_dim
        self.num_blocks = len(transformer.blocks)
        transformer.set_attn_processor(
            {f"blocks.{i}.attn1.processor": CausalWanAttnProcessor(i) for i in range(self.num_blocks)}
            | {f"blocks.{i}.attn2.processor": transformer.blocks[i].attn2.processor for i in range(self.num_blocks)}
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

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    def rope_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _time_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [...] (ints, any size) -> angles [..., t_dim/2] in float64."""
        return positions.to(torch.float64).unsqueeze(-1) * self._t_freqs.to(positions.device)

    def rope(self, positions: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for every token of frames at ``positions`` ([B, n] ints): [B, n·hp·wp, 1, D/2]."""
        hp, wp = grid
        if hp > self._h_cos.shape[0] or wp > self._w_cos.shape[0]:
            raise ValueError(f"latent grid {hp}x{wp} is larger than the RoPE table ({self._h_cos.shape[0]})")
        b, n = positions.shape
        angles = self._time_angles(positions.cpu())  # [B, n, t/2]
        parts = []
        for t_tab, h_tab, w_tab in ((angles.cos(), self._h_cos, self._w_cos), (angles.sin(), self._h_sin, self._w_sin)):
            t = t_tab.to(self.device, self.rope_dtype()).view(b, n, 1, 1, -1).expand(b, n, hp, wp, -1)
            h = h_tab[:hp].to(self.device, self.rope_dtype()).view(1, 1, hp, 1, -1).expand(b, n, hp, wp, -1)
            w = w_tab[:wp].to(self.device, self.rope_dtype()).view(1, 1, 1, wp, -1).expand(b, n, hp, wp, -1)
            parts.append(torch.cat([t, h, w], dim=-1).reshape(b, n * hp * wp, 1, -1))
        return parts[0], parts[1]

    def time_shift(self, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin that turn rotated keys ``shifts`` frames forward in time ([B] ints): [B, 1, 1, D/2].

        RoPE rotations compose: R(p + s) = R(s)·R(p); the space axes are left as they are."""
        angles = self._time_angles(shifts.cpu())  # [B, t/2]
        rest = self.head_dim // 2 - self._t_half
        cos = torch.cat([angles.cos(), torch.ones(len(shifts), rest, dtype=torch.float64)], dim=1)
        sin = torch.cat([angles.sin(), torch.zeros(len(shifts), rest, dtype=torch.float64)], dim=1)
        return (
            cos.to(self.device, self.rope_dtype()).view(-1, 1, 1, self.head_dim // 2),
            sin.to(self.device, self.rope_dtype()).view(-1, 1, 1, self.head_dim // 2),
        )

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        _, ph, pw = self.patch_size
        return latent_hw[0] // ph, latent_hw[1] // pw

    def embed(
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, C, F, h, w], sigma [B], text [B, Lt, text_dim] -> hidden [B, L, E], temb [B, E],
        timestep_proj [B, 6, E], text states [B, Lt, E]."""
        t = self.transformer
        hidden = t.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B, L, E]
        timestep = sigma.to(torch.float32) * 1000.0
        temb, tproj, enc, _ = t.condition_embedder(timestep, text.to(self.dtype))
        return hidden, temb, tproj.unflatten(1, (6, -1)), enc

    def run_blocks(
        self, hidden: torch.Tensor, enc: torch.Tensor, tproj: torch.Tensor, batch: AttnBatch, blocks: range
    ) -> torch.Tensor:
        for i in blocks:
            hidden = self.transformer.blocks[i](hidden, enc, tproj, batch)  # type: ignore[arg-type]
        return hidden

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """hidden [B, L, E] -> velocity [B, C, F, h, w]."""
        t = self.transformer
        b, _, f, h, w = shape
        pt, ph, pw = self.patch_size
        shift, scale = (t.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = t.proj_out(hidden)  # [B, L, C·pt·ph·pw]
        out = out.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        hidden, temb, tproj, enc = self.embed(x, sigma, text)
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
