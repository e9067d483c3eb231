"""The one-stage executor: every block in this process (DESIGN §6a: the single-process StreamBatch is the
one-stage case of the stage code).

``batching="tick"`` is the StreamBatch: every slot of the tick, from every session, in one batched forward.
``batching="slot"`` is the sequential baseline: one forward per slot, the same visibility rule (writes held
back to the tick's end); ``"step"`` one micro-batch per step level, as a ring runs them.
"""

from __future__ import annotations

from collections import deque

from pipeline.config import SystemConfig
from pipeline.decode import DecodePhase
from pipeline.executor import BATCHINGS, Activations, Control, Denoised, Event, MicroBatch, split_slots
from pipeline.models.loader import Models
from pipeline.scheduler import TickPlan
from pipeline.stages.stage import Stage
from pipeline.stats import PhaseTimer


class LocalExecutor:
    """The one-stage case: the stage runs each micro-batch at once, in this thread."""

    stages = 1
    capacity = 1 << 30  # nothing to bound: a micro-batch is done when submit returns

    def __init__(self, stage: Stage, batching: str = "tick") -> None:
        if not (stage.first and stage.last):
            raise ValueError(f"a local executor runs every block; stage {stage.blocks} is not all of them")
        if batching not in BATCHINGS:
            raise ValueError(f"batching={batching!r} is not allowed: one of {BATCHINGS}")
        self.stage = stage
        self.batching = batching
        self.timer = stage.timer
        assert stage.decoder is not None
        self.decoder: DecodePhase = stage.decoder
        self.decode_depth = 1 if self.decoder.threaded else 0
        self.blocks = (stage.blocks,)
        self._results: deque[Denoised] = deque()

    def split(self, plan: TickPlan) -> list[tuple[int, ...]]:
        return split_slots(plan.slots, self.batching)

    def submit(self, mb: MicroBatch, act: Activations) -> None:
        out = self.stage.run(mb, act)
        assert out.x0 is not None
        self._results.append(Denoised(mb.tick, mb.index, out.x0))

    def control(self, control: Control) -> None:
        self.stage.apply(control)  # in one process nothing is on its way: at once is in order

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = list(self._results)
        self._results.clear()
        events += self.decoder.take(0.0 if events else timeout)
        return events

    def pending(self) -> int:
        return len(self._results) + self.decoder.pending

    def close(self) -> None:
        self.decoder.stop()


def local_executor(
    config: SystemConfig,
    models: Models,
    batching: str = "tick",
    threaded_decode: bool | None = None,
    keep_latents: bool = False,
    decode_bound: int | None = None,
) -> LocalExecutor:
    """The model in this process: StreamBatch (``tick``) or sequential (``slot``) micro-batches, the
    decode phase in its own thread (``threaded_decode``; None: as the config says) or inline."""
    timer = PhaseTimer(models.dit.device.type)
    bound = decode_bound or max(2, config.max_sessions)
    threaded = config.threaded_decode if threaded_decode is None else threaded_decode
    decoder = DecodePhase(models.vae, config.fps, bound, threaded, keep_latents, timer)
    stage = Stage(models.dit, config, range(models.dit.num_blocks), models.sampler, decoder, timer)
    return LocalExecutor(stage, batching)
