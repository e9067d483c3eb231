"""The engine: commands in, decoded chunks out (DESIGN §6a).

- :meth:`Engine.apply` takes one command (:mod:`pipeline.commands`: open, close, demand, submit,
  params, cut, query) and returns its typed result. Commands are applied between ticks.
- :meth:`Engine.step` moves the work on by one tick through its phases: intake (frames in, encode)
  -> schedule -> execute (the executor: one process, or a ring of stages) -> update -> decode (its own
  phase, behind a bounded queue). It returns a :class:`~pipeline.commands.StepOutput`: the chunks decoded
  since the last call, in order per session, with envelope and pts (with the decode phase in its own
  thread those were made earlier), and every session's status after the step.

Both are called from one thread; a server's is a worker thread, never its event loop (``streamer.bridge``),
and what feeds the sessions between steps is :class:`pipeline.feeder.Feeder`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from pipeline.commands import (
    MODES,
    Close,
    Closed,
    Command,
    Cut,
    CutDone,
    Demand,
    Open,
    Opened,
    ParamsSet,
    Query,
    Result,
    SessionStatus,
    SetParams,
    StepOutput,
    Submit,
    Submitted,
)
from pipeline.config import SystemConfig
from pipeline.executor import Activations, Control, Denoised, Executor, MicroBatch
from pipeline.intake import NO_INPUT, Intake
from pipeline.models.loader import Models, load_models
from pipeline.sampling import chunk_noise
from pipeline.scheduler import NoiseSource, Scheduler, Slot, fold
from pipeline.stages.dispatch import Dispatcher, TickWork
from pipeline.stages.local import local_executor
from pipeline.state import ChunkState, SessionState
from pipeline.types import DecodedChunk, Envelope, UserParams

WAIT_S = 0.05  # longest a step waits for results or decodes when nothing can be issued


class SessionLimitError(RuntimeError):
    """The engine already serves ``max_sessions`` sessions."""


@dataclass
class EngineStats:
    ticks: int = 0  # ticks committed
    slots: int = 0
    chunks_out: int = 0
    frames_out: int = 0
    tick_seconds: deque[float] = field(
        default_factory=lambda: deque(maxlen=1000)
    )  # wall time of steps that issued a tick


@dataclass
class _Out:
    """A micro-batch on its way: what its results fold into."""

    work: TickWork
    index: int
    x: torch.Tensor  # [B, C, F, h, w] its inputs
    sigma: torch.Tensor  # [B]


class Engine:
    def __init__(
        self,
        config: SystemConfig,
        models: Models | None = None,
        executor: Executor | None = None,
        max_input_chunks: int | None = None,
        noise: NoiseSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.models = models if models is not None else load_models(config)
        self.device = self.models.dit.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's 3-D convolutions see a few fixed shapes
        self.dtype = config.torch_dtype
        self.executor = executor if executor is not None else local_executor(config, self.models)
        self.timer = self.executor.timer
        self.scheduler = Scheduler(config)
        self.dispatch = Dispatcher(self.executor.capacity)
        self.sessions: dict[str, SessionState] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.clock = clock  # when chunks are handed out (their deadlines); time.monotonic, or a test's clock
        self._work: TickWork | None = None  # the tick being issued
        self._out: dict[tuple[int, int], _Out] = {}  # micro-batches out, by (tick, index)
        # v2v input chunks a session may have waiting to enter: a file source can run ahead (default
        # 2 steps' worth); a live source keeps it small so that waiting input never builds latency.
        self._max_input_chunks = max_input_chunks or 2 * config.steps
        # ε of a chunk entering a step: keyed by default; bench.parity replays recorded draws instead
        self.noise: NoiseSource = noise if noise is not None else self._keyed_noise

    @property
    def pipeline_depth(self) -> int:
        """Chunks a t2v session has on their way when its pipeline is full: denoising (see
        ``Scheduler.depth``), and one in the decode phase when that runs beside the DiT. A caller that
        keeps fewer than this asked for and not yet taken leaves part of every tick idle."""
        return self.scheduler.depth + self.executor.decode_depth

    def close(self) -> None:
        """Stop the executor (the decode thread, the stages)."""
        self.executor.close()

    # ---- commands -----------------------------------------------------------------------------

    @overload
    def apply(self, command: Open) -> Opened: ...
    @overload
    def apply(self, command: Close) -> Closed: ...
    @overload
    def apply(self, command: Demand | Query) -> SessionStatus: ...
    @overload
    def apply(self, command: Submit) -> Submitted: ...
    @overload
    def apply(self, command: SetParams) -> ParamsSet: ...
    @overload
    def apply(self, command: Cut) -> CutDone: ...

    def apply(self, command: Command) -> Result:
        """Apply one command between ticks; its typed result. Bad input raises ValueError/KeyError
        naming the field and the value, and changes nothing."""
        match command:
            case Open():
                return self._open(command)
            case Close(session_id=sid):
                if self.sessions.pop(sid, None) is not None:
                    self.executor.control(Control(closed=(sid,)))
                return Closed(sid)
            case Demand(session_id=sid, chunks=chunks, exact=exact):
                s = self._get(sid, "t2v")
                s.demand = max(0, chunks) if exact else s.demand + chunks
                return self.status(s)
            case Submit():
                return self._submit(command)
            case SetParams(session_id=sid, changes=changes):
                s = self._get(sid)
                s.params = s.params.updated(dict(changes))
                return ParamsSet(s.params)
            case Cut(session_id=sid, demand=demand):
                s = self._get(sid)
                self.scheduler.cut(s)
                self.executor.control(Control(epochs=((sid, s.epoch),)))
                if demand is not None and s.mode == "t2v":
                    s.demand = max(0, demand)
                return CutDone(s.epoch, s.next_chunk_index, self.status(s))
            case Query(session_id=sid):
                return self.status(self._get(sid))
        raise TypeError(f"command={command!r} is not allowed: one of {Command}")

    def _open(self, command: Open) -> Opened:
        if command.mode not in MODES:
            raise ValueError(f"mode={command.mode!r} is not allowed: one of {MODES}")
        params = command.params
        if not isinstance(params, UserParams):
            raise TypeError(f"params={params!r} is not allowed: UserParams (UserParams().updated(d) checks a dict)")
        if len(self.sessions) >= self.config.max_sessions:
            raise SessionLimitError(f"the engine serves its limit of {self.config.max_sessions} sessions")
        sid = f"s{next(self._ids)}"
        intake = None
        if command.mode == "v2v":
            vae = self.models.vae
            intake = Intake(vae, self.config.frames_for_chunk, self._max_input_chunks, self.device, self.dtype)
        s = self.sessions[sid] = SessionState(sid, command.mode, params, intake=intake)
        return Opened(sid, self.status(s))

    def _submit(self, command: Submit) -> Submitted:
        s = self._get(command.session_id, "v2v")
        frames = command.frames
        want = (self.config.height, self.config.width, 3)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != want or frames.dtype != np.uint8:
            raise ValueError(
                f"frames of shape {tuple(frames.shape)} and dtype {frames.dtype} are not allowed: "
                f"uint8 [N, {want[0]}, {want[1]}, 3]"
            )
        if len(command.arrived) != len(frames):
            raise ValueError(f"arrived has {len(command.arrived)} times for {len(frames)} frames: one per frame")
        assert s.intake is not None
        taken = s.intake.add(frames, command.arrived)
        return Submitted(taken, self.status(s))

    def _get(self, session_id: str, mode: str | None = None) -> SessionState:
        try:
            s = self.sessions[session_id]
        except KeyError:
            raise KeyError(f"session_id={session_id!r} is not open") from None
        if mode is not None and s.mode != mode:
            other = "give it frames with Submit" if s.mode == "v2v" else "ask for chunks with Demand"
            raise ValueError(f"session {session_id!r} is {s.mode}: {other}")
        return s

    def status(self, s: SessionState) -> SessionStatus:
        denoising = sum(1 for c in s.in_flight if not c.clean and not c.phantom)
        return SessionStatus(
            session_id=s.session_id,
            mode=s.mode,
            epoch=s.epoch,
            next_chunk_index=s.next_chunk_index,
            next_video_frame=s.next_video_frame,
            demand=s.demand,
            denoising=denoising,
            in_flight=sum(1 for c in s.in_flight if not c.phantom),  # a per-step phantom is no chunk of the session
            undelivered=s.undelivered,
            decoding=s.undelivered - denoising,
            input=s.intake.need() if s.intake is not None else NO_INPUT,
            params=s.params,
            deadline_misses=s.deadline_misses,
        )

    # ---- the tick -----------------------------------------------------------------------------

    def has_work(self) -> bool:
        """Something is in flight, waiting to start, or being decoded."""
        return (
            self._work is not None
            or bool(self._out)
            or self.executor.pending() > 0
            or any(
                s.in_flight or s.has_input() or (s.intake is not None and s.intake.ready())
                for s in self.sessions.values()
            )
        )

    def step(self) -> StepOutput:
        """One tick: intake, then the next tick planned, committed and issued whole, each micro-batch
        as soon as its inputs are back; the chunks decoded since the last call and where every session
        stands. Commands come between steps, so never inside a tick."""
        t0 = time.perf_counter()
        self._intake()
        out = self._take(self.executor.poll(0.0))
        tick = self.stats.ticks
        if not self._commit():
            out += self._take(self.executor.poll(WAIT_S if self.executor.pending() else 0.0))
            return self._output(None, out)
        while self._work is not None:
            if not self._issue():
                out += self._take(self.executor.poll(WAIT_S))  # its inputs are on their way back
        out += self._take(self.executor.poll(0.0))
        self.stats.tick_seconds.append(time.perf_counter() - t0)
        return self._output(tick, out)

    def _output(self, tick: int | None, chunks: list[DecodedChunk]) -> StepOutput:
        sessions = {sid: self.status(s) for sid, s in self.sessions.items()}
        return StepOutput(tick, tuple(chunks), sessions, self.has_work())

    def _intake(self) -> None:
        for s in self.sessions.values():
            if s.intake is not None and s.intake.ready():
                with self.timer.phase("encode"):
                    s.intake.encode()

    def _commit(self) -> bool:
        """Plan the next tick and commit it (the structural half of the update step)."""
        plan = self.scheduler.schedule(self.stats.ticks, list(self.sessions.values()))
        if not plan.slots:
            return False
        chunks = self.scheduler.commit(plan, self.sessions, self._enter)
        self._work = TickWork(plan, chunks, self.executor.split(plan))
        self.stats.ticks += 1
        self.stats.slots += len(plan.slots)
        return True

    def _enter(self, s: SessionState, slot: Slot) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
        """An admitted chunk's first input: noise (t2v), or its input chunk noised to its first σ (v2v)."""
        env = slot.envelope
        shape = (self.config.model.latent_channels, slot.frames, *self.config.latent_size)
        text = self.models.text(env.params.prompt).to(self.dtype)
        if slot.phantom:
            return torch.zeros(shape, dtype=self.dtype, device=self.device), text, ()
        noise = self.noise(env, 0, shape)
        if s.intake is None:
            return noise, text, ()
        chunk = s.intake.take()
        return self.models.sampler.noised(chunk.latents, slot.sigma, noise), text, chunk.arrived

    def _keyed_noise(self, env: Envelope, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        """ε of chunk ``env`` entering ``step`` (0: its first input): keyed, independent of batching
        (``pipeline.sampling.chunk_noise``)."""
        return chunk_noise(env.params.seed, env.epoch, env.chunk_index, step, shape, self.dtype, self.device)

    def _issue(self) -> bool:
        """Issue the micro-batches of the current tick whose inputs are here; True if any went."""
        work = self._work
        assert work is not None
        issued = False
        while (m := self.dispatch.next(work, _ready)) is not None:
            group = work.groups[m]
            chunks: list[ChunkState] = [work.chunks[i] for i in group]
            slots = tuple(work.plan.slots[i] for i in group)
            x = torch.stack([c.x for c in chunks])  # type: ignore[misc]  # every one is ready
            for c in chunks:
                c.x = None  # on its way: its next input comes with the result
            sigma = torch.tensor([s.sigma for s in slots], dtype=torch.float32, device=self.device)
            times = torch.tensor([s.model_time for s in slots], dtype=torch.float32, device=self.device)
            text = torch.stack([c.text for c in chunks])
            timing = tuple((c.scheduled_at, c.arrived) for c in chunks)
            last = all(work.issued[k] or k == m for k in range(len(work.groups)))
            mb = MicroBatch(work.plan.tick, m, slots, not any(work.issued), last, timing)
            self.dispatch.issued(work, m)
            self._out[(mb.tick, m)] = _Out(work, m, x, sigma)
            self.executor.submit(mb, Activations(x=x, sigma=sigma, text=text, time=times))
            issued = True
        if work.done:
            self._work = None
        return issued

    def _take(self, events: list[Any]) -> list[DecodedChunk]:
        """Fold results back into their chunks (the value half of the update step); keep decoded
        chunks of current epochs, in order, and count them out."""
        out = []
        for event in events:
            if isinstance(event, Denoised):
                self._fold(event)
                continue
            env = event.envelope
            s = self.sessions.get(env.session_id)
            if s is None or env.stale(s.epoch):
                continue  # closed, or cut since: its frames never appear
            self.scheduler.delivered(s, env, self.clock())
            self.stats.chunks_out += 1
            self.stats.frames_out += event.num_frames
            out.append(event)
        return out

    def _fold(self, result: Denoised) -> None:
        done = self._out.pop((result.tick, result.index))
        self.dispatch.returned()
        group = done.work.groups[done.index]
        for j, i in enumerate(group):
            slot, chunk = done.work.plan.slots[i], done.work.chunks[i]
            s = self.sessions.get(slot.envelope.session_id)
            if s is None or slot.envelope.stale(s.epoch):
                continue
            fold(chunk, slot, done.x[j], done.sigma[j : j + 1], result.x0[j], self.models.sampler, self.noise)


def _ready(chunk: ChunkState) -> bool:
    return chunk.ready
