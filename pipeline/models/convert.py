"""Wan DiT weights between the original key names and diffusers' ``WanTransformer3DModel``.

The original names are those of Wan2.1's ``WanModel`` and of the causal models built on it
(Self-Forcing's and StreamDiffusionV2's ``CausalWanModel``, CausVid, LongLive). The mapping is the
one of diffusers' ``scripts/convert_wan_to_diffusers.py`` for the text-to-video model, written out
per key in both directions so that every key is accounted for: a key this table does not know, a key
the architecture needs that the file lacks, or a tensor of the wrong shape is a :class:`ConfigError`
naming the file and the key(s). Nothing is dropped or filled in silently.

The architecture is read from the tensors' shapes; only the head count cannot be (``dim`` = heads x
head_dim), so it comes from :data:`HEADS_BY_DIM` (the released Wan2.1 sizes) or an explicit ``heads=``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from pipeline.config import ConfigError

# Model width -> attention heads of the released Wan2.1 text-to-video models.
HEADS_BY_DIM = {1536: 12, 5120: 40}  # 1.3B: 12 x 128; 14B: 40 x 128

# Whole-parameter renames (original -> diffusers) outside the blocks.
_TOP_PARAMS = {"head.modulation": "scale_shift_table"}
# Module renames outside the blocks; the parameter name (weight, bias) is kept.
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Inside ``blocks.N.``: whole parameters, then modules.
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    # The original block applies norm1, norm3 (affine, before cross-attention), norm2; diffusers
    # names them in order of use: norm1, norm2 (affine), norm3. Only the affine one has weights.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_PARAM_NAMES = ("weight", "bias")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
# Image-to-video / first-last-frame extras: a different model, not supported yet.
_I2V_MARKERS = ("img_emb.", ".k_img.", ".v_img.", ".norm_k_img.")


def _invert(table: dict[str, str]) -> dict[str, str]:
    inverse = {v: k for k, v in table.items()}
    assert len(inverse) == len(table), "rename table is not one-to-one"
    return inverse


_INVERSE = (_invert(_TOP_PARAMS), _invert(_TOP_MODULES), _invert(_BLOCK_PARAMS), _invert(_BLOCK_MODULES))
_FORWARD = (_TOP_PARAMS, _TOP_MODULES, _BLOCK_PARAMS, _BLOCK_MODULES)


def _rename(key: str, tables: tuple[dict[str, str], ...]) -> str | None:
    """``key`` under one direction's tables, or None when no entry covers it."""
    top_params, top_modules, block_params, block_modules = tables
    m = _BLOCK_KEY.fullmatch(key)
    prefix, rest, params, modules = ("", key, top_params, top_modules)
    if m is not None:
        prefix, rest, params, modules = (f"blocks.{m.group(1)}.", m.group(2), block_params, block_modules)
    if rest in params:
        return prefix + params[rest]
    module, _, param = rest.rpartition(".")
    if param in _PARAM_NAMES and module in modules:
        return f"{prefix}{modules[module]}.{param}"
    return None


def diffusers_key(key: str) -> str | None:
    """An original Wan key's name in diffusers' layout, or None when it is not one the mapping knows."""
    return _rename(key, _FORWARD)


def _shape(sd: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"checkpoint {source!r}: missing key {key!r} (original Wan key names)")
    return tuple(sd[key].shape)


