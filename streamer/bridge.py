"""The bridge: the engine in its own thread, the event loop on the other side of bounded queues.

The loop never waits on the model. Commands (open, close, request, submit, params, cut) go to the
worker through ``D_in``, a bounded queue: when it is full a caller's coroutine waits for room
(backpressure) while the loop keeps running. Decoded chunks come back through ``D_out``: each
session has a bounded asyncio queue, and t2v sessions only ask the engine for as many chunks as
their queue has room for (credits), so the worker never blocks on a slow or vanished client and
one session never holds up another. A command's result or error comes back through a future.
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
from typing import Any, TypeVar

from pipeline.engine import Engine
from pipeline.types import DecodedChunk

T = TypeVar("T")

_STOP = object()


@dataclass
class BridgeStats:
    ticks: int = 0
    tick_times: deque[float] = field(default_factory=lambda: deque(maxlen=500))  # monotonic end of recent ticks
    commands: int = 0

    def ticks_per_s(self, window: float = 5.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.tick_times if now - t <= window]
        return len(recent) / window


class EngineBridge:
    """Owns an :class:`Engine` and the thread that runs it."""

    def __init__(self, engine: Engine, d_in: int = 64, d_out: int = 4) -> None:
        if d_in < 1 or d_out < 1:
            raise ValueError(f"D_in={d_in}, D_out={d_out} are not allowed: both at least 1")
        self.engine = engine
        self.d_in = d_in
        self.d_out = d_out  # per session: chunks decoded and not yet taken
        self.stats = BridgeStats()
        self._commands: queue.Queue[Any] = queue.Queue(maxsize=d_in)
        self._room: asyncio.Semaphore | None = None
        self._outputs: dict[str, asyncio.Queue[DecodedChunk]] = {}
        self._modes: dict[str, str] = {}
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
        while True:  # the stop marker must get in even when D_in is full
            try:
                self._commands.put_nowait(_STOP)
                break
            except queue.Full:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None

    def queue_depths(self) -> dict[str, Any]:
        return {
            "d_in": self._commands.qsize(),
            "d_in_max": self.d_in,
            "d_out": {sid: q.qsize() for sid, q in self._outputs.items()},
            "d_out_max": self.d_out,
        }

    # ---- commands (loop side) -----------------------------------------------------------------

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between ticks; its result or exception."""
        if self._loop is None or self._room is None:
            raise RuntimeError("EngineBridge.start() was not awaited")
        if self._failed is not None:
            raise RuntimeError(f"the engine thread stopped: {self._failed!r}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        await self._room.acquire()  # D_in: wait for room without blocking the loop
        try:
            self._commands.put_nowait((fn, future))
        except queue.Full:  # cannot happen while every put holds the semaphore
            self._room.release()
            raise
        return await asyncio.wrap_future(future)

    async def open_session(self, params: dict[str, Any], mode: str) -> str:
        sid = await self.call(lambda e: e.open_session(params, mode))
        self._outputs[sid] = asyncio.Queue(maxsize=self.d_out)
        self._modes[sid] = mode
        if mode == "t2v":
            await self.call(lambda e: e.request(sid, self.d_out))  # one credit per place in D_out
        return sid

    async def close_session(self, sid: str) -> None:
        self._outputs.pop(sid, None)
        self._modes.pop(sid, None)
        with contextlib.suppress(RuntimeError, KeyError):
            await self.call(lambda e: e.close_session(sid))

    async def get_chunk(self, sid: str, timeout: float | None = None) -> DecodedChunk | None:
        """The session's next decoded chunk (in completion order), None after ``timeout`` seconds.
        Taking a t2v chunk frees its place in D_out: the engine is asked for one more."""
        try:
            chunk = await asyncio.wait_for(self._outputs[sid].get(), timeout)
        except TimeoutError:
            return None
        if self._modes.get(sid) == "t2v":
            await self.call(lambda e: e.request(sid, 1) if sid in e.sessions else None)
        return chunk

    async def cut(self, sid: str) -> tuple[int, int]:
        """Hard cut: returns (new epoch, its first chunk index). Old-epoch chunks already queued are
        dropped (they were delivered before the cut's answer: callbacks keep their order); a t2v
        session's credits are reset, since the chunks it had in flight will never come."""

        def cut(e: Engine) -> tuple[int, int]:
            return e.cut(sid), e.next_chunk_index(sid)

        epoch, first = await self.call(cut)
        self.drain(sid, keep=lambda c: c.envelope.epoch >= epoch)
        if self._modes.get(sid) == "t2v":
            room = self.d_out - self._outputs[sid].qsize()
            await self.call(lambda e: e.set_demand(sid, room))
        return epoch, first

    def drain(self, sid: str, keep: Callable[[DecodedChunk], bool]) -> int:
        """Drop queued chunks of ``sid`` that ``keep`` rejects (a cut); returns how many.
        Their t2v credits are the caller's to give back (see :meth:`cut`)."""
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
        self._room.release()

    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            while True:
                idle = not self.engine.has_work()
                try:
                    # Wait for a command only when there is nothing to compute.
                    item = self._commands.get(timeout=0.05) if idle else self._commands.get_nowait()
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        return
                    loop.call_soon_threadsafe(self._release_room)
                    fn, future = item
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(self.engine))
                        except Exception as e:  # bad input reaches the caller, the engine goes on
                            future.set_exception(e)
                    self.stats.commands += 1
                    try:
                        item = self._commands.get_nowait()
                    except queue.Empty:
                        item = None
                if not self.engine.has_work():
                    continue
                chunks = self.engine.step()
                self.stats.ticks += 1
                self.stats.tick_times.append(time.monotonic())
                for chunk in chunks:
                    loop.call_soon_threadsafe(self._deliver, chunk)
        except BaseException as e:  # a bug in the engine: every caller hears of it
            self._failed = e
            raise

    def _deliver(self, chunk: DecodedChunk) -> None:
        out = self._outputs.get(chunk.envelope.session_id)
        if out is None:  # the session closed meanwhile
            return
        if out.full():
            # v2v sessions are paced by their input, and the track takes one chunk per chunk of
            # input; a full queue means the client stopped reading: drop the oldest (newest wins).
            out.get_nowait()
        out.put_nowait(chunk)
