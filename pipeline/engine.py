"""The engine: sessions in, decoded chunks out, one tick at a time (schedule -> execute -> update).

The API later layers build on (all methods are thread-safe; ``step`` does the model work, so a
server calls it from a worker thread, never from its event loop):

- ``open_session(params, mode)`` / ``close_session(id)``
- ``request(id, n)``: t2v, ask for n more chunks; ``submit(id, frames)``: v2v input frames
- ``update_params(id, **changes)``: soft change from the next chunk on
- ``cut(id)``: hard cut, returns the new epoch
- ``step()``: one tick; returns the chunks that left clean, decoded, with envelope and pts
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import SystemConfig
from pipeline.executor import Executor, SequentialExecutor, SlotInputs, StreamBatchExecutor
from pipeline.models.loader import DTYPES, Models, load_models
from pipeline.models.vae import VaeStream
from pipeline.sampling import add_noise, chunk_noise, to_x0
from pipeline.scheduler import Scheduler, Slot, TickPlan
from pipeline.types import PTS_CLOCK, DecodedChunk, UserParams
from pipeline.window import ChunkState, KVWindow, SessionWindow

MODES = ("t2v", "v2v")


class SessionLimitError(RuntimeError):
    """The engine already serves ``max_sessions`` sessions."""


@dataclass
class _Session:
    window: SessionWindow
    vae: VaeStream  # causal caches of encoder and decoder for the current epoch
    pending_frames: list[np.ndarray] = field(default_factory=list)  # v2v frames not yet encoded


@dataclass(frozen=True)
class SessionProgress:
    next_video_frame: int  # first video frame of the next chunk to start (output timeline)
    demand: int  # t2v: chunks asked for and not started
    denoising: int  # chunks in flight that are not clean yet
    in_flight: int  # chunks in the window, the one waiting for its σ=0 write included
    epoch: int


@dataclass
class EngineStats:
    ticks: int = 0
    slots: int = 0
    chunks_out: int = 0
    frames_out: int = 0
    tick_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # wall time of recent ticks


def frames_to_tensor(frames: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [1, 3, N, H, W] in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return t.permute(3, 0, 1, 2).unsqueeze(0).to(dtype) / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [1, 3, N, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class Engine:
    def __init__(
        self,
        config: SystemConfig,
        models: Models | None = None,
        executor: str = "streambatch",
        keep_latents: bool = False,
        max_input_chunks: int | None = None,
    ) -> None:
        self.config = config
        self.keep_latents = keep_latents  # DecodedChunk.latents holds x0 (tests, re-encoding)
        self.models = models if models is not None else load_models(config)
        self.device = self.models.dit.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's 3-D convolutions see a few fixed shapes
        self.dtype = DTYPES[config.dtype]
        args = (self.models.dit, config.latent_size, config.chunk_frames, config.sink_frames, config.window_frames)
        if executor == "streambatch":
            self.executor: Executor = StreamBatchExecutor(*args)
        elif executor == "sequential":
            self.executor = SequentialExecutor(*args)
        else:
            raise ValueError(f"executor={executor!r} is not allowed: 'streambatch' or 'sequential'")
        self.scheduler = Scheduler(config)
        self.sessions: dict[str, _Session] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._lock = threading.RLock()
        # v2v input chunks a session may have waiting to enter: a file source can run ahead (default
        # 2 steps' worth); a live source keeps it small so that waiting input never builds latency.
        self._max_pending_chunks = max_input_chunks or 2 * config.steps

    # ---- sessions -------------------------------------------------------------------------

    def open_session(self, params: UserParams | dict[str, Any] | None = None, mode: str = "t2v") -> str:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed: one of {MODES}")
        if isinstance(params, dict):
            params = UserParams().updated(params)
        params = params or UserParams()
        with self._lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise SessionLimitError(f"the engine serves its limit of {self.config.max_sessions} sessions")
            sid = f"s{next(self._ids)}"
            kv = self._new_kv()
            self.sessions[sid] = _Session(SessionWindow(sid, mode, params, kv), self.models.vae.new_stream())
            return sid

    def _new_kv(self) -> KVWindow:
        cfg, dit = self.config, self.models.dit
        return KVWindow(
            blocks=range(dit.num_blocks),
            sink=cfg.sink_frames,
            window=cfg.window_frames,
            in_flight_frames=(cfg.steps + 1) * cfg.chunk_frames,
            tokens_per_frame=cfg.tokens_per_frame,
            heads=dit.heads,
            head_dim=dit.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def close_session(self, session_id: str) -> None:
        with self._lock:
            self.sessions.pop(session_id, None)

    def _get(self, session_id: str) -> _Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"session_id={session_id!r} is not open") from None

    def kv_bytes(self, session_id: str) -> int:
        with self._lock:
            return self._get(session_id).window.kv.nbytes

    # ---- user input -----------------------------------------------------------------------

    @property
    def pipeline_depth(self) -> int:
        """Chunks a t2v session has in flight when its pipeline is full (see ``Scheduler.depth``): a
        caller that keeps fewer than this asked for and not yet taken leaves part of every tick idle."""
        return self.scheduler.depth

    def request(self, session_id: str, chunks: int = 1) -> None:
        """t2v: ask for ``chunks`` more chunks."""
        with self._lock:
            s = self._get(session_id)
            if s.window.mode != "t2v":
                raise ValueError(f"session {session_id!r} is v2v: give it frames with submit()")
            s.window.demand += chunks

    def set_demand(self, session_id: str, chunks: int) -> None:
        """t2v: ask for exactly ``chunks`` chunks not yet started (after a cut, say)."""
        with self._lock:
            s = self._get(session_id)
            if s.window.mode != "t2v":
                raise ValueError(f"session {session_id!r} is v2v: give it frames with submit()")
            s.window.demand = max(0, chunks)

    def progress(self, session_id: str) -> SessionProgress:
        """Where the session stands: the next chunk's first video frame, demand, chunks in flight."""
        with self._lock:
            w = self._get(session_id).window
            in_flight = sum(1 for c in w.in_flight if not c.clean)
            return SessionProgress(w.next_video_frame, w.demand, in_flight, len(w.in_flight), w.epoch)

    def next_chunk_index(self, session_id: str) -> int:
        with self._lock:
            return self._get(session_id).window.next_chunk_index

    def _backlog(self, s: _Session) -> tuple[int, int, int]:
        """(input chunks waiting, frames missing for the next one, frames of it already there):
        encoded chunks plus complete chunks among the pending frames; an epoch's first chunk
        takes 3 fewer frames."""
        pending, first = len(s.pending_frames), s.vae.frames_encoded == 0
        waiting = len(s.window.inputs)
        while pending >= (need := self.config.frames_for_chunk(first)):
            pending, first, waiting = pending - need, False, waiting + 1
        return waiting, need - pending, pending

    def partial_input(self, session_id: str) -> int:
        """v2v: frames waiting that do not make a whole chunk yet."""
        with self._lock:
            return self._backlog(self._get(session_id))[2]

    def frames_needed(self, session_id: str) -> int:
        """v2v: frames still missing before the next input chunk is complete."""
        with self._lock:
            return self._backlog(self._get(session_id))[1]

    def wants_frames(self, session_id: str) -> int:
        """v2v: frames to submit now (those completing the next chunk), 0 while enough input waits."""
        with self._lock:
            waiting, missing, _ = self._backlog(self._get(session_id))
            return missing if waiting < self._max_pending_chunks else 0

    def submit(self, session_id: str, frames: np.ndarray) -> bool:
        """v2v: frames uint8 [N, H, W, 3] at the system's size. False (nothing taken) while the
        session already has enough input waiting: the caller decides what to drop."""
        with self._lock:
            s = self._get(session_id)
            if s.window.mode != "v2v":
                raise ValueError(f"session {session_id!r} is t2v: ask for chunks with request()")
            want = (self.config.height, self.config.width, 3)
            if frames.ndim != 4 or tuple(frames.shape[1:]) != want or frames.dtype != np.uint8:
                raise ValueError(
                    f"frames of shape {tuple(frames.shape)} and dtype {frames.dtype} are not allowed: "
                    f"uint8 [N, {want[0]}, {want[1]}, 3]"
                )
            if self._backlog(s)[0] >= self._max_pending_chunks:
                return False
            s.pending_frames.extend(frames)
            return True

    def update_params(self, session_id: str, **changes: Any) -> UserParams:
        """Soft change: chunks started from now on use the new params; in-flight ones keep theirs."""
        with self._lock:
            s = self._get(session_id)
            s.window.params = s.window.params.updated(changes)
            return s.window.params

    def cut(self, session_id: str) -> int:
        """Hard cut: drop everything of the current epoch (chunks in flight, input waiting, KV window,
        VAE caches); the next chunk starts with an empty context. Returns the new epoch."""
        with self._lock:
            s = self._get(session_id)
            w = s.window
            dropped = [c for c in w.in_flight if not c.clean]  # clean ones were already decoded
            if dropped:  # their frames never appear: keep the output timeline gapless
                w.next_video_frame = min(c.envelope.video_frame for c in dropped)
            w.epoch += 1
            w.in_flight.clear()
            w.inputs.clear()
            w.next_frame = 0
            w.kv.reset()
            s.vae = self.models.vae.new_stream()
            s.pending_frames.clear()
            return w.epoch

    # ---- the tick -------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return any(
                s.window.in_flight or s.window.has_input() or len(s.pending_frames) >= self._frames_needed(s)
                for s in self.sessions.values()
            )

    def _frames_needed(self, s: _Session) -> int:
        return self.config.frames_for_chunk(s.vae.frames_encoded == 0)

    def _encode_inputs(self) -> None:
        for s in self.sessions.values():
            while (
                len(s.pending_frames) >= (n := self._frames_needed(s))
                and len(s.window.inputs) < self._max_pending_chunks
            ):
                frames = np.stack(s.pending_frames[:n])
                del s.pending_frames[:n]
                video = frames_to_tensor(frames, self.device, self.models.vae.vae.dtype)
                s.window.inputs.append(self.models.vae.encode(s.vae, video)[0].to(self.dtype))  # [C, F, h, w]

    def step(self) -> list[DecodedChunk]:
        """One tick: schedule all sessions, run every slot, fold results back, decode what left."""
        with self._lock:
            t0 = time.perf_counter()
            self._encode_inputs()
            windows = [s.window for s in self.sessions.values()]
            plan = self.scheduler.schedule(self.stats.ticks, windows)
            if not plan.slots:
                return []
            chunks = self._admit(plan)
            inputs = self._inputs(plan, chunks)
            finished = self._update(plan, chunks, inputs, self.executor.run(inputs))
            out = [self._decode(c) for c in finished]
            self.stats.ticks += 1
            self.stats.slots += len(plan.slots)
            self.stats.chunks_out += len(out)
            self.stats.frames_out += sum(c.num_frames for c in out)
            self.stats.tick_seconds.append(time.perf_counter() - t0)
            return out

    def _admit(self, plan: TickPlan) -> list[ChunkState]:
        """The chunk of every slot; admitted chunks enter their window here with their first x."""
        chunks = []
        for slot in plan.slots:
            w = self.sessions[slot.envelope.session_id].window
            if slot.admit:
                chunks.append(self._enter(w, slot))
            else:
                chunks.append(next(c for c in w.in_flight if c.envelope == slot.envelope))
        return chunks

    def _enter(self, w: SessionWindow, slot: Slot) -> ChunkState:
        env = slot.envelope
        shape = (self.config.model.latent_channels, self.config.chunk_frames, *self.config.latent_size)
        noise = chunk_noise(env.params.seed, env.epoch, env.chunk_index, 0, shape, self.dtype, self.device)
        if w.mode == "v2v":
            x = self._noised(w.inputs.pop(0), slot.sigma, noise)
        else:
            w.demand -= 1
            x = noise
        text = self.models.text(env.params.prompt).to(self.dtype)
        chunk = ChunkState(env, slot.sigmas, 0, x, text, scheduled_at=time.monotonic())
        w.in_flight.append(chunk)
        w.next_chunk_index += 1
        w.next_frame += self.config.chunk_frames
        w.next_video_frame += env.num_frames
        return chunk

    def _inputs(self, plan: TickPlan, chunks: list[ChunkState]) -> SlotInputs:
        return SlotInputs(
            slots=list(plan.slots),
            windows=[self.sessions[s.envelope.session_id].window.kv for s in plan.slots],
            x=torch.stack([c.x for c in chunks]),
            sigma=torch.tensor([s.sigma for s in plan.slots], dtype=torch.float32, device=self.device),
            text=torch.stack([c.text for c in chunks]),
        )

    def _update(
        self, plan: TickPlan, chunks: list[ChunkState], inputs: SlotInputs, velocity: torch.Tensor
    ) -> list[ChunkState]:
        """Move results back: x0 -> next σ with fresh noise; clean chunks leave (their σ=0 write
        comes next tick); chunks whose σ=0 write ran are done."""
        finished = []
        x0 = to_x0(inputs.x, inputs.sigma, velocity)
        for i, (slot, c) in enumerate(zip(plan.slots, chunks, strict=True)):
            w = self.sessions[slot.envelope.session_id].window
            if slot.is_write:
                w.in_flight.remove(c)
                continue
            env = c.envelope
            c.step += 1
            if c.clean:
                c.x = x0[i]
                finished.append(c)
            else:
                shape = tuple(c.x.shape)
                noise = chunk_noise(env.params.seed, env.epoch, env.chunk_index, c.step, shape, self.dtype, self.device)
                c.x = self._noised(x0[i], c.sigmas[c.step], noise)
        return finished

    def _noised(self, x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        """x_σ; a passthrough model's latents are left as they are (its denoiser is the identity)."""
        return x0 if self.config.model.kind == "passthrough" else add_noise(x0, sigma, noise)

    def _decode(self, c: ChunkState) -> DecodedChunk:
        s = self.sessions[c.envelope.session_id]
        vae = self.models.vae
        video = vae.decode(s.vae, c.x.unsqueeze(0).to(vae.vae.dtype))  # [1, 3, N, H, W]
        frames = tensor_to_frames(video)
        env = c.envelope
        if frames.shape[0] != env.num_frames:
            raise RuntimeError(f"chunk {env.key} decoded to {frames.shape[0]} frames, expected {env.num_frames}")
        pts = tuple((env.video_frame + k) * PTS_CLOCK // self.config.fps for k in range(env.num_frames))
        latents = c.x.detach().cpu() if self.keep_latents else None
        return DecodedChunk(envelope=env, frames=frames, pts=pts, latents=latents, scheduled_at=c.scheduled_at)
