"""The ``demo`` model's latent space: a small autoencoder trained with it, in place of the Wan VAE.

Same factors as Wan's VAE (a latent frame holds 4 video frames, a latent pixel 8x8 pixels; a stream's
first latent frame holds its first frame alone, encoded as that frame 4 times and decoded to its last
copy), so every executor, window and output treats it like any other preset's. Unlike Wan's it has no
causal cache across latent frames: each latent frame is encoded and decoded on its own, which makes it
cheap (the decoder is a few convolutions at 16x16 and 32x32 and two pixel shuffles; bench/README.md
measures it against the tick) and lets several sessions decode in one batch always.

Encoder: 4 frames stacked as 12 channels -> pixel_unshuffle(8) -> 1x1 -> residual 3x3 -> ``z_dim``.
Decoder: ``z_dim`` -> 3x3 -> residual 3x3 -> 1x1, pixel_shuffle(2) -> 3x3 -> 1x1, pixel_shuffle(4).
Latents handed to the DiT are normalised with ``latents_mean``/``latents_std`` (set by the training
script from the data, as Wan's VAE config carries its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipeline.config import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR
from pipeline.models.vae import VaeStream


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.silu(self.a(F.silu(x))))


class FrameAutoencoder(ModelMixin, ConfigMixin):
    """4 video frames <-> one latent frame, [B, 12, H, W] <-> [B, z_dim, H/8, W/8] (frames in [-1, 1])."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        z_dim: int = 16,
        enc_dim: int = 128,
        dec_dim: int = 96,
        dec_up_dim: int = 48,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        t, s = VAE_TEMPORAL_FACTOR, VAE_SPATIAL_FACTOR
        pixels = 3 * t
        self.enc_in = nn.Conv2d(pixels * s * s, enc_dim, 1)
        self.enc_res = _Residual(enc_dim)
        self.enc_out = nn.Conv2d(enc_dim, z_dim, 3, padding=1)
        self.dec_in = nn.Conv2d(z_dim, dec_dim, 3, padding=1)
        self.dec_res = _Residual(dec_dim)
        self.dec_up = nn.Conv2d(dec_dim, dec_up_dim * 4, 1)  # pixel_shuffle(2): 16x16 -> 32x32
        self.dec_mid = nn.Conv2d(dec_up_dim, dec_up_dim, 3, padding=1)
        self.dec_out = nn.Conv2d(dec_up_dim, pixels * (s // 2) ** 2, 1)  # pixel_shuffle(4): -> 128x128
        z = z_dim
        self.register_buffer("mean", torch.tensor(latents_mean or [0.0] * z).view(1, z, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(latents_std or [1.0] * z).view(1, z, 1, 1), persistent=False)

    def encode_raw(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 12, H, W] -> un-normalised latents [B, z, H/8, W/8]."""
        h = self.enc_in(F.pixel_unshuffle(frames, VAE_SPATIAL_FACTOR))
        return self.enc_out(F.silu(self.enc_res(h)))

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 12, H, W] -> normalised latents [B, z, H/8, W/8]."""
        return (self.encode_raw(frames) - self.mean) / self.std

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_res(self.dec_in(z))
        h = F.pixel_shuffle(self.dec_up(F.silu(h)), 2)
        h = self.dec_out(F.silu(self.dec_mid(F.silu(h))))
        return F.pixel_shuffle(h, VAE_SPATIAL_FACTOR // 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, z, h, w] -> [B, 12, 8h, 8w] (not clamped)."""
        return self.decode_raw(latents * self.std + self.mean)


def to_groups(video: torch.Tensor, first: bool, who: str = "frame autoencoder") -> torch.Tensor:
    """Frames [B, 3, N, H, W] -> groups of 4 as channels [B·n, 12, H, W]; ``first``: the stream's first
    frame alone makes the first group (repeated 4 times), as the Wan VAE's first latent frame holds one frame.
    ``who`` names the codec in the error for a wrong frame count (this one, and the passthrough's pixel pack)."""
    t = VAE_TEMPORAL_FACTOR
    n = video.shape[2]
    if (first and (n - 1) % t) or (not first and n % t):
        want = "1 + 4k frames for a stream's first chunk" if first else "a multiple of 4 frames"
        raise ValueError(f"{who} got {n} frames: needs {want}")
    if first:
        video = torch.cat([video[:, :, :1].expand(-1, -1, t, -1, -1), video[:, :, 1:]], dim=2)
    b, c, total, h, w = video.shape
    return video.reshape(b, c, total // t, t, h, w).permute(0, 2, 1, 3, 4, 5).reshape(-1, c * t, h, w)


def from_groups(groups: torch.Tensor, batch: int, first: bool) -> torch.Tensor:
    """The inverse of :func:`to_groups`: [B·n, 12, H, W] -> [B, 3, N, H, W] (the first group's last frame only)."""
    t = VAE_TEMPORAL_FACTOR
    _, _, h, w = groups.shape
    video = groups.reshape(batch, -1, 3, t, h, w).permute(0, 2, 1, 3, 4, 5).reshape(batch, 3, -1, h, w)
    return video[:, :, t - 1 :] if first else video


@dataclass(frozen=True)
class _DtypeOf:
    module: nn.Module

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


class StreamingFrameAe:
    """The engine's codec interface (as :class:`pipeline.models.vae.StreamingVae`) over a :class:`FrameAutoencoder`.

    A stream's only state is how many frames it has seen (its first latent frame holds one frame)."""

    def __init__(self, ae: FrameAutoencoder) -> None:
        self.ae = ae
        self.vae = _DtypeOf(ae)  # what intake and decode read the codec's dtype from

    def new_stream(self) -> VaeStream:
        return VaeStream()

    @torch.no_grad()
    def encode(self, stream: VaeStream, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, N, H, W] in [-1, 1] -> normalised latents [B, z, n, h, w]."""
        first = stream.frames_encoded == 0
        z = self.ae.encode(to_groups(frames, first))
        stream.frames_encoded += frames.shape[2]
        return z.unflatten(0, (frames.shape[0], -1)).transpose(1, 2)

    @torch.no_grad()
    def decode(self, stream: VaeStream, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, z, n, h, w] -> frames [B, 3, N, H, W] in [-1, 1]."""
        return self.decode_many([stream], [latents])[0]

    @torch.no_grad()
    def decode_many(self, streams: list[VaeStream], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """One chunk of each of several streams, all latent frames in one batched call."""
        flat = torch.cat([x.transpose(1, 2).flatten(0, 1) for x in latents])  # [Σ B·n, z, h, w]
        groups = self.ae.decode(flat).clamp(-1.0, 1.0)
        out, at = [], 0
        for stream, x in zip(streams, latents, strict=True):
            b, _, n, _, _ = x.shape
            first = stream.latents_decoded == 0
            out.append(from_groups(groups[at : at + b * n], b, first))
            stream.latents_decoded += n
            at += b * n
        return out
