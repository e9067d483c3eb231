"""The transport between stages: ``torch.distributed`` point-to-point (NCCL on GPUs, gloo on a CPU).

A message is a small header (any picklable data: a micro-batch's slots with their envelopes and
steps, a decoded chunk's envelope, a control) and the tensors that go with it. It travels as a
length record, the pickled header, then each tensor, in order on one link (sends and receives
between two ranks are matched in order).

- **Sends are asynchronous and bounded**: at most ``max_sends`` messages wait to be sent on a link (a
  thread sends them); a send past that waits for room. Receiving is a thread too (:class:`Link`).
- **Every wait watches the ring** (:class:`Board`): rank 0 hosts the rendezvous store; every rank bumps
  its heartbeat counter there every ``BEAT_S`` from a thread of its own, and stops when its main loop
  has been stuck in one piece of work for ``timeout`` seconds. A rank whose counter has not moved for
  ``timeout`` seconds died or hangs; the first rank to see it (or any error) posts it on the board,
  and every rank reads the board while it waits, so all of them stop with the same clear error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

HOOK_S = 0.01  # how often a waiting receive runs its while_waiting hook (the last stage sends decoded chunks)
CHECK_S = 0.2  # how often the board is read while waiting
BEAT_S = 0.25  # how often a rank's heartbeat counter moves
HEADER_BYTES = 1 << 20  # a header larger than this is a bug (they are a few KiB)
RECEIVED_MAX = 1024  # messages received and not yet taken, on one link


class StageFailure(RuntimeError):
    """A stage died, hangs, or stopped with an error: the ring cannot go on."""


@dataclass(frozen=True)
class Ring:
    """This process's place in the ring."""

    rank: int
    world: int  # stages
    device: torch.device
    addr: str  # the store's host (rank 0)
    port: int

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world


def connect(ring: Ring, backend: str, timeout: float = 120.0) -> dist.TCPStore:
    """Join the ring: rank 0 hosts the store at ``addr:port`` (the rendezvous, the heartbeats and the
    failure board), the others connect to it; then the process group over that store."""
    host = ring.rank == 0 and not _agent_store()
    store = dist.TCPStore(ring.addr, ring.port, ring.world, host, timeout=datetime.timedelta(seconds=timeout))
    dist.init_process_group(backend, store=store, rank=ring.rank, world_size=ring.world)
    return store


