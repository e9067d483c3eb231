"""Decode as its own phase: clean chunks in, frames out, off the DiT's critical path (DESIGN §6a).

- **Threaded** (the default): a worker thread decodes while the DiT runs the next tick, so a tick costs
  about max(DiT, decode) instead of their sum. On a GPU it decodes on its own CUDA stream, after the
  event that says the chunk's x0 is written, and copies frames to pinned host memory asynchronously.
  ``threaded=False`` decodes at once in :meth:`put` (the phase off: a tick costs DiT + decode).
- **Bounded**: at most ``bound`` chunks wait; :meth:`put` then waits for room (backpressure on the DiT;
  nothing is dropped for being late).
- **Stale**: a chunk of an epoch older than its session's current one (:func:`pipeline.types.stale`) is
  dropped before it is decoded: a cut drops pending decodes of the old epoch.
- **Together**: chunks of several sessions waiting at once are decoded in one batched call where the
  decoder allows it (its causal caches line up); one session's chunks stay in order.
- Each session's decoder cache belongs to its current epoch: a new epoch starts a new one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.stats import PhaseTimer
from pipeline.types import DecodedChunk, Envelope, frame_pts, stale

_STOP = object()


@dataclass(frozen=True)
class DecodeJob:
    envelope: Envelope
    x0: torch.Tensor  # [C, F, h, w] clean latents, model dtype, on the model's device
    scheduled_at: float  # time.monotonic() the chunk entered its window
    arrived: tuple[float, ...]  # v2v: its input frames' arrival at ingress
    ready: Any = None  # torch.cuda.Event recorded after x0 was written (GPU), else None


def tensor_to_frames(video: torch.Tensor) -> torch.Tensor:
    """float [B, 3, N, H, W] in [-1, 1] -> uint8 [B, N, H, W, 3] on the same device."""
    x = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1)


class DecodePhase:
    def __init__(
        self,
        vae: Any,
        fps: int,
        bound: int,
        threaded: bool = True,
        keep_latents: bool = False,
        timer: PhaseTimer | None = None,
    ) -> None:
        if bound < 1:
            raise ValueError(f"decode bound={bound} is not allowed: at least 1")
        self.vae = vae  # StreamingVae or PixelPackVae: new_stream(), decode_many(streams, latents)
        self.fps = fps
        self.bound = bound
        self.threaded = threaded
        self.keep_latents = keep_latents  # DecodedChunk.latents holds x0 on the CPU (tests, re-encoding)
        self.timer = timer or PhaseTimer("cpu")
        self.dropped = 0  # stale chunks dropped before their decode
        self._epochs: dict[str, int] = {}  # each session's current epoch
        self._streams: dict[str, tuple[int, Any]] = {}  # session -> (epoch, its decoder cache)
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=bound)
        self._out: deque[DecodedChunk] = deque()
        self._done = threading.Condition()
        self._pending = 0  # jobs put and not yet taken out (queued, decoding, or decoded and waiting)
        self._failed: BaseException | None = None
        self._cuda: Any = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
            self._thread.start()

    # ---- control (the engine's side) ------------------------------------------------------------

    def epoch(self, session_id: str, epoch: int) -> None:
        """The session's current epoch: pending decodes of older ones are dropped."""
        with self._lock:
            self._epochs[session_id] = max(epoch, self._epochs.get(session_id, 0))

    def close(self, session_id: str) -> None:
        with self._lock:
            self._epochs[session_id] = 1 << 62  # anything of it still queued is stale
            self._streams.pop(session_id, None)

    @property
    def pending(self) -> int:
        return self._pending

    def put(self, jobs: list[DecodeJob]) -> None:
        """Decode ``jobs`` (a micro-batch's clean chunks): at once, together (phase off), or queued for the
        worker one by one, each waiting while ``bound`` wait."""
        self._raise()
        with self._done:
            self._pending += len(jobs)
        if not self.threaded:
            self._decode(list(jobs))
            return
        for job in jobs:
            while True:
                try:
                    self._jobs.put(job, timeout=0.5)
                    break
                except queue.Full:
                    self._raise()

    def take(self, timeout: float = 0.0) -> list[DecodedChunk]:
        """Chunks decoded so far (in the order they were put, per session); waits up to ``timeout``
        seconds for one when there is none yet and some are pending."""
        self._raise()
        with self._done:
            if not self._out and self._pending and timeout > 0:
                self._done.wait(timeout)
            out = list(self._out)
            self._out.clear()
            self._pending -= len(out)
        self._raise()
        return out

    def stop(self) -> None:
        """Stop the worker after the chunk it is decoding (what still waits is dropped)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:  # make room: nothing queued is decoded any more
                    self._jobs.get_nowait()
            try:
                self._jobs.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        thread.join()

    def _raise(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the decode phase failed: {self._failed!r}") from self._failed

    # ---- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    return
                jobs = [job]
                while True:  # whatever else waits now is decoded with it
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        self._jobs.put(_STOP)
                        break
                    jobs.append(more)
                self._decode(jobs)
        except BaseException as e:  # a bug: the engine hears of it at its next put or take
            self._failed = e
            with self._done:
                self._done.notify_all()
            raise

    def _decode(self, jobs: list[DecodeJob]) -> None:
        while jobs:  # rounds of at most one chunk per session, in order
            batch: list[DecodeJob] = []
            rest: list[DecodeJob] = []
            seen: set[str] = set()
            for job in jobs:
                (rest if job.envelope.session_id in seen else batch).append(job)
                seen.add(job.envelope.session_id)
            self._decode_batch(batch)
            jobs = rest

    def _decode_batch(self, jobs: list[DecodeJob]) -> None:
        fresh, streams = [], []
        with self._lock:  # the stale check and the decoder cache in one step: a cut or close may come any time
            for job in jobs:
                env = job.envelope
                if stale(env.epoch, self._epochs.get(env.session_id, env.epoch)):
                    self.dropped += 1
                    continue
                fresh.append(job)
                streams.append(self._stream(env))
        if len(fresh) < len(jobs):
            with self._done:
                self._pending -= len(jobs) - len(fresh)
                self._done.notify_all()
        if not fresh:
            return
        jobs = fresh
        device = jobs[0].x0.device
        with self._on_stream(device, jobs), self.timer.phase("decode"):
            videos = self.vae.decode_many(streams, [j.x0.unsqueeze(0).to(self.vae.vae.dtype) for j in jobs])
            frames = [tensor_to_frames(v)[0] for v in videos]  # uint8 [N, H, W, 3] each
            host = self._to_host(frames)
            latents = [j.x0.detach().to("cpu", non_blocking=False) if self.keep_latents else None for j in jobs]
        out = []
        for job, rgb, lat in zip(jobs, host, latents, strict=True):
            env = job.envelope
            if rgb.shape[0] != env.num_frames:
                raise RuntimeError(f"chunk {env.key} decoded to {rgb.shape[0]} frames, expected {env.num_frames}")
            pts = tuple(frame_pts(env.video_frame + k, self.fps) for k in range(env.num_frames))
            out.append(DecodedChunk(env, rgb, pts, lat, job.scheduled_at, job.arrived))
        with self._done:
            self._out.extend(out)
            self._done.notify_all()

    def _stream(self, env: Envelope) -> Any:
        """The session's decoder cache for ``env``'s epoch (under the lock)."""
        epoch, stream = self._streams.get(env.session_id, (-1, None))
        if epoch != env.epoch:  # a new session or a new epoch: the decoder starts over
            stream = self.vae.new_stream()
            self._streams[env.session_id] = (env.epoch, stream)
        return stream

    def _on_stream(self, device: torch.device, jobs: list[DecodeJob]) -> Any:
        """On a GPU: the phase's own CUDA stream, after each chunk's x0 is written."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self._cuda is None:
            self._cuda = torch.cuda.Stream(device)
        for job in jobs:
            if job.ready is not None:
                self._cuda.wait_event(job.ready)
            job.x0.record_stream(self._cuda)
        return torch.cuda.stream(self._cuda)

    def _to_host(self, frames: list[torch.Tensor]) -> list[np.ndarray]:
        if frames[0].device.type != "cuda":
            return [f.numpy() for f in frames]
        pinned = [torch.empty(f.shape, dtype=torch.uint8, pin_memory=True) for f in frames]
        for p, f in zip(pinned, frames, strict=True):
            p.copy_(f, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self._cuda)
        done.synchronize()  # this thread waits; the DiT's stream does not
        return [p.numpy() for p in pinned]
