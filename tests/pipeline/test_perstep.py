"""The per-step rule (pipeline/perstep.py): StreamDiffusionV2's system, exactly.

Parity runs our engine against bundles recorded from their own code: the shared one, and bundles this
test records with their harness (other seeds, steps, sizes, RoPE refresh, adaptive sink), which needs
their source (``pip download --no-deps streamdiffusionv2``, a package registry). The pieces both sides
could share a bug in (the σ table, positions, the cache's eviction) are pinned with fixed values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bench import parity
from pipeline.commands import Cut
from pipeline.config import ConfigError
from pipeline.engine import Engine
from pipeline.executor import local_executor
from pipeline.models.loader import load_models
from pipeline.perstep import StepCaches, rope_position
from pipeline.sampling import table_sigma
from tests.conftest import ROOT, drain, open_t2v, tiny_config

SHARED = ROOT.parent / "shared" / "peers" / "sdv2"
BUNDLE = SHARED / "ref_stream_steps2.pt"
PEER_VERSION = "0.1.1"


def per_step(**changes):
    base = dict(
        context="per-step",
        sink_frames=2,
        window_frames=2,
        first_chunk_frames=2,
        adaptive_sink=0.2,
        rope_refresh=6,
        timestep_rule="table",
        shift=8.0,
        timesteps=[700, 500, 300],
        dtype="float64",
    )
    return tiny_config(**(base | changes))


# ---- pinned pieces ------------------------------------------------------------------------------


def test_table_sigma_is_their_scheduler_table():
    # FlowMatchScheduler(shift=8, sigma_min=0, extra_one_step=True).set_timesteps(1000): the entry nearest t
    assert table_sigma(700, 8.0) == pytest.approx(0.7002323865890503, abs=1e-12)
    assert table_sigma(500, 8.0) == pytest.approx(0.49971863627433777, abs=1e-12)
    assert table_sigma(1000, 8.0) == 1.0
    assert table_sigma(700, 5.0) != table_sigma(700, 8.0)  # the table's spacing depends on the shift


def test_rope_position_wraps_like_their_t_refresh():
    # their loop: before a call, if start // fsl >= t_refresh: start = kv_cache_length - fsl
    refresh, cache = 8, 6
    got = [rope_position(f, cache, 1, refresh) for f in range(2, 16)]
    assert got == [2, 3, 4, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
    expected, pos = [], 2
    for _ in range(2, 16):
        pos = cache - 1 if pos >= refresh else pos
        expected.append(pos)
        pos += 1
    assert got == expected
    assert [rope_position(f, cache, 1, 0) for f in (0, 5, 500)] == [0, 5, 500]


def caches(frames=5, sink=2, tpf=1, adaptive=-1.0, dim=2):
    return StepCaches(range(1), 1, frames, sink, adaptive, tpf, 1, dim, torch.float64, "cpu")


def test_cache_eviction_order_pinned():
    """Their ring, traced by hand: fill in order; then the eviction queue turns over the frames after
    the sink (sink 2, 5 frames, a first chunk of 2 frames)."""
    c = caches()
    writes = [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1)]  # (start, frames); key value = start
    used = []
    for start, n in writes:
        k = torch.full((n, 1, 2), float(start), dtype=torch.float64)
        expected = c.used_after(0, start, n)
        used.append(c.write(0, 0, start, k, k))
        assert used[-1] == expected
    assert used == [2, 3, 4, 5, 5, 5, 5]
    assert c.k[0, 0, :, 0, 0].tolist() == [0, 0, 2, 7, 6]  # frames 5 and 7 went to position 3, 6 to 4
    assert c.queue[0][0] == [5, 4]


def test_adaptive_sink_replaces_the_least_similar_sink_frame():
    tpf = 2
    c = caches(frames=4, sink=2, tpf=tpf, adaptive=0.5)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    first = torch.stack([a * 1.0, a * 1.0, a * 2.0, a * 2.0])[:, None]  # 2 frames of 2 tokens
    c.write(0, 0, 0, first, first)
    same = (a * 3.0).expand(tpf, 1, 2)
    c.write(0, 0, 2 * tpf, same, same)  # similar to the sink: the queue is left as it was
    c.write(0, 0, 3 * tpf, same, same)
    assert c.queue[0][0] == [4 * tpf]
    other = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(tpf, 1, 2)
    c.write(0, 0, 4 * tpf, other, other)  # dissimilar to both sink frames: sink frame 0 is evicted next
    assert c.k[0, 0, :tpf, 0].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert c.queue[0][0] == [4 * tpf]  # the sink entry is not put back in the queue


def test_config_rejects_per_step_fields_elsewhere():
    for field, value in (("adaptive_sink", 0.2), ("rope_refresh", 50), ("first_chunk_frames", 2)):
        with pytest.raises(ConfigError, match=field):
            tiny_config(**{field: value})
    with pytest.raises(ConfigError, match="timestep_rule"):
        per_step(timestep_rule="nearest")
    with pytest.raises(ConfigError, match="rope_refresh"):
        per_step(rope_refresh=3)


# ---- the engine under the per-step rule ----------------------------------------------------------


def run(config, sessions=1, chunks=7, batching="tick", cut_after=None):
    models = load_models(config)
    engine = Engine(config, models, local_executor(config, models, batching=batching, keep_latents=True))
    sids = [open_t2v(engine, chunks, prompt=f"p{i}", seed=i) for i in range(sessions)]
    out = drain(engine)
    if cut_after is not None:
        engine.apply(Cut(sids[0], demand=cut_after))
        out += drain(engine)
    engine.close()
    return {(c.envelope.session_id, c.envelope.epoch, c.envelope.chunk_index): c for c in out}, engine


def test_first_chunk_then_one_per_tick_without_write_slots():
    cfg = per_step()
    got, engine = run(cfg, chunks=7)
    assert sorted(k[2] for k in got) == list(range(7))  # phantoms are never decoded
    assert got[("s0", 0, 0)].num_frames == 5 and got[("s0", 0, 0)].latents.shape[1] == 2
    assert all(got[("s0", 0, i)].num_frames == 4 for i in range(1, 7))
    t = cfg.steps
    # the first chunk alone for T ticks, then T slots a tick (phantoms fill the levels above the new chunk)
    assert engine.stats.ticks == t + 6 + (t - 1)
    assert engine.stats.slots == t + 6 * t + t * (t - 1) // 2  # phantoms: levels 1..T-1, climbing


def test_sessions_batched_together_equal_each_alone():
    cfg = per_step(max_sessions=3)
    together, _ = run(cfg, sessions=3, chunks=6)
    alone, _ = run(cfg, sessions=1, chunks=6)
    assert len(together) == 18 and len(alone) == 6
    for k, c in alone.items():
        assert (c.latents - together[k].latents).abs().max() < 1e-10, k
    slot_by_slot, _ = run(cfg, sessions=3, chunks=6, batching="slot")
    for k, c in together.items():
        assert (c.latents - slot_by_slot[k].latents).abs().max() < 1e-10, k


def test_cut_starts_the_epoch_over_with_its_own_first_chunk():
    cfg = per_step()
    got, _ = run(cfg, chunks=4, cut_after=4)
    fresh, _ = run(cfg, chunks=4)
    after = sorted(k for k in got if k[1] == 1)
    assert len(after) == 4 and got[after[0]].latents.shape[1] == 2
    # a new epoch is a fresh start: its chunks' noise differs by epoch, their shapes and counts do not
    assert [got[k].num_frames for k in after] == [fresh[("s0", 0, i)].num_frames for i in range(4)]


# ---- parity with their code -----------------------------------------------------------------------


def need_bundle() -> Path:
    if not BUNDLE.exists():
        if os.environ.get("CI"):
            pytest.fail(f"the shared StreamDiffusionV2 bundle is missing: {BUNDLE}")
        pytest.skip(f"no shared bundle at {BUNDLE}")
    return BUNDLE


def test_parity_with_the_shared_bundle():
    result = parity.run(str(need_bundle()))
    assert result["compared_chunks"] == 11
    assert result["max_abs_diff"] < 1e-4, result["per_chunk"]


def test_parity_fails_when_the_rule_is_broken(monkeypatch):
    """The comparison can fail: without the adaptive sink's queue entry, outputs move apart."""
    original = StepCaches.write

    def no_adaptive(self, level, block, start, k, v):
        saved, self.adaptive_sink = self.adaptive_sink, -1.0
        try:
            return original(self, level, block, start, k, v)
        finally:
            self.adaptive_sink = saved

    monkeypatch.setattr(StepCaches, "write", no_adaptive)
    result = parity.run(str(need_bundle()))
    assert result["max_abs_diff"] > 1e-3


