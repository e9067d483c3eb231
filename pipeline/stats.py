"""The engine's own timings: wall time per call of each phase (encode, DiT, decode, whole tick).

On a GPU a phase is timed with CUDA events on the stream it runs on and read once they have passed,
so measuring never synchronises the streams it measures (decode overlapping the DiT stays overlapped).
Benchmarks read these instead of wrapping the engine's parts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

MAX_RECORDS = 2000


class PhaseTimer:
    def __init__(self, device_type: str = "cpu") -> None:
        self.cuda = device_type == "cuda"
        self._seconds: dict[str, deque[float]] = {}
        self._events: deque[tuple[str, Any, Any]] = deque()  # CUDA: (phase, start, end) not yet read
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds.setdefault(name, deque(maxlen=MAX_RECORDS)).append(seconds)

    def seconds(self, name: str) -> list[float]:
        """Recorded times of ``name`` (CUDA: those whose events have passed), oldest first."""
        self._read_events()
        with self._lock:
            return list(self._seconds.get(name, ()))

    def names(self) -> list[str]:
        self._read_events()
        with self._lock:
            return sorted(self._seconds)

    def clear(self) -> None:
        self._read_events()
        with self._lock:
            self._seconds.clear()

    def _read_events(self) -> None:
        with self._lock:
            while self._events and self._events[0][2].query():
                name, start, end = self._events.popleft()
                self._seconds.setdefault(name, deque(maxlen=MAX_RECORDS)).append(start.elapsed_time(end) / 1000)
