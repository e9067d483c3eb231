"""The demo model: its world (data generator, detector), its parts (frame autoencoder, word tokenizer, the
training forward), its training (reproducible, resumable) and the shipped weights (loaded as any folder is,
and held to measured quality)."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import pipeline.config
from bench.demo_quality import (
    Tally,
    best_shape,
    detect,
    following,
    frame_follows,
    measure,
    other_prompt,
    prompt_set,
)
from pipeline.config import (
    CONFIG_DIR,
    MODEL_DIR,
    REPO_ROOT,
    ConfigError,
    load_model_preset,
    load_system_config,
    replace,
)
from pipeline.engine import Engine
from pipeline.models.frame_ae import FrameAutoencoder, StreamingFrameAe, from_groups, to_groups
from pipeline.models.loader import load_models
from pipeline.models.text import TextEncoder, WordTokenizer
from pipeline.reference import forward_one, reference_session, split_frames
from pipeline.sampling import EulerSampler, FlowSampler
from pipeline.shapes import (
    CANONICAL,
    CANONICAL_SIZE,
    SHAPES,
    Obj,
    Scene,
    caption,
    parse_caption,
    random_scene,
    render,
    trajectories,
    vocabulary,
)
from pipeline.train import demo
from pipeline.types import UserParams
from tests.conftest import drain, open_t2v, run_streamer
from tests.conftest import executor as make_executor

SHIPPED = REPO_ROOT / "models" / "demo"


def frames_of(video: torch.Tensor) -> list[np.ndarray]:
    """[1, 3, N, H, W] in [-1, 1] -> uint8 frames [H, W, 3] as the engine hands them out."""
    return [
        ((video[0, :, t].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        for t in range(video.shape[2])
    ]


# ---- the world ------------------------------------------------------------------------------------------


def test_scenes_and_frames_are_a_pure_function_of_the_seed():
    a = [random_scene(np.random.default_rng(7)) for _ in range(3)]
    b = [random_scene(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    assert torch.equal(render(a, 5, 32, 32), render(b, 5, 32, 32))
    assert random_scene(np.random.default_rng(8)) != a[0]


def test_captions_parse_back_and_name_what_is_wrong():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        spec = parse_caption(caption(scene))
        assert spec.objects == tuple((o.colour, o.shape) for o in scene.objects)
        assert (spec.background, spec.motion) == (scene.background, scene.motion)
    assert (
        caption(
            Scene((Obj("circle", "red", 0.1, 0.5, 0.5, 0, 0),), "grey", "pass"),
        )
        == "a red circle passing on grey"
    )
    with pytest.raises(ValueError, match="'a purple circle on black' is not in the demo grammar"):
        parse_caption("a purple circle on black")
    with pytest.raises(ValueError, match="two objects of one colour"):
        parse_caption("a red circle and a red square on black")
    assert set(vocabulary()) >= {
        "red",
        "green",
        "blue",
        "yellow",
        "white",
        "circle",
        "square",
        "triangle",
        "black",
        "grey",
    }


def test_objects_bounce_inside_the_frame_and_passing_ones_leave_and_come_back():
    fast = Obj("circle", "red", 0.1, 0.5, 0.5, 0.05, 0.0)
    bounce = trajectories([Scene((fast,), "black", "bounce")], 200)[0, 0]
    assert bounce[:, 0].min() >= 0.1 and bounce[:, 0].max() <= 0.9  # the outline touches a wall, never crosses it
    assert torch.allclose(bounce[:3, 0], torch.tensor([0.5, 0.55, 0.6], dtype=torch.float64))
    passing = trajectories([Scene((fast,), "black", "pass")], 200)[0, 0]
    assert passing[:, 0].min() < 0 and passing[:, 0].max() > 1  # wholly out of the frame at times
    assert (passing[1:, 0] - passing[:-1, 0] < 0).any()  # wrapped around: out at the right, in at the left


def test_canonical_scenes_start_from_one_layout_and_move_apart():
    rng = np.random.default_rng(4)
    scenes = [random_scene(rng, layout="canonical") for _ in range(20)]
    for scene in scenes:
        where = CANONICAL[len(scene.objects)]
        assert [(o.x, o.y) for o in scene.objects] == list(where)
        assert all(o.size == CANONICAL_SIZE for o in scene.objects)
    assert len({(round(o.vx, 6), round(o.vy, 6)) for sc in scenes for o in sc.objects}) > 20  # velocities differ


def test_a_rendered_shape_sits_where_its_trajectory_says():
    scene = Scene((Obj("square", "white", 0.1, 0.3, 0.6, 0.01, -0.01),), "black", "bounce")
    video = render([scene], 3, 64, 64)
    centre = trajectories([scene], 3)[0, 0] * 64
    for t in range(3):
        mask = video[0, 0, t] > 0
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert abs(float(xs.float().mean() + 0.5) - float(centre[t, 0])) < 0.6
        assert abs(float(ys.float().mean() + 0.5) - float(centre[t, 1])) < 0.6


# ---- the detector bench.demo_quality reads frames with ---------------------------------------------------


def test_the_detector_reads_rendered_truth_right_and_catches_wrong_colours_and_shapes():
    rng = np.random.default_rng(3)
    tally = Tally()
    for _ in range(6):
        scene = random_scene(rng)
        scene = Scene(scene.objects, scene.background, "bounce")
        tally.add_stream(parse_caption(caption(scene)), frames_of(render([scene], 12, 128, 128)), {4, 8})
    s = tally.summary()
    assert s["colour_accuracy"] == 1.0 and s["shape_accuracy"] == 1.0 and s["objects_judged"] > 20
    assert s["vanish_at_chunk_boundaries"] == s["vanish_inside_chunks"] == s["jumps"] == s["flicker"] == 0

    for shape in SHAPES:  # each shape is told from the other two
        one = Scene((Obj(shape, "green", 0.11, 0.5, 0.5, 0, 0),), "grey", "bounce")
        assert detect(frames_of(render([one], 1, 128, 128))[0], "grey")["green"].shape == shape
    frame = frames_of(render([Scene((Obj("square", "blue", 0.1, 0.5, 0.5, 0, 0),), "black", "bounce")], 1, 128, 128))[0]
    assert not frame_follows(detect(frame, "black"), parse_caption("a red square on black"))  # wrong colour
    assert not frame_follows(
        detect(frame, "black"), parse_caption("a blue square and a red circle on black")
    )  # missing
    assert frame_follows(detect(frame, "black"), parse_caption("a blue circle on black"))  # colour only ...
    assert detect(frame, "black")["blue"].shape == "square"  # ... the shape is judged on its own
    # an object that leaves between two frames is counted once, at a chunk boundary when it is one
    tally = Tally()
    empty = np.zeros_like(frame)
    tally.add_stream(parse_caption("a blue square on black"), [frame, frame, empty, frame], {2})
    assert (tally.vanish_boundary, tally.vanish_inside) == (1, 0)
    assert [(v["frame"], v["colour"], v["at_chunk_boundary"]) for v in tally.vanished] == [(2, "blue", True)]
    assert following([frame, empty], "a blue square on black") == (1.0, 0.5)
    assert following([frame, empty], "a red square on grey") == (0.0, 0.0)


def test_best_shape_of_a_blob_is_the_circle():
    yy, xx = np.mgrid[0:64, 0:64]
    assert best_shape((xx - 32) ** 2 + (yy - 32) ** 2 < 100) == "circle"


def test_fixed_prompts_and_their_changes():
    prompts = prompt_set(12)
    assert prompts == prompt_set(12) and len(set(prompts)) == 12
    assert all(parse_caption(p).motion == "bounce" for p in prompts)
    for p in prompts:
        new = parse_caption(other_prompt(p))
        old = parse_caption(p)
        assert not {c for c, _ in new.objects} & {c for c, _ in old.objects}
        assert new.background != old.background


# ---- the parts ------------------------------------------------------------------------------------------


def test_word_tokenizer_ids_unknown_words_and_its_file(tmp_path):
    tok = WordTokenizer(vocabulary())
    ids, mask = tok.encode("A red, circle on BLACK!", 8)
    words = vocabulary()
    assert ids == [words.index(w) + 3 for w in ("a", "red", "circle", "on", "black")] + [1, 0, 0]
    assert mask == [1] * 6 + [0, 0]
    assert tok.unknown("a red fox on black") == ["fox"]
    assert tok.encode("a fox", 4)[0] == [words.index("a") + 3, 2, 1, 0]
    tok.save_pretrained(tmp_path)
    assert WordTokenizer.from_pretrained(tmp_path).words == words
    with pytest.raises(ValueError, match="distinct lower-case words"):
        WordTokenizer(["a", "a"])


def test_frame_autoencoder_groups_frames_as_the_wan_vae_does():
    video = torch.arange(3 * 9 * 2 * 2, dtype=torch.float32).view(1, 3, 9, 2, 2)
    groups = to_groups(video, first=True)  # frame 0 alone (4 times), then frames 1-4 and 5-8
    assert groups.shape == (3, 12, 2, 2)
    assert torch.equal(groups[0].view(3, 4, 2, 2)[:, 3], video[0, :, 0])
    assert torch.equal(groups[2].view(3, 4, 2, 2), video[0, :, 5:9])
    assert torch.equal(from_groups(groups, 1, first=True), video)
    with pytest.raises(ValueError, match="got 4 frames: needs 1 \\+ 4k"):
        to_groups(video[:, :, :4], first=True)


def test_streaming_frame_ae_decodes_sessions_batched_as_one_by_one():
    torch.manual_seed(0)
    codec = StreamingFrameAe(FrameAutoencoder().eval())
    latents = [torch.randn(1, 16, 1, 4, 4) for _ in range(3)]
    streams = [codec.new_stream() for _ in range(3)]
    streams[1].latents_decoded = 1  # one past its first chunk: 4 frames; the others 1
    joint = codec.decode_many(streams, latents)
    assert [v.shape[2] for v in joint] == [1, 4, 1]
    alone = [codec.new_stream() for _ in range(3)]
    alone[1].latents_decoded = 1
    for s, x, v in zip(alone, latents, joint, strict=True):
        assert torch.allclose(codec.decode(s, x), v, atol=1e-6)


def test_per_frame_times_equal_chunk_by_chunk_forwards_at_those_levels():
    """forward_frames (training) is what the KV-cached stream computes when each chunk was written at its level."""
    config = replace(load_system_config(CONFIG_DIR / "demo.yaml"), dtype="float64", height=32, width=32)
    models = load_models(config, random_weights=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, 4, generator=g, dtype=torch.float64)
    sigmas = [0.0, 0.4, 0.9, 0.9]
    text = models.text("a red circle on black").to(torch.float64)
    frames = models.dit.forward_frames(x, torch.tensor([sigmas]) * 1000, text[None])[0]
    context, outs = [], []
    for j, s in enumerate(sigmas):
        velocity, written = forward_one(models.dit, config, x[0, :, j : j + 1], s, text, j, context)
        context += split_frames(written, 1)
        outs.append(velocity)
    assert torch.allclose(torch.cat(outs, dim=1), frames, atol=1e-6, rtol=0)


def test_staircase_is_the_stream_rule():
    # DESIGN §4: chunk j at step i sees chunk j-d as written by its step min(i+d-1, W); W = 4 (clean) with 4 steps
    assert demo.staircase(7, 0, 4) == [4, 4, 4, 3, 2, 1, 0, 0]
    assert demo.staircase(7, 2, 4) == [4, 4, 4, 4, 4, 3, 2, 2]
    assert demo.staircase(2, 1, 4) == [2, 1, 1, 4, 4, 4, 4, 4]  # frames after the head: clean, and unseen


# ---- training -------------------------------------------------------------------------------------------


def tiny_run(out, **kw):
    opts = demo.Options(out=out, minutes=60, ae_steps=3, ae_batch=2, pool=4, steps=4, batch=2, sample_every_s=1e9)
    for k, v in kw.items():
        setattr(opts, k, v)
    return demo.run(opts)


@pytest.mark.slow
def test_training_is_reproducible_and_resumes_where_it_stopped(tmp_path):
    a = tiny_run(tmp_path / "a")
    b = tiny_run(tmp_path / "b", final_samples=False)
    assert a["ae_losses"] == b["ae_losses"] and len(a["ae_losses"]) == 3
    assert a["dit_losses"] == b["dit_losses"] and len(a["dit_losses"]) == 4
    assert tiny_run(tmp_path / "c", seed=1, final_samples=False)["dit_losses"] != a["dit_losses"]
    tiny_run(tmp_path / "d", steps=2, final_samples=False)
    resumed = tiny_run(tmp_path / "d", steps=4, final_samples=False)  # from its checkpoint after 2 steps
    assert resumed["dit_losses"] == a["dit_losses"]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    assert list((tmp_path / "a" / "samples").glob("step-4.png"))
    # what it writes loads through the normal loader, config from its own files
    config = load_system_config(CONFIG_DIR / "demo.yaml", model_source=str(tmp_path / "a" / "model"))
    models = load_models(config)
    assert isinstance(models.vae, StreamingFrameAe)
    meta = json.loads((tmp_path / "a" / "model" / "training.json").read_text())
    assert meta["dit_steps"] == 4 and meta["seed"] == 0


# ---- the shipped weights -----------------------------------------------------------------------------------


def test_the_shipped_folder_is_small_and_loads_with_its_own_configs(tmp_path):
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 8 * 2**20, size
    config = load_system_config(CONFIG_DIR / "demo.yaml")
    assert config.model.source == str(SHIPPED)
    models = load_models(config)
    assert models.source == str(SHIPPED)
    assert isinstance(models.text, TextEncoder) and isinstance(models.text.tokenizer, WordTokenizer)
    # its latent statistics come from its vae/config.json, not from the preset
    ae_config = json.loads((SHIPPED / "vae" / "config.json").read_text())
    assert isinstance(models.vae, StreamingFrameAe)
    assert torch.allclose(models.vae.ae.mean.flatten(), torch.tensor(ae_config["latents_mean"]))
    # a folder whose transformer is another architecture is refused, naming it
    other = tmp_path / "other"
    shutil.copytree(SHIPPED, other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ConfigError, match="matches none of the known presets"):
        load_models(load_system_config(CONFIG_DIR / "demo.yaml", model_source=str(other)))
    fake = tmp_path / "taew2_1.pth"
    fake.write_bytes(b"")
    with pytest.raises(ConfigError, match="decoder='taehv' is not allowed with model 'demo'"):
        load_models(replace(config, decoder="taehv", decoder_path=str(fake)))


def test_the_shipped_autoencoder_reconstructs_the_world():
    models = load_models(load_system_config(CONFIG_DIR / "demo.yaml"))
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng) for _ in range(4)]
    video = render(scenes, 9, 128, 128)
    codec = models.vae
    for i in range(4):
        stream = codec.new_stream()
        back = torch.cat([codec.decode(stream, codec.encode(codec.new_stream(), video[i : i + 1]))], dim=2)
        assert back.shape == video[i : i + 1].shape
        assert (back - video[i : i + 1]).abs().mean() < 0.03  # of a range of 2
    assert load_model_preset("demo").latent_channels == 16


@pytest.mark.slow
def test_the_shipped_model_holds_what_it_measured():
    """A short bench.demo_quality, held a little below what the shipped weights measured on it on a 2-core AMD
    EPYC (colour 100 %, shape 99.2 % of 362 objects judged, none vanished), with a margin for another CPU's
    rounding (none for vanishing: issue 13 allows none); the full run is in bench/README.md. Goes red when the
    weights, the sampler, the detector or the engine path regress."""
    report, _ = measure(CONFIG_DIR / "demo.yaml", streams=8, chunks=8, changes=0)
    assert report["background_accuracy"] >= 0.95, report
    assert report["colour_accuracy"] >= 0.95, report
    assert report["shape_accuracy"] >= 0.93 and report["objects_judged"] >= 300, report
    assert report["vanish_at_chunk_boundaries"] + report["vanish_inside_chunks"] == 0, report["vanished"]
    assert report["frames"] == 8 * (1 + 4 * 7)


MAKE_DEMO_PROMPT = "a red circle and a blue square on black"  # the Makefile's


@pytest.mark.slow
def test_make_demo_command_writes_a_playable_video_of_the_prompt(tmp_path):
    assert f'--prompt "{MAKE_DEMO_PROMPT}"' in (REPO_ROOT / "Makefile").read_text()
    out = tmp_path / "demo.mp4"
    r = run_streamer(
        "run",
        "--config",
        "configs/demo.yaml",
        "--prompt",
        MAKE_DEMO_PROMPT,
        "--seconds",
        "2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    import av

    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) >= 29
    background, objects = following(frames, MAKE_DEMO_PROMPT)
    assert background > 0.9 and objects > 0.9, (background, objects)  # both objects, no other colour
    # words outside the model's vocabulary are named (the video is still made)
    r = run_streamer("run", "--config", "configs/demo.yaml", "--prompt", "a red fox on black", "--frames", "5",
                     "--out", str(tmp_path / "fox.mp4"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "does not know the word(s) ['fox']" in r.stderr and "triangle" in r.stderr


def test_euler_step_keeps_the_noise_the_model_reads():
    x, v, sigma = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 1.0]]), torch.tensor([0.8])
    euler = EulerSampler()
    x0 = euler.x0(x, sigma, v)
    assert torch.allclose(x0, torch.tensor([[-1.1, -1.8]]))  # x − σ·v
    assert not euler.fresh_noise
    nxt = euler.next_input(x, sigma, x0, 0.5, None)
    assert torch.allclose(nxt, torch.tensor([[-0.1, -1.3]]))  # x + (0.5 - 0.8)·v: no fresh noise
    eps = x0 + v  # the same step as x0 and ε̂ = x0 + v, mixed at 0.5
    assert torch.allclose(nxt, 0.5 * x0 + 0.5 * eps)
    flow = FlowSampler()
    assert flow.fresh_noise
    assert torch.allclose(flow.next_input(x, sigma, x0, 0.5, torch.full((1, 2), 9.0)), 0.5 * x0 + 0.5 * 9.0)
    with pytest.raises(ValueError, match="fresh noise"):
        flow.next_input(x, sigma, x0, 0.5, None)


def test_an_x0_model_output_is_read_as_the_clean_latents():
    """``prediction: x0`` (the demo): the output is x0 itself; the velocity is (x − x0)/σ, so the ODE step keeps
    ε̂ = (x − (1−σ)·x0)/σ."""
    x, out, sigma = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.1, 0.3]]), torch.tensor([0.8])
    sampler = EulerSampler("x0")
    x0 = sampler.x0(x, sigma, out)
    assert torch.equal(x0, out)
    nxt = sampler.next_input(x, sigma, x0, 0.5, None)
    assert torch.allclose(nxt, torch.tensor([[0.35, -0.5125]]))  # x + (0.5 − 0.8)·(x − x0)/0.8, v = [0.5, −1.625]
    eps = (x - 0.2 * out) / 0.8
    assert torch.allclose(nxt, 0.5 * out + 0.5 * eps)
    flow = FlowSampler("x0")
    assert torch.allclose(
        flow.next_input(x, sigma, flow.x0(x, sigma, out), 0.5, torch.full((1, 2), 9.0)), 0.5 * out + 4.5
    )
    # the same model output read as a velocity means something else
    assert not torch.allclose(EulerSampler().x0(x, sigma, out), out)
    with pytest.raises(ValueError, match="prediction='eps' is not allowed"):
        FlowSampler("eps")


@pytest.mark.parametrize(("field", "value"), [("prediction", "eps"), ("sampler", "ddim")])
def test_a_preset_with_an_unknown_update_rule_is_refused(tmp_path, monkeypatch, field, value):
    text = (MODEL_DIR / "demo.yaml").read_text()
    assert re.search(rf"^{field}: ", text, flags=re.M)
    (tmp_path / "demo.yaml").write_text(re.sub(rf"^{field}: .*$", f"{field}: {value}", text, flags=re.M))
    monkeypatch.setattr(pipeline.config, "MODEL_DIR", tmp_path)
    with pytest.raises(ConfigError, match=f"{field}={value!r} is not allowed"):
        load_model_preset("demo")


def test_the_engine_samples_the_demo_preset_as_the_reference_loop_does():
    """The demo's ODE step through the StreamBatch engine equals the plain reference loop with it."""
    config = replace(load_system_config(CONFIG_DIR / "demo.yaml"), dtype="float64", height=32, width=32)
    models = load_models(config, random_weights=True)
    assert isinstance(models.sampler, EulerSampler) and models.sampler.prediction == "x0"
    engine = Engine(config, models, executor=make_executor(config, models, "streambatch", keep_latents=True))
    params = [UserParams(prompt="a red circle on black", seed=1), UserParams(prompt="a blue square on grey", seed=2)]
    sids = [open_t2v(engine, 5, prompt=p.prompt, seed=p.seed) for p in params]
    got: dict[str, list] = {}
    for c in drain(engine):
        got.setdefault(c.envelope.session_id, []).append(c.latents)
    for sid, p in zip(sids, params, strict=True):
        want = reference_session(models.dit, models.text, config, p, 5, sampler=EulerSampler("x0"))
        fresh = reference_session(models.dit, models.text, config, p, 5, sampler=FlowSampler("x0"))
        assert len(got[sid]) == 5
        for a, b in zip(got[sid], want, strict=True):
            assert (a - b).abs().max() < 1e-6
        assert (got[sid][-1] - fresh[-1]).abs().max() > 1e-3  # the update rule matters


