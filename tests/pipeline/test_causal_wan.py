"""The KV-cached, chunk-by-chunk forward is the block-causal full forward."""

import pytest
import torch

from pipeline.models.attention import attend
from pipeline.models.causal_wan import patch_embed
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


def test_the_patch_embedding_is_wans_conv_and_needs_no_neighbours():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 48, (1, 2, 2), stride=(1, 2, 2))
    x = torch.randn(3, 16, 2, 8, 6)
    got = patch_embed(conv, x)
    assert got.shape == (3, 2 * 4 * 3, 48)
    torch.testing.assert_close(got, conv(x).flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    for i in range(3):
        assert torch.equal(got[i : i + 1], patch_embed(conv, x[i : i + 1]))  # a slot's tokens, alone or batched


def test_attention_of_slots_with_padded_keys_equals_each_slot_alone():
    torch.manual_seed(0)
    q = torch.randn(3, 4, 2, 24)
    k, v = torch.randn(3, 12, 2, 24), torch.randn(3, 12, 2, 24)
    lengths = (12, 4, 8)  # slot i's keys are its first lengths[i]; the rest is padding
    got = attend(q, k, v, lengths=lengths)
    for i, n in enumerate(lengths):
        assert torch.equal(got[i : i + 1], attend(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n]))
    with pytest.raises(ValueError, match="lengths"):
        attend(q, k, v, torch.ones(3, 1, 1, 12, dtype=torch.bool), lengths=lengths)
