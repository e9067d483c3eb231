"""StreamDiffusionV2's own stream-batch loop, unmodified, on a CPU with a tiny random DiT.

    python -m bench.peers.sdv2.driver --steps 3 --save-ref bundle.pt   # record a reference bundle
    python -m bench.peers.sdv2.driver --steps 2,4 --iters 50           # ms per inference_stream call

What runs is theirs: ``CausalStreamInferencePipeline`` (``__init__``, ``prepare``, ``inference_stream``), their
``CausalWanDiffusionWrapper`` (flow prediction to x0, their ``FlowMatchScheduler``) and ``CausalWanModel``
(rolling KV cache, sink, adaptive sink), from the source :mod:`bench.peers.sdv2.source` fetched. What their
code would read from disk or a GPU is handed in while the pipeline is built, and only then:

- the Wan checkpoint: their wrapper builds our tiny ``CausalWanModel`` (seeded, with a non-zero head: their
  ``init_weights`` zeroes it, which would make every x0 equal its input);
- the UMT5 text encoder and the VAE: a fixed random text embedding, no VAE (only the DiT loop runs);
- the KV and cross-attention caches: their initialisers hard-code head_dim 128 and text length 512, so the
  caches are made by their own initialisers and then given the tiny model's shapes, before ``prepare`` (which
  makes them only when there are none).

Geometry (:class:`Geometry`) follows their v2v configuration ``wan_causal_dmd_v2v.yaml``: 128x128, a first
chunk of 2 latent frames and 1 after it, a KV cache of 6 frames with 3 sink frames, adaptive sink 0.2,
``t_refresh`` 50, ``current_step`` 700, their ``--step N`` rule for the timesteps. The loop around
``inference_stream`` is theirs too (``streamv2v/inference.py``: positions move one chunk per call and wrap
back at ``t_refresh``).

A bundle (``--save-ref``) holds what ``bench.parity`` replays: the weights in their names, the text
embedding, the inputs, every re-noise draw in call order and the chunk that leaves each call (README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
import yaml

from bench.peers.sdv2.source import STREAM_MODULE, peer_source

V2V_CONFIG = ("streamv2v/configs/wan_causal_dmd_v2v.yaml", "configs/wan_causal_dmd_v2v.yaml")  # wheel, repository


@dataclass(frozen=True)
class Geometry:
    """One peer run: their tiny ``CausalWanModel`` and their stream geometry (field names as in their config)."""

    steps: int = 2  # their --step: the first N non-zero timesteps of the config's list
    seed: int = 0  # weights (seed), inputs (seed + 1), text (seed + 2), re-noise (seed + 3)
    height: int = 128
    width: int = 128
    num_kv_cache: int = 6  # KV cache length in latent frames
    sink: int = 3  # their num_sink_tokens, in latent frames
    adapt_sink_thr: float = 0.2  # -1: the sink is never replaced
    first_chunk_frames: int = 2  # latent frames of the chunk given to prepare() (1 + 4 video frames)
    current_step: int = 700  # the timestep a chunk enters at
    t_refresh: int = 50  # frame position at which their loop wraps positions back
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 256
    text_dim: int = 32
    text_len: int = 512
    freq_dim: int = 256

    def model_kwargs(self) -> dict[str, Any]:
        """Every argument of their ``CausalWanModel``: 984,256 parameters at the defaults."""
        return {
            "model_type": "t2v",
            "patch_size": (1, 2, 2),
            "text_len": self.text_len,
            "in_dim": 16,
            "dim": self.heads * self.head_dim,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "text_dim": self.text_dim,
            "out_dim": 16,
            "num_heads": self.heads,
            "num_layers": self.layers,
            "window_size": (-1, -1),
            "qk_norm": True,
            "cross_attn_norm": True,
            "eps": 1e-6,
        }

    def latent(self, frames: int) -> tuple[int, ...]:
        """Their latent layout [B, F, C, h, w]."""
        return (1, frames, 16, self.height // 8, self.width // 8)


class Peer:
    """Their modules, imported from one source folder (and checked to come from it)."""

    def __init__(self, src: Path) -> None:
        self.src = src.resolve()
        if str(self.src) not in sys.path:
            sys.path.insert(0, str(self.src))
        sys.dont_write_bytecode = True  # leave their folder as it was unpacked
        warnings.filterwarnings("ignore", message="flash_attn is not installed")  # their CPU attention path
        self.stream = importlib.import_module("models.wan.causal_stream_inference")
        self.wrapper = importlib.import_module("models.wan.wan_wrapper")
        self.causal = importlib.import_module("models.wan.causal_model")
        where = Path(str(self.stream.__file__)).resolve()
        if where != self.src / STREAM_MODULE:
            raise RuntimeError(f"their stream module was imported from {where}, not from {self.src}")

    def config(self, g: Geometry) -> SimpleNamespace:
        """Their v2v config file, with what a CPU run sets, and their ``--step`` rule."""
        path = next((self.src / p for p in V2V_CONFIG if (self.src / p).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"none of {V2V_CONFIG} is in {self.src}")
        cfg = yaml.safe_load(path.read_text())
        timesteps = [*[int(t) for t in cfg["denoising_step_list"] if int(t) != 0][: g.steps], 0]
        cfg |= {
            "model_type": "T2V-1.3B",  # a name their code accepts; blocks and heads are the tiny model's
            "height": g.height,
            "width": g.width,
            "t2v": False,
            "use_taehv": False,
            "num_kv_cache": g.num_kv_cache,
            "num_sink_tokens": g.sink,
            "adapt_sink_threshold": g.adapt_sink_thr,
            "num_frame_per_block": 1,
            "denoising_step_list": timesteps,
        }
        return SimpleNamespace(**cfg)

    def tiny_model(self, g: Geometry) -> torch.nn.Module:
        torch.manual_seed(g.seed)
        model = self.causal.CausalWanModel(**g.model_kwargs())
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        return model


class _Text(torch.nn.Module):
    """Stands in for their UMT5 wrapper: the same embedding for every prompt."""

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds  # [1, text_len, text_dim]

    def forward(self, text_prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.embeds.expand(len(text_prompts), -1, -1).clone()}


class PeerStream:
    """Their pipeline for one geometry, and their loop around ``inference_stream``."""

    def __init__(self, peer: Peer, g: Geometry, dtype: torch.dtype = torch.float32) -> None:
        self.peer, self.g, self.dtype = peer, g, dtype
        self.prompt_embeds = torch.randn(1, g.text_len, g.text_dim, generator=_gen(g.seed + 2)).to(dtype)
        model = peer.tiny_model(g)
        from_files = SimpleNamespace(from_pretrained=lambda *_a, **_k: model)
        text = _Text(self.prompt_embeds)
        handed_in = {
            (peer.wrapper, "CausalWanModel"): from_files,
            (peer.wrapper, "WanModel"): from_files,
            (peer.stream, "get_text_encoder_wrapper"): lambda **_: lambda **_: text,
            (peer.stream, "get_vae_wrapper"): lambda **_: lambda **_: torch.nn.Module(),
        }
        with contextlib.ExitStack() as scope:  # only while their __init__ runs
            for (module, name), value in handed_in.items():
                scope.enter_context(mock.patch.object(module, name, value))
            pipe = peer.stream.CausalStreamInferencePipeline(peer.config(g), device="cpu")
        pipe.num_transformer_blocks, pipe.num_heads = g.layers, g.heads
        pipe.to(device="cpu", dtype=dtype)
        pipe.eval()
        self._caches(pipe)
        self.pipe = pipe
        self.fsl = pipe.frame_seq_length  # tokens per latent frame

    def _caches(self, pipe: Any) -> None:
        """Their own cache initialisers, then the tiny model's shapes (they hard-code 128 and 512)."""
        pipe._initialize_kv_cache(batch_size=1, dtype=self.dtype, device="cpu")
        pipe._initialize_crossattn_cache(batch_size=1, dtype=self.dtype, device="cpu")
        for cache in pipe.kv_cache1:
            cache["k"] = torch.zeros(1, pipe.kv_cache_length, self.g.heads, self.g.head_dim, dtype=self.dtype)
            cache["v"] = torch.zeros_like(cache["k"])
        for cache in pipe.crossattn_cache:
            cache["k"] = torch.zeros(1, self.g.text_len, self.g.heads, self.g.head_dim, dtype=self.dtype)
            cache["v"] = torch.zeros_like(cache["k"])

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.pipe.generator.model.parameters())

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.peer.config(self.g).denoising_step_list]

    def inputs(self, calls: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The first chunk (given to ``prepare``) and one chunk per stream call: latents [1, F, 16, h, w]."""
        g = _gen(self.g.seed + 1)
        first = torch.randn(self.g.latent(self.g.first_chunk_frames), generator=g).to(self.dtype)
        return first, [torch.randn(self.g.latent(1), generator=g).to(self.dtype) for _ in range(calls)]

    @torch.no_grad()
    def run(
        self, first: torch.Tensor, chunks: list[torch.Tensor], after: Callable[[int, float], None] | None = None
    ) -> list[torch.Tensor]:
        """``prepare`` on the first chunk, then one ``inference_stream`` per chunk, positions as their loop moves
        them; the chunk that leaves each call (the last slot). ``after(call, seconds)`` follows each call."""
        end = self.fsl * self.g.first_chunk_frames
        self.pipe.prepare(
            text_prompts=["tiny"], device="cpu", dtype=self.dtype, block_mode="input", noise=first,
            current_start=0, current_end=end, batch_denoise=True,
        )  # fmt: skip
        start = end
        out = []
        for k, chunk in enumerate(chunks):
            if start // self.fsl >= self.g.t_refresh:
                start = self.pipe.kv_cache_length - self.fsl
            t0 = time.perf_counter()
            slots = self.pipe.inference_stream(
                noise=chunk, current_start=start, current_end=start + self.fsl, current_step=self.g.current_step
            )
            seconds = time.perf_counter() - t0
            out.append(slots[[-1]].clone())
            if after is not None:
                after(k, seconds)
            start += self.fsl
        return out

    @contextlib.contextmanager
    def recording_renoise(self) -> Iterator[list[torch.Tensor]]:
        """Every noise tensor their loop passes to its scheduler's ``add_noise``, in call order."""
        scheduler = self.pipe.scheduler
        original = scheduler.add_noise
        draws: list[torch.Tensor] = []

        def add_noise(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            draws.append(noise.clone())
            return original(x, noise, t)

        scheduler.add_noise = add_noise
        try:
            yield draws
        finally:
            del scheduler.add_noise  # the instance attribute goes; the class's method shows again


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def record_bundle(g: Geometry, calls: int = 12, src: Path | None = None) -> dict[str, Any]:
    """A reference bundle of ``calls`` stream calls (the fields ``bench.parity`` reads)."""
    stream = PeerStream(Peer(src or peer_source()), g)
    first, chunks = stream.inputs(calls)
    torch.manual_seed(g.seed + 3)  # their re-noise draws come from the global generator
    with stream.recording_renoise() as draws:
        outputs = stream.run(first, chunks)
    return {
        "model_kwargs": g.model_kwargs(),
        "state_dict": stream.pipe.generator.model.state_dict(),
        "prompt_embeds": stream.prompt_embeds,
        "first_chunk": first,
        "chunks": chunks,
        "denoising_step_list": stream.timesteps,
        "current_step": g.current_step,
        "renoise_draws_in_order": draws,
        "stream_outputs_last_slot": outputs,
        "args": dataclasses.asdict(g),
    }


def time_calls(stream: PeerStream, warmup: int, iters: int, after: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each measured ``inference_stream`` call (``after()`` runs after every call, untimed)."""
    times: list[float] = []

    def each(k: int, seconds: float) -> None:
        if k >= warmup:
            times.append(seconds)
        if after is not None:
            after()

    torch.manual_seed(stream.g.seed)
    first, chunks = stream.inputs(warmup + iters)
    stream.run(first, chunks, each)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.sdv2.driver", description=__doc__.split("\n\n")[0])
    fields = {f.name: f for f in dataclasses.fields(Geometry)}
    for name, f in fields.items():
        if name != "steps":
            p.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--steps", default="2", help="comma list of step counts")
    p.add_argument("--save-ref", default="", help="record a bundle of --calls calls here ({steps}: one per count)")
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="timings: write them here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = [int(s) for s in a.steps.split(",") if s]
    geometries = [Geometry(**{k: getattr(a, k) for k in fields if k != "steps"}, steps=s) for s in steps]
    if a.save_ref:
        for g in geometries if "{steps}" in a.save_ref else geometries[:1]:
            path = a.save_ref.replace("{steps}", str(g.steps))
            torch.save(record_bundle(g, a.calls), path)
            print(f"bench.peers.sdv2.driver: saved a {g.steps}-step bundle of {a.calls} calls to {path}")
        return 0
    peer = Peer(peer_source())
    rows = []
    for g in geometries:
        stream = PeerStream(peer, g)
        ms = sorted(t * 1000 for t in time_calls(stream, a.warmup, a.iters))
        rows.append({"steps": g.steps, "median_ms_per_call": statistics.median(ms), "p10_ms": ms[len(ms) // 10]})
        print(json.dumps(rows[-1] | {"params": stream.params}))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "threads": a.threads}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
