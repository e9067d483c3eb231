"""Hard cut and soft prompt change."""

import torch

from pipeline.commands import Cut, SetParams
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.reference import reference_session
from pipeline.types import PTS_CLOCK, UserParams
from tests.conftest import drain, executor, open_t2v, open_v2v, status, submit, tiny_config


def test_hard_cut_drops_old_epoch_and_restarts_from_empty_context():
    config = tiny_config(dtype="float64")
    models = load_models(config)
    engine = Engine(config, models, executor=executor(config, models, keep_latents=True))
    sid = open_t2v(engine, 20, prompt="before", seed=3)
    before = []
    while engine.stats.ticks < 6 or not before:  # some chunks out, later ones mid-way
        before += engine.step().chunks
    in_flight = [c.envelope.chunk_index for c in engine.sessions[sid].in_flight]
    assert in_flight  # chunks of epoch 0 are mid-way
    done = engine.apply(Cut(sid, demand=3))  # 3 chunks in the new epoch
    assert done.epoch == 1 and done.status.demand == 3 and done.status.in_flight == 0
    engine.apply(SetParams.of(sid, prompt="after"))
    assert all(f < 0 for f in engine.executor.stage.window(sid).held)  # the KV window starts empty
    after = drain(engine)

    assert {c.envelope.epoch for c in before} == {0}
    assert {c.envelope.epoch for c in after} == {1}
    first_new = after[0].envelope.chunk_index
    assert first_new == done.first_chunk_index > max(in_flight)  # nothing computed before the cut comes out after it
    assert after[0].num_frames == config.frames_for_chunk(first=True)  # the decoder restarted too
    # pts stay gapless: the cut-off chunks' frames never existed
    end = before[-1].envelope.video_frame + before[-1].num_frames
    assert after[0].envelope.video_frame == end and after[0].pts[0] == end * PTS_CLOCK // config.fps
    # the new epoch is exactly a fresh stream: the reference loop starts with an empty context
    want = reference_session(
        models.dit, models.text, config, UserParams(prompt="after", seed=3), 3, epoch=1, first_chunk_index=first_new
    )
    for c, ref in zip(after, want, strict=True):
        assert (c.latents - ref).abs().max() < 1e-6


def test_soft_prompt_change_applies_from_the_next_chunk():
    config = tiny_config()
    engine = Engine(config)
    sid = open_t2v(engine, 8, prompt="first")
    out = []
    while engine.stats.ticks < 3:
        out += engine.step().chunks
    engine.apply(SetParams.of(sid, prompt="second"))
    out += drain(engine)
    prompts = [c.envelope.params.prompt for c in out]
    assert prompts[0] == "first" and prompts[-1] == "second"
    switch = prompts.index("second")
    assert prompts[:switch] == ["first"] * switch  # in-flight chunks kept their snapshot
    assert all(c.envelope.epoch == 0 for c in out)  # no cut: same epoch, same window
    assert [c.envelope.chunk_index for c in out] == list(range(8))


def test_v2v_follows_its_input():
    config = tiny_config()
    models = load_models(config)
    engine = Engine(config, models, executor=executor(config, models, keep_latents=True))
    sid = open_v2v(engine, prompt="style", strength=0.5)
    rng = torch.Generator().manual_seed(0)
    frames = (torch.rand(1 + 4 * 5, 32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
    assert status(engine, sid).input.missing == 1
    assert submit(engine, sid, frames[:1])
    assert status(engine, sid).input.missing == 4
    assert submit(engine, sid, frames[1:])
    out = drain(engine)
    assert [c.envelope.chunk_index for c in out] == list(range(6))
    assert [c.num_frames for c in out] == [1, 4, 4, 4, 4, 4]
    # a different input changes the output (strength < 1 keeps part of the input)
    engine2 = Engine(config, models, executor=executor(config, models, keep_latents=True))
    sid2 = open_v2v(engine2, prompt="style", strength=0.5)
    submit(engine2, sid2, 255 - frames)
    out2 = drain(engine2)
    assert (out[0].latents - out2[0].latents).abs().max() > 1e-3
