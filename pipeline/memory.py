"""The memory plan: what each device will hold, worked out from the config before any weight is loaded.

Per device (one column per device a stage runs on, and the host where the text encoder is sent there):

- **DiT weights**: parameters counted from the preset's transformer config (:func:`dit_params`, held to
  the real module's ``numel`` by a test), at the engine's dtype, the modules diffusers keeps in float32
  at half precision in float32 (as :func:`pipeline.models.loader.cast` does). A stage holds the embedding
  and head and its own blocks (``pipeline.stages.launch.trim`` frees the others after loading all).
- **KV windows**: exactly the tensors :class:`pipeline.window.KVWindow` allocates per session and stage:
  K and V, [blocks, sink + window + (steps+1)·chunk_frames, tokens_per_frame, heads, head_dim], times
  ``kv_copies`` (``per-step``: one cache per step level), times ``max_sessions``.
- **DiT activations**: an estimate of the largest forward, the whole tick's StreamBatch in one block
  (:func:`dit_activation_bytes` says which tensors it counts).
- **Decoder**: the Wan VAE's weights (encoder and decoder: both are loaded), each session's causal
  cache of the decoder and (v2v) of the encoder, measured by running the VAE on the ``meta`` device
  (shapes only, nothing allocated), and the activations of a batched decode of every session.
- **Text encoder**: UMT5 parameters counted from its config, at the dtype the loader gives it.

The plan follows the loader: the VAE and text encoder run in float32 on a CPU, at the engine's dtype
on a GPU; every stage process loads every component (only the first encodes, only the last decodes).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import SystemConfig
from pipeline.types import shown, within

GIB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
PCIE_GBPS = {"PCIe Gen4 x16": 25.0, "PCIe Gen5 x16 (H100)": 55.0}  # host-to-device copy, GB/s, practical
BUILT_OFFLOADS = ("none", "text")
# what diffusers' WanTransformer3DModel and transformers' UMT5 keep in float32 at half precision
# (``_keep_in_fp32_modules``; :func:`pipeline.models.loader.cast` honours them)
DIT_FP32_MODULES = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
UMT5_FP32_MODULES = ("wo",)


class MemoryPlanError(ValueError):
    """The plan does not fit: the message gives needed against available per device."""


# ---- parameter counts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DitParams:
    """Parameter counts of a WanTransformer3DModel, split as the loader casts them."""

    shared: int  # embeddings, time/text embedders, head: every stage holds them
    shared_fp32: int  # of which kept in float32 at half precision (time embedder, scale-shift table)
    block: int  # one transformer block
    block_fp32: int  # of which kept in float32 (scale-shift table, norm2)
    blocks: int  # number of blocks
    rope_buffer: int  # elements of the RoPE cos/sin buffers (float32, not parameters)

    @property
    def total(self) -> int:
        return self.shared + self.blocks * self.block

    def nbytes(self, dtype: str, owned: int | None = None) -> int:
        """Bytes of the weights and buffers of the shared part and ``owned`` blocks (None: all)."""
        n = self.blocks if owned is None else owned
        cast = self.shared - self.shared_fp32 + n * (self.block - self.block_fp32)
        kept = self.shared_fp32 + n * self.block_fp32 + self.rope_buffer
        if dtype in ("bfloat16", "float16"):
            return cast * BYTES[dtype] + kept * 4
        return (cast + kept) * BYTES[dtype]


def dit_params(t: dict[str, Any]) -> DitParams:
    """Parameters of ``WanTransformer3DModel(**t)`` (diffusers' Wan 2.1 text-to-video layout)."""
    for key in ("added_kv_proj_dim", "image_dim", "pos_embed_seq_len"):
        if t.get(key) is not None:
            raise ValueError(f"transformer.{key}={t[key]!r} is not counted by the memory plan: text-to-video only")
    if t.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"transformer.qk_norm={t['qk_norm']!r} is not counted: rms_norm_across_heads only")
    e = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    pt, ph, pw = (int(p) for p in t.get("patch_size", (1, 2, 2)))
    patch = pt * ph * pw
    c_in, c_out = int(t.get("in_channels", 16)), int(t.get("out_channels", 16))
    time_embedder = int(t.get("freq_dim", 256)) * e + e + e * e + e
    shared = (
        c_in * patch * e
        + e  # patch embedding (Conv3d)
        + time_embedder
        + e * 6 * e
        + 6 * e  # time projection
        + int(t["text_dim"]) * e
        + e
        + e * e
        + e  # text embedder
        + 2 * e  # head scale-shift table
        + e * c_out * patch
        + c_out * patch  # proj_out
    )
    attention = 4 * (e * e + e) + 2 * e  # q, k, v, out with bias; RMS norms of q and k across heads
    ffn = int(t["ffn_dim"])
    norm2 = 2 * e if t.get("cross_attn_norm", True) else 0
    block_fp32 = 6 * e + norm2  # scale-shift table, norm2 (affine)
    block = 2 * attention + e * ffn + ffn + ffn * e + e + block_fp32
    rope = 2 * int(t.get("rope_max_seq_len", 1024)) * int(t["attention_head_dim"])
    return DitParams(shared, time_embedder + 2 * e, block, block_fp32, int(t["num_layers"]), rope)


