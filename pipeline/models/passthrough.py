"""The passthrough model: the engine's whole schedule with an identity denoiser and no VAE.

It stands in for :class:`~pipeline.models.causal_wan.CausalWan`, :class:`~pipeline.models.vae.StreamingVae`
and the text encoder with the same interfaces, so scheduler, windows, StreamBatch executor, KV
writes, reorder, pacing and transport all run as for a real model, while frames come out bit for
bit as they went in: the latency of the system itself can be measured with frames that survive.

- "VAE": a latent pixel packs the 3 colours x 4 frames x 8x8 pixels it covers into 768 channels
  (a stream's first latent frame holds one frame, repeated, as the Wan VAE's does).
- Denoiser: velocity 0, so x0 = x; its sampler (``IdentitySampler``) never noises its latents.
- Text: a constant.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import VAE_SPATIAL_FACTOR
from pipeline.models.causal_wan import AttnBatch
from pipeline.models.frame_ae import from_groups, to_groups
from pipeline.models.vae import VaeStream


class PassthroughDit(torch.nn.Module):
    """Velocity zero for every slot; still writes (empty) keys/values so the window fills as usual."""

    heads = 1
    head_dim = 2
    num_blocks = 1
    patch_size = (1, 1, 1)

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self._device, self._dtype = device, dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw

    def rope(self, positions: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = positions.shape
        ones = torch.ones(b, n * grid[0] * grid[1], 1, 1, device=self._device)
        return ones, torch.zeros_like(ones)

    def time_shift(self, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(len(shifts), 1, 1, 1, device=self._device)
        return ones, torch.zeros_like(ones)

    def embed(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        text: torch.Tensor,
        text_keys: tuple[Hashable, ...] | None = None,
        time_keys: tuple[Hashable, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, L, 1] zeros (one token per latent pixel), and one-wide stand-ins for the rest."""
        b, _, f, h, w = x.shape
        zeros = x.new_zeros
        return zeros(b, f * h * w, 1), zeros(b, 1), zeros(b, 6, 1), zeros(b, 1, 1)

    def run_blocks(
        self, hidden: torch.Tensor, enc: torch.Tensor, tproj: torch.Tensor, batch: AttnBatch, blocks: range
    ) -> torch.Tensor:
        if batch.kv is not None and 0 in blocks:
            b, tokens, _ = hidden.shape
            kv = torch.zeros(b, tokens, self.heads, self.head_dim, device=hidden.device, dtype=self._dtype)
            batch.kv.exchange(0, kv, kv)
        return hidden

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return hidden.new_zeros(shape)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        hidden, temb, tproj, enc = self.embed(x, sigma, text)
        return self.head(self.run_blocks(hidden, enc, tproj, batch, range(1)), temb, tuple(x.shape))


class PixelPackVae:
    """Lossless space-and-time-to-depth in place of the Wan VAE (factors 4 in time, 8 in space)."""

    def __init__(self, device: torch.device) -> None:
        self.vae = _DtypeHolder(torch.float32)
        self.device = device

    def new_stream(self) -> VaeStream:
        return VaeStream()

    def encode(self, stream: VaeStream, frames: torch.Tensor) -> torch.Tensor:
        """frames [1, 3, N, H, W] -> latents [1, 768, n, H/8, W/8]."""
        s = VAE_SPATIAL_FACTOR
        b, _, _, height, width = frames.shape
        groups = to_groups(frames, stream.frames_encoded == 0, "passthrough encode")  # [B·n, 12, H, W]
        stream.frames_encoded += frames.shape[2]
        packed = F.pixel_unshuffle(groups, s)  # [B·n, 768, h, w]
        return packed.reshape(b, -1, packed.shape[1], height // s, width // s).permute(0, 2, 1, 3, 4).contiguous()

    def decode(self, stream: VaeStream, latents: torch.Tensor) -> torch.Tensor:
        """latents [1, 768, n, h, w] -> frames [1, 3, N, H, W] (N = 1 + 4(n-1) for a stream's first)."""
        b, _, n, h, w = latents.shape
        per = latents.permute(0, 2, 1, 3, 4).reshape(b * n, -1, h, w)
        frames = from_groups(F.pixel_shuffle(per, VAE_SPATIAL_FACTOR), b, stream.latents_decoded == 0)
        stream.latents_decoded += n
        return frames

    def decode_many(self, streams: list[VaeStream], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.decode(s, x) for s, x in zip(streams, latents, strict=True)]


@dataclass(frozen=True)
class _DtypeHolder:
    dtype: torch.dtype


class ConstantText:
    """No text encoder: every prompt conditions alike."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._value = torch.zeros(1, 1, device=device, dtype=dtype)

    def __call__(self, prompt: str) -> torch.Tensor:
        return self._value
