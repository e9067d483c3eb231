"""The ring on a virtual clock: the same scheduler, dispatch rules and stage order, a cost model in
place of the model (DESIGN §6). It runs in milliseconds, so tests sweep hundreds of configurations.

What is real here: :class:`~pipeline.scheduler.Scheduler` plans and commits every tick of every
session, :func:`~pipeline.executor.split_slots` splits it, :class:`~pipeline.stages.dispatch.Dispatcher`
decides what goes next, exactly as in the engine. What is modelled: stage 0 is the engine's own thread
(it runs its blocks on each micro-batch it issues, and takes results back between issues); each other
stage runs what comes in order; a stage waits when the next one's queue (``queue`` micro-batches) is
full; the last stage hands each chunk that leaves clean to the decode phase (a queue of
``decode_bound`` chunks, decoded beside the stages, or within the last stage with ``decode="inline"``),
and every hop takes ``link_s``.

Cost of a micro-batch of B slots on stage s: ``stage_s[s] * B + fixed_s[s]`` seconds; a chunk's decode:
``decode_s``. Reported (:class:`SimResult`): throughput, TTFF, period, the bubble fraction of the
stages, the OverlapScore, and a deadlock if the work stops with chunks still owed.

- **Bubble fraction**: 1 - (busy time of all stages) / (S x the steady window).
- **OverlapScore**: how much of the work that could run side by side did: with ``serial`` the time per
  tick if stages and decode ran one after another, ``bottleneck`` the busiest one's time per tick and
  ``actual`` the measured time per tick, (serial - actual) / (serial - bottleneck), in [0, 1] (1 when
  there is nothing to overlap).
- **The bubble bound** (``stream``, balanced stages). A tick has T+1 step levels; its micro-batches are
  one per level with every session in it (k = 1), or, when T+1 < S, one per level and session (k =
  sessions). Let c be a micro-batch's cost on each stage and trip = S·(c + link) the time from its
  issue until its result is back. Stage 0 issues a tick's M = (T+1)·k micro-batches one after another,
  level by level, the new chunks first (they need no result): offsets o_0 = 0 < o_1 < ... within a tick
  of period P, o_{p+1} >= o_p + c. A session's micro-batch at level l+1 of tick n+1 needs its own at
  level l of tick n, k places earlier and a tick before: o_{p+k} + P >= o_p + trip. Following one
  session's chain over the T levels and closing the tick (P >= o_{M-1} + c):
  P >= k·c + T·max(k·c, trip - P), so

      P = max(M·c, (k·c + T·trip) / (T + 1), M·trip / C)        bubble = 1 - M·c / P

  where the last term is the dispatcher's bound: at most C micro-batches out at once, each for a trip.

  With no link time the ring is full while S <= (T+1)·k + 1 (T >= S - 2 for one session).
  :func:`bubble_bound` computes it; the tests hold the simulator to it. (``clean``: a session's one
  micro-batch per tick needs its own of the tick before, so P >= trip unless sessions fill it.)
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import CONFIG_DIR, SystemConfig, load_system_config, replace
from pipeline.executor import split_slots
from pipeline.scheduler import Scheduler, Slot
from pipeline.stages.dispatch import Dispatcher, TickWork
from pipeline.state import ChunkState, SessionState
from pipeline.types import UserParams

READY = object()  # a chunk's input, in the simulator: there or not


@dataclass(frozen=True)
class SimConfig:
    stages: int = 2  # S
    steps: int = 4  # T
    sessions: int = 1
    context: str = "stream"
    chunks: int = 60  # chunks per session
    queue: int = 2  # micro-batches waiting at each stage's input
    capacity: int | None = None  # micro-batches out at once (None: 2S, as RingExecutor)
    stage_s: tuple[float, ...] = ()  # per slot, each stage (default 0.01 each)
    fixed_s: tuple[float, ...] = ()  # per micro-batch, each stage (default 0)
    decode_s: float = 0.0  # per chunk
    decode_bound: int = 4
    decode: str = "thread"  # "thread": beside the stages; "inline": within the last stage
    link_s: float = 0.0  # each hop between stages
    batching: str | None = None  # None: "step" for S > 1, "tick" for one stage (as the engine)

    def costs(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        per = self.stage_s or (0.01,) * self.stages
        fixed = self.fixed_s or (0.0,) * self.stages
        if len(per) != self.stages or len(fixed) != self.stages:
            raise ValueError(f"stage_s={per!r}, fixed_s={fixed!r} are not allowed: one cost per stage ({self.stages})")
        return per, fixed


@dataclass
class SimResult:
    config: SimConfig
    chunks: int  # chunks decoded and out
    virtual_s: float
    throughput: float  # chunks per second, steady state (the middle half of the chunks out)
    ttff_s: float  # mean over sessions: open -> first chunk out
    period_s: float  # median time between a session's chunks, steady state
    tick_s: float  # steady time per tick
    bubble: float  # 1 - stage busy time / (S x window), steady state
    overlap_score: float
    busy: list[float]  # per stage, fraction of the steady window
    deadlock: str | None  # why the work stopped with chunks owed, or None

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = dataclasses.asdict(self.config)
        return d


def system_config(sim: SimConfig) -> SystemConfig:
    """The system config the scheduler plans with: the tiny preset's shapes, T evenly spaced timesteps."""
    base = load_system_config(CONFIG_DIR / "tiny.yaml", height=32, width=32)
    timesteps = [1000 * (1 - i / sim.steps) for i in range(sim.steps)]
    return replace(base, timesteps=timesteps, context=sim.context, max_sessions=max(1, sim.sessions))


