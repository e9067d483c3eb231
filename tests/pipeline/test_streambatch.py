"""Every executor equals the plain reference loop of its visibility rule (DESIGN §4)."""

import pytest
import torch

from pipeline.commands import Demand, Open
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.reference import reference_session
from pipeline.types import UserParams
from tests.conftest import drain, open_t2v, tiny_config
from tests.conftest import executor as make_executor

ATOL = 1e-6  # float64 model; diffusers' Wan block rounds its residual through float32


def run_engine(engine, sessions, join_at):
    """Open each session at its tick, ask for its chunks, run until idle; x0 latents per session."""
    ids, out = {}, {}
    while True:
        for name, (params, chunks) in sessions.items():
            if name not in ids and engine.stats.ticks >= join_at[name]:
                ids[name] = engine.apply(Open(params)).session_id
                engine.apply(Demand(ids[name], chunks))
        if len(ids) == len(sessions) and not engine.has_work():
            break
        for c in engine.step().chunks:
            out.setdefault(c.envelope.session_id, []).append(c)
    return {name: out[sid] for name, sid in ids.items()}


@pytest.mark.parametrize("context", ["stream", "clean"])
@pytest.mark.parametrize("executor", ["streambatch", "sequential"])
def test_executor_equals_reference_loop(context, executor):
    # sink 1 + window 3 with 7 chunks: the window rolls, evicts and re-bases positions
    config = tiny_config(dtype="float64", context=context, sink_frames=1, window_frames=3)
    models = load_models(config)
    engine = Engine(config, models, executor=make_executor(config, models, executor, keep_latents=True))
    sessions = {
        "a": (UserParams(prompt="red sails", seed=1), 7),
        "b": (UserParams(prompt="blue whale", seed=2), 5),
        "c": (UserParams(prompt="red sails", seed=3), 6),
    }
    got = run_engine(engine, sessions, join_at={"a": 0, "b": 0, "c": 3})
    assert engine.stats.slots > engine.stats.ticks  # sessions really were batched together

    for name, (params, chunks) in sessions.items():
        want = reference_session(models.dit, models.text, config, params, chunks)
        chunks_out = got[name]
        assert [c.envelope.chunk_index for c in chunks_out] == list(range(chunks))
        for c, ref in zip(chunks_out, want, strict=True):
            diff = (c.latents - ref).abs().max().item()
            assert diff < ATOL, f"session {name} chunk {c.envelope.chunk_index}: max diff {diff}"


@pytest.mark.parametrize("context", ["stream", "clean"])
def test_a_slot_batched_with_others_gets_the_bits_it_gets_alone(context):
    """float32, sessions of different ages (contexts of different lengths, padded in a batch): one forward
    per tick and one forward per slot give the same bits, so splitting a tick into micro-batches (a ring of
    stages) changes no frame."""
    config = tiny_config(context=context, sink_frames=1, window_frames=3)
    models = load_models(config)
    sessions = {"a": (UserParams(prompt="red sails", seed=1), 6), "b": (UserParams(prompt="blue", seed=2), 4)}
    runs = {}
    for executor in ("streambatch", "sequential"):
        engine = Engine(config, models, executor=make_executor(config, models, executor, keep_latents=True))
        runs[executor] = run_engine(engine, sessions, join_at={"a": 0, "b": 2})
        engine.close()
    for name in sessions:
        for batched, alone in zip(runs["streambatch"][name], runs["sequential"][name], strict=True):
            assert torch.equal(batched.latents, alone.latents), (name, batched.envelope.chunk_index)


def test_stream_and_clean_rules_differ():
    """The two rules give different pictures from chunk 1 on (chunk 0 has no context)."""
    stream = tiny_config(dtype="float64", context="stream")
    clean = tiny_config(dtype="float64", context="clean")
    models = load_models(stream)
    p = UserParams(prompt="x", seed=5)
    a = reference_session(models.dit, models.text, stream, p, 3)
    b = reference_session(models.dit, models.text, clean, p, 3)
    assert torch.equal(a[0], b[0])
    assert (a[2] - b[2]).abs().max() > 1e-4


def test_stream_keeps_t_chunks_in_flight_and_clean_one():
    for context, slots_per_tick in (("stream", 5), ("clean", 1)):  # T=4: 4 steps + the σ=0 write
        config = tiny_config(context=context)
        engine = Engine(config)
        open_t2v(engine, 20)
        counts = []
        while engine.stats.ticks < 12:
            before = engine.stats.slots
            engine.step()
            counts.append(engine.stats.slots - before)
        assert max(counts) == slots_per_tick
        assert counts[-1] == slots_per_tick


def test_same_seed_same_frames_other_seed_other_frames():
    config = tiny_config()
    models = load_models(config)

    def frames(seed):
        engine = Engine(config, models)
        open_t2v(engine, 3, prompt="p", seed=seed)
        return [c.frames for c in drain(engine)]

    a, b, c = frames(7), frames(7), frames(8)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != z).any() for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("context", ["stream", "clean"])
@pytest.mark.parametrize("executor", ["streambatch", "sequential"])
@pytest.mark.parametrize(("chunk_frames", "window"), [(2, 3), (3, 4)])
def test_chunks_of_several_frames_around_an_odd_ring_equal_the_reference(context, executor, chunk_frames, window):
    """Chunks of 2 and 3 latent frames in a ring of odd size (window + (T+1)·chunk_frames = 13, 19), run
    until the ring has wrapped at least three times: a chunk's frames are split where the ring wraps,
    and a write or read that gets one frame of a multi-frame chunk wrong shows here."""
    config = tiny_config(
        dtype="float64", context=context, sink_frames=1, window_frames=window, chunk_frames=chunk_frames
    )
    models = load_models(config)
    engine = Engine(config, models, executor=make_executor(config, models, executor, keep_latents=True))
    sessions = {"a": (UserParams(prompt="red sails", seed=1), 20), "b": (UserParams(prompt="blue", seed=2), 9)}
    got = run_engine(engine, sessions, join_at={"a": 0, "b": 2})
    ring = window + (config.steps + 1) * chunk_frames
    assert ring % 2 == 1
    assert (20 * chunk_frames - config.sink_frames) / ring >= 3  # session a's ring wrapped three times

    for name, (params, chunks) in sessions.items():
        want = reference_session(models.dit, models.text, config, params, chunks)
        assert [c.envelope.chunk_index for c in got[name]] == list(range(chunks))
        for c, ref in zip(got[name], want, strict=True):
            diff = (c.latents - ref).abs().max().item()
            assert diff < ATOL, f"session {name} chunk {c.envelope.chunk_index}: max diff {diff}"
