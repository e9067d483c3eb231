import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from pipeline.config import CONFIG_DIR, SystemConfig, load_system_config, replace
from pipeline.stages.launch import free_port  # noqa: F401  (tests import it from here)

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(CONFIG_DIR / "tiny.yaml")]  # the CLI's default is the demo model; these tests mean tiny
TINY_32 = [*TINY, "--height", "32", "--width", "32"]  # as tiny_config(): 4x4 latents


def run_streamer(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m streamer ARGS`` in a real subprocess from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw
    )


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


def open_t2v(engine, chunks: int = 0, **params) -> str:
    """A t2v session of ``engine`` with ``chunks`` asked for; its id."""
    from pipeline.commands import Demand, Open
    from pipeline.types import UserParams

    sid = engine.apply(Open(UserParams(**params))).session_id
    if chunks:
        engine.apply(Demand(sid, chunks))
    return sid


def open_v2v(engine, **params) -> str:
    from pipeline.commands import Open
    from pipeline.types import UserParams

    return engine.apply(Open(UserParams(**params), "v2v")).session_id


def submit(engine, sid: str, frames) -> bool:
    """Hand ``frames`` (uint8 [N, H, W, 3]) to a v2v session, arriving now; whether they were taken."""
    import time

    from pipeline.commands import Submit

    return engine.apply(Submit(sid, frames, (time.monotonic(),) * len(frames))).taken


def status(engine, sid: str):
    from pipeline.commands import Query

    return engine.apply(Query(sid))


def drain(engine) -> list:
    """Step until nothing is left in flight or being decoded; every chunk that came out (the one feed loop)."""
    from pipeline.feeder import Feeder

    return Feeder(engine).drain()


def executor(config, models, name: str = "streambatch", **kw):
    """The local executor by its benchmark name: ``streambatch`` (one forward per tick) or ``sequential``."""
    from pipeline.stages.local import local_executor

    return local_executor(config, models, {"streambatch": "tick", "sequential": "slot"}[name], **kw)


def with_layers(config: SystemConfig, layers: int) -> SystemConfig:
    """The same config with a transformer of ``layers`` blocks (seeded weights), so that it splits into stages."""
    model = dataclasses.replace(config.model, transformer={**config.model.transformer, "num_layers": layers})
    return dataclasses.replace(config, model=model)


@pytest.fixture(scope="session")
def sdv2_src() -> Path:
    """StreamDiffusionV2's own source: ``$SDV2_SRC``, else the package registry's wheel, checked against its
    sha256 and unpacked once into the repository's ignored ``.cache/peers`` (``make peers``)."""
    from bench.peers.sdv2.source import RegistryUnreachable, peer_source

    try:
        return peer_source()
    except RegistryUnreachable as e:
        pytest.skip(f"registry unreachable: {e}")


def record_sdv2(src: Path, where: Path, *args: str, timeout: float = 600) -> None:
    """Bundles recorded by the peer's own loop (``python -m bench.peers.sdv2.driver ARGS --save-ref WHERE``),
    in a process of its own: their modules and warnings stay out of the tests."""
    cmd = [sys.executable, "-m", "bench.peers.sdv2.driver", *args, "--save-ref", str(where)]
    done = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, SDV2_SRC=str(src)), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="session")
def sdv2_bundles(sdv2_src, tmp_path_factory) -> dict[int, Path]:
    """Reference bundles of 2, 3 and 4 steps (their v2v geometry, seed 0, 12 stream calls), recorded here."""
    where = tmp_path_factory.mktemp("sdv2-bundles")
    record_sdv2(sdv2_src, where / "steps{steps}.pt", "--steps", "2,3,4")
    return {steps: where / f"steps{steps}.pt" for steps in (2, 3, 4)}


@pytest.fixture(scope="session")
def wan_module(sdv2_src):
    """A module of Wan2.1's own code (StreamDiffusionV2's copy: ``model``, ``vae``, ``t5``), imported under a
    private package name without the package ``__init__`` (its tokenizer needs ``ftfy`` and a download)."""
    import importlib
    import types

    from bench.peers.sdv2.source import WAN_MODULES

    pkg = "_sdv2_wan_modules"
    if pkg not in sys.modules:
        package = types.ModuleType(pkg)
        package.__path__ = [str(sdv2_src / WAN_MODULES)]
        sys.modules[pkg] = package
    if f"{pkg}.tokenizers" not in sys.modules:  # t5.py imports it; the tokenizer is not under test
        stub = types.ModuleType(f"{pkg}.tokenizers")
        stub.HuggingfaceTokenizer = object  # type: ignore[attr-defined]
        sys.modules[f"{pkg}.tokenizers"] = stub
    sys.dont_write_bytecode = True  # leave the peer's folder as it was unpacked

    def load(name: str) -> types.ModuleType:
        return importlib.import_module(f"{pkg}.{name}")

    return load
