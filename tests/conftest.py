import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from pipeline.config import CONFIG_DIR, SystemConfig, load_system_config, replace

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


def run_streamer(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m streamer ARGS`` in a real subprocess from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_frames(path: Path) -> int:
    """Decodable video frames in a file."""
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


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
