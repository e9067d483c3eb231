"""TAEHV, the tiny video autoencoder for Wan 2.1 latents, as a streaming decoder beside the full Wan VAE.

The architecture and state-dict layout are those of madebyollin's TAEHV (github.com/madebyollin/taehv,
MIT), so the published Wan 2.1 weights, ``taew2_1.pth``, load as they are (:func:`load_taehv`, strict).
The code is ours: a chunk is run in parallel over its frames, and a stream carries each MemBlock's past.

- Latents: TAEHV decodes exactly what the DiT produces (the Wan VAE's *normalised* latents: no
  ``latents_mean``/``latents_std`` is applied); its frames come out in [0, 1] and are handed on in
  [-1, 1], as :class:`~pipeline.models.vae.StreamingVae` hands them.
- Time: the decoder grows each latent frame into 4 frames (two TGrow of stride 2) and a stream's first 3
  are trimmed, so the first latent frame gives 1 frame and every later one 4: the Wan VAE's 1 + 4(n-1),
  which ``SystemConfig.frames_for_chunk`` counts on.
- Memory: a MemBlock sees its input at the frame before (zeros before a stream's first frame). A
  :class:`TaehvStream` keeps, per MemBlock, the input of the last frame it saw; a chunk whose first frame
  gets that as its past equals the same frames within one pass over the whole sequence.
- Encoding (v2v) stays with the Wan VAE's encoder (:class:`StreamingTaehv` delegates it); TAEHV's own
  encoder is built only so that the published file loads whole and strictly.

Shapes: latents [B, 16, n, h, w] (NCTHW, as the engine hands them), frames [B, 3, N, 8h, 8w].
Inside the decoder, frames are flattened into the batch: [B·T, C, H, W].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models.vae import StreamingVae, VaeStream

LATENT_CHANNELS = 16  # Wan 2.1's z_dim
DECODER_WIDTHS = (256, 128, 64, 64)  # channels of the decoder's levels, coarse to fine
TIME_UPSCALE = 4  # frames per latent frame (TGrow strides 1, 2, 2)
WEIGHTS_HINT = "TAEHV's Wan 2.1 weights, taew2_1.pth from github.com/madebyollin/taehv"


def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """A soft clamp of latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block of one frame and the block's input at the frame before (its past).
    Keys: ``conv.{0,2,4}.{weight,bias}``, and ``skip.weight`` when the width changes."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(2 * n_in, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past [B·T, C, H, W] -> [B·T, C', H, W]."""
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """Encoder: ``stride`` consecutive frames mixed into one by a 1x1 conv. Key: ``conv.weight``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B·T, C, H, W] -> [B·T/stride, C, H, W]."""
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """Decoder: each frame grown into ``stride`` frames by a 1x1 conv (channel group k: the k-th frame).
    Key: ``conv.weight``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B·T, C, H, W] -> [B·T·stride, C, H, W], each frame's new frames in time order."""
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class Taehv(nn.Module):
    """TAEHV with Wan 2.1's settings (16 latent channels, no pixel patches, time /4 and x4, space /8 and x8).

    The module order inside ``encoder`` and ``decoder`` is the published state dict's key layout
    (``decoder.3.conv.0.weight``, ``decoder.7.conv.weight``, ...): do not reorder."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS, widths: tuple[int, ...] = DECODER_WIDTHS) -> None:
        super().__init__()
        self.latent_channels = latent_channels

        def level(pool: int) -> list[nn.Module]:  # an encoder level: time pool, space /2, three MemBlocks
            return [TPool(64, pool), conv3x3(64, 64, stride=2, bias=False), *(MemBlock(64, 64) for _ in range(3))]

        self.encoder = nn.Sequential(
            conv3x3(3, 64), nn.ReLU(), *level(2), *level(2), *level(1), conv3x3(64, latent_channels)
        )
        w = widths

        def up(i: int, t_stride: int) -> list[nn.Module]:  # a decoder level: three MemBlocks, space x2, time xN
            mems = [MemBlock(w[i], w[i]) for _ in range(3)]
            return [*mems, nn.Upsample(scale_factor=2), TGrow(w[i], t_stride), conv3x3(w[i], w[i + 1], bias=False)]

        self.decoder = nn.Sequential(
            Clamp(), conv3x3(latent_channels, w[0]), nn.ReLU(), *up(0, 1), *up(1, 2), *up(2, 2), nn.ReLU(),
            conv3x3(w[3], 3),
        )  # fmt: skip
        self.frames_to_trim = TIME_UPSCALE - 1  # a stream's first latent frame decodes to its last frame only

    def decode_chunk(self, x: torch.Tensor, past: list[torch.Tensor | None]) -> torch.Tensor:
        """latents x [B, T, C, h, w] (NTCHW) -> raw frames [B, 4T, 3, 8h, 8w] (about [0, 1], untrimmed).

        ``past[i]`` is decoder block i's input at the frame before x's first ([B, C, H, W]), or None at a
        stream's start (zeros); it is replaced by its input at x's last frame (the next chunk's past)."""
        b = x.shape[0]
        h = x.flatten(0, 1)  # [B·T, C, h, w]
        for i, block in enumerate(self.decoder):
            if isinstance(block, MemBlock):
                frames = h.unflatten(0, (b, -1))  # [B, T', C, H, W]
                before = past[i]
                if before is None:
                    before = torch.zeros_like(frames[:, 0])
                prev = torch.cat([before.unsqueeze(1), frames[:, :-1]], dim=1)  # each frame's predecessor
                past[i] = frames[:, -1].clone()
                h = block(h, prev.flatten(0, 1))
            else:
                h = block(h)
        return h.unflatten(0, (b, -1))

    def decode_video(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence in one pass: latents [B, T, C, h, w] -> frames [B, 4T-3, 3, 8h, 8w] in [0, 1]."""
        past: list[torch.Tensor | None] = [None] * len(self.decoder)
        return self.decode_chunk(x, past)[:, self.frames_to_trim :].clamp(0, 1)


@dataclass
class TaehvStream(VaeStream):
    """One stream's state: the Wan encoder's causal cache (v2v; :class:`VaeStream`'s fields) and TAEHV's
    decoder memory. Replace it on a hard cut."""

    past: list = field(default_factory=list)  # per decoder block: MemBlock input at the last frame [1, C, H, W]


def _join(entries: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Several streams' past of one MemBlock as one batch; a stream at its start contributes zeros."""
    like = next((e for e in entries if e is not None), None)
    if like is None:
        return None
    return torch.cat([e if e is not None else torch.zeros_like(like) for e in entries])


class StreamingTaehv:
    """A drop-in for :class:`StreamingVae` in the engine: decode with TAEHV, encode (v2v) with the Wan VAE."""

    def __init__(self, taehv: Taehv, wan: StreamingVae) -> None:
        self.taehv = taehv.eval()
        self.wan = wan
        self.vae = wan.vae  # the frames' dtype on the encode side (intake, decode phase read ``.vae.dtype``)

    def new_stream(self) -> TaehvStream:
        enc = self.wan.new_stream()
        return TaehvStream(enc_cache=enc.enc_cache, past=[None] * len(self.taehv.decoder))

    def encode(self, stream: VaeStream, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, N, H, W] in [-1, 1] -> normalised latents, by the Wan VAE's encoder."""
        return self.wan.encode(stream, frames)

    @torch.no_grad()
    def decode(self, stream: TaehvStream, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, C, n, h, w] -> frames [B, 3, N, 8h, 8w] in [-1, 1] (N = 4n-3 for a stream's
        first chunk, 4n after)."""
        dtype = next(self.taehv.parameters()).dtype
        raw = self.taehv.decode_chunk(latents.to(dtype).transpose(1, 2), stream.past)  # [B, 4n, 3, H, W]
        if stream.latents_decoded == 0:
            raw = raw[:, self.taehv.frames_to_trim :]
        stream.latents_decoded += latents.shape[2]
        return raw.clamp(0, 1).mul(2).sub(1).transpose(1, 2)

    @torch.no_grad()
    def decode_many(self, streams: list[TaehvStream], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """One chunk of each of several streams: ``latents[i]`` [1, C, n, h, w] -> frames [1, 3, N, H, W].

        Chunks of the same shape are decoded in one batched call whatever their streams' positions (a
        stream at its start has zeros for its past; only its trim differs); other shapes, one by one."""
        out: list[torch.Tensor | None] = [None] * len(streams)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(latents):
            groups.setdefault(tuple(x.shape), []).append(i)
        for idx in groups.values():
            if len(idx) == 1:
                out[idx[0]] = self.decode(streams[idx[0]], latents[idx[0]])
                continue
            n_blocks = len(self.taehv.decoder)
            joint = TaehvStream(past=[_join([streams[i].past[k] for i in idx]) for k in range(n_blocks)])
            joint.latents_decoded = 1  # trimmed below, per stream
            video = self.decode(joint, torch.cat([latents[i] for i in idx]))
            for k, entry in enumerate(joint.past):
                parts = entry.split(1) if entry is not None else [None] * len(idx)
                for i, part in zip(idx, parts, strict=True):
                    streams[i].past[k] = part
            for i, v in zip(idx, video.split(1), strict=True):
                first = streams[i].latents_decoded == 0
                out[i] = v[:, :, self.taehv.frames_to_trim :] if first else v
                streams[i].latents_decoded += latents[i].shape[2]
        return [v for v in out if v is not None]

    @torch.no_grad()
    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """The reference: all latent frames [B, C, n, h, w] in one pass -> frames [B, 3, 4n-3, H, W] in [-1, 1]."""
        dtype = next(self.taehv.parameters()).dtype
        return self.taehv.decode_video(latents.to(dtype).transpose(1, 2)).mul(2).sub(1).transpose(1, 2)


def shrunk_widths(scale: float) -> tuple[int, ...]:
    """Decoder widths scaled by ``scale`` (multiples of 4, at least 8): a random TAEHV shrunk as its preset's
    Wan VAE is (``tiny``: base_dim 8 of Wan's 96), for plumbing and timings on a CPU."""
    return tuple(max(8, 4 * math.ceil(w * min(scale, 1.0) / 4)) for w in DECODER_WIDTHS)


def random_taehv(seed: int, scale: float = 1.0) -> Taehv:
    """The architecture with weights drawn from ``seed`` (torch's default init); decoder widths scaled by
    ``scale`` (1: the published size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Taehv(widths=shrunk_widths(scale))


def _read_state_dict(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another format, a pickle with code in it
        raise ConfigError(
            f"decoder_path {str(path)!r}: not a readable TAEHV weights file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"decoder_path {str(path)!r}: holds {type(sd).__name__}, not a state dict of tensors")
    return sd


def _listed(keys: list[str], most: int = 8) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > most else "")


def load_taehv(path: str | Path) -> Taehv:
    """TAEHV with the weights of ``path`` (``taew2_1.pth``, or its ``.safetensors``), loaded strictly: a
    missing key, an unexpected key or a wrong shape is a :class:`ConfigError` naming the file and the keys.

    One allowance, as the reference implementation makes: a decoder TGrow stored with more output channels
    (a checkpoint trained with more time upscaling there) keeps its last-frame group."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"decoder_path {str(path)!r} does not exist or is not a file ({WEIGHTS_HINT})")
    sd = _read_state_dict(path)
    model = random_taehv(0)
    want = model.state_dict()
    for i, block in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(block, TGrow) and key in sd and key in want:
            have, need = sd[key].shape, want[key].shape
            if have[0] > need[0] and have[0] % need[0] == 0 and have[1:] == need[1:]:
                sd[key] = sd[key][-need[0] :]
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [
        f"{k} {tuple(sd[k].shape)}, expected {tuple(t.shape)}"
        for k, t in want.items()
        if k in sd and sd[k].shape != t.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_listed(wrong)}")
    if problems:
        raise ConfigError(
            f"decoder_path {str(path)!r} is not TAEHV's Wan 2.1 layout ({WEIGHTS_HINT}): " + "; ".join(problems)
        )
    model.load_state_dict(sd, strict=True)
    return model


def taehv_decoder(
    wan: StreamingVae, path: str | None, seed: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0
) -> StreamingTaehv:
    """The engine's TAEHV decoder: the weights of ``path``, or seeded random ones when ``path`` is None
    (decoder widths scaled by ``scale``, as the preset's Wan VAE is scaled from Wan's)."""
    model = load_taehv(path) if path is not None else random_taehv(seed, scale)
    model.to(device=device, dtype=dtype)
    return StreamingTaehv(model, wan)
