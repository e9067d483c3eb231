"""Intake: a v2v session's input, from frames to encoded chunks (the first phase of a tick).

Frames wait with their arrival times until a whole chunk is there (an epoch's first chunk takes 3
frames fewer: the VAE's first latent frame is one frame); then they are encoded, keeping the
encoder's causal cache across chunks, and the encoded chunk waits for the scheduler to admit it.
Bounded: at most ``max_chunks`` whole chunks wait (encoded, or complete among the frames); past that
nothing is taken, and :meth:`need` says so, in one answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.commands import InputNeed

NO_INPUT = InputNeed(wanted=0, missing=0, partial=0, waiting=0)


@dataclass(frozen=True)
class InputChunk:
    latents: torch.Tensor  # [C, F, h, w] in the model's dtype, on its device
    arrived: tuple[float, ...]  # time.monotonic() each of its frames arrived at ingress


def frames_to_tensor(frames: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [1, 3, N, H, W] in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return t.permute(3, 0, 1, 2).unsqueeze(0).to(dtype) / 127.5 - 1.0


class Intake:
    def __init__(self, vae: Any, frames_for_chunk: Any, max_chunks: int, device: torch.device, dtype: torch.dtype):
        self.vae = vae  # StreamingVae or PixelPackVae: encode(stream, video)
        self.frames_for_chunk = frames_for_chunk  # (first: bool) -> video frames of one chunk
        self.max_chunks = max_chunks
        self.device, self.dtype = device, dtype
        self.stream = vae.new_stream()  # the encoder's causal cache, for the current epoch
        self.frames: list[np.ndarray] = []  # uint8 [H, W, 3] each, not yet encoded
        self.arrived: list[float] = []  # beside each frame
        self.chunks: deque[InputChunk] = deque()  # encoded, not yet started

    def need(self) -> InputNeed:
        pending, first = len(self.frames), self.stream.frames_encoded == 0
        waiting = len(self.chunks)
        while pending >= (size := self.frames_for_chunk(first)):
            pending, first, waiting = pending - size, False, waiting + 1
        wanted = size - pending if waiting < self.max_chunks else 0
        return InputNeed(wanted=wanted, missing=size - pending, partial=pending, waiting=waiting)

    def add(self, frames: np.ndarray, arrived: tuple[float, ...]) -> bool:
        """Take ``frames`` (uint8 [N, H, W, 3]); False, and nothing taken, while enough input waits."""
        if self.need().waiting >= self.max_chunks:
            return False
        self.frames.extend(frames)
        self.arrived.extend(arrived)
        return True

    def ready(self) -> bool:
        """A whole chunk of frames is waiting to be encoded, and there is room for it."""
        return len(self.frames) >= self.frames_for_chunk(self.stream.frames_encoded == 0) and (
            len(self.chunks) < self.max_chunks
        )

    def encode(self) -> int:
        """Encode every whole chunk of frames there is room for; returns how many."""
        done = 0
        while self.ready():
            n = self.frames_for_chunk(self.stream.frames_encoded == 0)
            frames, arrived = np.stack(self.frames[:n]), tuple(self.arrived[:n])
            del self.frames[:n], self.arrived[:n]
            video = frames_to_tensor(frames, self.device, self.vae.vae.dtype)
            latents = self.vae.encode(self.stream, video)[0].to(self.dtype)  # [C, F, h, w]
            self.chunks.append(InputChunk(latents, arrived))
            done += 1
        return done

    def has_chunk(self) -> bool:
        return bool(self.chunks)

    def take(self) -> InputChunk:
        return self.chunks.popleft()

    def reset(self) -> None:
        """A hard cut: the input of the old epoch is dropped and the encoder starts over."""
        self.stream = self.vae.new_stream()
        self.frames.clear()
        self.arrived.clear()
        self.chunks.clear()
