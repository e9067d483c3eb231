"""The KV-cached, chunk-by-chunk forward is the block-causal full forward."""

import torch

from pipeline.models.loader import load_models
from pipeline.reference import forward_one, split_frames
from tests.conftest import tiny_config

# The model runs in float64, but diffusers' Wan block rounds its residual stream through float32
# (``hidden_states.float()``), which bounds how close two mathematically equal paths can be.
ATOL = 1e-6


def test_kv_cached_chunks_equal_block_causal_full_forward():
    config = tiny_config(dtype="float64", chunk_frames=2, sink_frames=0, window_frames=16)
    models = load_models(config)
    model = models.dit
    g = torch.Generator().manual_seed(0)
    chunks, cf = 4, 2
    x = torch.randn(1, 16, chunks * cf, 4, 4, generator=g, dtype=torch.float64)
    text = models.text("a lighthouse at dusk").to(torch.float64)

    full = model.full_forward(x, torch.tensor([0.6]), text[None], chunk_frames=cf)[0]

    context, outs = [], []
    for j in range(chunks):
        velocity, written = forward_one(model, config, x[0, :, j * cf : (j + 1) * cf], 0.6, text, j * cf, context)
        context += split_frames(written, cf)
        outs.append(velocity)
    cached = torch.cat(outs, dim=1)

    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=ATOL, rtol=0), (cached - full).abs().max()
    # and the mask matters: without it the first chunk would see the future and differ
    unmasked = model.full_forward(x, torch.tensor([0.6]), text[None], chunk_frames=chunks * cf)[0]
    assert (unmasked[:, :cf] - full[:, :cf]).abs().max() > 1e-3


def test_sigma_and_text_change_the_velocity():
    config = tiny_config(dtype="float64")
    models = load_models(config)
    x = torch.randn(1, 16, 1, 4, 4, dtype=torch.float64)
    a = models.text("a").to(torch.float64)
    b = models.text("b").to(torch.float64)
    v1, _ = forward_one(models.dit, config, x[0], 0.9, a, 0, [])
    v2, _ = forward_one(models.dit, config, x[0], 0.3, a, 0, [])
    v3, _ = forward_one(models.dit, config, x[0], 0.9, b, 0, [])
    assert (v1 - v2).abs().max() > 1e-4
    assert (v1 - v3).abs().max() > 1e-4
