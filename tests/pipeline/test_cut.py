"""Hard cut and soft prompt change."""

import torch

from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.reference import reference_session
from pipeline.types import UserParams
from tests.conftest import tiny_config


def drain(engine):
    out = []
    while engine.has_work():
        out += engine.step()
    return out


def test_hard_cut_drops_old_epoch_and_restarts_from_empty_context():
    config = tiny_config(dtype="float64")
    models = load_models(config)
    engine = Engine(config, models, keep_latents=True)
    params = UserParams(prompt="before", seed=3)
    sid = engine.open_session(params)
    engine.request(sid, 20)
    before = []
    for _ in range(6):
        before += engine.step()
    in_flight = [c.envelope.chunk_index for c in engine.sessions[sid].window.in_flight]
    assert in_flight  # chunks of epoch 0 are mid-way
    assert engine.cut(sid) == 1
    engine.update_params(sid, prompt="after")
    window = engine.sessions[sid].window
    assert window.in_flight == [] and all(f < 0 for f in window.kv.held)
    engine.request(sid, 3 - window.demand)  # 3 chunks in the new epoch
    after = drain(engine)

    assert {c.envelope.epoch for c in before} == {0}
    assert {c.envelope.epoch for c in after} == {1}
    first_new = after[0].envelope.chunk_index
    assert first_new > max(in_flight)  # nothing computed before the cut comes out after it
    assert after[0].num_frames == config.frames_for_chunk(first=True)  # the decoder restarted too
    # pts stay gapless: the cut-off chunks' frames never existed
    assert after[0].pts[0] == before[-1].pts[-1] + before[-1].pts[1] - before[-1].pts[0]
    # the new epoch is exactly a fresh stream: the reference loop starts with an empty context
    want = reference_session(
        models.dit, models.text, config, UserParams(prompt="after", seed=3), 3, epoch=1, first_chunk_index=first_new
    )
    for c, ref in zip(after, want, strict=True):
        assert (c.latents - ref).abs().max() < 1e-6


def test_soft_prompt_change_applies_from_the_next_chunk():
    config = tiny_config()
    engine = Engine(config)
    sid = engine.open_session({"prompt": "first"})
    engine.request(sid, 8)
    out = []
    for _ in range(3):
        out += engine.step()
    engine.update_params(sid, prompt="second")
    out += drain(engine)
    prompts = [c.envelope.params.prompt for c in out]
    assert prompts[0] == "first" and prompts[-1] == "second"
    switch = prompts.index("second")
    assert prompts[:switch] == ["first"] * switch  # in-flight chunks kept their snapshot
    assert all(c.envelope.epoch == 0 for c in out)  # no cut: same epoch, same window
    assert [c.envelope.chunk_index for c in out] == list(range(8))


def test_v2v_follows_its_input():
    config = tiny_config()
    engine = Engine(config, keep_latents=True)
    sid = engine.open_session({"prompt": "style", "strength": 0.5}, mode="v2v")
    rng = torch.Generator().manual_seed(0)
    frames = (torch.rand(1 + 4 * 5, 32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
    assert engine.frames_needed(sid) == 1
    assert engine.submit(sid, frames[:1])
    assert engine.frames_needed(sid) == 4
    assert engine.submit(sid, frames[1:])
    out = drain(engine)
    assert [c.envelope.chunk_index for c in out] == list(range(6))
    assert [c.num_frames for c in out] == [1, 4, 4, 4, 4, 4]
    # a different input changes the output (strength < 1 keeps part of the input)
    engine2 = Engine(config, engine.models, keep_latents=True)
    sid2 = engine2.open_session({"prompt": "style", "strength": 0.5}, mode="v2v")
    engine2.submit(sid2, 255 - frames)
    out2 = drain(engine2)
    assert (out[0].latents - out2[0].latents).abs().max() > 1e-3
