"""Wan2.1's own VAE and T5 files read into diffusers / transformers: every key, and the same numbers as
Wan's own modules (StreamDiffusionV2's copy of them, from the package registry)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel

from pipeline.config import ConfigError, load_model_preset
from pipeline.models.wan_original import t5_original_to_transformers, vae_original_to_diffusers

TINY = load_model_preset("tiny")


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def diffusers_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(**TINY.vae).eval()


def test_wan_vae_file_loads_strictly_and_decodes_and_encodes_the_same(wan_module):
    v = TINY.vae
    original = (
        wan_module("vae")
        .WanVAE_(
            dim=v["base_dim"],
            z_dim=v["z_dim"],
            dim_mult=v["dim_mult"],
            num_res_blocks=v["num_res_blocks"],
            attn_scales=v["attn_scales"],
            temperal_downsample=v["temperal_downsample"],
        )
        .eval()
    )
    randomize(original, 1)
    ours = diffusers_vae()
    ours.load_state_dict(vae_original_to_diffusers(original.state_dict(), v, "Wan2.1_VAE.pth"), strict=True)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 16, 3, 4, 4, generator=g)
    x = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    scale = [0.0, 1.0]  # Wan's latent normalisation, here the identity: diffusers leaves it to the pipeline
    with torch.no_grad():
        want_x = original.decode(z, scale).clamp(-1, 1)  # Wan's WanVAE.decode clamps, as diffusers' decode does
        got_x = ours.decode(z).sample
        want_mu = original.encode(x, scale)
        got_mu = ours.encode(x).latent_dist.mean
    assert (want_x.abs() < 0.99).float().mean() > 0.3  # most values are not at the clamp
    torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mu, want_mu, rtol=1e-4, atol=1e-5)


def test_vae_mapping_covers_diffusers_keys_both_ways():
    """Without Wan's code: the diffusers VAE's own keys, renamed back by hand, map onto themselves."""
    keys = diffusers_vae().state_dict().keys()
    # an unknown key is an error naming the file and the key
    with pytest.raises(ConfigError, match=r"Wan2\.1_VAE\.pth.*decoder\.upsamples\.99\.residual\.0\.gamma"):
        vae_original_to_diffusers({"decoder.upsamples.99.residual.0.gamma": torch.zeros(1)}, TINY.vae, "Wan2.1_VAE.pth")
    assert "decoder.up_blocks.3.resnets.1.conv2.weight" in keys  # the layout the mapping writes


def test_wan_t5_file_loads_strictly_and_encodes_the_same(wan_module):
    t = TINY.text_encoder
    original = (
        wan_module("t5")
        .T5Encoder(
            vocab=t["vocab_size"],
            dim=t["d_model"],
            dim_attn=t["num_heads"] * t["d_kv"],
            dim_ffn=t["d_ff"],
            num_heads=t["num_heads"],
            num_layers=t["num_layers"],
            num_buckets=t["relative_attention_num_buckets"],
            shared_pos=False,  # umT5: a position table per layer
            dropout=0.0,
        )
        .eval()
    )
    randomize(original, 3)
    ours = UMT5EncoderModel(UMT5Config(**t)).eval()
    ours.load_state_dict(t5_original_to_transformers(original.state_dict(), "t5.pth"), strict=True)
    ids = torch.randint(0, t["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = original(ids, mask)
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, :7], want[1, :7], rtol=1e-4, atol=1e-5)  # padding rows: not used


def test_t5_unknown_key_names_file_and_key():
    with pytest.raises(ConfigError, match=r"t5\.pth.*blocks\.0\.attn\.rel\.weight"):
        t5_original_to_transformers({"blocks.0.attn.rel.weight": torch.zeros(1)}, "t5.pth")


def test_the_released_vae_and_t5_shapes_map_onto_the_wan_preset(wan_module):
    """Wan2.1's real VAE and UMT5-XXL architectures (on the meta device: no memory): every key maps
    to a key of the preset's diffusers / transformers model, with its shape."""
    preset = load_model_preset("wan2.1-1.3b")
    v, t = preset.vae, preset.text_encoder
    with torch.device("meta"):
        vae = wan_module("vae").WanVAE_(
            dim=v["base_dim"],
            z_dim=v["z_dim"],
            dim_mult=v["dim_mult"],
            num_res_blocks=v["num_res_blocks"],
            attn_scales=v["attn_scales"],
            temperal_downsample=v["temperal_downsample"],
        )
        t5 = wan_module("t5").T5Encoder(
            t["vocab_size"],
            t["d_model"],
            t["num_heads"] * t["d_kv"],
            t["d_ff"],
            t["num_heads"],
            t["num_layers"],
            t["relative_attention_num_buckets"],
            shared_pos=False,
        )
        want_vae = AutoencoderKLWan(**v).state_dict()
        want_t5 = UMT5EncoderModel(UMT5Config(**t)).state_dict()
    for got, want in (
        (vae_original_to_diffusers(vae.state_dict(), v, "Wan2.1_VAE.pth"), want_vae),
        (t5_original_to_transformers(t5.state_dict(), "t5.pth"), want_t5),
    ):
        assert got.keys() == want.keys()
        assert all(got[k].shape == want[k].shape for k in want)


