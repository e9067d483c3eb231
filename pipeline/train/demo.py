"""Train the embedded ``demo`` model on procedurally generated shapes (pipeline/shapes.py).

    python -m pipeline.train.demo --minutes 40 --out runs/demo            # train; resumes if runs/demo has a checkpoint
    python -m pipeline.train.demo --minutes 40 --out runs/demo --export models/demo   # and write the shipped folder

Three phases, each a pure function of ``--seed`` and its own step count:

1. **Frame autoencoder** (``--ae-steps``): 4 frames <-> one 16-channel latent frame (pipeline/models/frame_ae.py),
   L1 + L2 reconstruction on 64x64 crops of fresh 128x128 clips, with noise on the latents so the decoder
   forgives a denoiser's small errors. Then the latents' per-channel mean and std are measured and kept in its config.
2. **A pool of latent sequences** (``--pool``): clips rendered and encoded once, each 8 latent frames as the
   ``stream`` window shows them (a sink frame, then 7 in a row); some start an epoch, some are a rolled window
   whose sink is the clip's first frame from long before, some change scene (and caption) part way.
3. **The causal DiT and its text encoder** (until ``--minutes`` are spent, or ``--steps``): flow matching at the
   preset's 4 noise levels, one forward over a sequence (``CausalWan.forward_frames``) laid out for the context
   rule trained for. ``clean`` (the default, the shipped weights'): teacher forcing, every noisy frame seeing the
   clean frames before it. ``stream``: each frame noised to the level the ``stream`` rule shows it at (DESIGN §4:
   chunk j at step i sees chunk j-d as written by its step min(i+d-1, W)) under a frame-causal mask. The loss is
   on every noisy frame, against what the preset says its DiT predicts (``prediction``: x0 for the demo, or the
   velocity). So chunk-by-chunk sampling with the preset's 4 steps is what it was trained for.

Shown while it runs: a progress bar (loss, steps/s), ``loss.png`` and sample grids (``samples/step-N.png``: four
prompts streamed by the real engine from the weights as they are). ``checkpoint.pt`` in ``--out`` holds everything
to resume (models, optimiser, EMA, step, losses, time spent); the learning rate does not depend on the budget, so
the same seed gives the same loss curve however many minutes it runs, only longer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import UMT5EncoderModel

from pipeline.config import CONFIG_DIR, ModelPreset, load_model_preset, load_system_config
from pipeline.models.causal_wan import CausalWan
from pipeline.models.frame_ae import FrameAutoencoder, to_groups
from pipeline.models.loader import random_components
from pipeline.models.text import WordTokenizer
from pipeline.sampling import prediction_target, sigmas_from_timesteps
from pipeline.shapes import Scene, caption, random_scene, render, trajectories, vocabulary

PRESET = "demo"
SIZE = 128  # training frames, the preset's default size
SEQ = 8  # latent frames per training sequence: sink + window (6) + the newest
AE_CROP = 64
START_SHARE = 0.35  # of pool sequences: an epoch's start (frames 0..28 in a row)
SWITCH_SHARE = 0.1  # of pool sequences: the scene and caption change at a latent frame
MAX_ROLL = 60  # a rolled window starts up to this many latent frames into the clip


@dataclass
class Options:
    out: Path
    minutes: float
    seed: int = 0
    ae_steps: int = 2000
    ae_batch: int = 32
    pool: int = 3072
    steps: int | None = None  # DiT steps; None: until the minutes are spent
    batch: int = 8
    context: str = "clean"  # the visibility rule trained for: "clean" (teacher forcing) or "stream" (a staircase)
    first_weight: float = 1.0  # the loss weight of an epoch's first chunk (no context: the hardest to draw)
    first_batch: int = 0  # epoch-start frames alone added to every step's loss (0: none)
    any_sigma: bool = False  # clean: noise levels drawn from all of (0, 1] (any step count samples), not the preset's
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.995
    sample_every_s: float = 300.0
    export: Path | None = None
    threads: int | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    command: str = ""  # the command line, recorded with the exported weights
    final_samples: bool = True  # a sample grid of the weights as they end


def _generator(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, *salt])


# ---- phase 1: the frame autoencoder ------------------------------------------------------------------------


def ae_batch(rng: np.random.Generator, batch: int) -> torch.Tensor:
    """Groups of 4 frames as the codec sees them ([B, 12, crop, crop]): a quarter are a stream's first frame
    repeated 4 times, the rest 4 frames in a row; cropped from 128x128 renders at multiples of 8."""
    scenes = [random_scene(rng) for _ in range(batch)]
    starts = rng.integers(0, 400, size=batch)
    groups = []
    for scene, start in zip(scenes, starts, strict=True):
        first = rng.random() < 0.25
        video = render([scene], 1 if first else 4, SIZE, SIZE, start=int(start))
        g = to_groups(video, first)
        # most crops hold an object: around one object's centre, jittered (objects are a small part of a frame)
        centre = trajectories([scene], 1, int(start))[0, int(rng.integers(0, len(scene.objects))), 0] * SIZE
        y, x = (
            int(np.clip(round((float(c) - AE_CROP / 2 + rng.normal(0, 12)) / 8), 0, (SIZE - AE_CROP) // 8)) * 8
            for c in (centre[1], centre[0])
        )
        groups.append(g[:, :, y : y + AE_CROP, x : x + AE_CROP])
    return torch.cat(groups)


def ae_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2, pixels unlike their crop's background (its per-channel median) weighted 5x: objects are what counts."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    weight = 1 + 4 * ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    err = (y - x).abs()
    return ((err + err.square()) * weight).mean() / weight.mean()


def train_ae(ae: FrameAutoencoder, opts: Options, state: dict[str, Any], bar: tqdm) -> None:
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    if "ae_opt" in state:
        opt.load_state_dict(state["ae_opt"])
    losses: list[float] = state.setdefault("ae_losses", [])
    ae.train()
    for step in range(len(losses), opts.ae_steps):
        rng = _generator(opts.seed, 1, step)
        x = ae_batch(rng, opts.ae_batch).to(opts.device)
        torch.manual_seed(opts.seed * 1_000_003 + step)
        z = ae.encode_raw(x)
        z = z + 0.05 * z.detach().std() * torch.randn_like(z)  # the decoder forgives small latent errors
        loss = ae_loss(ae.decode_raw(z), x)
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / opts.ae_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix_str(f"autoencoder loss {loss.item():.4f}")
    state["ae_opt"] = opt.state_dict()
    ae.eval()
    with torch.no_grad():  # the latents' statistics, for the DiT's unit-scale inputs (as Wan's VAE config holds)
        z = torch.cat(
            [ae.encode_raw(ae_batch(_generator(opts.seed, 2, i), opts.ae_batch).to(opts.device)) for i in range(8)]
        )
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    ae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    ae.mean.copy_(mean.view(ae.mean.shape))
    ae.std.copy_(std.view(ae.std.shape))


# ---- phase 2: the pool of latent sequences -----------------------------------------------------------------


def sequence_video(rng: np.random.Generator) -> tuple[torch.Tensor, str, int]:
    """One training sequence as video ([1, 3, 1 + 4·(SEQ-1), H, W]: a first frame, then SEQ-1 groups of 4), the
    caption of its newest frames, and the first latent frame a loss may be taken on (its context is one the
    engine shows: an epoch's start from 0; a rolled window from 2, where the window's own frames are there; a
    scene change from the change on, where the caption is the new scene's)."""
    scene = random_scene(rng, layout="canonical")
    first_loss = 0
    if rng.random() < START_SHARE:
        video = render([scene], 1 + 4 * (SEQ - 1), SIZE, SIZE)
    else:  # a rolled window: the sink is the clip's first frame, the window 7 groups from far later
        start = 1 + 4 * int(rng.integers(SEQ - 1, MAX_ROLL))
        video = torch.cat([render([scene], 1, SIZE, SIZE), render([scene], 4 * (SEQ - 1), SIZE, SIZE, start)], 2)
        first_loss = 2
    if rng.random() < SWITCH_SHARE:  # a new scene from latent frame `at` on, with its caption
        other: Scene = random_scene(rng, layout="canonical")
        at = int(rng.integers(2, SEQ))
        later = render([other], 4 * (SEQ - at), SIZE, SIZE)  # from its first frame: a cut to the new scene
        video = torch.cat([video[:, :, : 1 + 4 * (at - 1)], later], dim=2)
        scene, first_loss = other, at
    return video, caption(scene), first_loss


@torch.no_grad()
def make_pool(ae: FrameAutoencoder, opts: Options, bar: tqdm) -> dict[str, Any]:
    latents, captions, first_loss = [], [], []
    for i in range(opts.pool):
        video, text, first = sequence_video(_generator(opts.seed, 3, i))
        z = ae.encode(to_groups(video, first=True).to(opts.device))  # [SEQ, z, h, w]
        latents.append(z.transpose(0, 1).half().cpu())  # [z, SEQ, h, w]
        captions.append(text)
        first_loss.append(first)
        bar.update(1)
    return {"latents": torch.stack(latents), "captions": captions, "first_loss": torch.tensor(first_loss)}


# ---- phase 3: the DiT -----------------------------------------------------------------------------------


def staircase(head: int, step: int, steps: int) -> list[int]:
    """Step level of each frame 0..SEQ-1 of a sequence whose newest frame ``head`` is a slot at ``step``, as the
    ``stream`` rule shows them (DESIGN §4): frame head-d was written by its step min(step + d - 1, steps) for
    d >= 1 (``steps`` = clean, the σ=0 write); the head itself is at ``step``; frames after it: clean (unseen)."""
    return [step if p == head else min(step + head - p - 1, steps) if p < head else steps for p in range(SEQ)]


def teacher_forcing(frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``clean`` rule for a whole sequence in one forward: frames 0..F-1 clean, then the same frames noised.
    A clean frame sees the clean frames up to itself (its σ=0 write); a noisy frame sees the clean frames before
    it and itself, as a chunk at any step does under ``clean``. -> frame positions [2F], visibility [2F, 2F]."""
    causal = torch.ones(frames, frames, dtype=torch.bool).tril()
    visible = torch.cat(
        [
            torch.cat([causal, torch.zeros(frames, frames, dtype=torch.bool)], dim=1),
            torch.cat([causal.tril(-1), torch.eye(frames, dtype=torch.bool)], dim=1),
        ]
    )
    return torch.arange(frames).repeat(2), visible


def text_states(encoder: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """As :class:`pipeline.models.text.TextEncoder` makes them: positions past the prompt's tokens are zero."""
    states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return states * mask.unsqueeze(-1).to(states.dtype)


@dataclass
class DitBatch:
    x: torch.Tensor  # [B, C, F, h, w] the model's input: F = SEQ (stream) or 2·SEQ (clean: clean, then noised)
    time: torch.Tensor  # [B, F] the model's time input (1000·σ)
    target: torch.Tensor  # [B, C, F, h, w] what the model predicts: velocity ε - x0, or x0 (the preset's prediction)
    weight: torch.Tensor  # [B, F] 1 where the loss counts
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor | None = None  # [F] RoPE frame positions (None: 0..F-1)
    visible: torch.Tensor | None = None  # [F, F] (None: frame-causal)


def caption_tokens(
    pool: dict[str, Any], tok: WordTokenizer, text_len: int, pick: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, text_len] of the picked pool items' captions."""
    encoded = [tok.encode(pool["captions"][int(i)], text_len) for i in pick]
    return torch.tensor([e[0] for e in encoded]), torch.tensor([e[1] for e in encoded])


def dit_batch(
    pool: dict[str, Any],
    tok: WordTokenizer,
    text_len: int,
    sigmas: list[float],
    rng: np.random.Generator,
    batch: int,
    context: str = "clean",
    first_weight: float = 1.0,
    shift: float | None = None,
    prediction: str = "velocity",
) -> DitBatch:
    """A batch for the ``context`` rule. ``clean``: every frame from the item's first loss frame on is noised to
    one of the preset's σ and sees the clean frames before it (teacher forcing). ``stream``: a staircase of levels
    (:func:`staircase`) below a head frame; the loss on its noisy frames."""
    n = len(pool["captions"])
    pick = torch.from_numpy(rng.integers(0, n, size=batch))
    x0 = pool["latents"][pick].float()  # [B, C, SEQ, h, w]
    first = pool["first_loss"][pick]  # [B]
    steps = len(sigmas)
    table = torch.tensor([*sigmas, 0.0])
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    eps = torch.randn(x0.shape, generator=g)
    ctx = x0 + 0.03 * torch.rand(batch, 1, SEQ, 1, 1, generator=g) * torch.randn(x0.shape, generator=g)
    target = prediction_target(x0, eps, prediction)
    ids, mask = caption_tokens(pool, tok, text_len, pick)
    later = (torch.arange(SEQ).view(1, SEQ) >= first.view(batch, 1)).float()  # [B, SEQ]
    later[:, 0] *= torch.where(first == 0, first_weight, 1.0)  # an epoch's first chunk: no context, the hardest
    if context == "clean":
        if shift is None:  # the preset's σ only
            sigma = table[torch.from_numpy(rng.integers(0, steps, size=(batch, SEQ)))]  # [B, SEQ]
        else:  # any σ: t uniform in (0, 1], shifted as the sampler's timesteps are; a tenth pure noise (σ = 1)
            t = torch.from_numpy(1.0 - rng.random((batch, SEQ))).float()
            t = torch.where(torch.from_numpy(rng.random((batch, SEQ)) < 0.1), 1.0, t)
            sigma = shift * t / (1 + (shift - 1) * t)
        s = sigma.view(batch, 1, SEQ, 1, 1)
        noisy = (1 - s) * x0 + s * eps
        positions, visible = teacher_forcing(SEQ)
        zero = torch.zeros(batch, SEQ)
        return DitBatch(
            torch.cat([ctx, noisy], dim=2),
            torch.cat([zero, sigma * 1000.0], dim=1),
            torch.cat([torch.zeros_like(x0), target], dim=2),
            torch.cat([zero, later], dim=1),
            ids,
            mask,
            positions,
            visible,
        )
    levels = []
    for i in range(batch):
        head = SEQ - 1 if rng.random() < 0.75 else int(rng.integers(int(first[i]), SEQ))
        levels.append(staircase(head, int(rng.integers(0, steps)), steps))
    sigma = table[torch.tensor(levels)]  # [B, SEQ]
    s = sigma.view(batch, 1, SEQ, 1, 1)
    x = torch.where(s > 0, (1 - s) * x0 + s * eps, ctx)
    return DitBatch(x, sigma * 1000.0, target, (sigma > 0).float() * later, ids, mask)


def first_batch(
    pool: dict[str, Any],
    tok: WordTokenizer,
    text_len: int,
    sigmas: list[float],
    rng: np.random.Generator,
    batch: int,
    prediction: str = "velocity",
) -> DitBatch:
    """Epoch-start frames alone (no context), ``batch`` of them: each is one latent frame of 64 tokens, cheap
    next to a sequence, and the frame a stream's every later chunk continues from."""
    starts = torch.nonzero(pool["first_loss"] == 0).flatten()
    pick = starts[torch.from_numpy(rng.integers(0, len(starts), size=batch))]
    x0 = pool["latents"][pick][:, :, :1].float()  # [B, C, 1, h, w]
    sigma = torch.tensor(sigmas)[torch.from_numpy(rng.integers(0, len(sigmas), size=(batch, 1)))]  # [B, 1]
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    eps = torch.randn(x0.shape, generator=g)
    s = sigma.view(batch, 1, 1, 1, 1)
    ids, mask = caption_tokens(pool, tok, text_len, pick)
    target = prediction_target(x0, eps, prediction)
    return DitBatch((1 - s) * x0 + s * eps, sigma * 1000.0, target, torch.ones(batch, 1), ids, mask)


def loss_of(dit: CausalWan, text: UMT5EncoderModel, b: DitBatch) -> torch.Tensor:
    d = dit.device
    v = dit.forward_frames(
        b.x.to(d), b.time.to(d), text_states(text, b.ids.to(d), b.mask.to(d)), b.positions, b.visible
    )
    per_frame = (v - b.target.to(d)).square().mean(dim=(1, 3, 4))  # [B, F]
    weight = b.weight.to(d)
    return (per_frame * weight).sum() / weight.sum()


# ---- the run ----------------------------------------------------------------------------------------------


def build(preset: ModelPreset, seed: int) -> tuple[CausalWan, FrameAutoencoder, UMT5EncoderModel]:
    transformer, vae, text = random_components(dataclasses.replace(preset, seed=seed))
    assert isinstance(vae, FrameAutoencoder)
    for m in (transformer, vae, text):
        m.float()
    return CausalWan(transformer, text_kv_cache=False), vae, text


def from_scratch(opts: Options, steps: int, minutes: float) -> str:
    """One command that makes the same weights from nothing: every step is a function of the seed and the step's
    number, and a resumed run equals an uninterrupted one, so the options that shape the steps and the step count
    are all it needs (``--minutes`` does not bound a run given ``--steps``)."""
    default = Options(out=opts.out, minutes=opts.minutes)
    flags = [f"--minutes {math.ceil(minutes)}", f"--steps {steps}"]
    for name in ("seed", "ae_steps", "pool", "batch", "context", "first_weight", "first_batch", "lr"):
        if getattr(opts, name) != getattr(default, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(opts, name)}")
    if opts.any_sigma:
        flags.append("--any-sigma")
    return f"python -m pipeline.train.demo {' '.join(flags)} --out runs/demo --export models/demo"


def export(folder: Path, dit: CausalWan, ae: FrameAutoencoder, text: UMT5EncoderModel, meta: dict[str, Any]) -> None:
    """The shipped layout (diffusers' Wan layout, half-precision safetensors), read by the normal loader."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(dit.transformer).half().save_pretrained(tmp / "transformer")
    copy.deepcopy(ae).half().save_pretrained(tmp / "vae")
    copy.deepcopy(text).half().save_pretrained(tmp / "text_encoder")
    WordTokenizer(vocabulary()).save_pretrained(tmp / "tokenizer")
    (tmp / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    commands = "\n".join(meta.get("commands") or ["(not recorded)"])
    (tmp / "README.md").write_text(
        "# The demo model's weights\n\n"
        "Trained by this project on procedurally generated shapes (pipeline/shapes.py); the folder is in\n"
        "diffusers' Wan layout and loads with `--config configs/demo.yaml` (the preset's default source).\n\n"
        f"Made by (from the repository root):\n\n```sh\n{commands}\n```\n\n"
        f"{meta['ae_steps']} autoencoder steps, {meta['dit_steps']} DiT steps (batch {meta['batch']}), "
        f"{meta['minutes']} minutes in all on {meta['device']}; seed {meta['seed']}. Half-precision safetensors.\n\n"
        "The same weights from scratch, in one command (every step is a function of the seed and the step's number;\n"
        f"a resumed run equals an uninterrupted one):\n\n```sh\n{meta['from_scratch']}\n```\n"
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def sample_grid(folder: Path, path: Path, prompts: list[str], chunks: int = 8) -> None:
    """Stream each prompt through the real engine from the exported ``folder``: a grid, one row per prompt."""
    from PIL import Image

    from pipeline.commands import Demand, Open
    from pipeline.engine import Engine
    from pipeline.feeder import Feeder
    from pipeline.models.loader import load_models
    from pipeline.types import UserParams

    config = load_system_config(CONFIG_DIR / "demo.yaml", model_source=str(folder))
    engine = Engine(config, load_models(config))
    rows: dict[str, list[np.ndarray]] = {}
    try:
        ids = {}
        for i, p in enumerate(prompts):
            ids[engine.apply(Open(UserParams(prompt=p, seed=i))).session_id] = p
        for sid in ids:
            engine.apply(Demand(sid, chunks))
        for c in Feeder(engine).drain():
            rows.setdefault(c.envelope.session_id, []).append(c.frames[-1])
    finally:
        engine.close()
    grid = np.concatenate([np.concatenate(rows[sid], axis=1) for sid in ids], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


SAMPLE_PROMPTS = [
    "a red circle on black",
    "a blue square and a yellow triangle on grey",
    "a green triangle and a white circle on black",
    "a yellow square passing on grey",
]


def plot_losses(state: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "ae_losses", "frame autoencoder"), (axes[1], "dit_losses", "DiT (flow matching)")):
        y = np.array(state.get(key, []))
        if len(y):
            ax.plot(y, lw=0.5, alpha=0.4, color="C0")
            k = max(1, len(y) // 50)
            ax.plot(np.convolve(y, np.ones(k) / k, mode="valid"), color="C0")
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(opts: Options) -> dict[str, Any]:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    ckpt = opts.out / "checkpoint.pt"
    preset = load_model_preset(PRESET)
    dit, ae, text = build(preset, opts.seed)
    for m in (dit, ae, text):
        m.to(opts.device)
    state: dict[str, Any] = {"seconds": 0.0, "dit_losses": [], "ae_losses": []}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=opts.device)
        dit.transformer.load_state_dict(state["dit"])
        ae.load_state_dict(state["ae"])
        ae.register_to_config(**state["ae_config"])
        text.load_state_dict(state["text"])
        print(
            f"resumed from {ckpt}: {len(state['dit_losses'])} DiT steps, {state['seconds'] / 60:.1f} min",
            file=sys.stderr,
        )
    started = time.monotonic() - state["seconds"]
    if opts.command:
        state.setdefault("commands", []).append(opts.command)
    budget = opts.minutes * 60

    def save() -> None:
        state["seconds"] = time.monotonic() - started
        state.update(dit=dit.transformer.state_dict(), ae=ae.state_dict(), text=text.state_dict())
        state["ae_config"] = {"latents_mean": ae.config.latents_mean, "latents_std": ae.config.latents_std}
        torch.save(state, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    if len(state["ae_losses"]) < opts.ae_steps or "ae_config" not in state:
        with tqdm(total=opts.ae_steps, initial=len(state["ae_losses"]), desc="1/3 autoencoder", file=sys.stderr) as bar:
            train_ae(ae, opts, state, bar)
        save()
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    pool_path = opts.out / "pool.pt"
    if pool_path.exists():
        pool = torch.load(pool_path, weights_only=False)
    else:
        with tqdm(total=opts.pool, desc="2/3 latent pool", file=sys.stderr) as bar:
            pool = make_pool(ae, opts, bar)
        torch.save(pool, pool_path)

    params = [*dit.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_dit, ema_text = copy.deepcopy(dit.transformer), copy.deepcopy(text)
    if "dit_opt" in state:
        opt.load_state_dict(state["dit_opt"])
        ema_dit.load_state_dict(state["ema_dit"])
        ema_text.load_state_dict(state["ema_text"])
    tok = WordTokenizer(vocabulary())
    sigmas = list(sigmas_from_timesteps(preset.timesteps, preset.shift))
    losses: list[float] = state["dit_losses"]
    last_sample = time.monotonic()
    dit.train()
    text.train()

    def checkpoint() -> None:
        state.update(dit_opt=opt.state_dict(), ema_dit=ema_dit.state_dict(), ema_text=ema_text.state_dict())
        save()
        plot_losses(state, opts.out / "loss.png")

    def shipped(folder: Path) -> None:
        ema = CausalWan(ema_dit, text_kv_cache=False)
        meta = {
            "seed": opts.seed,
            "ae_steps": opts.ae_steps,
            "pool": opts.pool,
            "dit_steps": len(losses),
            "batch": opts.batch,
            "context": opts.context,
            "first_batch": opts.first_batch,
            "minutes": round(state["seconds"] / 60, 2),
            "device": opts.device,
            "commands": state.get("commands", []),  # every run that made it (a resumed run adds its own)
            "from_scratch": from_scratch(opts, len(losses), state["seconds"] / 60),
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
        }
        export(folder, ema, ae, ema_text, meta)

    total = opts.steps
    with tqdm(total=total, initial=len(losses), desc="3/3 DiT", file=sys.stderr) as bar:
        while True:
            step = len(losses)
            if (total is not None and step >= total) or (total is None and time.monotonic() - started >= budget):
                break
            rng = _generator(opts.seed, 4, step)
            shift = preset.shift if opts.any_sigma else None
            b = dit_batch(
                pool,
                tok,
                preset.text_len,
                sigmas,
                rng,
                opts.batch,
                opts.context,
                opts.first_weight,
                shift,
                preset.prediction,
            )
            torch.manual_seed(opts.seed * 1_000_003 + step)
            for g in opt.param_groups:
                g["lr"] = opts.lr * min(1.0, (step + 1) / opts.warmup)
            loss = loss_of(dit, text, b)
            if opts.first_batch:
                first = first_batch(pool, tok, preset.text_len, sigmas, rng, opts.first_batch, preset.prediction)
                loss = loss + loss_of(dit, text, first)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(opts.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for src, dst in ((dit.transformer, ema_dit), (text, ema_text)):
                    for p, e in zip(src.parameters(), dst.parameters(), strict=True):
                        e.lerp_(p, 1 - decay)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix_str(f"loss {np.mean(losses[-20:]):.4f}")
            if step % 100 == 99:
                checkpoint()
            if time.monotonic() - last_sample >= opts.sample_every_s:
                checkpoint()
                shipped(opts.out / "model")
                sample_grid(opts.out / "model", opts.out / "samples" / f"step-{step + 1}.png", SAMPLE_PROMPTS)
                last_sample = time.monotonic()
    checkpoint()
    shipped(opts.out / "model")
    if opts.final_samples:
        sample_grid(opts.out / "model", opts.out / "samples" / f"step-{len(losses)}.png", SAMPLE_PROMPTS)
    if opts.export is not None:
        shipped(opts.export)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of the whole run (resumes count on)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, loss.png, samples/, model/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DiT steps instead of the minutes' budget")
    p.add_argument("--ae-steps", type=int, default=Options.ae_steps)
    p.add_argument("--pool", type=int, default=Options.pool, help="latent sequences rendered once for the DiT")
    p.add_argument("--batch", type=int, default=Options.batch)
    p.add_argument("--context", choices=("clean", "stream"), default=Options.context, help="the rule trained for")
    p.add_argument("--first-weight", type=float, default=Options.first_weight, help="loss weight of a first chunk")
    p.add_argument("--any-sigma", action="store_true", help="clean: train every noise level, not the preset's")
    p.add_argument("--first-batch", type=int, default=0, help="epoch-start frames alone added to each step")
    p.add_argument("--lr", type=float, default=Options.lr)
    p.add_argument("--sample-every", type=float, default=5.0, help="minutes between sample grids")
    p.add_argument("--export", type=Path, default=None, help="also write the shipped folder here (models/demo)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=Options.device, help="cuda when there is one, else cpu")
    a = p.parse_args(argv)
    opts = Options(
        out=a.out,
        minutes=a.minutes,
        seed=a.seed,
        steps=a.steps,
        ae_steps=a.ae_steps,
        pool=a.pool,
        batch=a.batch,
        context=a.context,
        first_weight=a.first_weight,
        any_sigma=a.any_sigma,
        first_batch=a.first_batch,
        lr=a.lr,
        sample_every_s=a.sample_every * 60,
        export=a.export,
        threads=a.threads,
        device=a.device,
        command="python -m pipeline.train.demo " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    state = run(opts)
    losses = state["dit_losses"]
    print(
        f"trained: {len(state['ae_losses'])} autoencoder steps, {len(losses)} DiT steps in "
        f"{state['seconds'] / 60:.1f} min; DiT loss (last 50) {np.mean(losses[-50:]):.4f}; {opts.out / 'model'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