def _agent_store() -> bool:
    """torchrun's agent already hosts the store at MASTER_ADDR:MASTER_PORT: every rank is its client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


class Board:
    """Heartbeats and the failure board, in the ring's store."""

    def __init__(self, store: dist.TCPStore, ring: Ring, timeout: float, processes: Sequence[Any] = ()) -> None:
        self.store = store
        self.ring = ring
        self.timeout = timeout
        self.processes = list(processes)  # stage 0 on one machine: the stages it spawned, rank 1.., watched
        self._busy_since: float | None = None  # the main loop is in one piece of work since then
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it last moved, local time)
        self._checked = 0.0
        self._stop = threading.Event()
        store.add(self._key(ring.rank), 1)
        self._thread = threading.Thread(target=self._beat, name=f"stage{ring.rank}-beat", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"beat/{rank}"

    def _beat(self) -> None:
        # a client of its own: the main thread's may be in a call of its own
        store = dist.TCPStore(
            self.ring.addr, self.ring.port, self.ring.world, False, timeout=datetime.timedelta(seconds=10)
        )
        while not self._stop.wait(BEAT_S):
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.post(f"stuck in one micro-batch for over {self.timeout:g} s", store)
                return
            try:
                store.add(self._key(self.ring.rank), 1)
            except Exception:  # rank 0's store is gone: the main thread hears of it at its next check
                return

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """The main loop is in one piece of work (its heartbeat stops if that takes over ``timeout``)."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def post(self, message: str, store: dist.TCPStore | None = None) -> None:
        """Tell every rank: the first failure posted is the one they all report."""
        store = store or self.store
        with contextlib.suppress(Exception):  # the store's host (stage 0) may be the one that is gone
            if not store.check(["failed"]):
                store.set("failed", f"stage {self.ring.rank}: {message}")

    def check(self, force: bool = False) -> None:
        """Raise :class:`StageFailure` if a failure was posted or a rank's heartbeat stopped."""
        now = time.monotonic()
        if not force and now - self._checked < CHECK_S:
            return
        self._checked = now
        for rank, p in enumerate(self.processes, start=1):
            if (code := p.poll()) is not None:
                self.post(f"stage {rank} (pid {p.pid}) exited with status {code}")
                raise StageFailure(f"stage {rank} (pid {p.pid}) exited with status {code}")
        try:
            if self.store.check(["failed"]):
                raise StageFailure(self.store.get("failed").decode())
            keys = [self._key(r) for r in range(self.ring.world)]
            if not self.store.check(keys):
                return  # not every rank is up yet
            counts = self.store.multi_get(keys)
        except StageFailure:
            raise
        except Exception as e:
            raise StageFailure(f"stage 0 (the ring's store) is gone: {type(e).__name__}: {e}") from None
        for rank, raw in enumerate(counts):
            count = int(raw)
            last, since = self._beats.get(rank, (-1, now))
            if count != last:
                self._beats[rank] = (count, now)
            elif now - since > self.timeout:
                message = f"stage {rank} sent no heartbeat for {now - since:.1f} s: it died or hangs"
                self.post(message)
                raise StageFailure(self.store.get("failed").decode() if self.store.check(["failed"]) else message)

    def close(self) -> None:
        self._stop.set()


@dataclass
class Message:
    kind: str
    header: Any
    tensors: list[torch.Tensor]


STOP_KINDS = ("stop",)  # after one of these, a link's threads leave


class Link:
    """This rank's messages: sent to the next rank, received from the previous one.

    gloo's point-to-point work cannot be polled (it reports completion only once waited for), so each
    direction has a thread that blocks in it: the sender takes messages from a bounded queue (a send past
    ``max_sends`` waits for room), the receiver puts each message it has whole into a queue the main
    thread reads with a timeout. Each direction has a process group of its own (``groups``), so the two
    threads never share a communicator (NCCL needs that; gloo is fine with it)."""

    def __init__(self, ring: Ring, board: Board, groups: dict[tuple[int, int], Any], max_sends: int = 4) -> None:
        self.ring = ring
        self.board = board
        self._out_group = groups[(ring.rank, ring.next)]
        self._in_group = groups[(ring.prev, ring.rank)]
        self._sends: queue.Queue[Message] = queue.Queue(maxsize=max_sends)
        # What comes in is bounded at its source (the dispatcher lets 2S micro-batches out, the decode
        # queue bounds decoded chunks), so this never fills; were it to, the receiver would wait (block).
        self._received: queue.Queue[Message | BaseException] = queue.Queue(maxsize=RECEIVED_MAX)
        self._sending = 0  # messages queued or being sent
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._sender = threading.Thread(target=self._send_loop, name=f"stage{ring.rank}-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name=f"stage{ring.rank}-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    # ---- the main thread's side -------------------------------------------------------------------

    def send(self, kind: str, header: Any, tensors: list[torch.Tensor] | None = None) -> None:
        """Queue a message for the next rank; waits (watching the ring) while ``max_sends`` are queued."""
        message = Message(kind, header, [t.contiguous() for t in (tensors or [])])
        with self._lock:
            self._sending += 1
        while True:
            try:
                self._sends.put(message, timeout=CHECK_S)
                return
            except queue.Full:
                self.board.check()

    def receive(self, timeout: float | None = None, while_waiting: Callable[[], None] | None = None) -> Message | None:
        """The next message from the previous rank; None if none came within ``timeout`` seconds (None:
        wait as long as the ring is alive)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = CHECK_S if end is None else max(0.0, min(CHECK_S, end - time.monotonic()))
            if while_waiting is not None:
                wait = min(wait, HOOK_S)
            try:
                got = self._received.get(timeout=wait) if wait > 0 else self._received.get_nowait()
            except queue.Empty:
                self.board.check()
                if while_waiting is not None:
                    while_waiting()
                if end is not None and time.monotonic() >= end:
                    return None
                continue
            if isinstance(got, BaseException):
                self._broken(got)
            return got

    def _broken(self, error: BaseException) -> NoReturn:
        """The link from the previous stage broke: say why if anyone can (a process that exited, a failure
        posted), else say what broke."""
        for _ in range(10):
            self.board.check(force=True)
            time.sleep(0.05)
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        message = f"the link from stage {self.ring.prev} broke: it died or closed the connection ({detail})"
        self.board.post(message)
        raise StageFailure(f"stage {self.ring.rank}: {message}")

    def flush(self) -> None:
        """Wait until every queued message has been sent."""
        while True:
            with self._idle:
                if self._sending == 0:
                    return
                self._idle.wait(CHECK_S)
            self.board.check()

    # ---- the threads ------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        device, dst, group = self.ring.device, self.ring.next, self._out_group
        while True:
            message = self._sends.get()
            try:
                specs = [(tuple(t.shape), t.dtype) for t in message.tensors]
                blob = pickle.dumps((message.kind, message.header, specs))
                if len(blob) > HEADER_BYTES:
                    raise RuntimeError(f"a {message.kind} header of {len(blob)} bytes is over {HEADER_BYTES}")
                length = torch.tensor([len(blob)], dtype=torch.int64, device=device)
                payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
                for t in (length, payload, *message.tensors):
                    dist.send(t, dst, group=group)
            except Exception as e:  # the next rank is gone: the main thread hears of it from the board
                self.board.post(f"sending to stage {dst} failed: {type(e).__name__}: {e}")
                return
            finally:
                with self._idle:
                    self._sending -= 1
                    self._idle.notify_all()
            if message.kind in STOP_KINDS:
                return

    def _receive_loop(self) -> None:
        device, src, group = self.ring.device, self.ring.prev, self._in_group
        while True:
            try:
                length = torch.zeros(1, dtype=torch.int64, device=device)
                dist.recv(length, src, group=group)
                blob = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
                dist.recv(blob, src, group=group)
                kind, header, specs = pickle.loads(blob.cpu().numpy().tobytes())
                tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
                for t in tensors:
                    dist.recv(t, src, group=group)
            except Exception as e:  # the previous rank is gone
                self._received.put(e)
                return
            self._received.put(Message(kind, header, tensors))
            if kind in STOP_KINDS:
                return


def edge_groups(world: int) -> dict[tuple[int, int], Any]:
    """A process group for each directed edge of the ring (r -> r+1), made in the same order on every rank."""
    groups = {}
    for r in range(world):
        nxt = (r + 1) % world
        groups[(r, nxt)] = dist.new_group(ranks=sorted({r, nxt}))
    return groups


def stage_device(config_device: str, rank: int) -> torch.device:
    """A stage's device: ``cuda`` becomes its local GPU (torchrun's LOCAL_RANK, else the rank)."""
    if config_device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device(config_device)