def wan_original_config(state_dict: dict[str, torch.Tensor], source: str, heads: int | None = None) -> dict[str, Any]:
    """diffusers ``WanTransformer3DModel`` config kwargs read from an original-names state dict."""
    dim, in_channels, *patch = _shape(state_dict, "patch_embedding.weight", source)
    if len(patch) != 3:
        raise ConfigError(f"checkpoint {source!r}: patch_embedding.weight is {len(patch) + 2}-d, not a 5-d Conv3d")
    layers = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.fullmatch(k))})
    if not layers or layers != list(range(len(layers))):
        raise ConfigError(f"checkpoint {source!r}: block indices {layers[:8]}... are not 0..N-1 (keys 'blocks.N.*')")
    if heads is None:
        if dim not in HEADS_BY_DIM:
            raise ConfigError(
                f"checkpoint {source!r}: model width dim={dim} is not a known Wan2.1 size "
                f"{sorted(HEADS_BY_DIM)}; the head count cannot be read from the weights: give heads= explicitly"
            )
        heads = HEADS_BY_DIM[dim]
    if heads <= 0 or dim % heads:
        raise ConfigError(f"checkpoint {source!r}: dim={dim} is not divisible by heads={heads}")
    out_features = _shape(state_dict, "head.head.weight", source)[0]
    patch_volume = math.prod(patch)
    if out_features % patch_volume:
        raise ConfigError(
            f"checkpoint {source!r}: head.head.weight has {out_features} outputs, not a multiple of patch {patch}"
        )
    return {
        "patch_size": tuple(patch),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": in_channels,
        "out_channels": out_features // patch_volume,
        "text_dim": _shape(state_dict, "text_embedding.0.weight", source)[1],
        "freq_dim": _shape(state_dict, "time_embedding.0.weight", source)[1],
        "ffn_dim": _shape(state_dict, "blocks.0.ffn.0.weight", source)[0],
        "num_layers": len(layers),
        "cross_attn_norm": "blocks.0.norm3.weight" in state_dict,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``WanTransformer3DModel(**config)`` and its shape (built on the meta
    device: no memory, no time)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], source: str, names: str = "diffusers"
) -> None:
    """Every key ``config``'s model needs is present with its shape, and no other: else an error
    naming ``source`` and the keys (in the file's own names when ``names='original'``)."""
    want = expected_shapes(config)

    def shown(keys: list[str]) -> list[str]:
        if names != "original":
            return keys
        return [_rename(k, _INVERSE) or k for k in keys]

    missing = sorted(set(want) - set(state_dict))
    if missing:
        raise ConfigError(f"checkpoint {source!r}: missing key(s) {shown(missing)[:12]} ({len(missing)} in all)")
    extra = sorted(set(state_dict) - set(want))
    if extra:
        raise ConfigError(f"checkpoint {source!r}: unrecognised key(s) {shown(extra)[:12]} ({len(extra)} in all)")
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {want[k]}" for k in want if tuple(state_dict[k].shape) != want[k]]
    if wrong:
        raise ConfigError(f"checkpoint {source!r}: tensor shape(s) do not fit the architecture: {wrong[:8]}")


def wan_original_to_diffusers(
    state_dict: dict[str, torch.Tensor], source: str, heads: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(WanTransformer3DModel config kwargs, state dict in diffusers' names) of a state dict in the
    original Wan names. ``source`` names the file in every error. Tensors are shared, not copied."""
    i2v = sorted(k for k in state_dict if k.startswith("img_emb.") or any(m in k for m in _I2V_MARKERS))
    if i2v:
        raise ConfigError(
            f"checkpoint {source!r}: image-to-video weights are not supported (text-to-video only): {i2v[:6]}"
        )
    unknown = sorted(k for k in state_dict if diffusers_key(k) is None)
    if unknown:
        raise ConfigError(
            f"checkpoint {source!r}: unrecognised key(s) {unknown[:12]} ({len(unknown)} in all) "
            "for the original Wan names"
        )
    config = wan_original_config(state_dict, source, heads)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        converted[diffusers_key(key) or key] = tensor
    check_against(converted, config, source, names="original")
    return config, converted


def diffusers_to_wan_original(
    state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`wan_original_to_diffusers`: diffusers' names -> the original Wan names."""
    unknown = sorted(k for k in state_dict if _rename(k, _INVERSE) is None)
    if unknown:
        raise ConfigError(f"checkpoint {source!r}: unrecognised diffusers key(s) {unknown[:12]} ({len(unknown)} total)")
    return {_rename(k, _INVERSE) or k: v for k, v in state_dict.items()}
