"""Typed, frozen configuration: model presets and system configs (DESIGN §7).

Model parameters live in ``configs/models/<name>.yaml`` (and, for real weights, in the
checkpoint's own config files); system parameters in ``configs/<name>.yaml`` plus CLI flags.
Both are validated once, at load, and every error names the field, the value and what is
allowed. Nothing here changes while the engine runs: user parameters (prompt, seed, strength)
live in :class:`pipeline.types.UserParams`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.models.attention import BACKENDS, FLASH_MODULES, backend_installed
from pipeline.sampling import PREDICTIONS, sigmas_from_timesteps, table_sigma
from pipeline.types import shown, within

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MODEL_DIR = CONFIG_DIR / "models"

# Frames per latent frame and pixels per latent pixel of the Wan VAE family.
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8

# The largest values the numeric fields take (a value past them is an error naming it, never a float overflow).
MAX_SHIFT = 100.0  # flow shift: Wan uses 3 to 12
MAX_FPS = 240
MAX_SIZE = 4096  # pixels of height and width
MAX_SESSIONS = 1024
MAX_FRAMES = 1 << 20  # latent frames of a chunk, a sink, a window, a refresh period

SAMPLERS = ("flow", "euler")

# The latent codecs a preset may name in ``vae._class_name``: Wan's VAE, or the demo's frame autoencoder.
VAE_CLASSES = ("AutoencoderKLWan", "FrameAutoencoder")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names field, value and what is allowed."""


def _fail(where: str, field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}: {field}={shown(value)} is not allowed: {allowed}")


@dataclass(frozen=True)
class ModelPreset:
    """A model family member: architecture, where its weights come from, how it samples."""

    name: str
    kind: str  # "wan" (a causal Wan DiT) or "passthrough" (identity denoiser, no VAE: measures the system)
    weights: str  # "random" (seeded random weights), "pretrained" (needs a source) or "none"
    source: str | None  # default local folder or hub id of the weights; None for "random"
    seed: int  # seed of the random weights ("random" only)
    transformer: dict[str, Any]  # diffusers WanTransformer3DModel config
    vae: dict[str, Any]  # diffusers AutoencoderKLWan config, or with _class_name: FrameAutoencoder (demo) its own
    text_encoder: dict[str, Any]  # transformers UMT5Config
    tokenizer: str  # "bytes" (no download; tiny), "words" (the demo grammar's; pipeline.models.text) or "pretrained"
    text_len: int  # tokens of text conditioning (Wan: 512)
    timesteps: tuple[float, ...]  # the denoising timesteps it was distilled for, in [0, 1000]
    shift: float  # flow-matching shift applied to timesteps/1000
    fps: int  # video frames per second the model was trained at
    # the update rule between steps (pipeline/sampling.py): "flow" x0 noised again with fresh noise (distilled
    # few-step models: Self-Forcing, CausVid, StreamDiffusionV2), "euler" the flow's ODE step (the demo)
    sampler: str = "flow"
    # what the DiT's output means (pipeline/sampling.py): "velocity" ε − x0 (every Wan model), "x0" (the demo)
    prediction: str = "velocity"

    @property
    def patch_size(self) -> tuple[int, int, int]:
        p = self.transformer.get("patch_size", (1, 2, 2))
        return (int(p[0]), int(p[1]), int(p[2]))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("z_dim", 16))

    @property
    def num_layers(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def rope_max_seq_len(self) -> int:
        return int(self.transformer.get("rope_max_seq_len", 1024))

    def identity(self) -> dict[str, Any]:
        """The transformer fields that identify this architecture in a checkpoint's config."""
        keys = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "text_dim")
        ident = {k: self.transformer[k] for k in keys}
        ident["patch_size"] = list(self.patch_size)
        return ident


CHECKPOINT_FORMATS = ("self-forcing", "causvid", "sdv2", "longlive", "safetensors", "auto")


