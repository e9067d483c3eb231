"""The simulator: the real scheduler and dispatch rules on a virtual clock. No deadlock over a sweep, a full
ring when T >= S - 2, and the bubbles of the derived bound when the ring cannot be full."""

from __future__ import annotations

import itertools

import pytest

from pipeline.stages.dispatch import Dispatcher
from pipeline.stages.simulator import SimConfig, Simulator, bubble_bound, simulate


def test_no_deadlock_over_a_sweep_of_stages_steps_bounds_sessions_and_rules():
    configs = 0
    for stages, steps, queue, sessions, context in itertools.product(
        (1, 2, 3, 5), (1, 2, 4), (1, 3), (1, 3), ("stream", "clean")
    ):
        for capacity, decode in ((None, "thread"), (1, "inline"), (2 * stages + 1, "thread")):
            r = Simulator(
                SimConfig(
                    stages=stages,
                    steps=steps,
                    queue=queue,
                    sessions=sessions,
                    context=context,
                    capacity=capacity,
                    decode=decode,
                    decode_s=0.004,
                    decode_bound=1 + sessions % 2,
                    stage_s=tuple(0.001 * (1 + s % 3) for s in range(stages)),  # unbalanced on purpose
                    fixed_s=(0.0005,) * stages,
                    link_s=0.0002,
                    chunks=12,
                )
            ).run()
            assert r.deadlock is None, r.config
            assert r.chunks == 12 * sessions and r.throughput > 0 and r.ttff_s > 0
            configs += 1
    assert configs == 288


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_balanced_stages_with_t_at_least_s_give_s_times_one_stage(steps):
    one = simulate(stages=1, steps=steps, stage_s=(0.012,), chunks=60)
    for stages in range(2, steps + 1):
        r = simulate(stages=stages, steps=steps, stage_s=(0.012 / stages,) * stages, chunks=60)
        assert r.throughput >= 0.95 * stages * one.throughput, (stages, r.throughput, one.throughput)
        assert r.bubble < 0.05 and r.deadlock is None


def test_when_the_ring_cannot_be_full_the_bubbles_are_the_derived_bound():
    checked = 0
    for steps, stages, sessions, link in itertools.product((1, 2, 4), (3, 5, 8), (1, 3), (0.0, 0.002)):
        cfg = SimConfig(stages=stages, steps=steps, sessions=sessions, link_s=link, stage_s=(0.01 / stages,) * stages)
        bound = bubble_bound(cfg)
        r = Simulator(cfg).run()
        assert abs(r.bubble - bound) < 0.02, (cfg, r.bubble, bound)
        checked += bound > 0.05
    assert checked >= 10  # most of these really have bubbles
    # the closed form on a known case: one session, T = 1 (M = 2), S = 5, no link: P = (c + 1·5c)/2 = 3c
    assert bubble_bound(SimConfig(stages=5, steps=1, stage_s=(0.002,) * 5)) == pytest.approx(1 - 2 / 3)


def test_the_decode_phase_beside_the_stages_takes_a_tick_to_max_not_sum():
    base = {"stages": 1, "steps": 4, "stage_s": (0.01,), "decode_s": 0.04, "chunks": 40}
    inline = simulate(**base, decode="inline")
    thread = simulate(**base, decode="thread")
    assert inline.tick_s == pytest.approx(0.05 + 0.04, rel=0.02)  # DiT 5 slots x 10 ms, then the decode
    assert thread.tick_s == pytest.approx(0.05, rel=0.02)  # max(DiT, decode)
    assert thread.overlap_score == pytest.approx(1.0, abs=0.02) and inline.overlap_score < 0.05


def test_a_run_that_stops_with_chunks_owed_is_reported_as_a_deadlock(monkeypatch):
    monkeypatch.setattr(Dispatcher, "next", lambda self, work, ready: None)  # nothing ever goes
    r = simulate(stages=2, steps=2, chunks=5)
    assert r.deadlock is not None and "5 of 5 chunks never came out" in r.deadlock
