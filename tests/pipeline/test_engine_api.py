"""The engine's commands: limits, backpressure, closing, bad input named; results are typed data."""

import pickle

import numpy as np
import pytest

from pipeline.commands import Close, Cut, Demand, Open, Query, SetParams, Submit
from pipeline.engine import Engine, SessionLimitError
from pipeline.types import UserParams
from tests.conftest import open_t2v, open_v2v, status, submit, tiny_config


def test_session_limit_and_close_frees_the_slot():
    engine = Engine(tiny_config(max_sessions=2))
    a = open_t2v(engine)
    open_t2v(engine)
    with pytest.raises(SessionLimitError, match="limit of 2 sessions"):
        open_t2v(engine)
    assert engine.apply(Close(a)).session_id == a
    assert a not in engine.sessions
    open_t2v(engine)
    with pytest.raises(KeyError, match="session_id='s0' is not open"):
        engine.apply(Demand(a, 1))
    engine.close()


def test_v2v_input_is_bounded_and_refusal_is_a_return_value():
    config = tiny_config()
    engine = Engine(config)
    sid = open_v2v(engine)
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    assert status(engine, sid).input.wanted == 1  # an epoch's first chunk is one frame
    assert submit(engine, sid, frames[:1])
    taken = 1
    while submit(engine, sid, frames):
        taken += 4
        assert taken < 1000
    need = status(engine, sid).input
    assert need.wanted == 0 and need.waiting == 2 * config.steps  # full: the caller drops (newest wins upstream)
    assert taken == 1 + 4 * (2 * config.steps - 1)
    engine.step()
    assert status(engine, sid).input.wanted == 4  # a chunk entered the window: room for one more
    engine.close()


def test_wrong_frames_and_wrong_mode_are_clear_errors():
    engine = Engine(tiny_config())
    v2v = open_v2v(engine)
    t2v = open_t2v(engine)
    with pytest.raises(ValueError, match=r"frames of shape \(1, 16, 16, 3\) and dtype uint8 are not allowed"):
        submit(engine, v2v, np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype float32 are not allowed"):
        submit(engine, v2v, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="arrived has 1 times for 2 frames"):
        engine.apply(Submit(v2v, np.zeros((2, 32, 32, 3), np.uint8), (0.0,)))
    with pytest.raises(ValueError, match="is t2v"):
        submit(engine, t2v, np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="is v2v"):
        engine.apply(Demand(v2v, 1))
    with pytest.raises(ValueError, match=r"unknown user param\(s\) \['colour'\]"):
        engine.apply(SetParams.of(t2v, colour="red"))
    assert status(engine, t2v).params == UserParams()  # a refused change changes nothing
    engine.close()


def test_commands_and_results_are_plain_data_that_cross_a_process_boundary():
    """Commands are data (no closures), so they pickle: what a stage process or a remote driver gets."""
    engine = Engine(tiny_config())
    commands = [Open(UserParams(prompt="x", seed=3)), Demand("s0", 2), Query("s0"), SetParams.of("s0", seed=4)]
    results = [engine.apply(pickle.loads(pickle.dumps(c))) for c in commands]
    results.append(engine.apply(pickle.loads(pickle.dumps(Cut("s0", demand=5)))))
    assert [type(r).__name__ for r in results] == ["Opened", "SessionStatus", "SessionStatus", "ParamsSet", "CutDone"]
    assert pickle.loads(pickle.dumps(results[-1])) == results[-1]
    cut = results[-1]
    assert cut.epoch == 1 and cut.first_chunk_index == 0 and cut.status.demand == 5
    assert results[1].demand == 2 and results[3].params.seed == 4
    engine.close()


def test_demand_adds_or_sets_exactly():
    engine = Engine(tiny_config())
    sid = open_t2v(engine, 3)
    assert engine.apply(Demand(sid, 2)).demand == 5
    assert engine.apply(Demand(sid, 1, exact=True)).demand == 1
    assert engine.apply(Demand(sid, -4, exact=True)).demand == 0
    engine.close()