def umt5_params(c: dict[str, Any]) -> tuple[int, int]:
    """(parameters, of which kept in float32 at half precision) of ``UMT5EncoderModel(UMT5Config(**c))``."""
    d, inner = int(c["d_model"]), int(c["num_heads"]) * int(c["d_kv"])
    d_ff = int(c["d_ff"])
    gated = str(c.get("feed_forward_proj", "relu")).startswith("gated")
    attention = 4 * d * inner + int(c.get("relative_attention_num_buckets", 32)) * int(c["num_heads"]) + d
    wo = d_ff * d
    ff = (2 if gated else 1) * d * d_ff + wo + d
    layers = int(c["num_layers"])
    return int(c["vocab_size"]) * d + layers * (attention + ff) + d, layers * wo


@dataclass(frozen=True)
class VaeProfile:
    """What the decoder and the Wan VAE's encoder hold and make, in elements (dtype-free), for one latent size."""

    params: int  # the Wan VAE (encoder and decoder), and TAEHV's when it decodes
    dec_cache: int  # one session's decoder cache, steady state (after its first chunk)
    enc_cache: int  # one session's encoder cache (v2v), steady state
    dec_largest: int  # largest module output of one chunk's decode
    enc_largest: int  # largest module output of one chunk's encode


@functools.lru_cache(maxsize=8)
def _vae_profile(
    vae_items: tuple[tuple[str, Any], ...], latent: tuple[int, int], cf: int, ff: int, decoder: str
) -> VaeProfile:
    import torch

    from pipeline.models.loader import make_vae, streaming_codec

    vae_cfg: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae_items}
    with torch.device("meta"):
        vae = make_vae(vae_cfg)
        streaming: Any = streaming_codec(vae)
        params = sum(p.numel() for p in vae.parameters())
        if decoder == "taehv":
            from pipeline.models.taehv import StreamingTaehv, Taehv

            taehv = Taehv()
            streaming = StreamingTaehv(taehv, streaming)
            params += sum(p.numel() for p in taehv.parameters())
    largest = [0]

    def hook(module: Any, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel())

    modules = [*vae.modules(), *(streaming.taehv.modules() if decoder == "taehv" else ())]
    handles = [m.register_forward_hook(hook) for m in modules]
    z = int(vae_cfg.get("z_dim", 16))
    h, w = latent
    stream = streaming.new_stream()
    streaming.decode(stream, torch.zeros(1, z, ff, h, w, device="meta"))  # the first chunk
    largest[0] = 0
    streaming.decode(stream, torch.zeros(1, z, cf, h, w, device="meta"))  # the steady state
    dec_largest = largest[0]
    dec_cache = _elements(stream.past if decoder == "taehv" else stream.dec_cache)
    streaming.encode(stream, torch.zeros(1, 3, 1 + 4 * (ff - 1), 8 * h, 8 * w, device="meta"))
    largest[0] = 0
    streaming.encode(stream, torch.zeros(1, 3, 4 * cf, 8 * h, 8 * w, device="meta"))
    for handle in handles:
        handle.remove()
    return VaeProfile(params, dec_cache, _elements(stream.enc_cache), dec_largest, largest[0])


def _elements(cache: list[Any]) -> int:
    import torch

    return sum(e.numel() for e in cache if isinstance(e, torch.Tensor))


def vae_profile(config: SystemConfig) -> VaeProfile:
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.model.vae.items()))
    return _vae_profile(items, config.latent_size, config.chunk_frames, config.first_frames, config.decoder)


# ---- per-session and per-forward sizes --------------------------------------------------------------


def kv_copies(config: SystemConfig) -> int:
    """KV caches a session keeps per block: one (``stream``, ``clean``), one per step level (``per-step``)."""
    return config.steps if config.context == "per-step" else 1