@dataclass
class _MB:
    tick: int
    index: int
    slots: tuple[Slot, ...]
    chunks: list[ChunkState]
    last_of_tick: bool
    handed: int = 0  # clean chunks already put in the decode queue (one at a time, as DecodePhase.put)


@dataclass
class _Stage:
    queue: deque[_MB] = field(default_factory=deque)
    busy_until: float = 0.0
    working: _MB | None = None
    blocked: _MB | None = None  # done, waiting for room downstream
    busy: list[tuple[float, float]] = field(default_factory=list)  # everything it ran (an inline decode too)
    dit: list[tuple[float, float]] = field(default_factory=list)  # its blocks only


class Simulator:
    def __init__(self, sim: SimConfig) -> None:
        if sim.stages < 1 or sim.steps < 1 or sim.sessions < 1 or sim.queue < 1 or sim.decode_bound < 1:
            raise ValueError(f"{sim!r} is not allowed: stages, steps, sessions, queue, decode_bound at least 1")
        self.sim = sim
        self.per, self.fixed = sim.costs()
        self.config = system_config(sim)
        self.scheduler = Scheduler(self.config)
        self.batching = sim.batching or ("step" if sim.stages > 1 else "tick")
        self.dispatch = Dispatcher(sim.capacity or 2 * sim.stages)
        self.sessions = {
            f"s{i}": SessionState(f"s{i}", "t2v", UserParams(seed=i), demand=sim.chunks) for i in range(sim.sessions)
        }
        self.now = 0.0
        self.work: TickWork | None = None
        self.ticks = 0
        self.stages = [_Stage() for _ in range(sim.stages)]
        self.decodes: deque[tuple[str, int]] = deque()  # (session, chunk) waiting to be decoded
        self.decoding: tuple[str, int] | None = None
        self.decode_busy: list[tuple[float, float]] = []
        self.events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.out: dict[str, list[float]] = {sid: [] for sid in self.sessions}  # when each chunk came out
        self.tick_times: list[float] = []  # when each tick was committed
        self.driver_free = 0.0  # stage 0 is the engine's thread

    # ---- events ---------------------------------------------------------------------------------------

    def at(self, when: float, kind: str, what: Any = None) -> None:
        heapq.heappush(self.events, (when, next(self._seq), kind, what))

    def run(self, max_events: int = 2_000_000) -> SimResult:
        self.settle()
        for _ in range(max_events):
            if not self.events:
                break
            self.now, _, kind, what = heapq.heappop(self.events)
            getattr(self, f"on_{kind}")(what)
            self.settle()
        return self.result()

    def settle(self) -> None:
        """Everything that can move now does: finished work goes on where there is room (last stage
        first, so room travels back up the ring), idle stages start, stage 0 issues."""
        self.start_decode()
        for s in reversed(range(len(self.stages))):
            self.push(s)
            if s > 0:
                self.start(s)
        self.start_decode()
        self.drive()

    # ---- stage 0: the engine's thread -------------------------------------------------------------

    def drive(self) -> None:
        """What the engine's step does: commit the next tick once the last one is out, issue each
        micro-batch as its inputs come back, run stage 0's blocks on it (which keeps this thread busy)."""
        while self.now >= self.driver_free:
            if self.work is None:
                plan = self.scheduler.schedule(self.ticks, list(self.sessions.values()))
                if not plan.slots:
                    return
                chunks = self.scheduler.commit(plan, self.sessions, _enter)
                self.work = TickWork(plan, chunks, split_slots(plan.slots, self.batching, self.sim.stages))
                self.ticks += 1
                self.tick_times.append(self.now)
            if len(self.stages) > 1 and len(self.stages[1].queue) >= self.sim.queue:
                return  # stage 1 takes no more: the send waits
            m = self.dispatch.next(self.work, lambda c: c.x is READY)
            if m is None:
                return
            work = self.work
            group = work.groups[m]
            chunks = [work.chunks[i] for i in group]
            for c in chunks:
                c.x = None
            last = all(work.issued[k] or k == m for k in range(len(work.groups)))
            self.dispatch.issued(work, m)
            if work.done:
                self.work = None
            mb = _MB(work.plan.tick, m, tuple(work.plan.slots[i] for i in group), chunks, last)
            cost = self.cost(0, mb)
            self.stages[0].busy.append((self.now, self.now + cost))
            self.stages[0].dit.append((self.now, self.now + cost))
            self.driver_free = self.now + cost
            self.at(self.driver_free, "stage0_done", mb)
            return  # the thread is busy until then

    def on_stage0_done(self, mb: _MB) -> None:
        if len(self.stages) > 1:
            self.at(self.now + self.sim.link_s, "arrive", (1, mb))
            return
        # one process: the whole model ran in this thread; it decodes now (inline), or hands the clean
        # chunks to the decode phase, waiting for room
        extra = 0.0 if self.threaded_decode else self.sim.decode_s * sum(1 for slot in mb.slots if slot.decodes)
        if extra:
            self.decode_spans(self.now, extra, self.stages[0])
            self.driver_free = self.now + extra
            self.at(self.driver_free, "stage0_decoded", mb)
            return
        self.stages[0].blocked = mb
        self.driver_free = float("inf")  # until the decode queue took them
        self.push(0)

    def on_stage0_decoded(self, mb: _MB) -> None:
        self.finish(0, mb)

    def decode_spans(self, start: float, seconds: float, stage: _Stage) -> None:
        """Decode done within a stage: busy for the bubble, a decode span for the OverlapScore."""
        stage.busy.append((start, start + seconds))
        self.decode_busy.append((start, start + seconds))

    def cost(self, s: int, mb: _MB) -> float:
        return self.per[s] * len(mb.slots) + self.fixed[s]

    # ---- stages 1..S-1 ----------------------------------------------------------------------------------

    def on_arrive(self, what: tuple[int, _MB]) -> None:
        s, mb = what
        self.stages[s].queue.append(mb)
        self.start(s)

    def start(self, s: int) -> None:
        st = self.stages[s]
        if st.working is not None or st.blocked is not None or not st.queue:
            return
        mb = st.queue.popleft()
        st.working = mb
        cost = self.cost(s, mb)
        st.busy.append((self.now, self.now + cost))
        st.dit.append((self.now, self.now + cost))
        if s == len(self.stages) - 1 and not self.threaded_decode:
            extra = self.sim.decode_s * sum(1 for slot in mb.slots if slot.decodes)
            self.decode_spans(self.now + cost, extra, st)
            cost += extra
        self.at(self.now + cost, "done", s)

    def on_done(self, s: int) -> None:
        st = self.stages[s]
        mb, st.working = st.working, None
        assert mb is not None
        st.blocked = mb
        self.push(s)

    def push(self, s: int) -> None:
        """Hand a finished micro-batch on: to the next stage, or (the last) back to stage 0 and its
        clean chunks to the decode phase; a full queue downstream holds it here."""
        st = self.stages[s]
        mb = st.blocked
        if mb is None:
            return
        if s < len(self.stages) - 1:
            if len(self.stages[s + 1].queue) >= self.sim.queue:
                return
            st.blocked = None
            self.at(self.now + self.sim.link_s, "arrive", (s + 1, mb))
            return
        if self.threaded_decode:  # each clean chunk waits for room in the decode queue, one by one
            clean = [slot for slot in mb.slots if slot.decodes]
            while mb.handed < len(clean) and len(self.decodes) < self.sim.decode_bound:
                env = clean[mb.handed].envelope
                self.decodes.append((env.session_id, env.chunk_index))
                mb.handed += 1
            if mb.handed < len(clean):
                return
        st.blocked = None
        if s == 0:  # one process: the engine's thread goes on
            self.driver_free = self.now
        self.finish(s, mb)

    def finish(self, s: int, mb: _MB) -> None:
        """Results go back to stage 0; clean chunks are out (decoded inline) or in the decode queue."""
        for slot in mb.slots:
            if slot.decodes and not self.threaded_decode:
                self.at(self.now, "out", (slot.envelope.session_id, slot.envelope.chunk_index))
        self.at(self.now + (self.sim.link_s if len(self.stages) > 1 else 0.0), "result", mb)

    def on_result(self, mb: _MB) -> None:
        self.dispatch.returned()
        for c in mb.chunks:
            c.x = READY  # type: ignore[assignment]  # its next input is back

    @property
    def threaded_decode(self) -> bool:
        return self.sim.decode == "thread" and self.sim.decode_s > 0

    # ---- decode -----------------------------------------------------------------------------------------

    def start_decode(self) -> None:
        if self.decoding is not None or not self.decodes:
            return
        self.decoding = self.decodes.popleft()
        self.decode_busy.append((self.now, self.now + self.sim.decode_s))
        self.at(self.now + self.sim.decode_s, "decoded")

    def on_decoded(self, _: Any) -> None:
        key, self.decoding = self.decoding, None
        assert key is not None
        self.at(self.now, "out", key)
        self.start_decode()

    def on_out(self, key: tuple[str, int]) -> None:
        self.out[key[0]].append(self.now)

    # ---- the figures ------------------------------------------------------------------------------------

    def result(self) -> SimResult:
        sim = self.sim
        owed = sim.sessions * sim.chunks
        done = sum(len(v) for v in self.out.values())
        deadlock = None
        if done < owed:
            waiting = [s for s, st in enumerate(self.stages) if st.queue or st.working or st.blocked]
            deadlock = (
                f"{owed - done} of {owed} chunks never came out at t={self.now:.4f}: tick {self.ticks}, "
                f"{self.dispatch.out} micro-batches out, stages holding work {waiting}, {len(self.decodes)} decodes"
            )
        times = sorted(t for v in self.out.values() for t in v)
        half = times[len(times) // 4 : 3 * len(times) // 4] if len(times) >= 8 else times  # no ramp, no drain
        window = (half[-1] - half[0]) if len(half) > 1 else 0.0
        throughput = (len(half) - 1) / window if window > 0 else 0.0
        periods = [b - a for v in self.out.values() for a, b in itertools.pairwise(v[len(v) // 4 : 3 * len(v) // 4])]
        start, end = (half[0], half[-1]) if window > 0 else (0.0, self.now)
        busy = [_overlap(st.busy, start, end) / max(end - start, 1e-12) for st in self.stages]
        ticks_in = [t for t in self.tick_times if start <= t <= end]
        tick_s = (ticks_in[-1] - ticks_in[0]) / (len(ticks_in) - 1) if len(ticks_in) > 1 else 0.0
        per_tick = max(len(ticks_in) - 1, 1)
        work = [_overlap(st.dit, start, end) / per_tick for st in self.stages]  # each stage's blocks per tick
        work.append(_overlap(self.decode_busy, start, end) / per_tick)  # the decode per tick
        serial, bottleneck = sum(work), max(work)
        overlap = 1.0 if serial - bottleneck <= 1e-12 else (serial - tick_s) / (serial - bottleneck)
        return SimResult(
            config=sim,
            chunks=done,
            virtual_s=self.now,
            throughput=throughput,
            ttff_s=statistics.mean(v[0] for v in self.out.values() if v) if done else float("inf"),
            period_s=statistics.median(periods) if periods else 0.0,
            tick_s=tick_s,
            bubble=1.0 - sum(busy) / len(busy),
            overlap_score=min(1.0, max(0.0, overlap)),
            busy=busy,
            deadlock=deadlock,
        )


def _enter(s: SessionState, slot: Slot) -> Any:
    """A chunk's first input, in the simulator: there at once (noise needs no result)."""
    return READY, None, ()


def _overlap(spans: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)


def simulate(**kw: Any) -> SimResult:
    return Simulator(SimConfig(**kw)).run()


def bubble_bound(sim: SimConfig) -> float:
    """The bubble fraction of the stages for ``stream`` and balanced stages (the module's derivation)."""
    if sim.context != "stream":
        raise ValueError(f"context={sim.context!r} is not allowed: the bound is derived for 'stream'")
    per, fixed = sim.costs()
    levels = sim.steps + 1
    k = sim.sessions if levels < sim.stages else 1  # split_slots splits levels by session when they are too few
    c = per[0] * (sim.sessions // k) + fixed[0]
    trip = sim.stages * (c + sim.link_s)
    busy = levels * k * c
    capacity = sim.capacity or 2 * sim.stages
    period = max(busy, (k * c + sim.steps * trip) / levels, levels * k * trip / capacity)
    return 1.0 - busy / period
