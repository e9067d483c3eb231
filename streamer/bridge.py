"""The bridge: the engine in its own thread, the event loop on the other side of bounded queues.

The loop never waits on the model. Commands (:mod:`pipeline.commands`: data, never closures) go to the
worker through ``D_in``, a bounded queue: when it is full a caller's coroutine waits for room
(backpressure) while the loop keeps running; the worker applies them between steps and the typed result
(or the error) comes back through a future. The worker drives the engine with the one feed loop
(:class:`pipeline.feeder.Feeder`): a v2v session's frames are pulled from its source (the session's
chunker, which wakes the worker when frames come), never polled for. Decoded chunks come
back through ``D_out``: each session has a bounded asyncio queue that drops its oldest chunk when full
(a v2v client that stopped reading: newest wins), and t2v sessions only ask the engine for as many
chunks as their credits allow (:class:`Credits`; credits handed back coalesce into one ``Demand``
command per session), so the worker never blocks on a slow or vanished client and one session never
holds up another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

from pipeline.commands import (
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
    Submit,
    Submitted,
)
from pipeline.engine import Engine
from pipeline.feeder import Feeder, FrameSource
from pipeline.types import DecodedChunk, UserParams, shown, within

MAX_D_IN = 4096  # commands waiting for the engine thread
MAX_D_OUT = 64  # decoded chunks waiting per session

_STOP = object()
_WAKE = object()  # wakes an idle engine thread: credits were given, or frames came (at most one in D_in at once)


@dataclass
class BridgeStats:
    ticks: int = 0
    tick_times: deque[float] = field(default_factory=lambda: deque(maxlen=500))  # monotonic end of recent ticks
    commands: int = 0

    def ticks_per_s(self, window: float = 5.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.tick_times if now - t <= window]
        return len(recent) / window


@dataclass
class Credits:
    """How many chunks a t2v session keeps asked for and not yet taken (in the pipeline or in D_out).

    Few credits keep latency low (a chunk is started shortly before it is shown, so a new prompt
    shows soon), but fewer than the pipeline depth leave StreamBatch slots empty. So the number
    adapts between ``low`` (D_out) and ``high`` (D_out + pipeline depth): each time the consumer
    starves (its chunk came later than it needed it: generation is behind playback) it grows by
    one; after ``patience`` takes in a row without starving it shrinks by one. An engine slower
    than real time, or a consumer that takes frames as fast as they come, gets a full pipeline; an
    engine faster than real time runs the shortest one that does not stall playback."""

    low: int
    high: int
    patience: int = 0  # 0: ``high`` takes
    target: int = field(init=False)
    _ahead: int = field(default=0, init=False)  # takes in a row that found a chunk waiting

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"credits low={self.low}, high={self.high} are not allowed: 1 <= low <= high")
        self.target = self.low
        self.patience = self.patience or self.high

    def after_take(self, starved: bool) -> int:
        """A chunk was taken; ``starved``: it came later than the consumer needed it. Returns how
        many chunks to ask the engine for now."""
        if starved:
            self._ahead = 0
            if self.target < self.high:
                self.target += 1
                return 2
            return 1
        self._ahead += 1
        if self._ahead >= self.patience and self.target > self.low:
            self._ahead = 0
            self.target -= 1
            return 0
        return 1


class EngineBridge:
    """Owns an :class:`Engine` and the thread that runs it."""

    def __init__(self, engine: Engine, d_in: int = 64, d_out: int = 4) -> None:
        if not (within(d_in, 1, MAX_D_IN, integer=True) and within(d_out, 1, MAX_D_OUT, integer=True)):
            raise ValueError(
                f"D_in={shown(d_in)}, D_out={shown(d_out)} are not allowed: 1 to {MAX_D_IN} and 1 to {MAX_D_OUT}"
            )
        self.engine = engine
        self.d_in = d_in
        self.d_out = d_out  # per session: chunks decoded and not yet taken
        self.stats = BridgeStats()
        # D_in: commands wait for room on the semaphore ``_room`` (backpressure, nothing dropped); the
        # queue holds those ``d_in`` commands plus one wake marker (coalesced) and the stop marker.
        self._commands: queue.Queue[Any] = queue.Queue(maxsize=d_in + 2)
        self._queued = 0  # commands in D_in (loop side)
        # t2v credits given back and not yet passed to the engine: sid -> chunks. Written on the loop,
        # applied by the engine thread before each tick.
        self._grants: dict[str, int] = {}
        self._grants_lock = threading.Lock()
        self._wake_queued = False  # a wake marker is in D_in: later grants and frames ride on it
        self._epochs: dict[str, int] = {}  # each session's epoch: chunks of older ones give no credit back
        self._cutting: set[str] = set()  # sessions whose cut is on its way to the engine
        self._room: asyncio.Semaphore | None = None
        self._outputs: dict[str, asyncio.Queue[DecodedChunk]] = {}
        self._credits: dict[str, Credits] = {}  # t2v sessions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    # ---- lifecycle (loop side) ----------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Semaphore(self.d_in)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._commands.put_nowait(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None

    @property
    def failure(self) -> str | None:
        """Why the engine stopped, for /api/health (a stage that died, a bug), or None."""
        return None if self._failed is None else f"{type(self._failed).__name__}: {self._failed}"

    def queue_depths(self) -> dict[str, Any]:
        return {
            "d_in": self._queued,
            "d_in_max": self.d_in,
            "d_out": {sid: q.qsize() for sid, q in self._outputs.items()},
            "d_out_max": self.d_out,
            "t2v_credits": {sid: c.target for sid, c in self._credits.items()},
        }

    # ---- commands (loop side) -----------------------------------------------------------------

    @overload
    async def apply(self, command: Open, source: FrameSource | None = None) -> Opened: ...
    @overload
    async def apply(self, command: Close) -> Closed: ...
    @overload
    async def apply(self, command: Demand | Query) -> SessionStatus: ...
    @overload
    async def apply(self, command: Submit) -> Submitted: ...
    @overload
    async def apply(self, command: SetParams) -> ParamsSet: ...
    @overload
    async def apply(self, command: Cut) -> CutDone: ...

    async def apply(self, command: Command, source: FrameSource | None = None) -> Result:
        """Apply ``command`` on the engine thread between steps; its result, or its exception. ``source``: an
        ``Open``'s v2v input, which the engine thread's feeder pulls frames from."""
        if self._loop is None or self._room is None:
            raise RuntimeError("EngineBridge.start() was not awaited")
        if self._failed is not None:
            raise RuntimeError(f"the engine stopped: {self.failure}")
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        await self._room.acquire()  # D_in: wait for room without blocking the loop
        self._queued += 1
        self._commands.put_nowait((command, future, source))
        return await asyncio.wrap_future(future)

    def wake(self) -> None:
        """Wake an idle engine thread (frames came for a v2v session); from any thread, never blocks, and
        wakes pending at once coalesce into one."""
        with self._grants_lock:
            wake, self._wake_queued = not self._wake_queued, True
        if wake:
            self._commands.put_nowait(_WAKE)

    def _grant(self, sid: str, chunks: int) -> None:
        """Give a t2v session ``chunks`` more credits without waiting for the engine: it applies them
        before its next tick. Awaiting a command here would hold each chunk on its way to the client
        until the running tick ends."""
        with self._grants_lock:
            self._grants[sid] = self._grants.get(sid, 0) + chunks
        self.wake()

    def _apply_grants(self, feeder: Feeder, woken: bool = False) -> None:
        """Pass the credits given so far to the engine, one Demand per session (``woken``: called for
        the wake marker)."""
        with self._grants_lock:
            grants, self._grants = self._grants, {}
            if woken:
                self._wake_queued = False
        for sid, chunks in grants.items():
            with contextlib.suppress(KeyError):  # closed meanwhile
                feeder.apply(Demand(sid, chunks))

    async def open_session(self, params: UserParams, mode: str, source: FrameSource | None = None) -> str:
        """A session: t2v, fed by credits; v2v, fed from ``source`` (the session's chunker)."""
        opened = await self.apply(Open(params, mode), source)
        sid = opened.session_id
        self._epochs[sid] = opened.status.epoch
        if mode == "t2v":
            credits = self._credits[sid] = Credits(self.d_out, self.d_out + self.engine.pipeline_depth)
            # The credits bound what is asked for and not taken, so this never fills with the current
            # epoch's chunks; twice that leaves room for old-epoch chunks still queued when a cut comes.
            # Drop policy when full (see _deliver): drop the oldest.
            self._outputs[sid] = asyncio.Queue(maxsize=2 * credits.high)
            self._grant(sid, credits.target)
        else:
            self._outputs[sid] = asyncio.Queue(maxsize=self.d_out)
        return sid

    async def close_session(self, sid: str) -> None:
        self._outputs.pop(sid, None)
        self._credits.pop(sid, None)
        self._epochs.pop(sid, None)
        with contextlib.suppress(RuntimeError, KeyError):
            await self.apply(Close(sid))

    async def get_chunk(self, sid: str, timeout: float | None = None, lead: float = 0.0) -> DecodedChunk | None:
        """The session's next decoded chunk (in completion order), None after ``timeout`` seconds.
        Taking a t2v chunk gives its credit back: the engine is asked for more (see :class:`Credits`).
        ``lead``: seconds the consumer can still play without this chunk; waiting longer is starving."""
        out = self._outputs[sid]
        asked, waiting = time.monotonic(), not out.empty()
        try:
            chunk = await asyncio.wait_for(out.get(), timeout)
        except TimeoutError:
            return None
        credits = self._credits.get(sid)
        if credits is not None and sid not in self._cutting and not chunk.envelope.stale(self._epochs.get(sid, 0)):
            starved = not waiting and time.monotonic() - asked > lead
            if more := credits.after_take(starved):
                self._grant(sid, more)
        return chunk

    def credits(self, sid: str) -> int | None:
        """A t2v session's chunks asked for and not yet taken (None: v2v or closed)."""
        credits = self._credits.get(sid)
        return None if credits is None else credits.target

    async def cut(self, sid: str) -> tuple[int, int]:
        """Hard cut: returns (new epoch, its first chunk index), as the engine answered. Old-epoch chunks
        already queued are dropped (they were delivered before the cut's answer: callbacks keep their
        order). A t2v session's chunks in flight will never come, so its demand is set to its credits
        in the same command; chunks taken while the cut is on its way, and old-epoch chunks taken after
        it, give no credit back."""
        credits = self._credits.get(sid)
        self._cutting.add(sid)
        with self._grants_lock:
            self._grants.pop(sid, None)  # the cut's demand covers them
        try:
            done = await self.apply(Cut(sid, demand=credits.target if credits is not None else None))
        finally:
            self._cutting.discard(sid)
        self._epochs[sid] = done.epoch
        self.drain(sid, keep=lambda c: not c.envelope.stale(done.epoch))
        return done.epoch, done.first_chunk_index

    def drain(self, sid: str, keep: Callable[[DecodedChunk], bool]) -> int:
        """Drop queued chunks of ``sid`` that ``keep`` rejects (a cut); returns how many. They give
        no t2v credit back (see :meth:`cut`)."""
        out = self._outputs.get(sid)
        if out is None:
            return 0
        kept, dropped = [], 0
        while not out.empty():
            c = out.get_nowait()
            if keep(c):
                kept.append(c)
            else:
                dropped += 1
        for c in kept:
            out.put_nowait(c)
        return dropped

    # ---- the engine thread --------------------------------------------------------------------

    def _release_room(self) -> None:
        assert self._room is not None
        self._queued -= 1
        self._room.release()

    def _next_command(self) -> Any:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        feeder = Feeder(self.engine)  # the one feed loop, on this thread
        try:
            while True:
                self._apply_grants(feeder)
                idle = not self.engine.has_work()
                try:
                    # Wait for a command (or a wake) only when there is nothing to compute.
                    item = self._commands.get(timeout=0.05) if idle else self._commands.get_nowait()
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        return
                    if item is _WAKE:
                        self._apply_grants(feeder, woken=True)
                        item = self._next_command()
                        continue
                    loop.call_soon_threadsafe(self._release_room)
                    command, future, source = item
                    if future.set_running_or_notify_cancel():
                        try:
                            result = feeder.apply(command) if source is None else feeder.open(command, source)
                            future.set_result(result)
                        except Exception as e:  # bad input reaches the caller, the engine goes on
                            future.set_exception(e)
                    self.stats.commands += 1
                    item = self._next_command()
                out = feeder.step()
                if out.tick is not None:
                    self.stats.ticks += 1
                    self.stats.tick_times.append(time.monotonic())
                for chunk in out.chunks:
                    loop.call_soon_threadsafe(self._deliver, chunk)
        except BaseException as e:  # a stage that died, or a bug: every caller hears of it
            self._failed = e
            self._fail_waiting(e)
            raise
        finally:
            self.engine.close()

    def _fail_waiting(self, error: BaseException) -> None:
        """Commands still in D_in get the engine's failure as their answer, not a wait for ever."""
        while (item := self._next_command()) is not None:
            if isinstance(item, tuple):
                _, future, _ = item
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError(f"the engine stopped: {error!r}"))

    def _deliver(self, chunk: DecodedChunk) -> None:
        out = self._outputs.get(chunk.envelope.session_id)
        if out is None:  # the session closed meanwhile
            return
        if out.full():
            # v2v sessions are paced by their input, and the track takes one chunk per chunk of
            # input; a full queue means the client stopped reading: drop the oldest (newest wins).
            # A t2v queue has room for all its credits and a cut's leftovers, so it does not fill.
            out.get_nowait()
        out.put_nowait(chunk)
