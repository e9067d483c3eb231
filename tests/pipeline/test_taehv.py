"""The tiny decoder (TAEHV): weights in the published taew2_1.pth layout load strictly, chunk by chunk equals one
decode of the whole sequence, and the engine with ``decoder: taehv`` gives the Wan VAE's frame counts."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import CONFIG_DIR, ConfigError, load_system_config, replace
from pipeline.decode import tensor_to_frames
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.models.taehv import MemBlock, StreamingTaehv, TGrow, load_taehv, random_taehv
from tests.conftest import TINY, drain, executor, open_t2v, tiny_config


def published_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights in the key layout of taew2_1.pth, the output layer scaled so frames span [0, 1]."""
    sd = random_taehv(seed).state_dict()
    sd["decoder.22.weight"] = sd["decoder.22.weight"] * 100
    sd["decoder.22.bias"] = torch.full_like(sd["decoder.22.bias"], 0.5)
    return sd


def save(tmp_path: Path, sd: dict[str, torch.Tensor]) -> str:
    path = tmp_path / "taew2_1.pth"
    torch.save(sd, path)
    return str(path)


def taehv_models(tmp_path: Path, **changes):
    config = tiny_config(decoder="taehv", decoder_path=save(tmp_path, published_state_dict()), **changes)
    return config, load_models(config)