# --- a tiny folder in Wan2.1's own layout, read by the real loader ------------------------------------------------


def original_vae_keys(vae: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    """The diffusers VAE's weights in Wan's names: the mapping inverted over every name Wan's modules use."""
    from pipeline.models.wan_original import _vae_key

    levels, res = len(TINY.vae["dim_mult"]), TINY.vae["num_res_blocks"]
    inner = [
        "residual.0.gamma",
        "residual.3.gamma",
        *(
            f"{m}.{p}"
            for m in ("residual.2", "residual.6", "shortcut", "resample.1", "time_conv")
            for p in ("weight", "bias")
        ),
    ]
    names = [f"{s}.downsamples.{j}.{i}" for s in ("encoder",) for j in range(24) for i in inner]
    names += [f"decoder.upsamples.{j}.{i}" for j in range(24) for i in inner]
    for side in ("encoder", "decoder"):
        names += [f"{side}.middle.{j}.{i}" for j in (0, 2) for i in inner]
        names += [
            f"{side}.middle.1.{i}" for i in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
        ]
        names += [f"{side}.head.0.gamma", *(f"{side}.{m}.{p}" for m in ("conv1", "head.2") for p in ("weight", "bias"))]
    names += [f"{m}.{p}" for m in ("conv1", "conv2") for p in ("weight", "bias")]
    inverse = {k: n for n in names if (k := _vae_key(n, levels, res)) is not None}
    return {inverse[k]: v.clone() for k, v in vae.state_dict().items()}


def original_t5_keys(t5: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    sd = t5.state_dict()
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(TINY.text_encoder["num_layers"]):
        b = f"encoder.block.{i}.layer."
        pairs = {
            "norm1": "0.layer_norm",
            "attn.q": "0.SelfAttention.q",
            "attn.k": "0.SelfAttention.k",
            "attn.v": "0.SelfAttention.v",
            "attn.o": "0.SelfAttention.o",
            "pos_embedding.embedding": "0.SelfAttention.relative_attention_bias",
            "norm2": "1.layer_norm",
            "ffn.gate.0": "1.DenseReluDense.wi_0",
            "ffn.fc1": "1.DenseReluDense.wi_1",
            "ffn.fc2": "1.DenseReluDense.wo",
        }
        out |= {f"blocks.{i}.{o}.weight": sd[f"{b}{d}.weight"].clone() for o, d in pairs.items()}
    return out


def word_tokenizer(folder: Path) -> None:
    """A small fast tokenizer saved where Wan keeps google/umt5-xxl (the real one is 4 MB of sentencepiece)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "fox": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def test_a_folder_in_wans_layout_loads_every_component(tmp_path):
    from safetensors.torch import save_file

    from pipeline.models.convert import diffusers_to_wan_original
    from pipeline.models.loader import load_models, random_components
    from tests.conftest import tiny_config

    torch.manual_seed(11)  # weights unlike the preset's seeded ones
    transformer, vae, t5 = random_components(TINY)
    save_file(
        {k: v.clone() for k, v in diffusers_to_wan_original(transformer.state_dict()).items()},
        tmp_path / "diffusion_pytorch_model.safetensors",
    )
    torch.save(original_vae_keys(vae), tmp_path / "Wan2.1_VAE.pth")
    torch.save(original_t5_keys(t5), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    word_tokenizer(tmp_path / "google" / "umt5-xxl")
    config = dataclasses.replace(tiny_config(), model_source=str(tmp_path))
    models = load_models(config)
    for got, want in ((models.dit.transformer, transformer), (models.vae.vae, vae), (models.text.encoder, t5)):
        g, w = got.state_dict(), want.state_dict()
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    assert models.text.tokenizer("a red fox")["input_ids"][:3] == [3, 4, 5]
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"Wan2\.1_VAE\.pth"):
        load_models(config)
