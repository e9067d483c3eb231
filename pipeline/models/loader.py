"""The one loader: any preset's weights, from seeded random init, a local folder or a hub id.

A folder is in diffusers' Wan layout (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``). Which model it holds is read from ``transformer/config.json`` and matched against
the known presets' architectures, never guessed from the path's spelling: a folder that matches
no preset, or another preset than the config asks for, is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from pipeline.config import ConfigError, ModelPreset, SystemConfig, known_presets, load_model_preset
from pipeline.models.causal_wan import CausalWan
from pipeline.models.checkpoints import load_checkpoint
from pipeline.models.frame_ae import FrameAutoencoder, StreamingFrameAe
from pipeline.models.passthrough import ConstantText, PassthroughDit, PixelPackVae
from pipeline.models.taehv import WEIGHTS_HINT, StreamingTaehv, taehv_decoder
from pipeline.models.text import BYTE_TOKENIZER_FILE, WORD_TOKENIZER_FILE, ByteTokenizer, TextEncoder, WordTokenizer
from pipeline.models.vae import StreamingVae
from pipeline.models.wan_original import is_original_layout, load_original_folder
from pipeline.sampling import EulerSampler, FlowSampler, IdentitySampler
from pipeline.shapes import vocabulary


@dataclass
class Models:
    preset: ModelPreset
    dit: CausalWan | PassthroughDit
    vae: (
        StreamingVae | StreamingFrameAe | StreamingTaehv | PixelPackVae
    )  # encode (v2v) and decode; StreamingTaehv: TAEHV decodes
    text: TextEncoder | ConstantText
    source: str  # where the weights came from: "random(seed=N)", a folder, "passthrough"
    sampler: FlowSampler = field(default_factory=FlowSampler)  # the update rule between steps


def cast(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to ``device`` and cast floating weights to ``dtype``, except the modules the model keeps
    in float32 at half precision (diffusers' ``_keep_in_fp32_modules``: norms, time embedder, rope)."""
    keep = (
        tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype in (torch.bfloat16, torch.float16) else ()
    )
    model.eval()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        want = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        t.data = t.data.to(device=device, dtype=want if t.is_floating_point() else t.dtype)


def make_vae(config: dict[str, Any]) -> AutoencoderKLWan | FrameAutoencoder:
    """The preset's latent codec from its ``vae`` config (``_class_name``: Wan's VAE unless it names the demo's)."""
    fields = {k: v for k, v in config.items() if k != "_class_name"}
    if config.get("_class_name") == "FrameAutoencoder":
        return FrameAutoencoder(**fields)
    return AutoencoderKLWan(**fields)


def streaming_codec(vae: AutoencoderKLWan | FrameAutoencoder) -> StreamingVae | StreamingFrameAe:
    return StreamingFrameAe(vae) if isinstance(vae, FrameAutoencoder) else StreamingVae(vae)


def random_tokenizer(preset: ModelPreset) -> ByteTokenizer | WordTokenizer:
    """The tokenizer of a preset's random weights: bytes, or the demo grammar's words."""
    if preset.tokenizer == "words":
        return WordTokenizer(vocabulary())
    return ByteTokenizer()


def random_components(
    preset: ModelPreset, device: torch.device | str = "cpu", text_device: torch.device | str | None = None
) -> tuple[WanTransformer3DModel, AutoencoderKLWan | FrameAutoencoder, UMT5EncoderModel]:
    """The preset's architecture with weights drawn from its seed (same seed, same weights on a
    given device). Made directly on ``device``: a 1.3B model's random weights for a GPU benchmark
    need no trip through host memory."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(preset.seed)
        transformer = WanTransformer3DModel(**preset.transformer)
        vae = make_vae(preset.vae)
        with torch.device(text_device or device):  # offload: made where it runs
            text = UMT5EncoderModel(UMT5Config(**preset.text_encoder))
    return transformer, vae, text


WAN_VAE_BASE_DIM = 96  # Wan2.1's VAE


def vae_scale(preset: ModelPreset) -> float:
    """How the preset's Wan VAE is shrunk from Wan's (tiny: 8/96); a random TAEHV is shrunk alike."""
    return float(preset.vae.get("base_dim", WAN_VAE_BASE_DIM)) / WAN_VAE_BASE_DIM


def save_pretrained(folder: str | Path, transformer: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> None:
    """Write components in the layout :func:`load_models` reads (used by tests for tiny checkpoints)."""
    folder = Path(folder)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")


def load_vae(folder: Path) -> AutoencoderKLWan | FrameAutoencoder:
    """A folder's latent codec, by the class its config.json names."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ConfigError(f"model path {str(folder.parent)!r}: vae/config.json cannot be read ({e})") from None
    if name == "FrameAutoencoder":
        return FrameAutoencoder.from_pretrained(folder)
    return AutoencoderKLWan.from_pretrained(folder)


