"""Wan checkpoints in their original formats: key mapping, readers, LoRA merge, errors, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from pipeline.config import CheckpointSpec, ConfigError, load_model_preset
from pipeline.models.checkpoints import load_checkpoint, merge_lora
from pipeline.models.convert import diffusers_to_wan_original, wan_original_to_diffusers
from pipeline.models.loader import load_models
from tests.conftest import TINY_32, tiny_config


@pytest.fixture
def bundle(sdv2_bundles) -> dict:
    """A 2-step bundle of StreamDiffusionV2's own stream loop (tests/conftest.py): their weights, their names."""
    return torch.load(sdv2_bundles[2], weights_only=False)


def test_recorded_causal_wan_loads_strictly_into_diffusers(bundle):
    b = bundle
    config, sd = wan_original_to_diffusers(
        b["state_dict"], "ref_stream_steps2.pt", heads=b["model_kwargs"]["num_heads"]
    )
    kw = b["model_kwargs"]
    assert config["num_layers"] == kw["num_layers"] == 4
    assert config["num_attention_heads"] * config["attention_head_dim"] == kw["dim"]
    assert (config["ffn_dim"], config["text_dim"], config["freq_dim"]) == (
        kw["ffn_dim"],
        kw["text_dim"],
        kw["freq_dim"],
    )
    assert (config["in_channels"], config["out_channels"]) == (kw["in_dim"], kw["out_dim"])
    assert tuple(config["patch_size"]) == tuple(kw["patch_size"])
    model = WanTransformer3DModel(**config)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[2].norm2.weight, b["state_dict"]["blocks.2.norm3.weight"])
    assert torch.equal(model.blocks[1].attn1.to_out[0].weight, b["state_dict"]["blocks.1.self_attn.o.weight"])
    back = diffusers_to_wan_original(model.state_dict())
    assert back.keys() == b["state_dict"].keys()
    assert all(torch.equal(back[k], v) for k, v in b["state_dict"].items())


