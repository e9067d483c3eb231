"""The DiT's speed levers give the same numbers on and off: the text K/V cache, the RoPE cache, the
attention backend's mask handling (pipeline/models/attention.py, CausalWan)."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from pipeline.commands import Demand, Open, SetParams
from pipeline.config import ConfigError, replace
from pipeline.engine import Engine
from pipeline.models import attention
from pipeline.models.loader import load_models
from pipeline.types import UserParams
from tests.conftest import executor as make_executor
from tests.conftest import tiny_config

EXACT = 1e-10


def stream_with_prompt_change(config):
    """Two sessions with different prompts batched together; session a changes its prompt mid-stream
    (chunks of both prompts in flight together), b keeps its own. x0 latents per session, and the model."""
    models = load_models(config)
    engine = Engine(config, models, executor=make_executor(config, models, "streambatch", keep_latents=True))
    a = engine.apply(Open(UserParams(prompt="red sails", seed=1))).session_id
    b = engine.apply(Open(UserParams(prompt="blue whale", seed=2))).session_id
    engine.apply(Demand(a, 8))
    engine.apply(Demand(b, 6))
    out: dict[str, list[torch.Tensor]] = {a: [], b: []}
    while engine.has_work():
        if engine.stats.ticks == 3:
            engine.apply(SetParams.of(a, prompt="a lighthouse at dusk"))
        for c in engine.step().chunks:
            out[c.envelope.session_id].append(c.latents)
    engine.close()
    return [torch.stack(out[a]), torch.stack(out[b])], models


def test_text_kv_cache_equals_no_cache_across_a_prompt_change():
    on = tiny_config(dtype="float64", sink_frames=1, window_frames=3)
    got, models = stream_with_prompt_change(on)
    want, plain = stream_with_prompt_change(replace(on, text_kv_cache=False))
    assert plain.dit.text_cache is None
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() < EXACT
    # it was used: three prompts, each projected once per block, whatever the ticks
    assert models.dit.text_cache is not None and models.dit.text_cache.misses == 3 * models.dit.num_blocks


def test_cross_attention_processor_equals_diffusers():
    """attn2 with our processor (cache off, and on) is diffusers' WanAttnProcessor."""
    models = load_models(tiny_config(dtype="float64"))
    block = models.dit.transformer.blocks[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, block.attn2.to_q.in_features, generator=g, dtype=torch.float64)
    enc = torch.randn(3, 32, block.attn2.to_k.in_features, generator=g, dtype=torch.float64)
    want = WanAttnProcessor()(block.attn2, hidden, enc)
    ours = models.dit._cross[0]
    assert (block.attn2(hidden, enc) - want).abs().max().item() < EXACT  # no keys: projected
    ours.text_keys = ("x", "y", "x")  # slots 0 and 2 share text states
    enc[2] = enc[0]
    try:
        got = block.attn2(hidden, enc)
    finally:
        ours.text_keys = None
    assert (got - WanAttnProcessor()(block.attn2, hidden, enc)).abs().max().item() < EXACT


def test_rope_cache_equals_no_cache():
    on = load_models(tiny_config(dtype="float64")).dit
    off = load_models(tiny_config(dtype="float64", rope_cache=False)).dit
    calls = [
        (torch.tensor([[0, 1], [5, 6]]), (2, 2)),
        (torch.tensor([[5, 6]]), (3, 2)),
        (torch.tensor([[7], [1]]), (2, 2)),
    ]
    for _ in range(2):  # the second time from the cache
        for positions, grid in calls:
            for a, b in zip(on.rope(positions, grid), off.rope(positions, grid), strict=True):
                assert a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(on.time_shift(torch.tensor([3, 0, 9])), off.time_shift(torch.tensor([3, 0, 9])), strict=True):
            assert torch.equal(a, b)
    # and a frame's RoPE does not depend on the batch it comes in
    alone = on.rope(torch.tensor([[6]]), (2, 2))[0]
    assert torch.equal(on.rope(torch.tensor([[5, 6]]), (2, 2))[0][:, 4:], alone)


def test_engine_with_levers_off_equals_on():
    config = tiny_config(dtype="float64", sink_frames=1, window_frames=3)
    got, _ = stream_with_prompt_change(config)
    want, _ = stream_with_prompt_change(replace(config, text_kv_cache=False, rope_cache=False))
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() < EXACT


def test_flash_key_padding_mask_is_run_slot_by_slot(monkeypatch):
    """A flash kernel takes no mask: key padding is run per slot on the kept keys, exactly as sdpa with
    the mask; a mask that depends on the query is an error naming the backend."""

    def unmasked_sdpa(q, k, v, causal=False):
        assert not causal
        return attention.attend(q, k, v, None, "sdpa"), None  # flash4 also returns the LSE

    monkeypatch.setattr(attention, "_flash", lambda backend: unmasked_sdpa)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 5, 2, 8, generator=g, dtype=torch.float64)  # [B, Lq, H, D]
    k, v = (torch.randn(3, 10, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[0, 2:5] = False
    keep[2, 4] = False
    mask = keep[:, None, None, :]
    want = attention.attend(q, k, v, mask, "sdpa")
    for backend in ("flash2", "flash3", "flash4"):
        assert (attention.attend(q, k, v, mask, backend) - want).abs().max().item() < EXACT
    with pytest.raises(ValueError, match="attention='flash2' takes no mask of shape"):
        attention.attend(q, k, v, torch.ones(1, 1, 5, 10, dtype=torch.bool), "flash2")


def test_attention_backend_is_checked_at_load():
    with pytest.raises(ConfigError, match="attention='flash9' is not allowed"):
        tiny_config(attention="flash9")
    for backend in ("flash2", "flash3", "flash4"):
        if attention.backend_installed(backend):
            continue
        with pytest.raises(ConfigError, match=f"attention={backend!r} is not allowed: an installed backend"):
            tiny_config(attention=backend, device="cuda", dtype="bfloat16")
    with pytest.raises(ConfigError, match="text_kv_cache='yes' is not allowed"):
        tiny_config(text_kv_cache="yes")