def test_teacher_forcing_is_the_clean_rule_in_one_forward():
    """Each noisy frame of the teacher-forcing layout gets what a chunk gets under ``clean``: the earlier chunks'
    σ=0 writes as context, and its own noisy input."""
    config = replace(
        load_system_config(CONFIG_DIR / "demo.yaml"), dtype="float64", height=32, width=32, context="clean"
    )
    models = load_models(config, random_weights=True)
    g = torch.Generator().manual_seed(1)
    frames = 3
    clean = torch.randn(1, 16, frames, 4, 4, generator=g, dtype=torch.float64)
    noisy = torch.randn(1, 16, frames, 4, 4, generator=g, dtype=torch.float64)
    sigmas = [0.9, 0.5, 0.2]
    text = models.text("a red circle on black").to(torch.float64)
    positions, visible = demo.teacher_forcing(frames)
    time = torch.tensor([[0.0] * frames + [1000 * s for s in sigmas]])
    out = models.dit.forward_frames(torch.cat([clean, noisy], dim=2), time, text[None], positions, visible)[0]
    context = []
    for j, s in enumerate(sigmas):
        velocity, _ = forward_one(models.dit, config, noisy[0, :, j : j + 1], s, text, j, context)
        assert torch.allclose(velocity, out[:, frames + j : frames + j + 1], atol=1e-6, rtol=0)
        _, written = forward_one(models.dit, config, clean[0, :, j : j + 1], 0.0, text, j, context)
        context += split_frames(written, 1)


def test_the_from_scratch_command_names_every_option_that_shapes_the_steps(tmp_path):
    from pipeline.train.demo import Options, from_scratch

    opts = Options(out=tmp_path, minutes=5.0, first_batch=16)
    assert from_scratch(opts, 8166, 250.03) == (
        "python -m pipeline.train.demo --minutes 251 --steps 8166 --first-batch 16 --out runs/demo --export models/demo"
    )
    opts = Options(out=tmp_path, minutes=5.0, seed=3, context="stream", any_sigma=True)
    assert from_scratch(opts, 10, 1.0) == (
        "python -m pipeline.train.demo --minutes 1 --steps 10 --seed 3 --context stream --any-sigma --out runs/demo"
        " --export models/demo"
    )