@pytest.fixture(scope="session")
def peer_source(tmp_path_factory) -> Path:
    """StreamDiffusionV2's own code, from the package registry (read, run, never imported by the project)."""
    where = tmp_path_factory.mktemp("sdv2")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            f"streamdiffusionv2=={PEER_VERSION}",
            "-d",
            where,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = where.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(where / "src")
    return where / "src"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        # 4 steps, another seed; RoPE refresh within the run; a stronger adaptive sink
        ["--steps", "4", "--seed", "11", "--t-refresh", "9", "--adapt-sink-thr", "0.5"],
        # 3 steps at 256x256 (4x the tokens), refresh at 8
        ["--steps", "3", "--seed", "1", "--height", "256", "--width", "256", "--t-refresh", "8"],
        # a smaller cache and sink, no adaptive sink
        [
            "--steps",
            "2",
            "--seed",
            "7",
            "--num-kv-cache",
            "5",
            "--sink",
            "2",
            "--adapt-sink-thr",
            "-1",
            "--t-refresh",
            "7",
        ],
    ],
    ids=["steps4-refresh9", "steps3-256px", "kv5-sink2"],
)
def test_parity_with_bundles_recorded_here(peer_source, tmp_path, args):
    if not (SHARED / "run_tiny.py").exists():
        pytest.fail(f"the peer harness is missing: {SHARED / 'run_tiny.py'}")
    bundle = tmp_path / "bundle.pt"
    env = dict(os.environ, SDV2_SRC=str(peer_source))
    cmd = [sys.executable, str(SHARED / "run_tiny.py"), "--modes", "stream", "--warmup", "1", "--iters", "1"]
    subprocess.run([*cmd, *args, "--save-ref", str(bundle)], check=True, env=env, cwd=tmp_path, timeout=600)
    result = parity.run(str(bundle))
    assert result["compared_chunks"] >= 9
    assert result["max_abs_diff"] < 1e-4, result["per_chunk"]


