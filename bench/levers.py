"""Each speed lever on and off, in one call: the table for issue 12's GPU targets.

    python -m bench.levers --config configs/wan2.1-1.3b.yaml --random-weights --json bench/results/levers-h200.json
    python -m bench.levers --config configs/tiny.yaml --json out.json          # the same table on a CPU

One session, StreamBatch, the config's decode phase. Cases, interleaved round by round on the same
weights (speed does not depend on their values):

- ``all levers, taehv, 2 steps``: the speed setting (the issue's 30 fps target is this row, end to end);
- each lever off in turn from it (``text_kv_cache``, ``rope_cache``), the attention backends installed;
- ``wan decoder``: the same with the full Wan VAE;
- ``quality``: 4 steps with the Wan VAE, the levers on;
- ``levers off``: 4 steps, Wan VAE, no levers (where the project stood before them).

Reported per case: frames/s end to end, DiT-only frames/s (frames per tick over the engine's own DiT
time), decode ms per call, and the DiT's MFU: its FLOPs per tick (counted from the shapes: the matmuls
and attention of every block, 2 FLOPs per multiply-add; text keys/values excluded when cached) over its
time, against ``--peak-tflops`` (default: 989 for an H100/H200 in bf16, dense; none on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from bench.engine import Case, machine, run_round
from pipeline.config import SystemConfig, load_system_config, replace
from pipeline.models.attention import BACKENDS, backend_installed
from pipeline.models.causal_wan import CausalWan
from pipeline.models.loader import Models, load_models

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    steps: int  # the first ``steps`` of the config's timesteps (fewer: evenly thinned)
    decoder: str  # "taehv" or "wan"
    text_kv_cache: bool = True
    rope_cache: bool = True
    attention: str = "sdpa"


def settings(backends: list[str]) -> list[Setting]:
    fast = Setting("all levers, taehv, 2 steps", 2, "taehv")
    out = [
        fast,
        dataclasses.replace(fast, name="text K/V cache off", text_kv_cache=False),
        dataclasses.replace(fast, name="RoPE cache off", rope_cache=False),
        *(dataclasses.replace(fast, name=f"attention {b}", attention=b) for b in backends if b != "sdpa"),
        dataclasses.replace(fast, name="wan decoder, 2 steps", decoder="wan"),
        Setting("quality: wan decoder, 4 steps", 4, "wan"),
        Setting("levers off: wan decoder, 4 steps", 4, "wan", text_kv_cache=False, rope_cache=False),
    ]
    return out


def thinned(timesteps: tuple[float, ...], steps: int) -> list[float]:
    if steps >= len(timesteps):
        return list(timesteps)
    return [timesteps[round(i * len(timesteps) / steps)] for i in range(steps)]


def dit_flops_per_slot(config: SystemConfig, text_cached: bool) -> float:
    """Matmul and attention FLOPs of one slot's forward at a full window (2 per multiply-add)."""
    t = config.model.transformer
    e = t["num_attention_heads"] * t["attention_head_dim"]
    ffn, blocks = t["ffn_dim"], t["num_layers"]
    own = config.tokens_per_frame * config.chunk_frames
    context = config.tokens_per_frame * (config.sink_frames + config.window_frames)
    lt = config.model.text_len
    per_block = (
        4 * own * e * e  # q, k, v, o of self-attention
        + 2 * own * (context + own) * e  # scores and values
        + 2 * own * e * e  # q, o of cross-attention
        + (0 if text_cached else 2 * lt * e * e)  # the text's k, v
        + 2 * own * lt * e  # cross-attention scores and values
        + 2 * own * e * ffn  # the FFN's two matmuls
    )
    return 2.0 * blocks * per_block


def engine_models(models: Models, s: Setting, decoders: dict[str, Any]) -> Models:
    dit = models.dit
    assert isinstance(dit, CausalWan)
    fresh = CausalWan(dit.transformer, s.attention, s.text_kv_cache, s.rope_cache)  # installs its processors
    return dataclasses.replace(models, dit=fresh, vae=decoders[s.decoder])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/wan2.1-1.3b.yaml")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--ticks", type=int, default=12, help="measured ticks per case and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: known GPUs)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    base = replace(load_system_config(a.config), max_sessions=1)
    models = {d: load_models(replace(base, decoder=d), random_weights=a.random_weights) for d in ("wan", "taehv")}
    shared = models["wan"]  # one transformer and text encoder; the decoders of both
    decoders = {d: m.vae for d, m in models.items()}
    peak = a.peak_tflops
    gpu = torch.cuda.get_device_name(0) if shared.dit.device.type == "cuda" else ""
    if peak is None:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    decode = "thread" if base.threaded_decode else "inline"
    cases = [(s, Case("streambatch", 1, decode)) for s in settings([b for b in BACKENDS if backend_installed(b)])]
    print(f"bench.levers: {base.model.name} {base.width}x{base.height} {base.dtype} on {base.device}", file=sys.stderr)
    for round_ in range(a.rounds):
        for s, case in cases:
            config = replace(base, timesteps=thinned(base.timesteps, s.steps), decoder=s.decoder, attention=s.attention)
            # until the windows are full: the steady state's shapes
            warmup = (config.sink_frames + config.window_frames) // config.chunk_frames + config.steps + 2
            run_round(case, engine_models(shared, s, decoders), config, warmup, a.ticks)
            print(f"  round {round_ + 1}/{a.rounds} {s.name}: done", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for s, case in cases:
        summary = case.summary()
        frames_per_tick = case.frames / case.ticks
        dit_s = summary["dit_ms_per_tick"] / 1000
        flops = dit_flops_per_slot(base, s.text_kv_cache) * summary["slots_per_tick"]
        rows.append(
            {
                "case": s.name,
                "setting": dataclasses.asdict(s),
                "fps": summary["fps"],
                "dit_fps": frames_per_tick / dit_s,
                "dit_ms_per_tick": summary["dit_ms_per_tick"],
                "decode_ms_per_call": summary["decode_ms_per_call_median"],
                "dit_tflops": flops / dit_s / 1e12,
                "mfu": flops / dit_s / (peak * 1e12) if peak else None,
                "slots_per_tick": summary["slots_per_tick"],
            }
        )
    print(f"{'case':<36}{'fps':>8}{'DiT fps':>9}{'DiT ms':>8}{'decode ms':>10}{'TFLOPS':>8}{'MFU':>7}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['case']:<36}{r['fps']:>8.1f}{r['dit_fps']:>9.1f}{r['dit_ms_per_tick']:>8.1f}"
            f"{r['decode_ms_per_call']:>10.1f}{r['dit_tflops']:>8.2f}{mfu:>7}"
        )
    if a.json:
        report = {
            "rows": rows,
            "config": base.summary(),
            "peak_tflops": peak,
            "machine": machine(),
            "command": " ".join(["python -m bench.levers", *(argv if argv is not None else sys.argv[1:])]),
        }
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
