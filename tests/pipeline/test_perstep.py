"""The per-step rule (pipeline/perstep.py): StreamDiffusionV2's system, exactly.

Parity runs our engine against bundles the tests record from their own stream loop (bench/peers/sdv2: 2, 3
and 4 steps, and other seeds, sizes, RoPE refresh and adaptive sink), from their source as the package
registry has it (``pip download --no-deps streamdiffusionv2==0.1.1``, cached in ``.cache/peers``). The pieces
both sides could share a bug in (the σ table, positions, the cache's eviction, each slot's σ) are pinned
with fixed values.
"""

from __future__ import annotations

import pytest
import torch

from bench import parity
from pipeline.commands import Cut
from pipeline.config import ConfigError
from pipeline.engine import Engine
from pipeline.models.loader import load_models
from pipeline.perstep import StepCaches, rope_position
from pipeline.sampling import table_sigma
from pipeline.stages.local import local_executor
from tests.conftest import drain, open_t2v, record_sdv2, tiny_config


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


class Recording:
    """The local executor, recording what each micro-batch is given: (chunk, step, σ) per slot."""

    def __init__(self, inner):
        self.inner = inner
        self.ticks: dict[int, list[tuple[int, int, float]]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, mb, act):
        given = [(s.envelope.chunk_index, s.step, float(x)) for s, x in zip(mb.slots, act.sigma, strict=True)]
        self.ticks.setdefault(mb.tick, []).extend(given)
        self.inner.submit(mb, act)


def test_every_slot_gets_the_sigma_of_its_level():
    """Pinned by hand from their stream batch: slot i of a call is at level i with σ of timestep i, the first
    chunk runs its levels alone, and the phantoms of zeros enter levels 1..T-1 with those levels' σ."""
    s0, s1, s2 = 0.7002323865890503, 0.49971863627433777, 0.3006632328033447  # table σ of 700, 500, 300
    cfg = per_step()
    models = load_models(cfg)
    recording = Recording(local_executor(cfg, models))
    engine = Engine(cfg, models, recording)
    open_t2v(engine, 4)
    drain(engine)
    engine.close()
    got = {tick: sorted(slots) for tick, slots in recording.ticks.items()}
    assert got == {
        0: [(0, 0, pytest.approx(s0))],
        1: [(0, 1, pytest.approx(s1))],
        2: [(0, 2, pytest.approx(s2))],
        3: [(-2, 2, pytest.approx(s2)), (-1, 1, pytest.approx(s1)), (1, 0, pytest.approx(s0))],
        4: [(-1, 2, pytest.approx(s2)), (1, 1, pytest.approx(s1)), (2, 0, pytest.approx(s0))],
        5: [(1, 2, pytest.approx(s2)), (2, 1, pytest.approx(s1)), (3, 0, pytest.approx(s0))],
        6: [(2, 2, pytest.approx(s2)), (3, 1, pytest.approx(s1))],
        7: [(3, 2, pytest.approx(s2))],
    }


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


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_parity_with_bundles_of_their_stream_loop(sdv2_bundles, steps):
    result = parity.run(str(sdv2_bundles[steps]))
    assert result["compared_chunks"] == 12 - (steps - 1)  # their first T-1 calls return the pipeline fill
    assert result["sigmas"] == [table_sigma(t, 8.0) for t in (700, 500, 400, 200)[:steps]]
    assert result["max_abs_diff"] < 1e-4, result["per_chunk"]


def test_parity_fails_when_the_rule_is_broken(sdv2_bundles, monkeypatch):
    """The comparison can fail: without the adaptive sink's queue entry, outputs move apart."""
    original = StepCaches.write

    def no_adaptive(self, level, block, start, k, v):
        saved, self.adaptive_sink = self.adaptive_sink, -1.0
        try:
            return original(self, level, block, start, k, v)
        finally:
            self.adaptive_sink = saved

    monkeypatch.setattr(StepCaches, "write", no_adaptive)
    result = parity.run(str(sdv2_bundles[2]))
    assert result["max_abs_diff"] > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        # 4 steps, another seed; RoPE refresh within the run; a stronger adaptive sink
        ["--steps", "4", "--seed", "11", "--t-refresh", "9", "--adapt-sink-thr", "0.5"],
        # 3 steps at 256x256 (4x the tokens), refresh at 8
        ["--steps", "3", "--seed", "1", "--height", "256", "--width", "256", "--t-refresh", "8"],
        # a smaller cache and sink, no adaptive sink
        ["--steps", "2", "--seed", "7", "--num-kv-cache", "5", "--sink", "2", "--adapt-sink-thr", "-1",
         "--t-refresh", "7"],
    ],
    ids=["steps4-refresh9", "steps3-256px", "kv5-sink2"],
)  # fmt: skip
def test_parity_with_other_geometries_of_theirs(sdv2_src, tmp_path, args):
    bundle = tmp_path / "bundle.pt"
    record_sdv2(sdv2_src, bundle, *args)
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