@pytest.mark.filterwarnings("ignore:flash_attn is not installed")  # the peer's CPU attention path
def test_converted_weights_compute_what_the_original_wan_model_computes(bundle, wan_module):
    """A full (bidirectional) forward of the converted diffusers model equals the peer's own Wan2.1
    ``WanModel`` holding the original weights, on the same latents, timestep and text."""
    b = bundle
    kw = {k: v for k, v in b["model_kwargs"].items()}
    wm = wan_module("model")
    original = wm.WanModel(**kw).eval()
    original.load_state_dict(b["state_dict"], strict=True)
    config, sd = wan_original_to_diffusers(b["state_dict"], "ref_stream_steps2.pt", heads=kw["num_heads"])
    ours = WanTransformer3DModel(**config).eval()
    ours.load_state_dict(sd, strict=True)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)  # [B, C, F, h, w]: 3 x 4 x 6 = 72 tokens
    text = b["prompt_embeds"][:, :512]  # [1, 512, 32], the length Wan pads its context to
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = original([x[0]], t=t, context=[text[0]], seq_len=72)
        got = ours(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert want.shape == got.shape == x.shape
    assert want.abs().mean() > 1e-3  # the head is not zero: the comparison says something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- the tiny preset's architecture, written in each format, read back through the real loader ---------------------


def tiny_transformer(seed: int = 7) -> WanTransformer3DModel:
    """The tiny preset's transformer with weights that differ everywhere (no zero-init head, no ones)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**load_model_preset("tiny").transformer)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def original_names(model: WanTransformer3DModel, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """What their ``WanDiffusionWrapper.state_dict()`` holds: original names under ``model.``."""
    return {prefix + k: v.clone() for k, v in diffusers_to_wan_original(model.state_dict()).items()}


def write(tmp_path: Path, fmt: str, model: WanTransformer3DModel) -> Path:
    """``model`` saved as each format's authors save it."""
    if fmt in ("self-forcing", "causvid", "longlive"):
        other = tiny_transformer(seed=99)  # a different generator_ema / generator, to see which one is read
        if fmt == "self-forcing":  # Self-Forcing: both, EMA read by default
            obj = {"generator": original_names(other), "generator_ema": original_names(model)}
        elif fmt == "causvid":  # CausVid: the generator only
            obj = {"generator": original_names(model)}
        else:  # LongLive: both, the non-EMA one read by default (their use_ema: false)
            obj = {"generator": original_names(model), "generator_ema": original_names(other)}
        path = tmp_path / f"{fmt}.pt"
        torch.save(obj, path)
    elif fmt == "sdv2":  # their checkpoint folder, model.pt with 'generator'
        path = tmp_path / "wan_causal_dmd_v2v"
        path.mkdir()
        torch.save({"generator": original_names(model)}, path / "model.pt")
    elif fmt == "safetensors-original":
        path = tmp_path / "original.safetensors"
        save_file(original_names(model, prefix=""), path)
    elif fmt == "safetensors-diffusers":
        path = tmp_path / "diffusers.safetensors"
        save_file({k: v.clone() for k, v in model.state_dict().items()}, path)
    else:
        raise AssertionError(fmt)
    return path


def loaded(config) -> dict[str, torch.Tensor]:
    return load_models(config).dit.transformer.state_dict()


FORMATS = ["self-forcing", "causvid", "longlive", "sdv2", "safetensors-original", "safetensors-diffusers"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_through_the_loader(tmp_path, fmt):
    model = tiny_transformer()
    path = write(tmp_path, fmt, model)
    name = "safetensors" if fmt.startswith("safetensors") else fmt
    for given in (name, "auto"):
        if given == "auto" and fmt in ("self-forcing", "longlive"):
            continue  # both generators in the file: auto refuses to choose (tested below)
        got = loaded(tiny_config(checkpoint=CheckpointSpec(str(path), format=given)))
        want = model.state_dict()
        assert got.keys() == want.keys()
        bad = [k for k in want if not torch.equal(got[k].to(want[k].dtype), want[k])]
        assert not bad, f"{fmt} read as {given}: {bad[:4]} differ"


def test_ema_flags_pick_the_other_generator(tmp_path):
    model, other = tiny_transformer(), tiny_transformer(seed=99)
    path = write(tmp_path, "self-forcing", model)  # generator_ema = model, generator = other
    assert torch.equal(
        loaded(tiny_config(checkpoint=CheckpointSpec(str(path), "self-forcing")))["proj_out.weight"],
        model.proj_out.weight,
    )
    no_ema = loaded(tiny_config(checkpoint=CheckpointSpec(str(path), "self-forcing", ema=False)))
    assert torch.equal(no_ema["proj_out.weight"], other.proj_out.weight)
    auto_ema = loaded(tiny_config(checkpoint=CheckpointSpec(str(path), "auto", ema=True)))
    assert torch.equal(auto_ema["proj_out.weight"], model.proj_out.weight)
    with pytest.raises(ConfigError, match=r"ambiguous.*--ema/--no-ema"):
        load_models(tiny_config(checkpoint=CheckpointSpec(str(path), "auto")))
    causvid = write(tmp_path, "causvid", model)
    with pytest.raises(ConfigError, match=rf"{causvid.name}.*--ema, but it has no 'generator_ema'"):
        load_models(tiny_config(checkpoint=CheckpointSpec(str(causvid), "causvid", ema=True)))


def test_fsdp_wrapper_segments_are_removed(tmp_path):
    model = tiny_transformer()
    sd = {k.replace("blocks.", "_fsdp_wrapped_module.blocks."): v for k, v in original_names(model).items()}
    torch.save({"generator_ema": sd}, tmp_path / "fsdp.pt")
    got = loaded(tiny_config(checkpoint=CheckpointSpec(str(tmp_path / "fsdp.pt"), "self-forcing")))
    assert torch.equal(got["blocks.1.attn2.to_k.weight"], model.blocks[1].attn2.to_k.weight)


def peft_lora(model: WanTransformer3DModel, rank: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LongLive-style ``generator_lora`` state dict: PEFT keys on the original model's Linear layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.0"):
        w = diffusers_to_wan_original(model.state_dict())[f"{name}.weight"]
        out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g)
        out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g)
    return out


def test_lora_merge_equals_base_plus_scale_b_a(tmp_path):
    model = tiny_transformer()
    base = write(tmp_path, "longlive", model)
    lora = peft_lora(model, rank=4)
    torch.save({"generator_lora": lora, "critic_lora": {}}, tmp_path / "lora.pt")
    scale = 0.5
    spec = CheckpointSpec(str(base), "longlive", lora=str(tmp_path / "lora.pt"), lora_scale=scale)
    got = loaded(tiny_config(checkpoint=spec))
    a, b = lora["base_model.model.blocks.1.ffn.0.lora_A.weight"], lora["base_model.model.blocks.1.ffn.0.lora_B.weight"]
    want = model.blocks[1].ffn.net[0].proj.weight + scale * (b @ a)  # alpha = rank (LongLive): factor 1
    torch.testing.assert_close(got["blocks.1.ffn.net.0.proj.weight"], want)
    a, b = (
        lora["base_model.model.blocks.0.self_attn.q.lora_A.weight"],
        lora["base_model.model.blocks.0.self_attn.q.lora_B.weight"],
    )
    torch.testing.assert_close(got["blocks.0.attn1.to_q.weight"], model.blocks[0].attn1.to_q.weight + scale * (b @ a))
    assert torch.equal(got["blocks.0.attn1.to_k.weight"], model.blocks[0].attn1.to_k.weight)  # not adapted


def test_lora_alpha_other_than_its_rank_scales_the_update(tmp_path):
    """merged W = W + scale * (alpha / rank) * B @ A, with alpha read from the file (here 2 for rank 4)."""
    model = tiny_transformer()
    base = write(tmp_path, "longlive", model)
    lora = peft_lora(model, rank=4)
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.0"):
        lora[f"base_model.model.{name}.alpha"] = torch.tensor(2.0)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    spec = CheckpointSpec(str(base), "longlive", lora=str(tmp_path / "lora.pt"), lora_scale=0.5)
    got = loaded(tiny_config(checkpoint=spec))
    a, b = lora["base_model.model.blocks.1.ffn.0.lora_A.weight"], lora["base_model.model.blocks.1.ffn.0.lora_B.weight"]
    want = model.blocks[1].ffn.net[0].proj.weight + 0.5 * (2.0 / 4) * (b @ a)
    torch.testing.assert_close(got["blocks.1.ffn.net.0.proj.weight"], want)


def test_lora_merge_of_fixed_numbers(tmp_path):
    """One adapter by hand: W 0, A [[1, 0, 2]], B [[1], [3]] (rank 1), alpha 4, scale 0.5: W + 2 * B @ A."""
    lora = {
        "m.lora_A.weight": torch.tensor([[1.0, 0.0, 2.0]]),
        "m.lora_B.weight": torch.tensor([[1.0], [3.0]]),
        "m.alpha": torch.tensor(4.0),
    }
    save_file(lora, tmp_path / "one.safetensors")
    merged = merge_lora({"m.weight": torch.zeros(2, 3)}, str(tmp_path / "one.safetensors"), 0.5)
    assert merged["m.weight"].tolist() == [[2.0, 0.0, 4.0], [6.0, 0.0, 12.0]]


def test_lora_errors_name_file_and_key(tmp_path):
    model = tiny_transformer()
    base = write(tmp_path, "causvid", model)
    lora = peft_lora(model, rank=2)
    lora["base_model.model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(2, 48)
    lora["base_model.model.blocks.7.self_attn.q.lora_B.weight"] = torch.zeros(48, 2)
    torch.save({"generator_lora": lora}, tmp_path / "bad_lora.pt")
    spec = CheckpointSpec(str(base), "causvid", lora=str(tmp_path / "bad_lora.pt"))
    with pytest.raises(ConfigError, match=r"bad_lora\.pt.*blocks\.7\.self_attn\.q"):
        load_models(tiny_config(checkpoint=spec))
    del lora["base_model.model.blocks.7.self_attn.q.lora_B.weight"]
    torch.save({"generator_lora": lora}, tmp_path / "bad_lora.pt")
    with pytest.raises(ConfigError, match=r"bad_lora\.pt.*blocks\.7\.self_attn\.q.*lora_B"):
        load_models(tiny_config(checkpoint=spec))


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    sd = original_names(tiny_transformer())
    sd["model.blocks.0.self_attn.rotary.weight"] = torch.zeros(3)
    torch.save({"generator": sd}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"extra\.pt.*unrecognised.*blocks\.0\.self_attn\.rotary\.weight"):
        load_models(tiny_config(checkpoint=CheckpointSpec(str(tmp_path / "extra.pt"), "causvid")))


def test_missing_key_is_an_error_naming_file_and_key(tmp_path):
    sd = original_names(tiny_transformer())
    del sd["model.blocks.1.cross_attn.norm_k.weight"]
    torch.save({"generator": sd}, tmp_path / "short.pt")
    with pytest.raises(ConfigError, match=r"short\.pt.*missing.*blocks\.1\.cross_attn\.norm_k\.weight"):
        load_models(tiny_config(checkpoint=CheckpointSpec(str(tmp_path / "short.pt"), "causvid")))


def test_wrong_architecture_is_an_error_naming_file_and_fields(tmp_path):
    preset = load_model_preset("tiny")
    deeper = WanTransformer3DModel(**{**preset.transformer, "num_layers": 3, "ffn_dim": 64})
    torch.save({"generator": original_names(deeper)}, tmp_path / "deep.pt")
    with pytest.raises(
        ConfigError, match=r"deep\.pt.*preset 'tiny'.*num_layers=3 \(preset 2\).*ffn_dim=64 \(preset 96\)"
    ):
        load_models(tiny_config(checkpoint=CheckpointSpec(str(tmp_path / "deep.pt"), "causvid")))


def test_image_to_video_weights_are_refused():
    sd = diffusers_to_wan_original(tiny_transformer().state_dict())
    sd["blocks.0.cross_attn.k_img.weight"] = torch.zeros(48, 48)
    with pytest.raises(ConfigError, match=r"i2v\.pt.*image-to-video.*k_img"):
        wan_original_to_diffusers(sd, "i2v.pt", heads=2)


def test_heads_come_from_the_table_or_an_explicit_argument():
    sd = diffusers_to_wan_original(tiny_transformer().state_dict())
    with pytest.raises(ConfigError, match=r"w\.pt.*dim=48"):
        wan_original_to_diffusers(sd, "w.pt")
    config, _ = wan_original_to_diffusers(sd, "w.pt", heads=2)
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (2, 24)


# --- the command line: streamer run --checkpoint, streamer convert --------------------------------------------------


def video_frames(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.slow  # two real `streamer run` subprocesses
def test_streamer_run_with_a_self_forcing_checkpoint_makes_the_video_of_its_weights(tmp_path):
    """The preset's own random transformer, saved as a Self-Forcing file, gives the very video of the
    preset without it (a wrong mapping would not); that the loaded weights are the ones the engine runs
    is the round-trip tests' part."""
    from pipeline.models.loader import random_components
    from tests.conftest import run_streamer

    own, _, _ = random_components(load_model_preset("tiny"))
    torch.save({"generator_ema": original_names(own)}, tmp_path / "own.pt")
    common = ["run", *TINY_32, "--prompt", "a red fox", "--seconds", "0.5", "--quiet"]
    videos = {}
    for name, extra in (("plain", []), ("own", ["own.pt"])):
        flags = ["--checkpoint", str(tmp_path / extra[0]), "--checkpoint-format", "self-forcing"] if extra else []
        out = tmp_path / f"{name}.mp4"
        r = run_streamer(*common, "--out", str(out), *flags)
        assert r.returncode == 0, r.stderr
        videos[name] = video_frames(out)
        assert len(videos[name]) == 8
    assert f"transformer from {tmp_path / 'own.pt'}" in r.stderr
    assert all((a == b).all() for a, b in zip(videos["plain"], videos["own"], strict=True))


def test_streamer_run_reports_a_bad_checkpoint_as_bad_input(tmp_path, capsys):
    from streamer.cli import main

    torch.save({"generator": {"model.patch_embedding.weight": torch.zeros(48, 16, 1, 2, 2)}}, tmp_path / "bad.pt")
    out = tmp_path / "out.mp4"
    argv = ["run", *TINY_32, "--seconds", "0.5", "--out", str(out)]
    assert main([*argv, "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert main([*argv, "--lora", str(tmp_path / "bad.pt")]) == 2
    assert "--lora given without --checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_streamer_convert_writes_a_diffusers_folder_that_loads_the_same(tmp_path):
    from streamer.cli import main

    model = tiny_transformer()
    base = write(tmp_path, "longlive", model)
    torch.save({"generator_lora": peft_lora(model, rank=3)}, tmp_path / "lora.pt")
    spec = CheckpointSpec(str(base), "longlive", lora=str(tmp_path / "lora.pt"), lora_scale=0.25)
    argv = ["convert", "--checkpoint", str(base), "--format", "longlive", "--lora", str(tmp_path / "lora.pt")]
    assert main([*argv, "--lora-scale", "0.25", "--out", str(tmp_path / "out")]) == 0
    folder = WanTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    tiny = load_model_preset("tiny")
    merged = load_checkpoint(spec, tiny).state_dict()
    assert folder.keys() == merged.keys() and all(torch.equal(folder[k], v) for k, v in merged.items())
    again = CheckpointSpec(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"), "auto")
    reloaded = load_checkpoint(again, tiny).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in merged.items())
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2  # not over a folder with files in it


def test_the_released_1_3b_shapes_read_as_the_wan_preset():
    """Wan2.1-T2V-1.3B's shapes (on the meta device: no memory) give the wan2.1-1.3b preset's config,
    its 12 heads from the table of released widths."""
    from pipeline.models.checkpoints import check_preset

    preset = load_model_preset("wan2.1-1.3b")
    with torch.device("meta"):
        model = WanTransformer3DModel(**preset.transformer)
    config, sd = wan_original_to_diffusers(diffusers_to_wan_original(model.state_dict()), "self_forcing_dmd.pt")
    check_preset(config, preset, "self_forcing_dmd.pt")
    assert config == {**preset.transformer, "patch_size": tuple(preset.patch_size)}
    assert sd.keys() == model.state_dict().keys()
