"""Outputs of ``streamer run``: each runs in its own thread behind a bounded queue.

Generation never waits on encoding or on the network: :meth:`OutputThread.put` never blocks. When
a queue is full its policy, ``drop-oldest``, drops the oldest frames waiting (a live stream stays
current) and counts them; the count is reported at the end. Files get a queue long enough that
they keep every frame on any machine that generates in real time; a live stream gets a short one.

A sink that fails is aborted at once, by its own thread (a file's partial file is removed then, not at
the end of the run), before its ``error`` is set: whoever sees the error sees it cleaned up.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

POLICY = "drop-oldest"
_END = None


class Sink(Protocol):
    """One destination, driven from its own thread."""

    name: str

    def write(self, frames: np.ndarray) -> None:
        """uint8 [N, H, W, 3] frames, in order."""
        ...

    def close(self) -> object:
        """Finish cleanly (a playable file, a stream ended properly)."""
        ...

    def abort(self) -> None:
        """Give up: remove what is half-written. Never raises; a second call does nothing."""
        ...


@dataclass
class OutputReport:
    name: str
    frames: int  # frames that reached the sink
    dropped: int  # frames dropped by the queue's policy
    policy: str
    error: str | None  # why the sink failed, if it did


class OutputThread:
    """A sink behind a bounded queue of ``capacity`` frames, written by its own thread."""

    def __init__(self, sink: Sink, capacity: int, on_error: Callable[[str, str], None] | None = None) -> None:
        self.sink = sink
        self.capacity = capacity
        self.frames = 0
        self.dropped = 0
        self.error: str | None = None
        self._on_error = on_error
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()  # makes drop-oldest + put one step against other producers
        self._count_lock = threading.Lock()  # dropped is counted from both the producer and this thread
        self._thread = threading.Thread(target=self._run, name=f"output:{sink.name}", daemon=True)
        self._thread.start()

    def put(self, frames: np.ndarray) -> None:
        """Queue frames; never blocks. Full: the oldest frames waiting are dropped (counted)."""
        if self.error is not None:
            self._drop(len(frames))
            return
        with self._lock:
            for frame in frames:
                while True:
                    try:
                        self._queue.put_nowait(frame)
                        break
                    except queue.Full:
                        with contextlib.suppress(queue.Empty):
                            if self._queue.get_nowait() is not None:
                                self._drop(1)

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            batch = [frame]
            while len(batch) < 16:  # hand the sink what is waiting in one call
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(batch)
                    return
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[np.ndarray]) -> None:
        if self.error is not None:
            self._drop(len(batch))
            return
        try:
            self.sink.write(np.stack(batch))
            self.frames += len(batch)
        except Exception as e:  # the sink gave up (after its own retries): the run goes on without it
            error = f"{type(e).__name__}: {e}"
            self.sink.abort()  # nothing half-written stays behind, from now on
            self.error = error
            self._drop(len(batch))
            if self._on_error is not None:
                self._on_error(self.sink.name, error)

    def _drop(self, n: int) -> None:
        with self._count_lock:
            self.dropped += n

    def finish(self) -> OutputReport:
        """Write what is queued, then close the sink; one that fails to close is aborted."""
        self._queue.put(_END)  # blocks only until the thread makes room
        self._thread.join()
        if self.error is None:
            try:
                self.sink.close()
            except Exception as e:
                self.sink.abort()
                self.error = f"{type(e).__name__}: {e}"
        return self.report()

    def abort(self) -> None:
        with contextlib.suppress(queue.Full):
            while True:  # empty the queue so the end marker gets in
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put_nowait(_END)
        self._thread.join(timeout=10)
        self.sink.abort()

    def report(self) -> OutputReport:
        return OutputReport(self.sink.name, self.frames, self.dropped, POLICY, self.error)