@dataclass(frozen=True)
class CheckpointSpec:
    """A causal checkpoint in its authors' format that provides the transformer (pipeline/models/checkpoints.py);
    the VAE, text encoder and tokenizer still come from the model folder (or the preset's random weights)."""

    path: str  # the .pt / .safetensors file (sdv2: also the folder holding model.pt)
    format: str = "auto"  # one of CHECKPOINT_FORMATS; "auto" reads it from the file's keys
    lora: str | None = None  # a PEFT LoRA file merged into the weights at load (LongLive's lora.pt)
    lora_scale: float = 1.0  # W + lora_scale * alpha/rank * B @ A
    ema: bool | None = None  # the EMA weights (generator_ema); None: the format's own default

    def __post_init__(self) -> None:
        if self.format not in CHECKPOINT_FORMATS:
            raise _fail("checkpoint", "format", self.format, f"one of {CHECKPOINT_FORMATS}")
        if not within(self.lora_scale, -1000, 1000):
            raise _fail("checkpoint", "lora_scale", self.lora_scale, "a number from -1000 to 1000")
        if self.lora_scale != 1.0 and self.lora is None:
            raise _fail("checkpoint", "lora_scale", self.lora_scale, "1.0 without a LoRA file (--lora)")


@dataclass(frozen=True)
class SystemConfig:
    """Launch-time settings: fixed for the life of the process."""

    model: ModelPreset
    model_source: str | None  # overrides model.source (CLI --model)
    device: str  # "cpu", "cuda", "cuda:1", ...
    dtype: str  # "float32", "bfloat16", "float16", "float64"
    height: int  # output frame height in pixels
    width: int  # output frame width in pixels
    chunk_frames: int  # latent frames per chunk
    context: str  # visibility rule: "stream" or "clean" (DESIGN §4)
    sink_frames: int  # latent frames kept for ever at the start of the KV window
    window_frames: int  # latest latent frames kept in the KV window
    max_sessions: int  # sessions the engine accepts at once
    timesteps: tuple[float, ...]  # denoising timesteps in use (default: the model's)
    fps: int  # output video frames per second
    decode_phase: str = "auto"  # "thread": decode beside the DiT; "inline": within the tick; "auto": thread on a GPU
    decoder: str = "wan"  # frames from latents: "wan" (the Wan VAE) or "taehv" (the tiny one; encode stays Wan's)
    decoder_path: str | None = None  # taehv: the local taew2_1.pth (None: seeded random weights, random presets only)
    checkpoint: CheckpointSpec | None = None  # the transformer from a causal checkpoint (CLI --checkpoint)
    # per-step rule (StreamDiffusionV2's system, pipeline/perstep.py): latent frames of an epoch's first chunk,
    # the similarity under which a sink frame is replaced (-1: never), the frame position at which RoPE
    # positions wrap back (0: never)
    first_chunk_frames: int = 0  # 0: chunk_frames
    adaptive_sink: float = -1.0
    rope_refresh: int = 0
    # how a timestep becomes (σ, the model's time input): "shift" σ = shift(t/1000), time = 1000·σ;
    # "table" (StreamDiffusionV2 / CausVid code): σ of the 1000-entry shifted table nearest t, time = t
    timestep_rule: str = "shift"
    shift: float = 0.0  # 0: the model's
    # memory (pipeline/memory.py): where the UMT5 runs ("": the DiT's device; "cpu": its embeddings are moved
    # to the DiT's device), and what is kept off the GPU ("text": the text encoder; "swap"/"layers": not built)
    text_encoder_device: str = ""
    offload: str = "none"
    # speed levers of the DiT (pipeline/models/attention.py; each gives the same numbers on or off, bench.peer_sdv2
    # measures them): the attention kernel, attn2's text keys/values once per prompt, RoPE tables kept on the device
    attention: str = "sdpa"  # "sdpa" (torch picks cuDNN / flash / efficient / math), "flash2", "flash3", "flash4"
    text_kv_cache: bool = True
    rope_cache: bool = True

    @property
    def text_device(self) -> str:
        """The text encoder's device: ``cpu`` with ``offload: text``, else as set, else the DiT's."""
        return "cpu" if self.offload == "text" else (self.text_encoder_device or self.device)

    @property
    def threaded_decode(self) -> bool:
        """Decode in a thread of its own, beside the DiT. ``auto``: on a GPU (its own CUDA stream), not on a
        CPU, where both phases share the same cores and a second thread only adds contention (measured:
        bench/README.md, "decode phase")."""
        if self.decode_phase == "auto":
            return self.device != "cpu"
        return self.decode_phase == "thread"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model's dtype (one of :data:`DTYPES`) as torch names it."""
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    @property
    def flow_shift(self) -> float:
        return self.shift or self.model.shift

    def sigmas(self) -> tuple[float, ...]:
        if self.timestep_rule == "table":
            return tuple(table_sigma(t, self.flow_shift) for t in self.timesteps)
        return sigmas_from_timesteps(self.timesteps, self.flow_shift)

    def model_times(self) -> tuple[float, ...]:
        """The time input the model gets at each step (its timestep embedding), aligned with :meth:`sigmas`."""
        if self.timestep_rule == "table":
            return self.timesteps
        return tuple(1000.0 * s for s in self.sigmas())

    @property
    def first_frames(self) -> int:
        """Latent frames of an epoch's first chunk."""
        return self.first_chunk_frames or self.chunk_frames

    def latent_frames(self, frame_start: int) -> int:
        """Latent frames of the chunk that starts at latent frame ``frame_start`` of its epoch."""
        return self.first_frames if frame_start == 0 else self.chunk_frames

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_SPATIAL_FACTOR, self.width // VAE_SPATIAL_FACTOR

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.latent_size
        _, ph, pw = self.model.patch_size
        return (h // ph) * (w // pw)

    def summary(self) -> dict[str, Any]:
        """The settings a measurement depends on, for benchmark reports."""
        return {
            "model": self.model.name,
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "steps": self.steps,
            "chunk_frames": self.chunk_frames,
            "frames_per_chunk": self.frames_for_chunk(first=False),
            "context": self.context,
            "dtype": self.dtype,
            "device": self.device,
            "decode_phase": "thread" if self.threaded_decode else "inline",
            "decoder": self.decoder,
        }

    def frames_for_chunk(self, first: bool) -> int:
        """Video frames that one chunk decodes to (the VAE's first latent frame is one frame)."""
        n = (self.first_frames if first else self.chunk_frames) * VAE_TEMPORAL_FACTOR
        return n - (VAE_TEMPORAL_FACTOR - 1) if first else n


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def known_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def _check_keys(where: str, data: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")


def _timesteps(where: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(where, "timesteps", value, "a non-empty list of numbers in (0, 1000]")
    if not all(within(t, 0, 1000, low_open=True) for t in value):
        raise _fail(where, "timesteps", value, "every timestep in (0, 1000]; zero is the clean end, not a step")
    ts = tuple(float(t) for t in value)
    if any(a <= b for a, b in itertools.pairwise(ts)):
        raise _fail(where, "timesteps", value, "strictly decreasing (noisiest first)")
    return ts


def load_model_preset(name: str) -> ModelPreset:
    """Load ``configs/models/<name>.yaml``; an unknown name is an error listing the known ones."""
    path = MODEL_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise ConfigError(f"model preset {name!r} is unknown; known presets: {known_presets()}")
    data = _read_yaml(path, "model preset")
    where = f"model preset {name!r}"
    kind = data.get("kind", "wan")
    if kind == "passthrough":
        return _passthrough_preset(name, data, where)
    if kind != "wan":
        raise _fail(where, "kind", kind, "'wan' or 'passthrough'")
    allowed = {"name", "kind", "weights", "source", "seed", "transformer", "vae", "text_encoder", "tokenizer"}
    allowed |= {"text_len", "timesteps", "shift", "fps", "sampler", "prediction"}
    _check_keys(where, data, allowed, allowed - {"source", "seed", "kind", "sampler", "prediction"})
    if data["name"] != name:
        raise _fail(where, "name", data["name"], f"the file's own name {name!r}")
    if data["weights"] not in ("random", "pretrained"):
        raise _fail(where, "weights", data["weights"], "'random' or 'pretrained'")
    if data["tokenizer"] not in ("bytes", "words", "pretrained"):
        raise _fail(where, "tokenizer", data["tokenizer"], "'bytes', 'words' or 'pretrained'")
    vae_class = data["vae"].get("_class_name", "AutoencoderKLWan")
    if vae_class not in VAE_CLASSES:
        raise _fail(where, "vae._class_name", vae_class, f"one of {VAE_CLASSES}")
    source = data.get("source")
    if source is not None and (REPO_ROOT / source).is_dir():  # weights shipped in the repository (demo)
        source = str(REPO_ROOT / source)
    t = data["transformer"]
    head_dim = t.get("attention_head_dim")
    if not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
        raise _fail(where, "transformer.attention_head_dim", head_dim, "an even integer >= 6 (RoPE splits it t/h/w)")
    _check_preset_numbers(where, data)
    if data.get("sampler", "flow") not in SAMPLERS:
        raise _fail(where, "sampler", data.get("sampler"), f"one of {SAMPLERS}")
    if data.get("prediction", "velocity") not in PREDICTIONS:
        raise _fail(where, "prediction", data.get("prediction"), f"one of {PREDICTIONS}")
    return ModelPreset(
        name=name,
        kind="wan",
        weights=data["weights"],
        source=source,
        seed=int(data.get("seed", 0)),
        transformer=dict(t),
        vae=dict(data["vae"]),
        text_encoder=dict(data["text_encoder"]),
        tokenizer=data["tokenizer"],
        text_len=int(data["text_len"]),
        timesteps=_timesteps(where, data["timesteps"]),
        shift=float(data["shift"]),
        fps=int(data["fps"]),
        sampler=data.get("sampler", "flow"),
        prediction=data.get("prediction", "velocity"),
    )


def _check_preset_numbers(where: str, data: dict[str, Any]) -> None:
    """A preset's shift, fps, text length and weight seed: in range, checked before any is converted."""
    if not within(data["shift"], 0, MAX_SHIFT, low_open=True):
        raise _fail(where, "shift", data["shift"], f"a number in (0, {MAX_SHIFT:g}]")
    if not within(data["fps"], 1, MAX_FPS, integer=True):
        raise _fail(where, "fps", data["fps"], f"an integer from 1 to {MAX_FPS}")
    if not within(data.get("text_len", 1), 1, 4096, integer=True):
        raise _fail(where, "text_len", data.get("text_len"), "an integer from 1 to 4096")
    if not within(data.get("seed", 0), 0, 2**63, integer=True, high_open=True):
        raise _fail(where, "seed", data.get("seed"), "an integer in [0, 2**63)")


# The passthrough "VAE" packs 4 frames x 8x8 pixels x 3 colours of a latent pixel into channels.
PASSTHROUGH_CHANNELS = 3 * VAE_TEMPORAL_FACTOR * VAE_SPATIAL_FACTOR * VAE_SPATIAL_FACTOR


def _passthrough_preset(name: str, data: dict[str, Any], where: str) -> ModelPreset:
    """The engine's whole schedule with an identity denoiser and no VAE (pipeline/models/passthrough.py)."""
    allowed = {"name", "kind", "timesteps", "shift", "fps"}
    _check_keys(where, data, allowed, allowed)
    if data["name"] != name:
        raise _fail(where, "name", data["name"], f"the file's own name {name!r}")
    _check_preset_numbers(where, data)
    return ModelPreset(
        name=name,
        kind="passthrough",
        weights="none",
        source=None,
        seed=0,
        transformer={"patch_size": [1, 1, 1], "num_layers": 1, "rope_max_seq_len": 1 << 20},
        vae={"z_dim": PASSTHROUGH_CHANNELS},
        text_encoder={},
        tokenizer="none",
        text_len=1,
        timesteps=_timesteps(where, data["timesteps"]),
        shift=float(data["shift"]),
        fps=int(data["fps"]),
    )


_SYSTEM_FIELDS = {
    "model",
    "device",
    "dtype",
    "height",
    "width",
    "chunk_frames",
    "context",
    "sink_frames",
    "window_frames",
    "max_sessions",
    "timesteps",
    "fps",
    "decode_phase",
    "decoder",
    "decoder_path",
    "first_chunk_frames",
    "adaptive_sink",
    "rope_refresh",
    "timestep_rule",
    "shift",
    "text_encoder_device",
    "offload",
    "attention",
    "text_kv_cache",
    "rope_cache",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")
CONTEXTS = ("stream", "clean", "per-step")
TIMESTEP_RULES = ("shift", "table")
DECODE_PHASES = ("auto", "thread", "inline")
DECODERS = ("wan", "taehv")
OFFLOADS = ("none", "text", "swap", "layers")  # pipeline/memory.py states what each costs


def load_system_config(path: str | Path, **overrides: Any) -> SystemConfig:
    """Load a system config file; ``overrides`` (CLI flags) replace its fields, None means unset."""
    path = Path(path)
    data = _read_yaml(path, "system config")
    data.update({k: v for k, v in overrides.items() if v is not None and k not in ("model_source", "checkpoint")})
    where = f"system config {str(path)!r}"
    return build_system_config(
        data, where=where, model_source=overrides.get("model_source"), checkpoint=overrides.get("checkpoint")
    )


def build_system_config(
    data: dict[str, Any],
    where: str = "system config",
    model_source: str | None = None,
    checkpoint: CheckpointSpec | None = None,
) -> SystemConfig:
    _check_keys(where, data, _SYSTEM_FIELDS, {"model", "height", "width"})
    preset = load_model_preset(str(data["model"]))
    device = str(data.get("device", "cpu"))
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise _fail(where, "device", device, "'cpu', 'cuda' or 'cuda:N'")
    dtype = str(data.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise _fail(where, "dtype", dtype, f"one of {DTYPES}")

    def positive_int(field: str, default: int | None = None, minimum: int = 1, maximum: int = MAX_FRAMES) -> int:
        value = data.get(field, default)
        if not within(value, minimum, maximum, integer=True):
            raise _fail(where, field, value, f"an integer from {minimum} to {maximum}")
        assert isinstance(value, int)
        return value

    height, width = positive_int("height", maximum=MAX_SIZE), positive_int("width", maximum=MAX_SIZE)
    _, ph, pw = preset.patch_size
    for field, value, p in (("height", height, ph), ("width", width, pw)):
        factor = VAE_SPATIAL_FACTOR * p
        if value % factor:
            raise _fail(where, field, value, f"a multiple of {factor} (VAE factor {VAE_SPATIAL_FACTOR} x patch {p})")
    chunk_frames = positive_int("chunk_frames", 1)
    context = str(data.get("context", "stream"))
    if context not in CONTEXTS:
        raise _fail(where, "context", context, f"one of {CONTEXTS}")
    sink = positive_int("sink_frames", 0, minimum=0)
    window = positive_int("window_frames", 8 * chunk_frames)
    if window < chunk_frames:
        raise _fail(where, "window_frames", window, f"at least chunk_frames ({chunk_frames})")
    max_sessions = positive_int("max_sessions", 4, maximum=MAX_SESSIONS)
    timesteps = _timesteps(where, data["timesteps"]) if data.get("timesteps") is not None else preset.timesteps
    fps = positive_int("fps", preset.fps, maximum=MAX_FPS)
    decode_phase = str(data.get("decode_phase", "auto"))
    if decode_phase not in DECODE_PHASES:
        raise _fail(where, "decode_phase", decode_phase, f"one of {DECODE_PHASES}")
    decoder = data.get("decoder", "wan")
    if decoder not in DECODERS:
        raise _fail(where, "decoder", decoder, f"one of {DECODERS}")
    if decoder == "taehv" and preset.latent_channels != 16:
        raise _fail(where, "decoder", decoder, f"'wan' for model {preset.name!r} (taehv decodes Wan 2.1's 16 channels)")
    decoder_path = data.get("decoder_path")
    if decoder_path is not None and (decoder != "taehv" or not isinstance(decoder_path, str) or not decoder_path):
        raise _fail(where, "decoder_path", decoder_path, "a file path, with decoder 'taehv' only")
    if decoder_path is not None and not Path(decoder_path).expanduser().is_file():
        raise _fail(where, "decoder_path", decoder_path, "an existing file (taew2_1.pth, github.com/madebyollin/taehv)")
    first_frames = positive_int("first_chunk_frames", 0, minimum=0)
    if first_frames not in (0, chunk_frames) and context != "per-step":
        raise _fail(
            where, "first_chunk_frames", first_frames, f"0 or chunk_frames ({chunk_frames}) unless context is per-step"
        )
    if context == "per-step" and (first_frames or chunk_frames) + chunk_frames > sink + window:
        raise _fail(
            where,
            "window_frames",
            window,
            "sink_frames + window_frames must hold the first chunk and one more (the per-step cache is that size)",
        )
    adaptive = data.get("adaptive_sink", -1.0)
    if not within(adaptive, -1, 1):
        raise _fail(where, "adaptive_sink", adaptive, "a cosine similarity in [-1, 1] (-1: never replace a sink frame)")
    if adaptive > -1 and context != "per-step":
        raise _fail(where, "adaptive_sink", adaptive, "-1 unless context is per-step")
    rope_refresh = positive_int("rope_refresh", 0, minimum=0)
    if rope_refresh and (context != "per-step" or rope_refresh < sink + window):
        raise _fail(
            where, "rope_refresh", rope_refresh, f"0, or with context per-step at least sink + window ({sink + window})"
        )
    timestep_rule = str(data.get("timestep_rule", "shift"))
    if timestep_rule not in TIMESTEP_RULES:
        raise _fail(where, "timestep_rule", timestep_rule, f"one of {TIMESTEP_RULES}")
    shift = data.get("shift", 0.0)
    if not within(shift, 0, MAX_SHIFT):
        raise _fail(where, "shift", shift, f"a number from 0 to {MAX_SHIFT:g} (0: the model's)")
    text_encoder_device = str(data.get("text_encoder_device") or "")
    if text_encoder_device not in ("", "cpu", device):
        raise _fail(where, "text_encoder_device", text_encoder_device, f"'cpu' or the DiT's device ({device!r})")
    offload = str(data.get("offload", "none"))
    if offload not in OFFLOADS:
        raise _fail(where, "offload", offload, f"one of {OFFLOADS}")
    if offload in ("swap", "layers"):
        raise _fail(
            where, "offload", offload, "'none' or 'text': swap and layers are not built yet (costs: --memory-plan)"
        )
    if offload == "text" and text_encoder_device not in ("", "cpu"):
        raise _fail(where, "text_encoder_device", text_encoder_device, "'cpu' (or unset) with offload: text")
    attention = str(data.get("attention", "sdpa"))
    if attention not in BACKENDS:
        raise _fail(where, "attention", attention, f"one of {BACKENDS}")
    if not backend_installed(attention):
        missing = f"an installed backend: {FLASH_MODULES[attention]} is not importable"
        raise _fail(where, "attention", attention, missing)
    if attention != "sdpa" and (not device.startswith("cuda") or dtype not in ("bfloat16", "float16")):
        needs = f"'sdpa' with device {device!r} and dtype {dtype!r} (flash: CUDA, 16-bit)"
        raise _fail(where, "attention", attention, needs)
    levers = {}
    for lever in ("text_kv_cache", "rope_cache"):
        levers[lever] = data.get(lever, True)
        if not isinstance(levers[lever], bool):
            raise _fail(where, lever, levers[lever], "true or false")
    # Every query-key distance the model sees stays within sink + window + one chunk (pipeline/window.py).
    longest = sink + window + chunk_frames
    if longest > preset.rope_max_seq_len:
        raise _fail(
            where,
            "window_frames",
            window,
            f"sink_frames + window_frames + chunk_frames <= the model's RoPE table ({preset.rope_max_seq_len})",
        )
    if checkpoint is not None and preset.kind != "wan":
        raise _fail(where, "checkpoint", checkpoint.path, f"none with model {preset.name!r}: it has no transformer")
    return SystemConfig(
        model=preset,
        model_source=model_source,
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        height=height,
        width=width,
        chunk_frames=chunk_frames,
        context=context,
        sink_frames=sink,
        window_frames=window,
        max_sessions=max_sessions,
        timesteps=timesteps,
        fps=fps,
        decode_phase=decode_phase,
        decoder=decoder,
        decoder_path=decoder_path,
        first_chunk_frames=first_frames,
        adaptive_sink=float(adaptive),
        rope_refresh=rope_refresh,
        timestep_rule=timestep_rule,
        shift=float(shift),
        text_encoder_device=text_encoder_device,
        offload=offload,
        attention=attention,
        **levers,
    )


def replace(config: SystemConfig, **changes: Any) -> SystemConfig:
    """A copy of ``config`` with fields changed and validated again (tests, benchmarks)."""
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in _SYSTEM_FIELDS}
    data["model"] = config.model.name
    data["timesteps"] = list(config.timesteps)
    checkpoint = changes.pop("checkpoint", config.checkpoint)  # not a file field: set like model_source
    data.update(changes)
    return build_system_config(data, model_source=config.model_source, checkpoint=checkpoint)
