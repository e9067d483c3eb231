"""The engine API later layers build on: limits, backpressure, closing."""

import numpy as np
import pytest

from pipeline.engine import Engine, SessionLimitError
from tests.conftest import tiny_config


def test_session_limit_and_close_frees_the_slot():
    engine = Engine(tiny_config(max_sessions=2))
    a = engine.open_session()
    engine.open_session()
    with pytest.raises(SessionLimitError, match="limit of 2 sessions"):
        engine.open_session()
    engine.close_session(a)
    assert a not in engine.sessions
    engine.open_session()
    with pytest.raises(KeyError, match="session_id='s0' is not open"):
        engine.request(a, 1)


def test_v2v_input_is_bounded_and_refusal_is_a_return_value():
    config = tiny_config()
    engine = Engine(config)
    sid = engine.open_session(mode="v2v")
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    assert engine.submit(sid, frames[:1])
    taken = 1
    while engine.submit(sid, frames):
        taken += 4
        assert taken < 1000
    assert engine.wants_frames(sid) == 0  # full: the caller drops (newest-wins lives upstream)
    assert taken == 1 + 4 * (2 * config.steps - 1)
    engine.step()
    assert engine.wants_frames(sid) == 4  # a chunk entered the window: room for one more


def test_wrong_frames_and_wrong_mode_are_clear_errors():
    engine = Engine(tiny_config())
    v2v = engine.open_session(mode="v2v")
    t2v = engine.open_session()
    with pytest.raises(ValueError, match=r"frames of shape \(1, 16, 16, 3\) and dtype uint8 are not allowed"):
        engine.submit(v2v, np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype float32 are not allowed"):
        engine.submit(v2v, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="is t2v"):
        engine.submit(t2v, np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="is v2v"):
        engine.request(v2v, 1)
