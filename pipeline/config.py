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

import yaml

from pipeline.sampling import sigmas_from_timesteps

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MODEL_DIR = CONFIG_DIR / "models"

# Frames per latent frame and pixels per latent pixel of the Wan VAE family.
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names field, value and what is allowed."""


def _fail(where: str, field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}: {field}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class ModelPreset:
    """A model family member: architecture, where its weights come from, how it samples."""

    name: str
    kind: str  # "wan" (a causal Wan DiT) or "passthrough" (identity denoiser, no VAE: measures the system)
    weights: str  # "random" (seeded random weights), "pretrained" (needs a source) or "none"
    source: str | None  # default local folder or hub id of the weights; None for "random"
    seed: int  # seed of the random weights ("random" only)
    transformer: dict[str, Any]  # diffusers WanTransformer3DModel config
    vae: dict[str, Any]  # diffusers AutoencoderKLWan config
    text_encoder: dict[str, Any]  # transformers UMT5Config
    tokenizer: str  # "bytes" (no download; tiny) or "pretrained"
    text_len: int  # tokens of text conditioning (Wan: 512)
    timesteps: tuple[float, ...]  # the denoising timesteps it was distilled for, in [0, 1000]
    shift: float  # flow-matching shift applied to timesteps/1000
    fps: int  # video frames per second the model was trained at

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

    def sigmas(self) -> tuple[float, ...]:
        return sigmas_from_timesteps(self.timesteps, self.model.shift)

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
        }

    def frames_for_chunk(self, first: bool) -> int:
        """Video frames that one chunk decodes to (the VAE's first latent frame is one frame)."""
        n = self.chunk_frames * VAE_TEMPORAL_FACTOR
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
    ts = tuple(float(t) for t in value)
    if any(not 0 < t <= 1000 for t in ts):
        raise _fail(where, "timesteps", value, "every timestep in (0, 1000]; zero is the clean end, not a step")
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
    allowed |= {"text_len", "timesteps", "shift", "fps"}
    _check_keys(where, data, allowed, allowed - {"source", "seed", "kind"})
    if data["name"] != name:
        raise _fail(where, "name", data["name"], f"the file's own name {name!r}")
    if data["weights"] not in ("random", "pretrained"):
        raise _fail(where, "weights", data["weights"], "'random' or 'pretrained'")
    if data["tokenizer"] not in ("bytes", "pretrained"):
        raise _fail(where, "tokenizer", data["tokenizer"], "'bytes' or 'pretrained'")
    t = data["transformer"]
    head_dim = t.get("attention_head_dim")
    if not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
        raise _fail(where, "transformer.attention_head_dim", head_dim, "an even integer >= 6 (RoPE splits it t/h/w)")
    if float(data["shift"]) <= 0:
        raise _fail(where, "shift", data["shift"], "a positive number")
    return ModelPreset(
        name=name,
        kind="wan",
        weights=data["weights"],
        source=data.get("source"),
        seed=int(data.get("seed", 0)),
        transformer=dict(t),
        vae=dict(data["vae"]),
        text_encoder=dict(data["text_encoder"]),
        tokenizer=data["tokenizer"],
        text_len=int(data["text_len"]),
        timesteps=_timesteps(where, data["timesteps"]),
        shift=float(data["shift"]),
        fps=int(data["fps"]),
    )


# The passthrough "VAE" packs 4 frames x 8x8 pixels x 3 colours of a latent pixel into channels.
PASSTHROUGH_CHANNELS = 3 * VAE_TEMPORAL_FACTOR * VAE_SPATIAL_FACTOR * VAE_SPATIAL_FACTOR


def _passthrough_preset(name: str, data: dict[str, Any], where: str) -> ModelPreset:
    """The engine's whole schedule with an identity denoiser and no VAE (pipeline/models/passthrough.py)."""
    allowed = {"name", "kind", "timesteps", "shift", "fps"}
    _check_keys(where, data, allowed, allowed)
    if data["name"] != name:
        raise _fail(where, "name", data["name"], f"the file's own name {name!r}")
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
}
DTYPES = ("float32", "bfloat16", "float16", "float64")
CONTEXTS = ("stream", "clean")
DECODE_PHASES = ("auto", "thread", "inline")


def load_system_config(path: str | Path, **overrides: Any) -> SystemConfig:
    """Load a system config file; ``overrides`` (CLI flags) replace its fields, None means unset."""
    path = Path(path)
    data = _read_yaml(path, "system config")
    data.update({k: v for k, v in overrides.items() if v is not None and k != "model_source"})
    return build_system_config(data, where=f"system config {str(path)!r}", model_source=overrides.get("model_source"))


def build_system_config(
    data: dict[str, Any], where: str = "system config", model_source: str | None = None
) -> SystemConfig:
    _check_keys(where, data, _SYSTEM_FIELDS, {"model", "height", "width"})
    preset = load_model_preset(str(data["model"]))
    device = str(data.get("device", "cpu"))
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise _fail(where, "device", device, "'cpu', 'cuda' or 'cuda:N'")
    dtype = str(data.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise _fail(where, "dtype", dtype, f"one of {DTYPES}")

    def positive_int(field: str, default: int | None = None, minimum: int = 1) -> int:
        value = data.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise _fail(where, field, value, f"an integer >= {minimum}")
        return value

    height, width = positive_int("height"), positive_int("width")
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
    max_sessions = positive_int("max_sessions", 4)
    timesteps = _timesteps(where, data["timesteps"]) if data.get("timesteps") is not None else preset.timesteps
    fps = positive_int("fps", preset.fps)
    decode_phase = str(data.get("decode_phase", "auto"))
    if decode_phase not in DECODE_PHASES:
        raise _fail(where, "decode_phase", decode_phase, f"one of {DECODE_PHASES}")
    # Every query-key distance the model sees stays within sink + window + one chunk (pipeline/window.py).
    longest = sink + window + chunk_frames
    if longest > preset.rope_max_seq_len:
        raise _fail(
            where,
            "window_frames",
            window,
            f"sink_frames + window_frames + chunk_frames <= the model's RoPE table ({preset.rope_max_seq_len})",
        )
    return SystemConfig(
        model=preset,
        model_source=model_source,
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
    )


def replace(config: SystemConfig, **changes: Any) -> SystemConfig:
    """A copy of ``config`` with fields changed and validated again (tests, benchmarks)."""
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in _SYSTEM_FIELDS}
    data["model"] = config.model.name
    data["timesteps"] = list(config.timesteps)
    data.update(changes)
    return build_system_config(data, model_source=config.model_source)
