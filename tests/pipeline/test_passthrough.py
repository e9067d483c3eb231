"""The passthrough preset: the whole schedule, frames out exactly as they went in."""

import numpy as np

from pipeline.config import CONFIG_DIR, load_system_config
from pipeline.engine import Engine
from tests.conftest import open_v2v, status, submit


def test_passthrough_returns_every_frame_unchanged_through_the_whole_schedule():
    config = load_system_config(CONFIG_DIR / "passthrough.yaml")
    engine = Engine(config)
    sid = open_v2v(engine, strength=1.0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (1 + 4 * 9, config.height, config.width, 3), dtype=np.uint8)
    sent, out = 0, []
    while sent < len(frames) or engine.has_work():
        n = status(engine, sid).input.wanted
        if n and sent < len(frames):
            assert submit(engine, sid, frames[sent : sent + n])
            sent += n
        out += engine.step().chunks
    engine.close()
    assert engine.stats.slots > engine.stats.ticks  # a real StreamBatch: several slots per tick
    got = np.concatenate([c.frames for c in out])
    assert got.shape == frames.shape
    assert np.array_equal(got, frames)
    assert [c.num_frames for c in out] == [1] + [4] * 9
