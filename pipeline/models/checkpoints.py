"""Causal Wan checkpoints as their authors publish them, read into a diffusers transformer.

Each format is named, and each reader says what it takes from the file:

- ``self-forcing`` / ``causvid``: a ``torch.save`` dict with ``generator`` and/or ``generator_ema``,
  each the state dict of their ``WanDiffusionWrapper`` (original Wan names under ``model.``). EMA
  by default when the file has it (Self-Forcing's ``--use_ema``).
- ``sdv2``: StreamDiffusionV2's ``model.pt`` (or the folder that holds it): the first of
  ``generator``, ``generator_ema``, ``state_dict`` present, or the bare state dict, as their
  ``load_generator_state_dict`` takes it; ``--ema`` picks ``generator_ema``.
- ``longlive``: the base ``.pt`` as Self-Forcing's, non-EMA by default (their config's
  ``use_ema: false``), plus a PEFT LoRA file (``generator_lora``), merged into the weights at load.
- ``safetensors``: one file, in the original or in diffusers' names (told apart by the keys).
- ``auto``: the format read from the file's keys; an error when they allow more than one reading.

The architecture is read from the tensors and must equal the model preset's; the model is then
built from the preset's config and loaded with ``strict=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from pipeline.config import CHECKPOINT_FORMATS, CheckpointSpec, ConfigError, ModelPreset
from pipeline.models.convert import (
    check_against,
    diffusers_key,
    diffusers_to_wan_original,
    wan_original_config,
    wan_original_to_diffusers,
)

# Segments that training wrappers (FSDP, activation checkpointing, torch.compile) put in key names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Where LoRA adapters live in the file, and the prefix PEFT gives the wrapped model's keys.
LORA_CONTAINERS = ("generator_lora",)
PEFT_PREFIX = "base_model.model."
# Which container of a generator checkpoint each format reads, EMA or not.
EMA_DEFAULT = {"self-forcing": True, "causvid": True, "longlive": False, "sdv2": False}


def load_file(path: Path) -> Any:
    """The object in a ``.pt`` (tensors and plain containers only) or the tensors of a ``.safetensors``."""
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch file, or one that holds pickled objects beyond tensors
        why = f"{type(e).__name__}: {e}"
        raise ConfigError(f"checkpoint {str(path)!r} could not be read as a torch file ({why})") from None


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip(sd: dict[str, torch.Tensor], source: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Wrapper segments removed and, when every key has it, ``prefix`` (their ``WanDiffusionWrapper.model``)."""
    out = {}
    for key, tensor in sd.items():
        for seg in WRAPPER_SEGMENTS:
            key = key.replace(seg, "")
        out[key] = tensor
    with_prefix = [k for k in out if k.startswith(prefix)]
    if with_prefix and len(with_prefix) != len(out):
        odd = sorted(k for k in out if not k.startswith(prefix))
        raise ConfigError(f"checkpoint {source!r}: some keys have the {prefix!r} prefix and some do not: {odd[:6]}")
    if with_prefix:
        out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def generator_state(obj: Any, source: str, fmt: str, ema: bool | None) -> dict[str, torch.Tensor]:
    """The generator's state dict of a Self-Forcing / CausVid / LongLive / StreamDiffusionV2 file."""
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {source!r}: holds a {type(obj).__name__}, not a dict (format {fmt!r})")
    if fmt == "sdv2" and not ema:
        if ema is False and "generator" not in obj and "generator_ema" in obj:
            raise ConfigError(f"checkpoint {source!r}: --no-ema, but it holds only 'generator_ema'")
        for key in ("generator", "generator_ema", "state_dict"):
            if key in obj:
                return strip(obj[key], source)
        if is_state_dict(obj):
            return strip(obj, source)
        raise ConfigError(f"checkpoint {source!r}: none of 'generator', 'generator_ema', 'state_dict' in {sorted(obj)}")
    if "generator" not in obj and "generator_ema" not in obj:
        raise ConfigError(
            f"checkpoint {source!r}: format {fmt!r} expects a dict with 'generator' and/or 'generator_ema', "
            f"it has {sorted(obj)[:8]}"
        )
    use_ema = EMA_DEFAULT[fmt] if ema is None else ema
    if use_ema and "generator_ema" not in obj:
        if ema:  # asked for explicitly
            raise ConfigError(f"checkpoint {source!r}: --ema, but it has no 'generator_ema' (keys {sorted(obj)[:8]})")
        use_ema = False
    if not use_ema and "generator" not in obj:
        raise ConfigError(f"checkpoint {source!r}: it holds only 'generator_ema': give --ema to use it")
    return strip(obj["generator_ema" if use_ema else "generator"], source)


