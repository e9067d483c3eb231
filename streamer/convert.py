"""Checkpoint flags of ``streamer run`` / ``serve``, and ``streamer convert``.

``streamer convert`` reads a causal checkpoint in its authors' format (any LoRA merged) and writes a
diffusers-layout transformer folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), so
that later runs load it with ``--checkpoint OUT/diffusion_pytorch_model.safetensors`` at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.config import CHECKPOINT_FORMATS, CheckpointSpec, ConfigError, known_presets, load_model_preset

EXIT_BAD_INPUT = 2


def add_checkpoint_flags(parser: argparse.ArgumentParser, required: bool = False, format_flag: str = "") -> None:
    """``--checkpoint``, its format, ``--lora``/``--lora-scale`` and ``--ema``/``--no-ema``."""
    parser.add_argument(
        "--checkpoint",
        required=required,
        default=None,
        help="the transformer from a causal checkpoint file (Self-Forcing, CausVid, StreamDiffusionV2, LongLive, "
        ".safetensors); --model still gives the VAE, text encoder and tokenizer",
    )
    parser.add_argument(
        *([format_flag] if format_flag else []),
        "--checkpoint-format",
        dest="checkpoint_format",
        default="auto",
        choices=CHECKPOINT_FORMATS,
        help="the checkpoint's format (default auto: read from its keys; an error when ambiguous)",
    )
    parser.add_argument("--lora", default=None, help="a LoRA file merged into the checkpoint (LongLive's lora.pt)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (default 1)")
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the EMA weights (generator_ema) or not (default: the format's own choice)",
    )


def checkpoint_spec(args: argparse.Namespace) -> CheckpointSpec | None:
    """The flags as a :class:`CheckpointSpec`; None without ``--checkpoint`` (then no other flag may be set)."""
    if getattr(args, "checkpoint", None) is None:
        given = [f for f, v in (("--lora", args.lora), ("--ema/--no-ema", args.ema)) if v is not None]
        if args.checkpoint_format != "auto":
            given.append("--checkpoint-format")
        if given:
            raise ConfigError(f"{', '.join(given)} given without --checkpoint")
        return None
    return CheckpointSpec(
        path=args.checkpoint, format=args.checkpoint_format, lora=args.lora, lora_scale=args.lora_scale, ema=args.ema
    )


def model_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides that say which model runs where, as ``run``, ``serve`` and a torchrun stage
    worker all take them (every rank of a ring must build the same config); None: the config's own."""
    return {
        "model_source": args.model,
        "checkpoint": checkpoint_spec(args),
        "device": args.device,
        "dtype": args.dtype,
        "decoder": args.decoder,
        "decoder_path": args.decoder_path,
        "text_encoder_device": getattr(args, "text_encoder_device", None),
        "offload": getattr(args, "offload", None),
    }


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="write a checkpoint as a diffusers transformer folder (fast to load)")
    add_checkpoint_flags(convert, required=True, format_flag="--format")
    convert.add_argument("--out", required=True, help="the folder to write (config.json + safetensors)")
    convert.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.models.checkpoints import build_transformer, check_preset, known_heads, read_checkpoint

    try:
        spec = checkpoint_spec(args)
        assert spec is not None
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {str(out)!r} exists and is not empty")
        presets = [load_model_preset(n) for n in known_presets()]
        presets = [p for p in presets if p.kind == "wan"]
        config, sd, fmt = read_checkpoint(spec, known_heads=known_heads(presets))
        matches = []
        for preset in presets:
            try:
                check_preset(config, preset, spec.path)
                matches.append(preset)
            except ConfigError:
                continue
        if not matches:
            raise ConfigError(
                f"checkpoint {spec.path!r} holds no known model preset's architecture "
                f"({ {k: config[k] for k in ('num_layers', 'num_attention_heads', 'ffn_dim', 'text_dim')} })"
            )
        model = build_transformer(sd, matches[0], spec.path)
    except ConfigError as e:
        print(f"streamer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model.save_pretrained(out)
    print(f"streamer: wrote {matches[0].name} ({fmt}) to {out}", file=sys.stderr)
    return 0
