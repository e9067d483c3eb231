"""Decoder benchmark: the full-size Wan VAE against the tiny decoder (TAEHV), time per decoded frame.

    python -m bench.decoders --json bench/results/decoders-cpu.json

Both at their real sizes with seeded random weights (speed does not depend on values): the Wan VAE of
the ``wan2.1-1.3b`` preset and TAEHV as ``taew2_1.pth`` is built. Each decodes one stream chunk by chunk,
as the engine's decode phase does (a first chunk of one latent frame, then ``--chunk-frames`` latent
frames a chunk, 4 frames each, the causal memory kept), on the CPU at 128x128 and 256x256 and, with CUDA,
at 480x832 on the GPU too. The two decoders alternate chunk by chunk, so a shared machine slows them
alike; the first ``--warmup`` chunks are not timed. Reported per size: the median seconds per chunk and
milliseconds per frame of each, and the ratio Wan / TAEHV.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan

from bench.soak.report import cpu_model
from pipeline.config import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR, load_model_preset
from pipeline.models.loader import cast
from pipeline.models.taehv import StreamingTaehv, random_taehv
from pipeline.models.vae import StreamingVae

CPU_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (256, 256))
GPU_SIZES: tuple[tuple[int, int], ...] = ((480, 832),)


def decoders(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """name -> an object with new_stream() and decode(stream, latents), full size, seeded random weights."""
    preset = load_model_preset("wan2.1-1.3b")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        vae = AutoencoderKLWan(**preset.vae)
    cast(vae, device, dtype)
    wan = StreamingVae(vae)
    taehv = random_taehv(preset.seed).to(device=device, dtype=dtype)
    return {"wan": wan, "taehv": StreamingTaehv(taehv, wan)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    models: dict[str, Any], size: tuple[int, int], chunks: int, warmup: int, chunk_frames: int, device: torch.device
) -> dict[str, Any]:
    h, w = size[0] // VAE_SPATIAL_FACTOR, size[1] // VAE_SPATIAL_FACTOR
    dtype = next(iter(models.values())).vae.dtype
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 16, 1 if i == 0 else chunk_frames, h, w, generator=g) for i in range(warmup + chunks)]
    streams = {name: m.new_stream() for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i, x in enumerate(latents):
        x = x.to(device=device, dtype=dtype)
        for name, m in models.items():  # alternate: a shared machine slows both alike
            sync(device)
            t0 = time.perf_counter()
            frames = m.decode(streams[name], x)
            sync(device)
            dt = time.perf_counter() - t0
            want = 1 + VAE_TEMPORAL_FACTOR * (x.shape[2] - 1) if i == 0 else VAE_TEMPORAL_FACTOR * x.shape[2]
            assert frames.shape == (1, 3, want, *size), (name, tuple(frames.shape))
            if i >= warmup:
                times[name].append(dt)
    frames_per_chunk = VAE_TEMPORAL_FACTOR * chunk_frames
    out: dict[str, Any] = {"height": size[0], "width": size[1], "frames_per_chunk": frames_per_chunk}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"s_per_chunk": ts, "median_s_per_chunk": med, "ms_per_frame": 1000 * med / frames_per_chunk}
    out["wan_over_taehv"] = out["wan"]["median_s_per_chunk"] / out["taehv"]["median_s_per_chunk"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks per size (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="chunks not timed, the first one included (default 2)")
    parser.add_argument("--chunk-frames", type=int, default=1, help="latent frames per chunk (default 1: 4 frames)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.chunks < 1 or args.warmup < 1 or args.chunk_frames < 1:
        parser.error("--chunks, --warmup and --chunk-frames must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(torch.device("cpu"), torch.float32, CPU_SIZES)]
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), torch.bfloat16, GPU_SIZES))
    report: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model() or "unknown",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
        },
        "args": vars(args),
        "results": [],
    }
    print(f"{'device':6} {'size':>8} {'wan ms/frame':>13} {'taehv ms/frame':>15} {'wan/taehv':>10}")
    with torch.no_grad():
        for device, dtype, sizes in runs:
            models = decoders(device, dtype)
            for size in sizes:
                r = measure(models, size, args.chunks, args.warmup, args.chunk_frames, device)
                r |= {"device": device.type, "dtype": str(dtype).removeprefix("torch.")}
                report["results"].append(r)
                print(
                    f"{device.type:6} {size[0]:>4}x{size[1]:<4} {r['wan']['ms_per_frame']:>13.1f} "
                    f"{r['taehv']['ms_per_frame']:>15.1f} {r['wan_over_taehv']:>9.1f}x",
                    flush=True,
                )
            del models
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
