"""Block split over processes: the StreamBatch spread around a ring of stages (DESIGN §6).

Stage 0 (this process, beside the engine) takes the engine's commands and encodes, embeds and runs
the first blocks; stage r runs its blocks; the last stage runs the head, hands each result back to
stage 0 and decodes the chunks that leave clean (its own decode phase, beside its blocks).
Micro-batches go round 0 -> 1 -> ... -> S-1 -> 0, and round again for their next step, so with
T+1 >= S micro-batches per tick every stage has work (:mod:`pipeline.stages.dispatch`).

Messages on the ring (:mod:`pipeline.stages.transport`), each in order on its link:

- ``work``: a :class:`~pipeline.stages.stage.MicroBatch` (its slots' envelopes and steps) and its
  activations, stage to stage;
- ``result``: a micro-batch's x0, last stage -> stage 0;
- ``decoded``: a decoded chunk (envelope, pts, timing) and its frames, last stage -> stage 0;
- ``control``: session changes (a cut's epoch, a close), sent at once, applied by every stage in
  order with the work around it; it goes no further than the last stage;
- ``stop``: round the ring; each stage leaves after passing it on, stage 0 when it is back.

Commands reach the engine only between ticks, and a tick is issued whole before ``step`` returns, so
a control never falls inside a tick: every stage applies it after that tick's writes and before the
next tick's reads. The last stage's messages carry its decode tally, so stage 0 knows how many
decodes are still to come.
"""

from __future__ import annotations

import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from pipeline.executor import Activations, Control, Denoised, Event, MicroBatch, split_slots
from pipeline.scheduler import TickPlan
from pipeline.stages.stage import Stage
from pipeline.stages.transport import Board, Link, Message, Ring, StageFailure
from pipeline.stats import PhaseTimer

ACTIVATIONS = ("x", "sigma", "hidden", "temb", "tproj", "enc")  # what goes from stage to stage, in order


@dataclass(frozen=True)
class Tally:
    """The last stage's decode count, on every message it sends to stage 0."""

    decoded: int  # chunks decoded and sent
    dropped: int  # chunks dropped as stale before their decode


def pack(act: Activations) -> list[torch.Tensor]:
    tensors = [getattr(act, name) for name in ACTIVATIONS]
    if any(t is None for t in tensors):
        raise RuntimeError("a micro-batch left a stage without its hidden states")
    return tensors


def unpack(tensors: list[torch.Tensor]) -> Activations:
    return Activations(**dict(zip(ACTIVATIONS, tensors, strict=True)))


