"""A stage: a contiguous range of transformer blocks and the KV windows of those blocks (DESIGN §6).

The first stage also embeds (x, σ, text -> hidden states), the last also runs the head and reads its output
as x0 (the model's sampler: the only place that interprets the model's output), hands the x0 of each
chunk's last step to the decode phase and returns every slot's x0. One process is the one-stage
case: a single stage that is first and last and owns every block.

A stage runs micro-batches in the order they come, tick after tick. Within a tick every slot reads
the KV window as it stood at the end of the previous tick: a micro-batch that is a whole tick writes
as it goes (within each block all its slots read before any writes); when a tick is split into
several micro-batches, their writes are held back and made at the end of the tick's last one. That is
the visibility rule of DESIGN §4, whatever the split, on every stage.

Session changes (a cut's new epoch, a close: :class:`Control`) come between ticks; every stage applies
them in the same place of the stream of work, after the tick before them.
"""

from __future__ import annotations

import torch

from pipeline.config import SystemConfig
from pipeline.decode import DecodeJob, DecodePhase
from pipeline.executor import Activations, Control, MicroBatch
from pipeline.models.causal_wan import AttnBatch, Denoiser, apply_rope
from pipeline.perstep import PerStepKV, StepCaches, rope_position
from pipeline.sampling import FlowSampler
from pipeline.scheduler import Slot
from pipeline.stats import PhaseTimer
from pipeline.types import Envelope, stale
from pipeline.window import KVWindow, sink_shift


