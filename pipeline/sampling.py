"""Sigma tables and flow-matching update rules: pure functions of explicit inputs.

Flow matching: ``x_σ = (1-σ)·x0 + σ·ε`` and the model predicts the velocity ``v = ε - x0``,
so ``x0 = x_σ - σ·v``. Every slot carries its own σ; there is no hidden step counter, so a batch
that mixes noise levels (a StreamBatch) needs nothing special.
"""

from __future__ import annotations

import hashlib
import itertools

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: float, shift: float) -> float:
    """The flow-matching time shift used by Wan: ``σ' = s·σ / (1 + (s-1)·σ)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigmas_from_timesteps(timesteps: tuple[float, ...] | list[float], shift: float) -> tuple[float, ...]:
    """Map denoising timesteps in (0, 1000] (e.g. StreamDiffusionV2's ``[700, 500, 400, 200]`` or
    Self-Forcing's ``[1000, 750, 500, 250]``) to shifted sigmas, noisiest first."""
    sigmas = tuple(shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift) for t in timesteps)
    validate_sigmas(sigmas)
    return sigmas


def table_sigma(timestep: float, shift: float, entries: int = NUM_TRAIN_TIMESTEPS) -> float:
    """σ of timestep ``t`` as StreamDiffusionV2's and CausVid's code reads it: a table of ``entries`` shifted
    sigmas from 1 down (float32, their ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)``), the
    entry whose timestep (1000·σ) is nearest ``t``. The model's time input stays ``t`` itself."""
    sigmas = torch.linspace(1.0, 0.0, entries + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return float(sigmas[torch.argmin((timesteps - timestep).abs())])


def shifted_sigmas(steps: int, shift: float) -> tuple[float, ...]:
    """``steps`` evenly spaced timesteps from 1000 down (1000, 750, 500, 250 for 4), shifted."""
    if steps < 1:
        raise ValueError(f"steps={steps!r} is not allowed: at least 1")
    return sigmas_from_timesteps([NUM_TRAIN_TIMESTEPS * (1 - i / steps) for i in range(steps)], shift)


def validate_sigmas(sigmas: tuple[float, ...] | list[float]) -> None:
    if len(sigmas) == 0:
        raise ValueError("sigmas=() is not allowed: at least one step")
    if any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas={tuple(sigmas)!r} is not allowed: every sigma in (0, 1]")
    if any(a <= b for a, b in itertools.pairwise(sigmas)):
        raise ValueError(f"sigmas={tuple(sigmas)!r} is not allowed: strictly decreasing")


def strength_sigmas(sigmas: tuple[float, ...], strength: float) -> tuple[float, ...]:
    """v2v: the same table scaled so that its first sigma is ``strength`` (the input is noised to it).

    ``strength=1`` keeps the table (the input is replaced by noise at σ_0 = 1 for a t2v table).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength!r} is not allowed: a number in (0, 1]")
    scale = strength / sigmas[0]
    return tuple(s * scale for s in sigmas)


def to_x0(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """``x0 = x_σ - σ·v``; ``sigma`` broadcasts per sample: shape [B] against x [B, ...]."""
    return x - _bcast(sigma, x) * velocity


def add_noise(x0: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1-σ)·x0 + σ·ε``."""
    s = _bcast(sigma, x0) if isinstance(sigma, torch.Tensor) else sigma
    return (1 - s) * x0 + s * noise


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def noise_seed(seed: int, epoch: int, chunk_index: int, step: int) -> int:
    """A 63-bit seed for the noise of one (chunk, step): independent of batching and of order."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{chunk_index}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def chunk_noise(
    seed: int,
    epoch: int,
    chunk_index: int,
    step: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Fresh Gaussian noise ε for chunk ``chunk_index`` entering ``step``: same inputs, same bits."""
    g = torch.Generator(device="cpu").manual_seed(noise_seed(seed, epoch, chunk_index, step))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


PREDICTIONS = ("velocity", "x0")


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, prediction: str) -> torch.Tensor:
    """What a model with this ``prediction`` should output for ``x_σ = (1-σ)·x0 + σ·ε``: the training target
    that :class:`FlowSampler` reads back (x0 itself, or the velocity ε − x0)."""
    return x0 if prediction == "x0" else noise - x0


class FlowSampler:
    """The update rule between steps, as a collaborator the model's loader picks (no model-kind branch in
    the engine): ``x0 = x_σ − σ·v``, then the next step's input ``x_σ' = (1−σ')·x0 + σ'·ε'``.

    ``prediction`` is what the model's output means. ``velocity`` (every Wan model): v = ε − x0. ``x0`` (the
    demo): the clean latents themselves, so v = (x_σ − x0)/σ. A small model trained from scratch learns x0
    at σ = 1 (the picture its prompt and context call for) where a velocity net must copy its input noise
    through to draw anything. :meth:`x0` is the one place the model's output is read (the last stage calls it
    once per slot); the update step works from x0. Every σ the engine steps at is > 0 (``validate_sigmas``)."""

    fresh_noise = True  # next_input needs fresh noise (the engine draws it only for a sampler that does)

    def __init__(self, prediction: str = "velocity") -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not allowed: one of {PREDICTIONS}")
        self.prediction = prediction

    def x0(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The model's ``output`` for input ``x`` at ``sigma`` ([B]) read as the clean latents."""
        return output if self.prediction == "x0" else to_x0(x, sigma, output)

    def noised(self, x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, sigma, noise)

    def next_input(
        self, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, sigma_next: float, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """The next step's input from this step's input ``x`` at ``sigma`` ([B]) and its ``x0``: x0 noised
        again with fresh ``noise`` to ``sigma_next``."""
        if noise is None:
            raise ValueError("this sampler draws on fresh noise at every step; none was given")
        return self.noised(x0, sigma_next, noise)


class EulerSampler(FlowSampler):
    """The flow's own ODE step (DDIM with η = 0): ``x_σ' = x_σ + (σ'−σ)·v = (1−σ')·x0 + σ'·ε̂`` with
    ε̂ = x0 + v the noise the model reads in its input, kept instead of drawn afresh. What a model trained
    only by flow matching (the ``demo``) needs to sample in few steps: with fresh noise at every step its
    first chunk, which has no context, would stay the mean of every picture the prompt allows (a blur);
    the kept noise is what decides where its objects are. The chunk's first noise still comes from the
    seed, so the same seed gives the same frames. The velocity is read from x0: ``v = (x − x0)/σ``."""

    fresh_noise = False

    def next_input(
        self, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, sigma_next: float, noise: torch.Tensor | None
    ) -> torch.Tensor:
        s = _bcast(sigma, x)
        return x + (sigma_next - s) * ((x - x0) / s)


class IdentitySampler(FlowSampler):
    """The passthrough model's: latents are never noised (its denoiser is the identity, velocity 0), so
    frames come out exactly as they went in."""

    fresh_noise = False

    def noised(self, x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        return x0

    def next_input(
        self, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, sigma_next: float, noise: torch.Tensor | None
    ) -> torch.Tensor:
        return x0