def detect(path: Path, obj: Any, ema: bool | None) -> str:
    """``auto``: the one format the file's keys allow; an error when none or several do."""
    source = str(path)
    if path.suffix == ".safetensors":
        return "safetensors"
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {source!r}: holds a {type(obj).__name__}; no format reads it")
    if any(k in obj for k in LORA_CONTAINERS):
        raise ConfigError(f"checkpoint {source!r} is a LoRA file ({sorted(obj)[:4]}): give it as --lora")
    has = {k for k in ("generator", "generator_ema", "state_dict") if k in obj}
    if has == {"generator", "generator_ema"} and ema is None:
        raise ConfigError(
            f"checkpoint {source!r}: ambiguous: it has 'generator' and 'generator_ema', and formats differ in "
            "which they use (self-forcing/causvid: EMA; longlive/sdv2: not): give --checkpoint-format or --ema/--no-ema"
        )
    if has & {"generator", "generator_ema"}:
        return "self-forcing" if ema is None or ema else "longlive"
    if has == {"state_dict"} or is_state_dict(obj):
        return "sdv2"  # their loader reads a 'state_dict' entry or a bare state dict
    raise ConfigError(f"checkpoint {source!r}: keys {sorted(obj)[:8]} match no format {CHECKPOINT_FORMATS[:-1]}")