def identify(folder: Path) -> str:
    """The preset whose architecture matches ``folder/transformer/config.json``."""
    cfg_path = folder / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"model path {str(folder)!r} does not identify a known model: it has no transformer/config.json "
            "(expected diffusers' Wan layout: transformer/, vae/, text_encoder/, tokenizer/)"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model path {str(folder)!r}: transformer/config.json is not valid JSON: {e}") from None
    if cfg.get("_class_name") != "WanTransformer3DModel":
        raise ConfigError(
            f"model path {str(folder)!r} does not identify a known model: transformer _class_name="
            f"{cfg.get('_class_name')!r}, expected 'WanTransformer3DModel'"
        )
    for name in known_presets():
        preset = load_model_preset(name)
        if preset.kind != "wan":
            continue
        ident = preset.identity()
        if all(cfg.get(k) == v for k, v in ident.items()):
            return name
    found = {k: cfg.get(k) for k in load_model_preset("tiny").identity()}
    raise ConfigError(
        f"model path {str(folder)!r} does not identify a known model: its transformer {found} matches none of "
        f"the known presets {known_presets()}"
    )


def resolve_source(source: str) -> Path:
    """A local folder as it is; anything else must be a hub id ('owner/name') already reachable."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model path {source!r} is a file, not a folder in diffusers' Wan layout")
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ConfigError(f"model path {source!r} does not exist and is not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=source))
    except Exception as e:  # network, auth, missing repo: all end here with the id named
        raise ConfigError(f"model {source!r}: could not be fetched from the hub ({type(e).__name__}: {e})") from None


def load_models(config: SystemConfig, random_weights: bool = False) -> Models:
    """The preset's components with their weights: from ``config.model_source`` (or the preset's
    own source), or seeded random weights for a ``random`` preset or when ``random_weights`` asks
    for them (GPU speed benchmarks of a pretrained architecture: speed does not depend on values)."""
    preset = config.model
    dtype = config.torch_dtype
    if preset.kind == "passthrough":
        device = torch.device(config.device)
        dit = PassthroughDit(device, dtype)
        vae = PixelPackVae(device)
        return Models(preset, dit, vae, ConstantText(device, dtype), source="passthrough", sampler=IdentitySampler())
    source = None if random_weights else (config.model_source or preset.source)
    if config.decoder == "taehv" and config.decoder_path is None and source is not None:
        raise ConfigError(
            f"decoder='taehv' with pretrained weights needs decoder_path (--decoder-path): {WEIGHTS_HINT}"
        )
    tokenizer: Any
    if source is None:
        if preset.weights != "random" and not random_weights:
            raise ConfigError(f"model preset {preset.name!r} has pretrained weights: give --model PATH_OR_ID")
        transformer, vae, text_encoder = random_components(preset, config.device, config.text_device)
        tokenizer = random_tokenizer(preset)
        where = f"random(seed={preset.seed})"
    elif is_original_layout(folder := resolve_source(source)):
        # Wan2.1's own layout (Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, the DiT in
        # the original names): converted at load, every key checked, the architecture the preset's.
        with_transformer = config.checkpoint is None
        transformer, vae, text_encoder, tokenizer = load_original_folder(folder, preset, with_transformer)
        where = str(folder)
    else:
        found = identify(folder)
        if found != preset.name:
            raise ConfigError(f"model path {source!r} holds {found!r}, but the config asks for {preset.name!r}")
        if config.checkpoint is None:  # else the transformer's weights come from the checkpoint, below
            transformer = WanTransformer3DModel.from_pretrained(folder / "transformer")
        vae = load_vae(folder / "vae")
        text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder")
        if (folder / "tokenizer" / BYTE_TOKENIZER_FILE).exists():
            tokenizer = ByteTokenizer()
        elif (folder / "tokenizer" / WORD_TOKENIZER_FILE).exists():
            tokenizer = WordTokenizer.from_pretrained(folder / "tokenizer")
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        where = str(folder)
    if isinstance(vae, FrameAutoencoder) and config.decoder != "wan":
        raise ConfigError(
            f"decoder={config.decoder!r} is not allowed with model {preset.name!r}: its latents are its own frame "
            "autoencoder's, which decodes them (decoder: wan, the default)"
        )
    if config.checkpoint is not None:
        # A causal checkpoint in its authors' format (Self-Forcing, CausVid, StreamDiffusionV2, LongLive,
        # safetensors) replaces the transformer; its architecture must be the preset's.
        transformer = load_checkpoint(config.checkpoint, preset)
        where += f"; transformer from {config.checkpoint.path}"
    device = torch.device(config.device)
    cast(transformer, device, dtype)

    def side(on: torch.device) -> torch.dtype:  # the VAE's and text encoder's: float32 on a CPU, float64 in tests
        return torch.float64 if dtype == torch.float64 else (torch.float32 if on.type == "cpu" else dtype)

    side_dtype = side(device)
    cast(vae, device, side_dtype)
    text_device = torch.device(config.text_device)  # "cpu" with offload: text; its embeddings go to ``device``
    cast(text_encoder, text_device, side(text_device))
    return Models(
        preset=preset,
        dit=CausalWan(
            transformer,
            attention=config.attention,
            text_kv_cache=config.text_kv_cache,
            rope_cache=config.rope_cache,
            text_cache_prompts=2 * config.max_sessions + 2,  # each session's prompt, and the one it changes to
        ),
        vae=streaming_codec(vae)
        if config.decoder == "wan"
        else taehv_decoder(StreamingVae(vae), config.decoder_path, preset.seed, device, side_dtype, vae_scale(preset)),
        text=TextEncoder(text_encoder, tokenizer, preset.text_len, device=device),
        source=where,
        sampler=(EulerSampler if preset.sampler == "euler" else FlowSampler)(preset.prediction),
    )