def kv_frames(config: SystemConfig) -> int:
    """Latent-frame positions of one KV cache: sink, window and the frames in flight (pipeline/window.py);
    ``per-step``: sink and window (pipeline/perstep.py, ``StepCaches``)."""
    if config.context == "per-step":
        return config.sink_frames + config.window_frames
    return config.sink_frames + config.window_frames + (config.steps + 1) * config.chunk_frames


def heads_and_dim(config: SystemConfig) -> tuple[int, int]:
    if config.model.kind == "passthrough":
        from pipeline.models.passthrough import PassthroughDit

        return PassthroughDit.heads, PassthroughDit.head_dim
    t = config.model.transformer
    return int(t["num_attention_heads"]), int(t["attention_head_dim"])


def kv_bytes_per_session(config: SystemConfig, blocks: int) -> int:
    """Bytes of one session's KV windows over ``blocks`` blocks: K and V."""
    heads, dim = heads_and_dim(config)
    per_block = kv_frames(config) * config.tokens_per_frame * heads * dim
    return 2 * kv_copies(config) * blocks * per_block * BYTES[config.dtype]


def slots_per_tick(config: SystemConfig) -> int:
    """Slots of the largest tick: every session's chunks in flight and its σ=0 write (``clean``: one)."""
    return config.max_sessions * (1 if config.context == "clean" else config.steps + 1)


def dit_activation_bytes(config: SystemConfig) -> int:
    """Estimate of the largest forward's live tensors within one block, for B slots of L own tokens and
    Lc context tokens (E model dim, F ffn dim, Lt text tokens, H heads):

    B·L·(6E + 2F)  hidden states, norm, q, k, v, attention out, FFN hidden before and after GELU
    + 2·B·(Lc + L)·E  the gathered context keys and values
    + 3·B·Lt·E  text states and the cross-attention's keys and values
    + on a CPU, B·H·L·(Lc + L) attention weights (SDPA's math path; a GPU's kernels keep none).
    Blocks run one after another, so this does not grow with their number."""
    if config.model.kind == "passthrough":
        return 0
    t = config.model.transformer
    heads, dim = heads_and_dim(config)
    e, ffn = heads * dim, int(t["ffn_dim"])
    frames = max(config.first_frames, config.chunk_frames)
    own = frames * config.tokens_per_frame
    ctx = (config.sink_frames + config.window_frames) * config.tokens_per_frame
    b = slots_per_tick(config)
    n = b * own * (6 * e + 2 * ffn) + 2 * b * (ctx + own) * e + 3 * b * config.model.text_len * e
    if config.device == "cpu":
        n += b * heads * own * (ctx + own)
    return n * BYTES[config.dtype]


def side_dtype(config: SystemConfig, device: str) -> str:
    """The VAE's and text encoder's dtype on ``device`` (pipeline/models/loader.py)."""
    if config.dtype == "float64":
        return "float64"
    return "float32" if device == "cpu" else config.dtype


# ---- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    bytes: dict[str, int]  # device -> bytes
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    devices: tuple[str, ...]  # columns, in order
    rows: tuple[Row, ...]
    load_peak: dict[str, int]  # device -> bytes held while loading (every weight before a stage trims)
    capacity: dict[str, int | None] = field(default_factory=dict)  # device -> bytes available; None: unknown
    notes: tuple[str, ...] = ()

    def total(self, device: str) -> int:
        return sum(r.bytes.get(device, 0) for r in self.rows)

    def needed(self, device: str) -> int:
        return max(self.total(device), self.load_peak.get(device, 0))

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def short(self) -> list[str]:
        """Devices whose need exceeds what is available."""
        return [d for d in self.devices if (c := self.capacity.get(d)) is not None and self.needed(d) > c]

    def table(self) -> str:
        unit, scale = ("GiB", GIB) if max(self.needed(d) for d in self.devices) >= GIB else ("MiB", 1 << 20)

        def cells(values: list[int | None]) -> str:
            return "".join(f"{'unknown' if v is None else f'{v / scale:.2f}':>12}" for v in values)

        width = max(len(r.name) for r in self.rows) + 2
        lines = [f"{f'memory plan ({unit})':<{width}}" + "".join(f"{d:>12}" for d in self.devices)]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}" + cells([r.bytes.get(d, 0) for d in self.devices]) + f"   {r.note}")
        lines.append(f"{'total':<{width}}" + cells([self.total(d) for d in self.devices]))
        if any(self.load_peak.get(d, 0) > self.total(d) for d in self.devices):
            peak = cells([self.load_peak.get(d, 0) for d in self.devices])
            lines.append(
                f"{'load peak':<{width}}" + peak + "   every weight, before a stage frees the blocks of others"
            )
        avail = cells([self.capacity.get(d) for d in self.devices])
        lines.append(f"{'available':<{width}}" + avail)
        fits = "".join(f"{_verdict(self, d):>12}" for d in self.devices)
        lines.append(f"{'fits':<{width}}" + fits)
        return "\n".join(lines + [f"  {n}" for n in self.notes])

    def refusal(self) -> str:
        parts = []
        for d in self.short():
            biggest = sorted(self.rows, key=lambda r: -r.bytes.get(d, 0))[:3]
            top = ", ".join(f"{r.name} {_gib(r.bytes.get(d, 0))}" for r in biggest)
            cap = self.capacity[d]
            assert cap is not None
            parts.append(f"{d} needs {_gib(self.needed(d))} GiB, {_gib(cap)} GiB available (biggest: {top} GiB)")
        return "the memory plan does not fit: " + "; ".join(parts)

    def check(self) -> None:
        if self.short():
            raise MemoryPlanError(self.refusal())


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}" if n >= GIB // 10 else f"{n / GIB:.2g}"