def lora_pairs(obj: Any, source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """module name -> (A [r, in], B [out, r], alpha or None) of a PEFT-style LoRA file."""
    if isinstance(obj, dict):
        for key in LORA_CONTAINERS:
            if key in obj:
                obj = obj[key]
    if not is_state_dict(obj):
        raise ConfigError(f"LoRA {source!r}: not a state dict of tensors, nor a dict with {LORA_CONTAINERS}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in obj.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for seg in WRAPPER_SEGMENTS:
            name = name.replace(seg, "")
        for kind, suffixes in (
            ("A", ("lora_A.weight", "lora_A.default.weight")),
            ("B", ("lora_B.weight", "lora_B.default.weight")),
        ):
            hit = next((s for s in suffixes if name.endswith("." + s)), None)
            if hit:
                parts.setdefault(name[: -len(hit) - 1], {})[kind] = tensor
                break
        else:
            if name.endswith(".alpha") and tensor.numel() == 1:
                parts.setdefault(name[: -len(".alpha")], {})["alpha"] = tensor
            else:
                raise ConfigError(
                    f"LoRA {source!r}: unrecognised key {key!r} (expected *.lora_A.weight / *.lora_B.weight)"
                )
    pairs = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ConfigError(f"LoRA {source!r}: module {module!r} lacks lora_{'A' if 'A' not in p else 'B'}.weight")
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"LoRA {source!r}: {module!r} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair"
            )
        pairs[module] = (a, b, float(p["alpha"]) if "alpha" in p else None)
    return pairs


def merge_lora(sd: dict[str, torch.Tensor], spec_lora: str, scale: float) -> dict[str, torch.Tensor]:
    """``W + scale * alpha/r * B @ A`` for every adapted module (alpha = r when the file has none, as
    LongLive's ``rank == alpha``); module names in the original Wan or in diffusers' naming."""
    source = spec_lora
    pairs = lora_pairs(load_file(Path(spec_lora).expanduser()), source)
    if not pairs:
        raise ConfigError(f"LoRA {source!r}: holds no adapters")
    out = dict(sd)
    for module, (a, b, alpha) in sorted(pairs.items()):
        key = diffusers_key(f"{module}.weight") if f"{module}.weight" not in out else f"{module}.weight"
        if key is None or key not in out:
            raise ConfigError(f"LoRA {source!r}: module {module!r} is not a weight of the checkpoint")
        w = out[key]
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise ConfigError(
                f"LoRA {source!r}: {module!r} adapts {b.shape[0]}x{a.shape[1]}, the weight is {tuple(w.shape)}"
            )
        rank = a.shape[0]
        factor = scale * (rank if alpha is None else alpha) / rank
        out[key] = (w.float() + factor * (b.float() @ a.float())).to(w.dtype)
    return out


def read_checkpoint(
    spec: CheckpointSpec, heads: int | None = None, known_heads: dict[int, int] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config read from the tensors, diffusers state dict with any LoRA merged, format used).
    ``heads``: the head count, when given; else ``known_heads`` by width, else Wan2.1's table."""
    path = Path(spec.path).expanduser()
    source = str(path)
    fmt = spec.format
    if path.is_dir():
        if fmt not in ("sdv2", "auto") or not (path / "model.pt").is_file():
            raise ConfigError(
                f"checkpoint {source!r} is a folder: only StreamDiffusionV2's checkpoint folder (holding model.pt) "
                "is read as a folder; give the file"
            )
        path, fmt = path / "model.pt", "sdv2"
        source = str(path)
    obj = load_file(path)
    if fmt == "auto":
        fmt = detect(path, obj, spec.ema)
    if (fmt == "safetensors") != (path.suffix == ".safetensors"):
        raise ConfigError(f"checkpoint {source!r}: format 'safetensors' reads .safetensors files, and only it does")
    sd = strip(obj, source) if fmt == "safetensors" else generator_state(obj, source, fmt, spec.ema)
    if heads is None and known_heads and "patch_embedding.weight" in sd:  # same name in both namings
        heads = known_heads.get(int(sd["patch_embedding.weight"].shape[0]))
    if fmt == "safetensors" and "condition_embedder.time_proj.weight" in sd:  # diffusers' names already
        config = wan_original_config(diffusers_to_wan_original(sd, source), source, heads)
        check_against(sd, config, source)
    else:
        config, sd = wan_original_to_diffusers(sd, source, heads)
    if spec.lora is not None:
        sd = merge_lora(sd, spec.lora, spec.lora_scale)
    return config, sd, fmt


def check_preset(config: dict[str, Any], preset: ModelPreset, source: str) -> None:
    """The architecture read from the file equals the preset's; else an error listing the differences."""
    want = {**preset.transformer, "patch_size": list(preset.patch_size)}
    got = {**config, "patch_size": list(config["patch_size"])}
    fields = ["num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "out_channels"]
    fields += ["text_dim", "freq_dim", "patch_size", "cross_attn_norm", "qk_norm"]
    diff = [f"{k}={got.get(k)!r} (preset {want.get(k)!r})" for k in fields if got.get(k) != want.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {source!r} does not hold model preset {preset.name!r}: {', '.join(diff)}")


def known_heads(presets: list[ModelPreset]) -> dict[int, int]:
    """Model width -> heads, of these presets (the head count is not in the weights)."""
    out = {}
    for p in presets:
        t = p.transformer
        out[int(t["num_attention_heads"]) * int(t["attention_head_dim"])] = int(t["num_attention_heads"])
    return out


def build_transformer(sd: dict[str, torch.Tensor], preset: ModelPreset, source: str) -> WanTransformer3DModel:
    """The preset's transformer holding ``sd`` (strict: every key, every shape; no copy of the tensors)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers (RoPE tables) made for real
        model = WanTransformer3DModel(**preset.transformer)
    check_against(sd, {k: v for k, v in model.config.items() if not k.startswith("_")}, source)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if left:
        raise ConfigError(f"checkpoint {source!r}: no values for {left[:6]}")
    return model


def load_checkpoint(spec: CheckpointSpec, preset: ModelPreset) -> WanTransformer3DModel:
    """The preset's transformer with the checkpoint's weights. The preset gives the head count for its
    own width (a file of another width then fails the architecture check), Wan2.1's table the rest."""
    config, sd, _ = read_checkpoint(spec, known_heads=known_heads([preset]))
    check_preset(config, preset, spec.path)
    return build_transformer(sd, preset, spec.path)