def test_the_sdv2_system_preset_is_their_configuration():
    from pipeline.config import CONFIG_DIR, load_system_config

    cfg = load_system_config(CONFIG_DIR / "sdv2.yaml")
    assert (cfg.context, cfg.sink_frames + cfg.window_frames, cfg.sink_frames) == ("per-step", 6, 3)
    assert (cfg.adaptive_sink, cfg.rope_refresh, cfg.first_frames, cfg.chunk_frames) == (0.2, 50, 2, 1)
    assert cfg.model_times() == (700.0, 500.0) and cfg.sigmas() == (table_sigma(700, 8.0), table_sigma(500, 8.0))
    assert (cfg.frames_for_chunk(True), cfg.frames_for_chunk(False)) == (5, 4)  # 1 + 4 video frames, then 4


def test_phantoms_are_no_chunks_of_the_session():
    from pipeline.commands import Query

    cfg = per_step()
    models = load_models(cfg)
    engine = Engine(cfg, models, local_executor(cfg, models))
    sid = open_t2v(engine, 3)
    while engine.stats.ticks < cfg.steps + 1:  # the first chunk's T ticks, then the first stream chunk's
        engine.step()
    phantoms = [c for c in engine.sessions[sid].in_flight if c.phantom]
    assert len(phantoms) == cfg.steps - 2  # the one that entered at the top level is gone already
    status = engine.apply(Query(sid))
    assert status.in_flight == len(engine.sessions[sid].in_flight) - len(phantoms) == 1
    drain(engine)
    engine.close()
