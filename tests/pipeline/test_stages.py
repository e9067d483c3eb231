"""The StreamBatch spread over a ring of real gloo processes equals one process (DESIGN §6).

Stage 0 runs here, in the test's process; the other stages are processes of their own
(``python -m pipeline.stages.worker``), as ``--stages N`` starts them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.commands import Close, Cut, Demand, Open, Query
from pipeline.engine import Engine
from pipeline.executor import split_slots
from pipeline.models.loader import load_models
from pipeline.scheduler import Slot
from pipeline.stages.balance import split_blocks
from pipeline.stages.launch import blocks_of, start_ring
from pipeline.start import measure
from pipeline.types import Envelope, UserParams
from tests.conftest import executor, submit, tiny_config, with_layers

ATOL = 1e-6  # float64; the batches differ (micro-batches per step level), the maths per slot does not


def scenario(engine: Engine) -> dict[tuple[str, int, int], tuple[np.ndarray, torch.Tensor]]:
    """Two t2v sessions (the second joins late; the first is cut once all it asked for is out, then goes
    on in a new epoch) and a v2v session fed from frames; every chunk out, by (session, epoch, chunk)."""
    config = engine.config
    a = engine.apply(Open(UserParams(prompt="red sails", seed=1))).session_id
    engine.apply(Demand(a, 5))
    v = engine.apply(Open(UserParams(prompt="style", seed=3, strength=0.6), "v2v")).session_id
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (1 + 4 * 6, config.height, config.width, 3), dtype=np.uint8)
    fed, b, cut = 0, None, False
    out = {}
    while True:
        if b is None and engine.stats.ticks >= 3:
            b = engine.apply(Open(UserParams(prompt="blue whale", seed=2))).session_id
            engine.apply(Demand(b, 6))
        need = engine.apply(Query(v)).input.wanted
        if need and fed < len(frames):
            assert submit(engine, v, frames[fed : fed + need])
            fed += need
        status = engine.apply(Query(a))
        if not cut and status.demand == 0 and status.undelivered == 0:  # all 5 asked for are out
            done = engine.apply(Cut(a, demand=4))  # a new epoch of 4 chunks with an empty context
            assert done.epoch == 1
            cut = True
        if b is not None and cut and fed >= len(frames) and not engine.has_work():
            break
        for c in engine.step().chunks:
            out[c.envelope.key] = (c.frames, c.latents)
    for sid in (a, b, v):
        assert sid is not None
        engine.apply(Close(sid))
    return out


PER_STEP = dict(  # StreamDiffusionV2's rule (pipeline/perstep.py), with its adaptive sink and RoPE refresh in play
    first_chunk_frames=2, adaptive_sink=0.3, rope_refresh=6, timestep_rule="table", shift=8.0, timesteps=[700, 500, 300]
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stages", "context"), [(2, "stream"), (3, "stream"), (2, "clean"), (3, "clean"), (2, "per-step")]
)
def test_a_ring_of_gloo_processes_gives_the_frames_of_one_process(stages, context):
    rule = PER_STEP if context == "per-step" else {}
    config = with_layers(tiny_config(dtype="float64", context=context, sink_frames=1, window_frames=3, **rule), 4)
    models = load_models(config)
    one = Engine(config, models, executor=executor(config, models, keep_latents=True))
    want = scenario(one)
    one.close()

    models = load_models(config)  # the ring's stage 0 frees the blocks it does not own
    ring = start_ring(config, models, stages, costs=measure(config, models), keep_latents=True)
    engine = Engine(config, models, executor=ring)
    try:
        got = scenario(engine)
    finally:
        engine.close()
    assert all(p.returncode == 0 for p in ring.processes)  # every stage left on the stop
    assert sorted(got) == sorted(want)
    sessions = {key[0] for key in want}
    assert len(sessions) == 3 and {key[1] for key in want} == {0, 1}  # three sessions; a cut one
    for key, (frames, latents) in want.items():
        got_frames, got_latents = got[key]
        assert (got_latents - latents).abs().max().item() < ATOL, key
        assert np.abs(got_frames.astype(int) - frames.astype(int)).max() <= 1, key


def slot(session: str, step: int) -> Slot:
    env = Envelope(session, 0, step, 0, 0, 0, 4, UserParams())
    return Slot(env, step, 0.5, (1.0, 0.5, 0.25), admit=False, context=())


def test_a_tick_splits_into_one_micro_batch_per_step_level_and_by_session_when_that_is_too_few():
    slots = (slot("a", 0), slot("a", 1), slot("b", 0), slot("a", 2), slot("b", 1))
    assert split_slots(slots, "tick") == [(0, 1, 2, 3, 4)]
    assert split_slots(slots, "slot") == [(0,), (1,), (2,), (3,), (4,)]
    assert split_slots(slots, "step", stages=2) == [(0, 2), (1, 4), (3,)]
    assert split_slots(slots, "step", stages=4) == [(0,), (2,), (1,), (4,), (3,)]
    with pytest.raises(ValueError, match="batching='rows' is not allowed"):
        split_slots(slots, "rows")


def test_blocks_are_split_by_measured_cost_and_the_stage_that_decodes_gets_fewer():
    even = {"blocks_s": [1.0] * 8, "rest_s": 0.0, "decode_s": 0.0}
    assert split_blocks(even, 2) == (range(0, 4), range(4, 8))
    assert split_blocks(even, 3) == (range(0, 3), range(3, 6), range(6, 8))  # 3, 3, 2: the max is 3
    decode = {"blocks_s": [1.0] * 8, "rest_s": 0.0, "decode_s": 2.0}
    assert split_blocks(decode, 2) == (range(0, 5), range(5, 8))  # 5 vs 3 + 2
    uneven = {"blocks_s": [4.0, 1.0, 1.0, 1.0, 1.0], "rest_s": 1.0, "decode_s": 0.0}
    assert split_blocks(uneven, 2) == (range(0, 1), range(1, 5))  # 4 + 1 (the embedding) vs 4
    assert split_blocks(even, 8) == tuple(range(i, i + 1) for i in range(8))
    with pytest.raises(ValueError, match="stages=9 is not allowed"):
        split_blocks(even, 9)


def test_a_manual_split_is_checked():
    assert blocks_of([1, 3], 4, 2) == (range(0, 1), range(1, 4))
    for bad in ([2, 3], [0, 4], [4]):
        with pytest.raises(ValueError, match="is not allowed"):
            blocks_of(bad, 4, 2)
