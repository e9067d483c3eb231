import dataclasses

import pytest
import torch

from pipeline.config import CONFIG_DIR, SystemConfig, load_system_config, replace

torch.set_num_threads(2)


def tiny_config(**changes) -> SystemConfig:
    """The tiny preset at 32x32 (4x4 latents): the real code paths, fast enough for many tests."""
    base = dict(height=32, width=32)
    base.update(changes)
    return replace(load_system_config(CONFIG_DIR / "tiny.yaml"), **base)


def with_rope_table(config: SystemConfig, length: int) -> SystemConfig:
    """The same config with the model's RoPE table cut to ``length`` positions."""
    model = dataclasses.replace(config.model, transformer={**config.model.transformer, "rope_max_seq_len": length})
    return dataclasses.replace(config, model=model)


@pytest.fixture
def tiny64() -> SystemConfig:
    return tiny_config(dtype="float64")
