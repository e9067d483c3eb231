"""Parity with StreamDiffusionV2: our engine, ``per-step`` rule, against a bundle recorded from their code.

    python -m bench.peers.sdv2.driver --steps 2 --save-ref bundle.pt      # record one from their code
    python -m bench.parity --bundle bundle.pt [--json out.json]

A bundle (``bench.peers.sdv2.driver --save-ref``; bench/peers/sdv2/README.md lists the fields) holds their
weights in the original Wan names, the text embedding, the first chunk and the following input
chunks, every re-noise draw in call order, and the finished chunk that left each stream call.

The bundle's weights go through the converter a user's checkpoint goes through
(:func:`pipeline.models.convert.wan_original_to_diffusers`) into our model; the engine runs with the
geometry the bundle's harness arguments give (sink, cache size, adaptive sink, RoPE refresh, first
chunk) and the ``table`` timestep rule of their scheduler (shift 8). Two things are fed in instead of
drawn: each chunk's input (their ``noise`` argument: the chunk enters as given at its first timestep)
and each re-noise draw (their ``add_noise`` calls, mapped to the (chunk, step) they were drawn for).

Their first T-1 stream calls return the zeros of their pipeline fill (our phantoms, never decoded);
every later call's output is one of our chunks, compared as latents. Exit 0 when the largest
absolute difference is within ``--tol`` (default 1e-4, float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from pipeline.commands import Demand, Open
from pipeline.config import build_system_config, load_model_preset
from pipeline.engine import Engine
from pipeline.feeder import Feeder
from pipeline.models.causal_wan import CausalWan
from pipeline.models.convert import wan_original_to_diffusers
from pipeline.models.loader import Models, cast, random_components
from pipeline.models.vae import StreamingVae
from pipeline.sampling import FlowSampler
from pipeline.stages.local import local_executor
from pipeline.types import Envelope, UserParams

SDV2_SHIFT = 8.0  # their WanDiffusionWrapper's FlowMatchScheduler(shift=8.0, sigma_min=0, extra_one_step=True)
DEFAULT_TOL = 1e-4


class GivenText:
    """Their text conditioning, used as given (no text encoder): [text_len, text_dim]."""

    def __init__(self, embeds: torch.Tensor) -> None:
        self.embeds = embeds

    def __call__(self, prompt: str) -> torch.Tensor:
        return self.embeds


def ours(t: torch.Tensor) -> torch.Tensor:
    """Their [F, C, h, w] latents (batch dropped) -> ours [C, F, h, w]."""
    return t.permute(1, 0, 2, 3).contiguous()


def load_bundle(path: str) -> dict[str, Any]:
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SystemExit(f"bench.parity: bundle {path!r} does not exist") from None
    fields = {"model_kwargs", "state_dict", "prompt_embeds", "first_chunk", "chunks", "denoising_step_list", "args"}
    missing = (fields | {"renoise_draws_in_order", "stream_outputs_last_slot"}) - set(bundle)
    if missing:
        raise SystemExit(f"bench.parity: {path!r} is not a bench.peers.sdv2.driver bundle (missing {sorted(missing)})")
    return bundle


def config_for(bundle: dict[str, Any], dtype: str) -> Any:
    a = bundle["args"]
    steps = [int(t) for t in bundle["denoising_step_list"] if int(t) != 0]
    if int(bundle.get("current_step", steps[0])) != steps[0]:
        raise SystemExit(
            f"bench.parity: current_step={bundle['current_step']} differs from the first timestep {steps[0]}; "
            "only bundles whose chunks enter at the first timestep are supported"
        )
    first = int(a.get("first_chunk_frames", 2))
    cfg = build_system_config(
        dict(
            model="tiny",
            height=int(a["height"]),
            width=int(a["width"]),
            dtype=dtype,
            chunk_frames=1,
            first_chunk_frames=first,
            context="per-step",
            sink_frames=int(a["sink"]),
            window_frames=int(a["num_kv_cache"]) - int(a["sink"]),
            adaptive_sink=float(a["adapt_sink_thr"]),
            rope_refresh=int(a["t_refresh"]),
            timestep_rule="table",
            shift=SDV2_SHIFT,
            timesteps=steps,
            max_sessions=1,
            decode_phase="inline",
        )
    )
    return cfg


def build_models(bundle: dict[str, Any], config: Any, source: str) -> Models:
    kwargs = bundle["model_kwargs"]
    tcfg, state = wan_original_to_diffusers(bundle["state_dict"], source, heads=int(kwargs["num_heads"]))
    transformer = WanTransformer3DModel(**tcfg)
    transformer.load_state_dict(state, strict=True)
    dtype = config.torch_dtype
    cast(transformer, torch.device("cpu"), dtype)
    preset = dataclasses.replace(
        load_model_preset("tiny"),
        name="sdv2-bundle",
        transformer=tcfg,
        text_len=int(kwargs["text_len"]),
        timesteps=config.timesteps,
        shift=SDV2_SHIFT,
    )
    _, vae, _ = random_components(load_model_preset("tiny"))  # decodes the latents; not compared
    cast(vae, torch.device("cpu"), torch.float32 if dtype != torch.float64 else dtype)
    text = GivenText(bundle["prompt_embeds"][0].to(dtype))
    return Models(
        preset=preset,
        dit=CausalWan(transformer),
        vae=StreamingVae(vae),
        text=text,  # type: ignore[arg-type]  # a TextEncoder's call: prompt -> [text_len, text_dim]
        source=source,
        sampler=FlowSampler(),
    )


def draws_by_key(bundle: dict[str, Any], steps: int) -> dict[tuple[int, int], torch.Tensor]:
    """Their re-noise draws in call order, keyed by the (our chunk index, step entered) they are for.

    prepare: steps 1..T-1 of the first chunk (our chunk 0). Stream call c (1-based): slot i = 0..T-2
    moves to step i+1; it holds our chunk c - i (chunks 1.. follow the first), or, where c - i < 1, the
    phantom that entered level i - c + 1 (our chunk index -(i - c + 1))."""
    draws = list(bundle["renoise_draws_in_order"])
    keyed: dict[tuple[int, int], torch.Tensor] = {}
    for step in range(1, steps):
        keyed[(0, step)] = ours(draws.pop(0))
    calls = len(bundle["chunks"])
    for c in range(1, calls + 1):
        for i in range(steps - 1):
            chunk = c - i if c - i >= 1 else -(i - c + 1)
            keyed[(chunk, i + 1)] = ours(draws.pop(0)[0])
    if draws:
        raise SystemExit(
            f"bench.parity: {len(draws)} re-noise draws left over: the bundle's schedule is not understood"
        )
    return keyed


def run(bundle_path: str, dtype: str = "float32") -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    config = config_for(bundle, dtype)
    models = build_models(bundle, config, bundle_path)
    steps = config.steps
    inputs = {0: ours(bundle["first_chunk"][0])} | {j + 1: ours(c[0]) for j, c in enumerate(bundle["chunks"])}
    draws = draws_by_key(bundle, steps)
    torch_dtype = config.torch_dtype

    def replay(env: Envelope, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        t = inputs[env.chunk_index] if step == 0 else draws[(env.chunk_index, step)]
        if tuple(t.shape) != shape:
            raise RuntimeError(f"chunk {env.chunk_index} step {step}: bundle tensor {tuple(t.shape)} != ours {shape}")
        return t.to(torch_dtype)

    engine = Engine(config, models, local_executor(config, models, keep_latents=True), noise=replay)
    calls = len(bundle["chunks"])
    sid = engine.apply(Open(UserParams(prompt="bundle"))).session_id
    # the first chunk, then those that leave within their calls (later ones never touch these: a chunk
    # reads only what earlier chunks wrote at its level)
    engine.apply(Demand(sid, 1 + calls - (steps - 1)))
    t0 = time.perf_counter()
    got: dict[int, torch.Tensor] = {c.envelope.chunk_index: c.latents for c in Feeder(engine).drain()}
    seconds = time.perf_counter() - t0
    engine.close()
    rows = []
    outputs = bundle["stream_outputs_last_slot"]
    for k, out in enumerate(outputs):
        ci = k + 2 - steps  # call k+1's last slot holds our chunk (k+1) - (T-1)
        if ci < 1:
            continue  # their pipeline fill: the zeros' output
        diff = (got[ci].double() - ours(out[0]).double()).abs().max().item()
        rows.append({"call": k + 1, "chunk": ci, "max_abs_diff": diff, "max_abs_value": out.abs().max().item()})
    worst = max(r["max_abs_diff"] for r in rows)
    return {
        "bundle": bundle_path,
        "args": {k: bundle["args"][k] for k in ("seed", "steps", "height", "width", "sink", "num_kv_cache")},
        "timesteps": list(config.timesteps),
        "sigmas": list(config.sigmas()),
        "dtype": dtype,
        "compared_chunks": len(rows),
        "skipped_fill_calls": steps - 1,
        "max_abs_diff": worst,
        "per_chunk": rows,
        "engine_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a bundle from python -m bench.peers.sdv2.driver --save-ref")
    p.add_argument("--json", default="", help="write the result here")
    p.add_argument(
        "--tol", type=float, default=DEFAULT_TOL, help=f"largest allowed abs difference (default {DEFAULT_TOL})"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.set_grad_enabled(False)
    result = run(a.bundle) | {"tol": a.tol}
    result["passed"] = result["max_abs_diff"] <= a.tol
    for r in result["per_chunk"]:
        print(f"call {r['call']:3d}  chunk {r['chunk']:3d}  max |ours - theirs| = {r['max_abs_diff']:.3e}")
    verdict = "PASS" if result["passed"] else "FAIL"
    print(
        f"{verdict}: {result['compared_chunks']} chunks, max abs difference {result['max_abs_diff']:.3e} "
        f"(tolerance {a.tol:g}, {result['dtype']}); "
        f"first {result['skipped_fill_calls']} call(s) are their pipeline fill"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
