"""Rolling KV window: sink + latest frames kept, memory flat, positions bounded for ever."""

import numpy as np
import torch

from pipeline.engine import Engine
from pipeline.models.causal_wan import apply_rope
from pipeline.models.loader import load_models
from pipeline.reference import reference_session
from pipeline.types import UserParams
from pipeline.window import KVWindow, context_frames, sink_shift
from tests.conftest import executor, open_t2v, tiny_config, with_rope_table


def test_context_is_sink_plus_latest_window():
    assert context_frames(0, sink=2, window=4) == ()
    assert context_frames(3, sink=2, window=4) == (0, 1, 2)
    assert context_frames(6, sink=2, window=4) == (0, 1, 2, 3, 4, 5)
    assert context_frames(20, sink=2, window=4) == (0, 1, 16, 17, 18, 19)
    assert context_frames(20, sink=0, window=4) == (16, 17, 18, 19)


def test_sink_sits_right_before_the_window_for_ever():
    sink, window, cf = 2, 4, 2
    for f in range(0, 400, cf):
        frames = context_frames(f, sink, window)
        shift = sink_shift(f, sink, window)
        # distance from the query's first frame to each context frame, as the model sees it
        seen = [f - (frame + shift if frame < sink else frame) for frame in frames]
        assert all(0 < d <= sink + window for d in seen)
        if f <= sink + window:
            assert shift == 0  # short streams: plain absolute positions
        else:
            assert seen == [window + sink - s for s in range(sink)] + list(range(window, 0, -1))


def test_rope_time_axis_is_exact_and_turns_compose():
    model = load_models(tiny_config(dtype="float64")).dit
    table = model.transformer.rope.freqs_cos[:, 0::2][:, : model._t_half]  # diffusers' float32 table
    cos, _ = model.rope(torch.arange(1024).view(1, -1), (1, 1))
    assert torch.allclose(cos[0, :, 0, : model._t_half], table.double(), atol=1e-6)
    # R(p + s) = R(s) R(p), for positions far past the table
    x = torch.randn(1, 3, 2, model.head_dim, dtype=torch.float64)
    grid = (1, 3)
    p, s = 5000, 123
    at_p = apply_rope(x, model.rope(torch.tensor([[p]]), grid))
    at_ps = apply_rope(x, model.rope(torch.tensor([[p + s]]), grid))
    assert torch.allclose(apply_rope(at_p, model.time_shift(torch.tensor([s]))), at_ps, atol=1e-9)


def test_ring_evicts_oldest_and_keeps_sink():
    w = KVWindow(
        range(2),
        sink=2,
        window=3,
        in_flight_frames=2,
        tokens_per_frame=1,
        heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )
    for f in range(40):
        for b in range(2):
            value = torch.full((1, 1, 2), float(f))
            w.scatter(b, range(f, f + 1), value, value)
        assert w.holds(context_frames(f + 1, 2, 3))
        k, _ = w.gather(1, context_frames(f + 1, 2, 3))  # runs across the ring's wrap, too
        assert k[:, 0, 0].tolist() == [float(x) for x in context_frames(f + 1, 2, 3)]
    assert w.holds((0, 1))  # sink frames survive
    assert not w.holds((30,))  # long gone
    assert len(w.runs(context_frames(40, 2, 3))) <= 3  # sink + window in at most two pieces
    assert w.capacity == 2 + 3 + 2


def test_long_stream_has_flat_memory_crosses_the_rope_table_and_equals_the_reference():
    # A RoPE table of 8 positions and 60 chunks: absolute frame indices run far past the table.
    config = with_rope_table(tiny_config(sink_frames=1, window_frames=4, dtype="float64"), 8)
    models = load_models(config)
    engine = Engine(config, models, executor=executor(config, models, keep_latents=True))
    params = UserParams(prompt="endless", seed=4)
    sid = open_t2v(engine, 60, prompt="endless", seed=4)
    sizes, tensors, out = set(), set(), []
    while engine.has_work():
        out += engine.step().chunks
        kv = engine.executor.stage.window(sid)
        sizes.add(engine.executor.stage.kv_bytes())
        tensors.add((kv.k.data_ptr(), kv.v.data_ptr()))
        assert sum(f >= 0 for f in kv.held) <= kv.capacity
    assert sizes == {kv.nbytes} and len(tensors) == 1  # the same buffers, never grown or copied
    assert out[-1].envelope.frame_start == 59 > config.model.rope_max_seq_len
    assert sum(c.num_frames for c in out) == 1 + 59 * 4
    assert np.isfinite(out[-1].frames).all() and out[-1].frames.std() > 0
    # the values, not only their finiteness: every chunk equals the plain reference loop
    want = reference_session(models.dit, models.text, config, params, 60)
    diffs = [(c.latents - ref).abs().max().item() for c, ref in zip(out, want, strict=True)]
    assert max(diffs) < 1e-6, diffs
