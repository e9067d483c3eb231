"""The memory plan: parameter counts equal the real modules, KV and decoder caches equal what the engine
allocates, a plan that does not fit is refused before loading, the offload options land where they say."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from pipeline.config import CONFIG_DIR, ConfigError, load_model_preset, load_system_config, replace
from pipeline.engine import Engine
from pipeline.memory import (
    DIT_FP32_MODULES,
    UMT5_FP32_MODULES,
    dit_activation_bytes,
    dit_params,
    kv_bytes_per_session,
    kv_copies,
    plan_memory,
    umt5_params,
)
from pipeline.models.loader import load_models
from streamer.cli import main
from tests.conftest import TINY, open_t2v, tiny_config


def _kept(name: str, keep: tuple[str, ...]) -> bool:
    return any(k in name.split(".") for k in keep)


@pytest.mark.parametrize("name", ["tiny", "tiny-deep", "wan2.1-1.3b"])
def test_dit_parameter_count_equals_the_module(name):
    preset = load_model_preset(name)
    with torch.device("meta"):  # the 1.3B is counted without allocating
        model = WanTransformer3DModel(**preset.transformer)
    params = dict(model.named_parameters())
    counted = dit_params(preset.transformer)
    assert counted.total == sum(p.numel() for p in params.values())
    assert counted.blocks * counted.block_fp32 + counted.shared_fp32 == sum(
        p.numel() for n, p in params.items() if _kept(n, DIT_FP32_MODULES)
    )
    assert counted.rope_buffer == sum(b.numel() for b in model.buffers())


@pytest.mark.parametrize("name", ["tiny", "wan2.1-1.3b"])
def test_text_encoder_parameter_count_equals_the_module(name):
    preset = load_model_preset(name)
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**preset.text_encoder))
    total, kept = umt5_params(preset.text_encoder)
    assert total == sum(p.numel() for p in model.parameters())
    assert kept == sum(p.numel() for n, p in model.named_parameters() if _kept(n, UMT5_FP32_MODULES))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_equal_the_loaded_models(dtype):
    config = tiny_config(dtype=dtype)
    models = load_models(config)
    plan = plan_memory(config, limit_gib=1.0)
    dit = models.dit.transformer
    assert plan.row("DiT weights").bytes["cpu"] == _nbytes([*dit.parameters(), *dit.buffers()])
    assert plan.row("VAE weights").bytes["cpu"] == _nbytes(models.vae.vae.parameters())
    assert plan.row("text encoder").bytes["cpu"] == _nbytes(models.text.encoder.parameters())


def test_kv_windows_and_decoder_caches_equal_what_the_engine_allocates():
    sessions = 3
    config = tiny_config(max_sessions=sessions, sink_frames=1, window_frames=3)
    engine = Engine(config)
    for seed in range(sessions):
        open_t2v(engine, chunks=4, seed=seed)
    decoded = 0
    while engine.has_work():
        decoded += len(engine.step().chunks)
    assert decoded == 4 * sessions
    stage = engine.executor.stage
    windows = [w for _, w in stage._windows.values()]
    assert len(windows) == sessions
    real_kv = _nbytes([t for w in windows for t in (w.k, w.v)])
    plan = plan_memory(config, limit_gib=1.0)
    assert plan.row("KV windows").bytes["cpu"] == real_kv == sessions * kv_bytes_per_session(config, 2)
    streams = [s for _, s in engine.executor.decoder._streams.values()]
    assert len(streams) == sessions
    assert plan.row("VAE decoder caches").bytes["cpu"] == _nbytes([e for s in streams for e in s.dec_cache])
    engine.close()


def test_per_step_keeps_one_cache_per_step_level():
    config = tiny_config()
    assert kv_copies(config) == 1
    assert kv_copies(replace(config, context="clean")) == 1
    per_step = replace(config, context="per-step")
    assert kv_copies(per_step) == config.steps
    frames = config.sink_frames + config.window_frames  # pipeline/perstep.py: a level holds sink and window
    per_level = 2 * 2 * frames * config.tokens_per_frame * 2 * 24 * 4  # K,V x blocks x tokens x H x D x float32
    assert kv_bytes_per_session(per_step, 2) == config.steps * per_level


def test_stages_split_the_dit_and_the_kv_windows():
    config = load_system_config(CONFIG_DIR / "wan2.1-1.3b.yaml")
    one = plan_memory(config, limit_gib=80)
    two = plan_memory(config, stages=2, split=[10, 20], limit_gib=80)
    assert two.devices == ("cuda:0", "cuda:1")
    kv = two.row("KV windows").bytes
    assert kv["cuda:0"] * 2 == kv["cuda:1"] and sum(kv.values()) == one.row("KV windows").bytes["cuda"]
    assert two.row("VAE decoder caches").bytes["cuda:0"] == 0  # the last stage decodes
    assert two.needed("cuda:0") >= two.row("DiT weights").bytes["cuda:0"] * 2  # each stage loads all, then trims


def test_text_encoder_on_the_cpu_moves_its_bytes_to_the_cpu_column():
    config = load_system_config(CONFIG_DIR / "wan2.1-1.3b.yaml")
    on_gpu = plan_memory(config, limit_gib=80)
    for changes in ({"text_encoder_device": "cpu"}, {"offload": "text"}):
        offloaded = plan_memory(replace(config, **changes), limit_gib=80)
        assert offloaded.devices == ("cuda", "cpu")
        float32 = 4 * umt5_params(config.model.text_encoder)[0]  # on the CPU the loader keeps it in float32
        assert offloaded.row("text encoder").bytes == {"cuda": 0, "cpu": float32}
        assert offloaded.total("cuda") == on_gpu.total("cuda") - on_gpu.row("text encoder").bytes["cuda"]


def test_text_encoder_on_the_cpu_is_accepted_and_runs():
    config = tiny_config(text_encoder_device="cpu")
    assert config.text_device == "cpu"
    models = load_models(config)
    assert next(models.text.encoder.parameters()).device.type == "cpu"
    assert models.text("a prompt").device == models.dit.device


@pytest.mark.parametrize("offload", ["swap", "layers"])
def test_swap_and_layers_are_refused_as_not_built(offload):
    with pytest.raises(ConfigError, match=f"offload='{offload}' is not allowed: .*not built yet"):
        tiny_config(offload=offload)


def test_cli_refuses_a_plan_that_does_not_fit_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("streamer.run.load_models", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "out.mp4"
    assert main(["run", *TINY, "--out", str(out), "--memory-limit", "0.01", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "memory plan (MiB)" in err
    assert "the memory plan does not fit: cpu needs 0.1" in err and "0.01 GiB available (biggest: " in err
    assert not out.exists()


def test_memory_plan_prints_the_table_and_exits(capsys, monkeypatch):
    monkeypatch.setattr("streamer.run.load_models", lambda *a, **k: pytest.fail("weights loaded"))
    args = ["run", "--config", str(CONFIG_DIR / "wan2.1-1.3b.yaml"), "--memory-plan", "--memory-limit", "80"]
    assert main(args) == 0
    table = capsys.readouterr().out
    for row in ("DiT weights", "KV windows", "DiT activations", "VAE decoder caches", "text encoder", "total"):
        assert row in table
    weights = dit_params(load_model_preset("wan2.1-1.3b").transformer).nbytes("bfloat16")
    assert f"DiT weights                       {weights / 2**30:.2f}" in table
    assert "layers (not built yet)" in table
    assert main([*args, "--offload", "text"]) == 0
    assert "cpu" in capsys.readouterr().out.splitlines()[0]
    serve = ["serve", "--config", str(CONFIG_DIR / "wan2.1-1.3b.yaml"), "--max-sessions", "1", "--memory-plan"]
    assert main([*serve, "--memory-limit", "80"]) == 0
    assert "KV windows                        5.36" in capsys.readouterr().out
    assert main([*serve, "--memory-limit", "8"]) == 2
    assert "cuda needs 26.35 GiB, 8.00 GiB available (biggest: text encoder 12.46" in capsys.readouterr().err


def test_the_activation_estimate_is_its_formula_in_numbers():
    """dit_activation_bytes by hand for tiny at 32x32: L = 4 own tokens (a 4x4 latent in 2x2 patches), Lc = 28
    (sink 1 + window 6 frames), E = 48 (2 heads x 24), F = 96, Lt = 32, H = 2."""
    # stream, 4 steps, 4 sessions: B = 4 x 5 = 20 slots; on a CPU the attention weights count, float32
    n = 20 * 4 * (6 * 48 + 2 * 96) + 2 * 20 * (28 + 4) * 48 + 3 * 20 * 32 * 48 + 20 * 2 * 4 * (28 + 4)
    assert n == 197_120
    assert dit_activation_bytes(tiny_config()) == 4 * n
    # clean: one slot per session (B = 4); on a GPU no attention weights; bfloat16
    n = 4 * 4 * (6 * 48 + 2 * 96) + 2 * 4 * (28 + 4) * 48 + 3 * 4 * 32 * 48
    assert dit_activation_bytes(tiny_config(context="clean", device="cuda", dtype="bfloat16")) == 2 * n == 76_800
