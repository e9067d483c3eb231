"""Rolling KV window: sink + latest frames kept, memory flat, positions bounded for ever."""

import numpy as np
import torch

from pipeline.engine import Engine
from pipeline.window import KVWindow, context_frames, rope_positions
from tests.conftest import tiny_config, with_rope_table


def test_context_is_sink_plus_latest_window():
    assert context_frames(0, sink=2, window=4) == ()
    assert context_frames(3, sink=2, window=4) == (0, 1, 2)
    assert context_frames(6, sink=2, window=4) == (0, 1, 2, 3, 4, 5)
    assert context_frames(20, sink=2, window=4) == (0, 1, 16, 17, 18, 19)
    assert context_frames(20, sink=0, window=4) == (16, 17, 18, 19)


def test_rope_positions_keep_true_distances_to_the_window_and_stay_bounded():
    sink, window, cf = 1, 4, 2
    for f in range(0, 400, cf):
        ctx, own = rope_positions(f, cf, sink, window)
        frames = context_frames(f, sink, window)
        # query-to-window distances are the true frame distances (no jump when the window rolls)
        for frame, pos in zip(frames, ctx):
            if frame >= sink:
                assert own[0] - pos == f - frame
            else:
                assert pos == frame
        assert max(own) < sink + window + cf
        if f + cf <= sink + window + cf:
            assert own == tuple(range(f, f + cf))  # short streams: absolute positions


def test_ring_evicts_oldest_and_keeps_sink():
    w = KVWindow(range(2), sink=2, window=3, in_flight_frames=2, tokens_per_frame=1, heads=1, head_dim=2,
                 dtype=torch.float32, device="cpu")
    for f in range(40):
        idx = torch.tensor(w.positions(range(f, f + 1)))
        for b in range(2):
            value = torch.full((1, 1, 2), float(f))
            w.scatter(b, range(f, f + 1), idx, value, value)
        assert w.holds(context_frames(f + 1, 2, 3))
    assert w.holds((0, 1))  # sink frames survive
    assert not w.holds((30,))  # long gone
    k, _ = w.gather(1, torch.tensor(w.positions((0, 1, 37, 38, 39))))
    assert k[:, 0, 0].tolist() == [0.0, 1.0, 37.0, 38.0, 39.0]
    assert w.capacity == 2 + 3 + 2


def test_long_stream_has_flat_memory_and_crosses_the_rope_table():
    # A RoPE table of 8 positions and 60 chunks: absolute frame indices run far past the table.
    config = with_rope_table(tiny_config(sink_frames=1, window_frames=4), 8)
    engine = Engine(config)
    sid = engine.open_session({"prompt": "endless"})
    engine.request(sid, 60)
    kv = engine.sessions[sid].window.kv
    sizes, tensors, frames = set(), set(), 0
    last = None
    while engine.has_work():
        for c in engine.step():
            frames += c.num_frames
            last = c
        sizes.add(engine.kv_bytes(sid))
        tensors.add((kv.k.data_ptr(), kv.v.data_ptr()))
        assert sum(f >= 0 for f in kv.held) <= kv.capacity
    assert sizes == {kv.nbytes} and len(tensors) == 1  # the same buffers, never grown or copied
    assert last.envelope.frame_start == 59 > config.model.rope_max_seq_len
    assert frames == 1 + 59 * 4
    assert np.isfinite(last.frames).all() and last.frames.std() > 0
