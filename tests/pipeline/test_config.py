"""Bad configuration is a clear error that names the field and the value; nothing is guessed."""

import dataclasses
import json
import re

import pytest
import torch
import yaml

from pipeline import config as config_module
from pipeline.commands import Open, SetParams
from pipeline.config import MODEL_DIR, ConfigError, load_model_preset, load_system_config
from pipeline.engine import Engine
from pipeline.models.loader import load_models, random_components, save_pretrained
from pipeline.models.text import ByteTokenizer
from pipeline.sampling import shifted_sigmas, sigmas_from_timesteps, strength_sigmas, validate_sigmas
from pipeline.types import UserParams
from tests.conftest import tiny_config


def write_config(tmp_path, **fields):
    data = {"model": "tiny", "height": 32, "width": 32}
    data.update(fields)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def test_unknown_preset_names_it_and_the_known_ones(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"'tiny2' is unknown; known presets: \['demo', 'passthrough', 'sdv2-tiny', 'tiny', 'tiny-deep', "
        r"'wan2.1-1.3b'\]",
    ):
        load_system_config(write_config(tmp_path, model="tiny2"))
    with pytest.raises(ConfigError, match="unknown"):
        load_model_preset("../models/tiny")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("height", 100, r"height=100 is not allowed: a multiple of 16"),
        ("width", 72, r"width=72 is not allowed: a multiple of 16"),
        ("timesteps", [1000, 0], r"timesteps=\[1000, 0\] is not allowed: every timestep in \(0, 1000\]"),
        ("timesteps", [500, 750], r"timesteps=\[500, 750\] is not allowed: strictly decreasing"),
        ("timesteps", [], r"timesteps=\[\] is not allowed"),
        ("context", "future", r"context='future' is not allowed: one of \('stream', 'clean', 'per-step'\)"),
        ("dtype", "int8", r"dtype='int8' is not allowed"),
        ("chunk_frames", 0, r"chunk_frames=0 is not allowed: an integer from 1 to 1048576"),
        ("window_frames", 5000, r"window_frames=5000 is not allowed: .*RoPE table"),
        ("colour", "red", r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_bad_system_values(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_system_config(write_config(tmp_path, **{field: value}))


BIG = 10**400  # an integer too large for a float: float(BIG) raises OverflowError
SHOWN = re.escape("=100000000000…(401 digits) is not allowed")


@pytest.mark.parametrize(
    "field",
    ["shift", "adaptive_sink", "fps", "height", "width", "max_sessions", "sink_frames", "window_frames",
     "chunk_frames", "rope_refresh", "first_chunk_frames"],
)  # fmt: skip
def test_an_integer_too_large_for_a_float_is_refused_by_name_in_short(tmp_path, field):
    for value in (BIG, -BIG):
        with pytest.raises(ConfigError, match=f"{field}={'-1' if value < 0 else '1'}") as e:
            load_system_config(write_config(tmp_path, **{field: value}))
        assert len(str(e.value)) < 300 and "digits) is not allowed" in str(e.value), e.value
    with pytest.raises(ConfigError, match=field + SHOWN):
        load_system_config(write_config(tmp_path, **{field: BIG}))


def test_timesteps_too_large_for_a_float_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"timesteps=\[1000000000.*characters of repr\) is not allowed: every"):
        load_system_config(write_config(tmp_path, timesteps=[BIG, 500]))


@pytest.mark.parametrize("field", ["shift", "fps", "text_len", "seed"])
def test_a_model_preset_s_numbers_are_checked_before_conversion(tmp_path, monkeypatch, field):
    data = yaml.safe_load((MODEL_DIR / "tiny.yaml").read_text()) | {field: BIG}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(config_module, "MODEL_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"model preset 'tiny': " + field + SHOWN):
        load_model_preset("tiny")


def test_a_user_param_too_large_for_a_float_is_refused_by_name():
    for field in ("strength", "seed"):
        with pytest.raises(ValueError, match=field + SHOWN):
            UserParams().updated({field: BIG})


def test_bad_sigmas():
    with pytest.raises(ValueError, match=r"sigmas=\(0.5, 0.0\) is not allowed"):
        validate_sigmas((0.5, 0.0))
    with pytest.raises(ValueError, match=r"sigmas=\(0.5, 0.7\) is not allowed: strictly decreasing"):
        validate_sigmas((0.5, 0.7))
    with pytest.raises(ValueError, match=re.escape("sigmas=()")):
        validate_sigmas(())
    with pytest.raises(ValueError, match="strength=0"):
        strength_sigmas((1.0, 0.5), 0)


def test_sigma_tables():
    assert shifted_sigmas(4, 1.0) == pytest.approx((1.0, 0.75, 0.5, 0.25))
    sdv2 = sigmas_from_timesteps([700, 500, 400, 200], 5.0)
    assert sdv2 == pytest.approx((3.5 / 3.8, 2.5 / 3.0, 2.0 / 2.6, 1.0 / 1.8))
    assert strength_sigmas((1.0, 0.5), 0.4) == pytest.approx((0.4, 0.2))


def test_bad_user_params_name_field_and_value():
    with pytest.raises(ValueError, match=r"unknown user param\(s\) \['colour'\]"):
        UserParams().updated({"colour": "red"})
    with pytest.raises(ValueError, match=re.escape("strength=1.5 is not allowed")):
        UserParams().updated({"strength": 1.5})
    with pytest.raises(ValueError, match="seed='x' is not allowed"):
        UserParams().updated({"seed": "x"})
    with pytest.raises(ValueError, match="prompt of 5000 characters is not allowed"):
        UserParams().updated({"prompt": "x" * 5000})
    engine = Engine(tiny_config())
    with pytest.raises(ValueError, match="mode='i2v' is not allowed"):
        engine.apply(Open(UserParams(), "i2v"))
    with pytest.raises(KeyError, match="session_id='nope' is not open"):
        engine.apply(SetParams.of("nope", prompt="x"))
    engine.close()


def test_model_folder_is_identified_by_its_config_not_its_name(tmp_path):
    preset = load_model_preset("tiny")
    transformer, vae, text = random_components(preset)
    # a tiny checkpoint in a folder whose name suggests another model
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    save_pretrained(folder, transformer, vae, text, ByteTokenizer())
    models = load_models(dataclasses.replace(tiny_config(), model_source=str(folder)))
    assert models.source == str(folder)
    for (name, p), q in zip(models.dit.transformer.named_parameters(), transformer.parameters(), strict=True):
        assert torch.equal(p, q), name
    # asking for the 1.3B preset with this folder is refused: it holds 'tiny'
    big = load_system_config(
        write_config(tmp_path, model="wan2.1-1.3b", height=480, width=832), model_source=str(folder)
    )
    with pytest.raises(ConfigError, match=re.escape("holds 'tiny', but the config asks for 'wan2.1-1.3b'")):
        load_models(big)


def test_model_folder_that_matches_no_preset_is_refused(tmp_path):
    empty = tmp_path / "tiny"
    empty.mkdir()
    config = load_system_config(write_config(tmp_path), model_source=str(empty))
    with pytest.raises(
        ConfigError, match=re.escape("does not identify a known model: it has no transformer/config.json")
    ):
        load_models(config)
    odd = tmp_path / "odd"
    (odd / "transformer").mkdir(parents=True)
    (odd / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 7})
    )
    config = load_system_config(write_config(tmp_path), model_source=str(odd))
    with pytest.raises(ConfigError, match="matches none of the known presets"):
        load_models(config)
    config = load_system_config(write_config(tmp_path), model_source=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_models(config)


def test_pretrained_preset_without_weights_says_so(tmp_path):
    config = load_system_config(write_config(tmp_path, model="wan2.1-1.3b", height=480, width=832))
    with pytest.raises(ConfigError, match="give --model PATH_OR_ID"):
        load_models(config)
