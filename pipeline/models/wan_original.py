"""Wan2.1's own folder layout (``Wan-AI/Wan2.1-T2V-1.3B``) read into the diffusers / transformers models.

That folder holds ``Wan2.1_VAE.pth`` (Wan's ``WanVAE_``), ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's
``T5Encoder``), the tokenizer in ``google/umt5-xxl/`` and the DiT as ``diffusion_pytorch_model*.safetensors``
in the original names. The VAE mapping is diffusers' ``convert_vae`` (scripts/convert_wan_to_diffusers.py)
written for any ``num_res_blocks`` and ``dim_mult``; the T5 mapping follows Wan's ``T5Encoder`` module by
module onto transformers' ``UMT5EncoderModel``. Every key is mapped or is an error naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, ModelPreset
from pipeline.models.checkpoints import build_transformer, check_preset, known_heads
from pipeline.models.convert import wan_original_to_diffusers

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.3.gamma": "norm2.gamma"}
_RESIDUAL_MODULES = {"residual.2": "conv1", "residual.6": "conv2", "shortcut": "conv_shortcut"}
_ATTENTION = {"norm.gamma": "norm.gamma"}
_ATTENTION_MODULES = {"to_qkv": "to_qkv", "proj": "proj"}
_RESAMPLE_MODULES = {"resample.1": "resample.1", "time_conv": "time_conv"}


def is_original_layout(folder: Path) -> bool:
    return (folder / VAE_FILE).is_file() and (folder / T5_FILE).is_file()


def _inner(rest: str, params: dict[str, str], modules: dict[str, str]) -> str | None:
    if rest in params:
        return params[rest]
    module, _, param = rest.rpartition(".")
    if param in ("weight", "bias") and module in modules:
        return f"{modules[module]}.{param}"
    return None


def _vae_key(key: str, levels: int, res_blocks: int) -> str | None:
    """One key of Wan's ``WanVAE_`` in diffusers' ``AutoencoderKLWan`` naming, or None."""
    fixed = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        fixed |= {f"{side}.conv1": f"{side}.conv_in", f"{side}.head.2": f"{side}.conv_out"}
    module, _, param = key.rpartition(".")
    if module in fixed and param in ("weight", "bias"):
        return f"{fixed[module]}.{param}"
    m = re.fullmatch(r"(encoder|decoder)\.head\.0\.gamma", key)
    if m:
        return f"{m.group(1)}.norm_out.gamma"
    m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", key)
    if m:
        side, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if i == 1:
            inner = _inner(rest, _ATTENTION, _ATTENTION_MODULES)
            return None if inner is None else f"{side}.mid_block.attentions.0.{inner}"
        inner = _inner(rest, _RESIDUAL, _RESIDUAL_MODULES)
        return None if inner is None or i not in (0, 2) else f"{side}.mid_block.resnets.{i // 2}.{inner}"
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
    if m:  # the same flat list in both
        inner = _inner(m.group(2), _RESIDUAL, _RESIDUAL_MODULES) or _inner(m.group(2), {}, _RESAMPLE_MODULES)
        return None if inner is None else f"encoder.down_blocks.{m.group(1)}.{inner}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if m:  # a flat list of (res_blocks + 1 residual blocks, then an upsampler but after the last level)
        j, rest = int(m.group(1)), m.group(2)
        for level in range(levels):
            size = res_blocks + 1 + (level < levels - 1)
            if j < size:
                break
            j -= size
        else:
            return None
        if j <= res_blocks:
            inner = _inner(rest, _RESIDUAL, _RESIDUAL_MODULES)
            return None if inner is None else f"decoder.up_blocks.{level}.resnets.{j}.{inner}"
        inner = _inner(rest, {}, _RESAMPLE_MODULES)
        return None if inner is None else f"decoder.up_blocks.{level}.upsamplers.0.{inner}"
    return None


def vae_original_to_diffusers(
    sd: dict[str, torch.Tensor], vae_config: dict[str, Any], source: str
) -> dict[str, torch.Tensor]:
    """Wan's ``Wan2.1_VAE.pth`` state dict in ``AutoencoderKLWan(**vae_config)``'s names."""
    levels, res_blocks = len(vae_config["dim_mult"]), int(vae_config["num_res_blocks"])
    out, unknown = {}, []
    for key, tensor in sd.items():
        new = _vae_key(key, levels, res_blocks)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise ConfigError(f"VAE {source!r}: unrecognised key(s) {sorted(unknown)[:12]} ({len(unknown)} in all)")
    return out


def t5_original_to_transformers(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Wan's ``T5Encoder`` (umT5, a relative position table per layer) in ``UMT5EncoderModel``'s names."""
    per_block = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    out, unknown = {}, []
    for key, tensor in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = tensor
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = tensor
        elif m and m.group(2) in per_block:
            out[f"encoder.block.{m.group(1)}.{per_block[m.group(2)]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"text encoder {source!r}: unrecognised key(s) {sorted(unknown)[:12]} ({len(unknown)} in all)"
        )
    return out


def _load_pth(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model folder {str(path.parent)!r}: no {path.name} ({what})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch file, or pickled objects beyond tensors
        raise ConfigError(f"{what} {str(path)!r} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{what} {str(path)!r} is not a state dict of tensors")
    return sd


def _filled(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into a model built under ``init_empty_weights`` (strict), checking nothing stays empty."""
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # missing/unexpected keys or shapes, as torch words them
        raise ConfigError(f"{source!r} does not fit the model preset: {e}") from None
    left = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if left:
        raise ConfigError(f"{source!r}: no values for {left[:6]}")


def load_original_folder(folder: Path, preset: ModelPreset, with_transformer: bool) -> tuple[Any, Any, Any, Any]:
    """(transformer or None, VAE, text encoder, tokenizer) of a folder in Wan2.1's own layout."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    transformer = None
    if with_transformer:
        shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if not shards:
            raise ConfigError(f"model folder {str(folder)!r}: no diffusion_pytorch_model*.safetensors (the DiT)")
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(shard))
        config, sd = wan_original_to_diffusers(sd, str(folder), known_heads([preset]).get(sd_width(sd)))
        check_preset(config, preset, str(folder))
        transformer = build_transformer(sd, preset, str(folder))
    vae_path, t5_path = folder / VAE_FILE, folder / T5_FILE
    with init_empty_weights():
        vae = AutoencoderKLWan(**preset.vae)
        text_encoder = UMT5EncoderModel(UMT5Config(**preset.text_encoder))
    _filled(vae, vae_original_to_diffusers(_load_pth(vae_path, "VAE"), preset.vae, str(vae_path)), str(vae_path))
    t5 = t5_original_to_transformers(_load_pth(t5_path, "text encoder"), str(t5_path))
    _filled(text_encoder, t5, str(t5_path))
    if not (folder / TOKENIZER_DIR).is_dir():
        raise ConfigError(f"model folder {str(folder)!r}: no {TOKENIZER_DIR}/ (the UMT5 tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    return transformer, vae, text_encoder, tokenizer


def sd_width(sd: dict[str, torch.Tensor]) -> int:
    w = sd.get("patch_embedding.weight")
    return -1 if w is None else int(w.shape[0])