class BatchKV:
    """The KV windows of a micro-batch's slots, seen as one padded batch per block."""

    def __init__(
        self,
        windows: list[KVWindow],
        slots: tuple[Slot, ...],
        chunk_frames: int,
        held_back: list[tuple[KVWindow, int, range, torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        self.windows = windows
        self.held_back = held_back  # None: write at once; else writes wait here for the tick's end
        # sink frames lead each slot's context; turned forward by each slot's sink_shift at read
        self.sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sink_tokens = windows[0].sink * windows[0].k.shape[2]
        self.read_runs = []
        self.write_frames = []
        for w, s in zip(windows, slots, strict=True):
            if not w.holds(s.context):
                missing = [f for f in s.context if w.held[w.position(f)] != f]
                raise RuntimeError(f"slot {s.envelope.key}@{s.step} reads frames {missing} not in its KV window")
            self.read_runs.append(w.runs(s.context))
            self.write_frames.append(range(s.envelope.frame_start, s.envelope.frame_start + chunk_frames))
        self.device = windows[0].k.device
        tpf = windows[0].k.shape[2]
        self.lengths = [len(s.context) * tpf for s in slots]
        self.max_len = max(self.lengths)

    def exchange(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather every slot's context straight into one [B, Lc + L, H, D] buffer, each slot's context, then
        its own tokens, then its padding (zeroed, masked), then record the slots' own keys/values. Padding
        last keeps each slot's attention the sums it would be alone: a ring's micro-batches give the frames
        of one process."""
        b, own, heads, dim = k.shape
        keys = k.new_empty(b, self.max_len + own, heads, dim)
        values = v.new_empty(b, self.max_len + own, heads, dim)
        for i, (w, runs, n) in enumerate(zip(self.windows, self.read_runs, self.lengths, strict=True)):
            w.gather_into(block, runs, keys[i, :n], values[i, :n])
            keys[i, n : n + own] = k[i]
            values[i, n : n + own] = v[i]
            if n < self.max_len:
                keys[i, n + own :] = 0
                values[i, n + own :] = 0
        if self.sink_rotation is not None:
            keys[:, : self.sink_tokens] = apply_rope(keys[:, : self.sink_tokens], self.sink_rotation)
        for i, (w, frames) in enumerate(zip(self.windows, self.write_frames, strict=True)):
            if self.held_back is not None:
                self.held_back.append((w, block, frames, k[i], v[i]))
            else:
                w.scatter(block, frames, k[i], v[i])
        return keys, values

    def key_lengths(self, own_tokens: int) -> tuple[int, ...]:
        """Each slot's real keys: its context, then its own tokens (its padding follows)."""
        return tuple(n + own_tokens for n in self.lengths)


def attn_batch(model: Denoiser, kv: BatchKV, slots: tuple[Slot, ...], config: SystemConfig) -> AttnBatch:
    """RoPE of the slots' own frames (absolute positions), the sink turn of each slot, the mask."""
    cf, sink, window = config.chunk_frames, config.sink_frames, config.window_frames
    grid = model.grid(config.latent_size)
    starts = [s.envelope.frame_start for s in slots]
    own = torch.tensor([list(range(f, f + cf)) for f in starts], dtype=torch.long)
    shifts = [sink_shift(f, sink, window) for f in starts]
    if sink and any(shifts):
        kv.sink_rotation = model.time_shift(torch.tensor(shifts, dtype=torch.long))
    return AttnBatch(kv=kv, q_rope=model.rope(own, grid), mask=None, key_lengths=kv.key_lengths(cf * grid[0] * grid[1]))


def perstep_batch(
    model: Denoiser, caches: list[StepCaches], slots: tuple[Slot, ...], config: SystemConfig
) -> AttnBatch:
    """The per-step rule's attention batch: each slot's level cache, its RoPE at its (wrapped) position."""
    grid = model.grid(config.latent_size)
    cache_frames = config.sink_frames + config.window_frames
    starts = [
        rope_position(s.envelope.frame_start, cache_frames, config.chunk_frames, config.rope_refresh) for s in slots
    ]
    frames = {s.frames for s in slots}
    if len(frames) > 1:
        raise ValueError(f"a micro-batch mixes chunks of {sorted(frames)} latent frames")
    (n,) = frames
    tpf = grid[0] * grid[1]
    kv = PerStepKV(
        caches,
        [s.step for s in slots],
        [f * tpf for f in starts],
        [s.envelope.frame_start == 0 for s in slots],
        n * tpf,
    )
    own = torch.tensor([list(range(f, f + n)) for f in starts], dtype=torch.long)
    return AttnBatch(kv=kv, q_rope=model.rope(own, grid), mask=None, key_lengths=tuple(kv.lengths))


class Stage:
    def __init__(
        self,
        model: Denoiser,
        config: SystemConfig,
        blocks: range,
        sampler: FlowSampler,
        decoder: DecodePhase | None = None,
        timer: PhaseTimer | None = None,
    ) -> None:
        if not (0 <= blocks.start < blocks.stop <= model.num_blocks) or blocks.step != 1:
            raise ValueError(f"blocks={blocks!r} is not allowed: a non-empty range within 0..{model.num_blocks}")
        self.model = model
        self.config = config
        self.blocks = blocks
        self.first = blocks.start == 0
        self.last = blocks.stop == model.num_blocks
        if self.last and decoder is None:
            raise ValueError("the last stage needs a decode phase")
        self.sampler = sampler
        self.decoder = decoder
        self.timer = timer or PhaseTimer(model.device.type)
        self._windows: dict[str, tuple[int, KVWindow | StepCaches]] = {}  # session -> (epoch, its KV of these blocks)
        self._held_back: list[tuple[KVWindow, int, range, torch.Tensor, torch.Tensor]] = []

    # ---- sessions ---------------------------------------------------------------------------------

    def apply(self, control: Control) -> None:
        for sid, epoch in control.epochs:
            held = self._windows.get(sid)
            if held is not None and stale(held[0], epoch):
                self._forget(held[1])
                held[1].reset()
                self._windows[sid] = (epoch, held[1])
            if self.decoder is not None:
                self.decoder.epoch(sid, epoch)
        for sid in control.closed:
            held = self._windows.pop(sid, None)
            if held is not None:
                self._forget(held[1])
            if self.decoder is not None:
                self.decoder.close(sid)

    def _forget(self, window: KVWindow | StepCaches) -> None:
        """Writes held back for ``window`` are of an epoch that ended: they never land."""
        self._held_back = [h for h in self._held_back if h[0] is not window]

    def window(self, session_id: str) -> KVWindow | StepCaches | None:
        held = self._windows.get(session_id)
        return None if held is None else held[1]

    def kv_bytes(self) -> int:
        return sum(w.nbytes for _, w in self._windows.values())

    def _window(self, env: Envelope) -> KVWindow:
        window = self._held(env)
        assert isinstance(window, KVWindow)
        return window

    def _caches(self, env: Envelope) -> StepCaches:
        caches = self._held(env)
        assert isinstance(caches, StepCaches)
        return caches

    def _held(self, env: Envelope) -> KVWindow | StepCaches:
        held = self._windows.get(env.session_id)
        if held is None or stale(held[0], env.epoch):  # a new session, or a new epoch not yet announced
            window = held[1] if held is not None else self._new_window()
            window.reset()
            self._windows[env.session_id] = held = (env.epoch, window)
        elif stale(env.epoch, held[0]):
            raise RuntimeError(f"chunk {env.key} reached stage {self.blocks} after its epoch ended")
        return held[1]

    def _new_window(self) -> KVWindow | StepCaches:
        cfg, model = self.config, self.model
        if cfg.context == "per-step":
            return StepCaches(
                blocks=self.blocks,
                levels=cfg.steps,
                frames=cfg.sink_frames + cfg.window_frames,
                sink=cfg.sink_frames,
                adaptive_sink=cfg.adaptive_sink,
                tokens_per_frame=cfg.tokens_per_frame,
                heads=model.heads,
                head_dim=model.head_dim,
                dtype=model.dtype,
                device=model.device,
            )
        return KVWindow(
            blocks=self.blocks,
            sink=cfg.sink_frames,
            window=cfg.window_frames,
            in_flight_frames=(cfg.steps + 1) * cfg.chunk_frames,
            tokens_per_frame=cfg.tokens_per_frame,
            heads=model.heads,
            head_dim=model.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    # ---- work -------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, mb: MicroBatch, act: Activations) -> Activations:
        """This stage's part of ``mb``: returns what the next stage needs (the last: each slot's x0)."""
        if self.config.context == "per-step":
            batch = perstep_batch(self.model, [self._caches(s.envelope) for s in mb.slots], mb.slots, self.config)
        else:
            windows = [self._window(s.envelope) for s in mb.slots]
            alone = mb.first_of_tick and mb.last_of_tick
            kv = BatchKV(windows, mb.slots, self.config.chunk_frames, None if alone else self._held_back)
            batch = attn_batch(self.model, kv, mb.slots, self.config)
        # each slot's text states are its prompt's (Engine._enter): the prompt names them for the text K/V cache
        batch.text_keys = tuple(s.envelope.params.prompt for s in mb.slots)
        batch.time_keys = tuple(s.model_time for s in mb.slots)
        model = self.model
        with self.timer.phase("dit"):
            if self.first:
                assert act.text is not None
                # the engine's time input is each slot's model_time: those numbers name its values
                time, keys = (act.sigma * 1000.0, None) if act.time is None else (act.time, batch.time_keys)
                act.hidden, act.temb, act.tproj, act.enc = model.embed(act.x, time, act.text, batch.text_keys, keys)
                act.text = act.time = None
            assert act.hidden is not None and act.enc is not None and act.tproj is not None
            act.hidden = model.run_blocks(act.hidden, act.enc, act.tproj, batch, self.blocks)
            if self.last:
                assert act.temb is not None
                output = model.head(act.hidden, act.temb, tuple(act.x.shape))
                act.x0 = self.sampler.x0(act.x, act.sigma, output)
                act.hidden = act.temb = act.tproj = act.enc = None
        if mb.last_of_tick:
            for w, block, frames, k, v in self._held_back:
                w.scatter(block, frames, k, v)
            self._held_back.clear()
        if self.last:
            self._decode(mb, act)
        return act

    def _decode(self, mb: MicroBatch, act: Activations) -> None:
        """Chunks whose last step this was leave clean: x0 to the decode phase."""
        assert self.decoder is not None and act.x0 is not None
        jobs = []
        for i, slot in enumerate(mb.slots):
            if not slot.decodes:
                continue
            x0 = act.x0[i]
            ready = None
            if x0.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            scheduled_at, arrived = mb.timing[i]
            jobs.append(DecodeJob(slot.envelope, x0, scheduled_at, arrived, ready))
        if jobs:
            self.decoder.put(jobs)
