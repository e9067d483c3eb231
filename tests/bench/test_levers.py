"""bench.levers runs its table on the tiny model (the GPU run uses the same code)."""

import json

from bench import levers
from pipeline.config import CONFIG_DIR, load_system_config


def test_the_lever_table_runs_and_counts_flops(tmp_path):
    out = tmp_path / "levers.json"
    assert (
        levers.main(["--config", str(CONFIG_DIR / "tiny.yaml"), "--ticks", "2", "--rounds", "1", "--json", str(out)])
        == 0
    )
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"all levers, taehv, 2 steps", "text K/V cache off", "quality: wan decoder, 4 steps"} <= set(rows)
    assert all(r["fps"] > 0 and r["dit_fps"] > 0 for r in rows.values())
    assert rows["quality: wan decoder, 4 steps"]["slots_per_tick"] > rows["wan decoder, 2 steps"]["slots_per_tick"]
    cfg = load_system_config(CONFIG_DIR / "wan2.1-1.3b.yaml")
    # the 1.3B model at 480x832, 1560 tokens a slot: its block matmuls (1.25e9 weights without the text's
    # k, v) at 2 FLOPs each per token = 3.90e12, self-attention over 15 frames of context + its own
    # (2 matmuls x 2 FLOPs x 1560 x 24960 x 1536 x 30 blocks = 7.18e12), cross-attention 0.15e12
    per_slot = levers.dit_flops_per_slot(cfg, text_cached=True)
    assert 1.12e13 < per_slot < 1.13e13
    assert levers.dit_flops_per_slot(cfg, text_cached=False) > per_slot
