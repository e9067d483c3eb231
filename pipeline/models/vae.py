"""Streaming encode/decode with diffusers' ``AutoencoderKLWan``, keeping the causal cache across chunks.

``AutoencoderKLWan.decode()`` clears its cache on every call, so a chunk-by-chunk decode through it
would restart the causal convolutions at every chunk (a visible seam). Here each session owns a
:class:`VaeStream`: the encoder's and decoder's feature caches, driven latent frame by latent frame
exactly as ``AutoencoderKLWan._encode``/``_decode`` do, but never cleared between chunks.

Latents handed to and from the DiT are normalised with the VAE's ``latents_mean``/``latents_std``.
Frames: float [-1, 1], [B, 3, N, H, W]. Latents: [B, C, n, h, w] with N = 1 + 4(n-1) for a stream's
first chunk and N = 4n afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm, unpatchify


def _rms_norm_forward(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """``WanRMS_norm.forward`` with the same math (``F.normalize`` over channels, eps 1e-12) but an
    explicit sum of squares: torch's CPU ``linalg_vector_norm`` over a non-innermost dim of a 5-D
    tensor is ~40x slower and was most of the tiny VAE's decode time."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dim = 1 if norm.channel_first else -1
    normalized = xf / xf.square().sum(dim=dim, keepdim=True).sqrt().clamp_min(1e-12)
    return normalized.to(x.dtype) * norm.scale * norm.gamma + norm.bias


def use_fast_rms_norm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, WanRMS_norm):
            m.forward = _rms_norm_forward.__get__(m)  # type: ignore[method-assign]


def _mkldnn_conv3d(
    conv: torch.nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``Conv3d._conv_forward`` with the same maths through oneDNN on a CPU: for a batch of one, torch
    picks its unblocked ``slow_conv3d``, which made a 128x128 tiny VAE decode 4x slower (237 ms against
    58 ms for one session on a 2-core CPU) than the batched calls of several sessions."""
    cpu_float = x.device.type == "cpu" and x.dtype == torch.float32
    if cpu_float and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):  # "same"/"valid": torch's
        args = (conv.padding, conv.stride, conv.dilation, conv.groups)
        return torch.mkldnn_convolution(x.contiguous(), weight, bias, *args)
    return torch.nn.Conv3d._conv_forward(conv, x, weight, bias)


def use_mkldnn_conv3d(module: torch.nn.Module) -> None:
    """Route every Conv3d of ``module`` through oneDNN on a CPU (where torch has it)."""
    if not torch.backends.mkldnn.is_available():
        return
    for m in module.modules():
        if isinstance(m, torch.nn.Conv3d):
            m._conv_forward = _mkldnn_conv3d.__get__(m)  # type: ignore[method-assign]


@dataclass
class VaeStream:
    """The causal caches of one stream (one session and epoch); replace it on a hard cut."""

    enc_cache: list = field(default_factory=list)  # per causal conv of the encoder: last frames' features
    dec_cache: list = field(default_factory=list)  # per causal conv of the decoder
    frames_encoded: int = 0  # video frames seen by the encoder so far
    latents_decoded: int = 0  # latent frames seen by the decoder so far


def _join(entries: list) -> object:
    """Several streams' entries of one causal cache as one batch (or the one value they all hold)."""
    return torch.cat(entries) if isinstance(entries[0], torch.Tensor) else entries[0]


class StreamingVae:
    def __init__(self, vae: AutoencoderKLWan) -> None:
        if vae.config.patch_size is not None:
            raise ValueError(f"AutoencoderKLWan patch_size={vae.config.patch_size!r} is not supported (Wan2.2 VAE)")
        self.vae = vae
        use_fast_rms_norm(vae)
        use_mkldnn_conv3d(vae)
        z = vae.config.z_dim
        self._mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._n_enc = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.encoder.modules())
        self._n_dec = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())

    def new_stream(self) -> VaeStream:
        return VaeStream(enc_cache=[None] * self._n_enc, dec_cache=[None] * self._n_dec)

    def _norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean.to(like.device, like.dtype), self._std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode(self, stream: VaeStream, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, N, H, W] in [-1, 1] -> normalised latents [B, C, n, h, w] (posterior mode)."""
        n = frames.shape[2]
        first = stream.frames_encoded == 0
        if (first and (n - 1) % 4) or (not first and n % 4):
            want = "1 + 4k frames for a stream's first chunk" if first else "a multiple of 4 frames"
            raise ValueError(f"VAE encode got {n} frames: needs {want}")
        starts = ([0] if first else []) + list(range(1 if first else 0, n, 4))
        ends = [*starts[1:], n]
        groups = [frames[:, :, a:b] for a, b in zip(starts, ends, strict=True)]  # diffusers' grouping: 1, 4, 4, ...
        outs = [self.vae.encoder(g, feat_cache=stream.enc_cache, feat_idx=[0]) for g in groups]
        h = self.vae.quant_conv(torch.cat(outs, dim=2))
        stream.frames_encoded += n
        mu = h[:, : self.vae.config.z_dim]
        mean, std = self._norm(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, stream: VaeStream, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, C, n, h, w] -> frames [B, 3, N, H, W] in [-1, 1]."""
        mean, std = self._norm(latents)
        x = self.vae.post_quant_conv(latents * std + mean)
        outs = []
        for i in range(x.shape[2]):
            first = stream.latents_decoded == 0
            outs.append(
                self.vae.decoder(x[:, :, i : i + 1], feat_cache=stream.dec_cache, feat_idx=[0], first_chunk=first)
            )
            stream.latents_decoded += 1
        out = torch.cat(outs, dim=2)
        if self.vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_many(self, streams: list[VaeStream], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """One chunk of each of several streams: ``latents[i]`` [1, C, n, h, w] -> frames [1, 3, N, H, W].

        Decoded in one batched call when the streams' causal caches line up (the same entries cached,
        of the same shapes, and all past their first latent frame, or none); else one by one. The result
        is the same either way (a test holds it to that)."""
        if len(streams) == 1 or not self._batchable(streams, latents):
            return [self.decode(s, x) for s, x in zip(streams, latents, strict=True)]
        joint = VaeStream(
            dec_cache=[_join([s.dec_cache[i] for s in streams]) for i in range(self._n_dec)],
            latents_decoded=streams[0].latents_decoded,
        )
        video = self.decode(joint, torch.cat(latents))
        for i, entry in enumerate(joint.dec_cache):
            parts = entry.split(1) if isinstance(entry, torch.Tensor) else [entry] * len(streams)
            for s, part in zip(streams, parts, strict=True):
                s.dec_cache[i] = part
        for s in streams:
            s.latents_decoded += latents[0].shape[2]
        return list(video.split(1))

    def _batchable(self, streams: list[VaeStream], latents: list[torch.Tensor]) -> bool:
        if any(x.shape != latents[0].shape for x in latents):
            return False
        if len({s.latents_decoded == 0 for s in streams}) > 1:  # a first chunk decodes otherwise
            return False
        for i in range(self._n_dec):
            entries = [s.dec_cache[i] for s in streams]
            if isinstance(entries[0], torch.Tensor):
                if not all(isinstance(e, torch.Tensor) and e.shape == entries[0].shape for e in entries):
                    return False
            elif not all(not isinstance(e, torch.Tensor) and e == entries[0] for e in entries):
                return False
        return True

    @torch.no_grad()
    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """The reference: diffusers' own one-call decode of all latent frames (normalised input)."""
        mean, std = self._norm(latents)
        return self.vae.decode(latents * std + mean).sample