def frame_by_frame(taehv: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """An independent reference: one latent frame at a time, depth first through the blocks (a MemBlock's past
    is its input at the previous frame; a TGrow's frames go on in time order), then the first 3 frames trimmed.
    latents [1, C, n, h, w] -> frames [1, 3, 4n-3, H, W] in [-1, 1]."""
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def run(x: torch.Tensor, start: int) -> None:
        for i in range(start, len(taehv.decoder)):
            block = taehv.decoder[i]
            if isinstance(block, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = block(x, past)
            elif isinstance(block, TGrow):
                for frame in block(x).split(1):
                    run(frame, i + 1)
                return
            else:
                x = block(x)
        out.append(x)

    with torch.no_grad():
        for t in range(latents.shape[2]):
            run(latents[:, :, t], 0)
    video = torch.stack(out[taehv.frames_to_trim :], dim=2)  # [1, 3, N, H, W]
    return video.clamp(0, 1) * 2 - 1


def test_streaming_decode_equals_one_decode_of_the_whole_sequence(tmp_path):
    _, models = taehv_models(tmp_path, dtype="float64", height=16, width=16)
    vae = models.vae
    assert isinstance(vae, StreamingTaehv)
    latents = torch.randn(1, 16, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = vae.decode_all(latents)
    stream = vae.new_stream()
    parts = [vae.decode(stream, latents[:, :, a : a + n]) for a, n in ((0, 1), (1, 2), (3, 1))]
    assert [p.shape[2] for p in parts] == [1, 8, 4]  # the Wan VAE's counts: 1 frame, then 4 per latent frame
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * 3, 16, 16)
    assert whole.std() > 0.1  # frames that differ, not a flat grey
    assert torch.allclose(streamed, whole, atol=1e-12, rtol=0)
    # and one pass equals an independent frame-by-frame decode (float32: float64 convs one frame at a time are slow)
    taehv32, latents32 = copy.deepcopy(vae.taehv).float(), latents.float()
    with torch.no_grad():
        one_pass = taehv32.decode_video(latents32.transpose(1, 2)).transpose(1, 2) * 2 - 1
    assert torch.allclose(one_pass, frame_by_frame(taehv32, latents32), atol=1e-5, rtol=0)
    # without the memory each chunk restarts: fewer frames, and the frames differ
    restarted = vae.decode(vae.new_stream(), latents[:, :, 1:3])
    assert restarted.shape[2] == 5 and (restarted[:, :, 1:] - whole[:, :, 5:9]).abs().max() > 1e-3


def test_sessions_decoded_together_give_the_frames_of_one_by_one(tmp_path):
    """Three sessions, the third joining a chunk late (at its start while the others are not): one batch."""
    _, models = taehv_models(tmp_path, height=16, width=16)
    vae = models.vae
    g = torch.Generator().manual_seed(2)
    per_session = [[torch.randn(1, 16, 1, 2, 2, generator=g) for _ in range(2)] for _ in range(3)]
    alone = [vae.new_stream() for _ in range(3)]
    together = [vae.new_stream() for _ in range(3)]
    for k in range(2):
        active = [0, 1] if k < 1 else [0, 1, 2]
        xs = [per_session[i][k if i < 2 else k - 1] for i in active]
        want = [vae.decode(alone[i], x) for i, x in zip(active, xs, strict=True)]
        got = vae.decode_many([together[i] for i in active], xs)
        for w, o in zip(want, got, strict=True):
            assert w.shape == o.shape and torch.allclose(w, o, atol=1e-5, rtol=0)


def test_missing_extra_and_misshapen_keys_are_named(tmp_path):
    sd = published_state_dict()
    missing = dict(sd)
    del missing["decoder.9.conv.2.bias"]
    with pytest.raises(ConfigError, match=r"taew2_1\.pth.*missing keys: decoder\.9\.conv\.2\.bias"):
        load_models(tiny_config(decoder="taehv", decoder_path=save(tmp_path, missing)))
    extra = {**sd, "decoder.23.weight": torch.zeros(3)}
    with pytest.raises(ConfigError, match=r"taew2_1\.pth.*unexpected keys: decoder\.23\.weight"):
        load_models(tiny_config(decoder="taehv", decoder_path=save(tmp_path, extra)))
    wrong = {**sd, "decoder.1.weight": torch.zeros(256, 48, 3, 3)}  # a 48-channel (Wan 2.2) latent input
    with pytest.raises(ConfigError, match=r"wrong shapes: decoder\.1\.weight \(256, 48, 3, 3\), expected \(256, 16"):
        load_models(tiny_config(decoder="taehv", decoder_path=save(tmp_path, wrong)))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pth.*not a readable TAEHV weights file"):
        load_models(tiny_config(decoder="taehv", decoder_path=str(tmp_path / "junk.pth")))


@pytest.mark.parametrize("wider", [2, 4])
def test_a_wider_tgrow_keeps_its_last_channel_group(tmp_path, wider):
    """A checkpoint trained with more time upscaling stores a decoder TGrow with ``wider`` x its output channels;
    the reference implementation keeps the last group (the frames nearest the next latent frame)."""
    sd = published_state_dict()
    grows = [i for i, block in enumerate(random_taehv(0).decoder) if isinstance(block, TGrow)]
    assert grows, "the decoder has TGrow blocks"
    expected = {}
    for i in grows:
        key = f"decoder.{i}.conv.weight"
        groups = [torch.full_like(sd[key], float(g + 1)) for g in range(wider)]  # group g holds the value g + 1
        sd[key] = torch.cat(groups)
        expected[i] = groups[-1]
    model = load_taehv(save(tmp_path, sd))
    for i in grows:
        assert torch.equal(model.decoder[i].conv.weight, expected[i]), i
        assert model.decoder[i].conv.weight.unique().tolist() == [float(wider)]


def test_decoder_settings_are_checked_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"decoder='tiny' is not allowed: one of \('wan', 'taehv'\)"):
        tiny_config(decoder="tiny")
    with pytest.raises(ConfigError, match=r"decoder_path='/nowhere/taew2_1.pth' is not allowed: an existing file"):
        tiny_config(decoder="taehv", decoder_path="/nowhere/taew2_1.pth")
    path = save(tmp_path, published_state_dict())
    with pytest.raises(ConfigError, match=r"decoder_path=.* is not allowed: a file path, with decoder 'taehv' only"):
        tiny_config(decoder_path=path)
    with pytest.raises(ConfigError, match=r"decoder='taehv' is not allowed: 'wan' for model 'passthrough'"):
        load_system_config(CONFIG_DIR / "passthrough.yaml", decoder="taehv")
    pretrained = load_system_config(CONFIG_DIR / "wan2.1-1.3b.yaml", decoder="taehv", model_source=str(tmp_path))
    with pytest.raises(ConfigError, match=r"decoder='taehv' with pretrained weights needs decoder_path.*taew2_1\.pth"):
        load_models(pretrained)
    assert replace(tiny_config(decoder="taehv"), height=64).decoder == "taehv"  # a random preset: no file needed


def test_the_engine_decodes_with_taehv_in_the_wan_vae_s_frame_counts(tmp_path):
    config, models = taehv_models(tmp_path, height=16, width=16)
    engine = Engine(config, models, executor=executor(config, models, keep_latents=True))
    sessions = [open_t2v(engine, 3, prompt="a", seed=1), open_t2v(engine, 3, prompt="b", seed=2)]
    out = drain(engine)
    engine.close()
    for sid in sessions:
        chunks = [c for c in out if c.envelope.session_id == sid]
        assert [c.envelope.chunk_index for c in chunks] == [0, 1, 2]
        assert [c.num_frames for c in chunks] == [config.frames_for_chunk(first=True), 4, 4] == [1, 4, 4]
        assert all(c.frames.shape[1:] == (16, 16, 3) and c.frames.dtype == np.uint8 for c in chunks)
        # the frames are TAEHV's decode of the session's latents as one sequence
        latents = torch.cat([c.latents for c in chunks], dim=1).unsqueeze(0)
        want = tensor_to_frames(models.vae.decode_all(latents))[0].numpy()
        got = np.concatenate([c.frames for c in chunks])
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert got.std() > 10


@pytest.mark.parametrize("command", ["run", "serve"])
def test_the_cli_flags_reach_the_config_and_bad_values_are_named(command, tmp_path, capsys):
    from streamer.cli import main

    extra = ["--out", str(tmp_path / "a.mp4")] if command == "run" else ["--port", "1"]
    assert main([command, *TINY, "--decoder", "tiny", *extra]) == 2
    assert "decoder='tiny' is not allowed: one of ('wan', 'taehv')" in capsys.readouterr().err
    assert main([command, *TINY, "--decoder", "taehv", "--decoder-path", str(tmp_path / "none.pth"), *extra]) == 2
    assert f"decoder_path='{tmp_path / 'none.pth'}' is not allowed: an existing file" in capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists()