def _verdict(plan: MemoryPlan, device: str) -> str:
    cap = plan.capacity.get(device)
    if cap is None:
        return "?"
    return "yes" if plan.needed(device) <= cap else "NO"


def stage_devices(config: SystemConfig, stages: int) -> list[str]:
    """Each stage's device, as pipeline.stages.transport.stage_device picks it: ``cuda`` is one GPU per
    stage (cuda:0, cuda:1, ...), any other device is every stage's."""
    if config.device == "cuda" and stages > 1:
        return [f"cuda:{r}" for r in range(stages)]
    return [config.device] * stages


def even_split(blocks: int, stages: int) -> list[int]:
    return [blocks // stages + (1 if r < blocks % stages else 0) for r in range(stages)]


def plan_memory(
    config: SystemConfig, stages: int = 1, split: list[int] | None = None, limit_gib: float | None = None
) -> MemoryPlan:
    """The plan for ``config`` over ``stages`` processes (``split``: blocks per stage; None: even, which the
    measured split differs from by a block or so), with each device's capacity (``limit_gib``: every
    device's, instead of asking it)."""
    preset = config.model
    passthrough = preset.kind == "passthrough"
    n_blocks = preset.num_layers
    sizes = split or even_split(n_blocks, stages)
    devices = stage_devices(config, stages)
    offloaded = config.text_device == "cpu"
    columns = list(dict.fromkeys([*devices, *(["cpu"] if offloaded else [])]))
    rows: dict[str, dict[str, int]] = {k: dict.fromkeys(columns, 0) for k in ROWS}
    peak = dict.fromkeys(columns, 0)
    dit = None if passthrough else dit_params(preset.transformer)
    vae = None if passthrough else vae_profile(config)
    text_n, text_fp32 = (0, 0) if passthrough else umt5_params(preset.text_encoder)
    s = config.max_sessions
    for rank, (dev, owned) in enumerate(zip(devices, sizes, strict=True)):
        tdev = "cpu" if offloaded else dev  # every stage process loads the text encoder, on its device
        text_bytes = _mixed(text_n, text_fp32, side_dtype(config, tdev))
        vdt = BYTES[side_dtype(config, dev)]
        vae_w = vae.params * vdt if vae else 0
        if dit is not None:
            rows["DiT weights"][dev] += dit.nbytes(config.dtype, owned)
            peak[dev] += dit.nbytes(config.dtype)
        rows["KV windows"][dev] += s * kv_bytes_per_session(config, owned)
        rows["DiT activations"][dev] = max(rows["DiT activations"][dev], dit_activation_bytes(config))
        rows["VAE weights"][dev] += vae_w
        peak[dev] += vae_w
        if rank == 0 and vae:
            rows["VAE encoder caches (v2v)"][dev] += s * vae.enc_cache * vdt
        if rank == stages - 1 and vae:
            rows["VAE decoder caches"][dev] += s * vae.dec_cache * vdt
            joined = s * vae.dec_cache if s > 1 else 0  # decode_many joins every session's cache (torch.cat)
            rows["decode activations"][dev] += (3 * s * vae.dec_largest + joined) * vdt
        rows["text encoder"][tdev] += text_bytes  # every stage process loads it
        peak[tdev] += text_bytes
    text_gpu = _mixed(text_n, text_fp32, config.dtype)
    text_cpu = _mixed(text_n, text_fp32, side_dtype(config, "cpu"))
    notes = _notes(config, dit, vae, (text_gpu, text_cpu), stages, sizes)
    capacity = {d: device_capacity(d, limit_gib) for d in columns}
    built = tuple(Row(name, rows[name], ROWS[name]) for name in ROWS)
    return MemoryPlan(tuple(columns), built, peak if stages > 1 else {}, capacity, notes)


ROWS = {
    "DiT weights": "parameters from the transformer config x dtype",
    "KV windows": "K,V x blocks x (sink+window+(T+1)chunk) frames x tokens x H x D, per session",
    "DiT activations": "estimate: the largest tick in one block",
    "VAE weights": "Wan VAE (or the demo's frame autoencoder), encoder and decoder (and TAEHV with decoder: taehv)",
    "VAE decoder caches": "causal cache per session (measured on the meta device)",
    "VAE encoder caches (v2v)": "v2v sessions only",
    "decode activations": "estimate: batched decode of every session",
    "text encoder": "UMT5 weights (or the demo's word table)",
}


def _mixed(n: int, fp32: int, dtype: str) -> int:
    if dtype in ("bfloat16", "float16"):
        return (n - fp32) * BYTES[dtype] + fp32 * 4
    return n * BYTES[dtype]


def _notes(
    config: SystemConfig,
    dit: DitParams | None,
    vae: VaeProfile | None,
    text_bytes: tuple[int, int],
    stages: int,
    sizes: list[int],
) -> tuple[str, ...]:
    notes = [
        f"{config.model.name} {config.width}x{config.height} {config.dtype}, {config.max_sessions} sessions, "
        f"context={config.context} (x{kv_copies(config)} KV), {config.steps} steps, {slots_per_tick(config)} "
        f"slots per tick, sink {config.sink_frames} + window {config.window_frames} frames, "
        f"{config.tokens_per_frame} tokens/frame, offload={config.offload}"
    ]
    if stages > 1:
        notes.append(f"{stages} stages, blocks {sizes}; every stage loads every component, then frees others' blocks")
    if dit is None or vae is None or config.device == "cpu":
        return tuple(notes)
    budget = config.frames_for_chunk(first=False) / config.fps
    dit_w, blocks_w = dit.nbytes(config.dtype), dit.nbytes(config.dtype) - dit.nbytes(config.dtype, 0)
    vae_w = vae.params * BYTES[side_dtype(config, config.device)]

    def ms(nbytes: int) -> str:
        return " / ".join(f"{nbytes / (gbps * 1e9) * 1e3:.0f} ms at {gbps:g} GB/s" for gbps in PCIE_GBPS.values())

    notes += [
        f"a tick is {budget * 1e3:.0f} ms of video; offload options and what each moves:",
        f"  text (built; text_encoder_device: cpu): the UMT5 on the CPU, {_gib(text_bytes[0])} GiB off the GPU, "
        f"{_gib(text_bytes[1])} GiB of host memory ({side_dtype(config, 'cpu')}); nothing moves per tick, a new prompt "
        f"costs a CPU encode and {config.model.text_len}x{config.model.text_encoder.get('d_model', 0)} values in",
        f"  swap (not built yet): DiT and VAE take turns on the GPU: {_gib(dit_w + vae_w)} GiB in per tick, "
        f"{ms(dit_w + vae_w)}",
        f"  layers (not built yet): blocks streamed from pinned host memory, two on the GPU: {_gib(blocks_w)} GiB "
        f"in per tick, {ms(blocks_w)} (can hide behind compute when it takes longer)",
    ]
    return tuple(notes)


# ---- capacity ---------------------------------------------------------------------------------------


def device_capacity(device: str, limit_gib: float | None = None) -> int | None:
    """Bytes available on ``device``: ``limit_gib`` if given, free memory on a GPU, MemAvailable on the
    CPU; None where it cannot be known here (a GPU on a machine without one)."""
    if limit_gib is not None:
        return int(limit_gib * GIB)
    if device == "cpu":
        return host_available()
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


MAX_MEMORY_GIB = 1e6


def check_limit(limit_gib: float | None) -> None:
    if limit_gib is not None and not within(limit_gib, 0, MAX_MEMORY_GIB, low_open=True):
        raise ValueError(f"--memory-limit={shown(limit_gib)} is not allowed: a number of GiB more than 0, at most 1e6")