class RingExecutor:
    """Stage 0's side: the engine's executor when the blocks are spread over S processes."""

    def __init__(
        self,
        stage: Stage,
        ring: Ring,
        board: Board,
        groups: dict[tuple[int, int], Any],
        capacity: int,
        blocks: tuple[range, ...],
        costs: dict[str, Any],
        decode_depth: int,
        processes: Sequence[Any] = (),
        threads: int | None = None,
    ) -> None:
        if not stage.first or stage.last:
            raise ValueError(f"stage 0 of a ring runs the first blocks and not the last; got {stage.blocks}")
        self.stage = stage
        self.ring = ring
        self.board = board
        self.stages = ring.world
        self.capacity = capacity
        self.blocks = blocks  # every stage's blocks
        self.costs = costs  # what the split was made from (pipeline.stages.balance.measure); {}: --split
        self.decode_depth = decode_depth  # 1: the last stage decodes beside its blocks; 0: within them
        self.timer: PhaseTimer = stage.timer
        self.link = Link(ring, board, groups)
        self._expected = 0  # decodes asked for: last steps issued
        self._tally = Tally(0, 0)
        self._out = 0  # micro-batches out
        self._events: deque[Event] = deque()
        self._closed = False
        self.processes = list(processes)  # the stages this process spawned (none under torchrun)
        self._threads = threads  # this process's torch threads before the ring took its share

    def split(self, plan: TickPlan) -> list[tuple[int, ...]]:
        return split_slots(plan.slots, "step", self.stages)

    def submit(self, mb: MicroBatch, act: Activations) -> None:
        with self.board.busy():
            out = self.stage.run(mb, act)
        self.link.send("work", mb, pack(out))
        self._out += 1
        self._expected += sum(1 for s in mb.slots if s.decodes)

    def control(self, control: Control) -> None:
        self.stage.apply(control)  # stage 0 has run everything issued: at once is in order
        self.link.send("control", control)

    def poll(self, timeout: float) -> list[Event]:
        end = time.monotonic() + timeout
        while True:
            message = self.link.receive(0.0 if self._events else max(0.0, end - time.monotonic()))
            if message is None:
                break
            self._take(message)
        events = list(self._events)
        self._events.clear()
        return events

    def _take(self, message: Message) -> None:
        if message.kind == "result":
            tick, index, self._tally = message.header
            self._out -= 1
            self._events.append(Denoised(tick, index, message.tensors[0]))
        elif message.kind == "decoded":
            chunk, self._tally = message.header
            frames = message.tensors[0].cpu().numpy()
            latents = message.tensors[1].cpu() if len(message.tensors) > 1 else None
            self._events.append(replace(chunk, frames=frames, latents=latents))
        else:
            raise RuntimeError(f"stage 0 got a {message.kind!r} message from the last stage")

    def pending(self) -> int:
        return self._out + self._expected - self._tally.decoded - self._tally.dropped

    def close(self) -> None:
        """Stop the ring: every stage passes the stop on and leaves; stage 0 waits for it to come back."""
        if self._closed:
            return
        self._closed = True
        failed = False
        try:
            self.link.send("stop", None)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                message = self.link.receive(0.1)
                if message is not None and message.kind == "stop":
                    break
            self.link.flush()
        except StageFailure:
            failed = True  # the stages that are left stop on their own; one that hangs is killed
        finally:
            self.board.close()
            for p in self.processes:
                if failed:  # a broken ring: what is left of it goes now (a hung stage would never leave)
                    p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if dist.is_initialized() and not failed:  # after a failure gloo's teardown may wait for a dead peer
                dist.destroy_process_group()
            if self._threads is not None:
                torch.set_num_threads(self._threads)


def run_stage(stage: Stage, ring: Ring, board: Board, groups: dict[tuple[int, int], Any]) -> None:
    """A stage other than 0: take what comes from the previous stage, run it, pass it on, until stop."""
    link = Link(ring, board, groups)
    decoder = stage.decoder
    decoded = 0

    def tally() -> Tally:
        return Tally(decoded, decoder.dropped if decoder is not None else 0)

    def send_decoded() -> None:
        nonlocal decoded
        if decoder is None:
            return
        for chunk in decoder.take(0.0):
            decoded += 1
            tensors = [torch.from_numpy(chunk.frames)]
            if chunk.latents is not None:
                tensors.append(chunk.latents)
            header = (replace(chunk, frames=_NO_FRAMES, latents=None), tally())
            link.send("decoded", header, [t.to(ring.device) for t in tensors])

    try:
        while True:
            message = link.receive(while_waiting=send_decoded)
            assert message is not None
            if message.kind == "work":
                mb: MicroBatch = message.header
                with board.busy():
                    out = stage.run(mb, unpack(message.tensors))
                if stage.last:
                    assert out.x0 is not None
                    link.send("result", (mb.tick, mb.index, tally()), [out.x0])
                else:
                    link.send("work", mb, pack(out))
            elif message.kind == "control":
                stage.apply(message.header)
                if not stage.last:
                    link.send("control", message.header)
            elif message.kind == "stop":
                link.send("stop", None)
                link.flush()
                return
            else:
                raise RuntimeError(f"stage {ring.rank} got a {message.kind!r} message")
            send_decoded()
    finally:
        if decoder is not None:
            decoder.stop()
        board.close()


_NO_FRAMES: Any = None  # a decoded chunk's header travels without its frames: they follow as a tensor
