"""Streaming VAE: chunk by chunk with a persistent causal cache equals one call over everything."""

import torch

from pipeline.models.loader import load_models
from tests.conftest import tiny_config


def test_streaming_decode_equals_one_call_decode():
    models = load_models(tiny_config(dtype="float64"))
    vae = models.vae
    latents = torch.randn(1, 16, 7, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = vae.decode_all(latents)
    stream = vae.new_stream()
    parts = [vae.decode(stream, latents[:, :, i : i + n]) for i, n in ((0, 1), (1, 3), (4, 1), (5, 2))]
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * 6, 32, 32)
    assert torch.allclose(streamed, whole, atol=1e-12, rtol=0)
    # without the persistent cache each chunk restarts: the seam is visible
    restarted = torch.cat([vae.decode(vae.new_stream(), latents[:, :, i : i + 1]) for i in range(7)], dim=2)
    assert restarted.shape[2] < whole.shape[2]


def test_streaming_encode_equals_one_call_encode():
    models = load_models(tiny_config(dtype="float64"))
    vae = models.vae
    video = torch.rand(1, 3, 1 + 4 * 4, 32, 32, dtype=torch.float64) * 2 - 1
    whole = vae.vae.encode(video).latent_dist.mode()
    mean, std = vae._norm(whole)
    whole = (whole - mean) / std
    stream = vae.new_stream()
    parts = [vae.encode(stream, video[:, :, a:b]) for a, b in ((0, 1), (1, 9), (9, 17))]
    assert torch.allclose(torch.cat(parts, dim=2), whole, atol=1e-12, rtol=0)
