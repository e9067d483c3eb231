"""No import inside pipeline/ points up a floor (lazy imports inside functions included), and streamer/ and
web/ sit above it: streamer -> pipeline, never back (DESIGN §3)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Each module's floor; a module imports only from its own floor or below. A package's entry covers its
# modules unless one has its own. The order is the engine's, bottom up: words and pure rules, configuration,
# models and per-session state, the rules of a tick, the executors, the engine, what drives it.
FLOORS = {
    "pipeline.types": 0,  # messages and the one stale rule
    "pipeline.sampling": 0,  # sigma tables and update rules
    "pipeline.stats": 0,
    "pipeline.shapes": 0,  # the demo's procedural world (its words are the demo tokenizer's)
    "pipeline.models.attention": 0,  # the attention kernels and their names, which the config checks
    "pipeline.config": 1,
    "pipeline.commands": 1,
    "pipeline.models": 2,
    "pipeline.window": 2,
    "pipeline.perstep": 2,
    "pipeline.intake": 2,
    "pipeline.state": 2,
    "pipeline.scheduler": 3,
    "pipeline.decode": 3,
    "pipeline.executor": 3,  # the executor contract and its messages
    "pipeline.reference": 3,
    "pipeline.memory": 3,
    "pipeline.stages": 4,  # the executors: local, ring, transport, launch, balance, dispatch, simulator
    "pipeline.engine": 5,
    "pipeline.feeder": 6,
    "pipeline.start": 6,  # an executor for a config: measuring runs an engine
    "pipeline.train": 7,
    "pipeline": 0,  # the package itself
}


def floor(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise KeyError(f"{module} has no floor in tests/test_layers.py's FLOORS: give it one")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def graph() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports."""
    edges: dict[str, set[str]] = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        edges[module_name(path)] = {m for _, m in imports(path) if m.startswith("pipeline")}
    return edges


def test_no_import_in_pipeline_points_up_a_floor():
    upward = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        me = module_name(path)
        for line, target in imports(path):
            if target.startswith("pipeline") and floor(target) > floor(me):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {me} (floor {floor(me)}) imports {target} "
                              f"(floor {floor(target)})")  # fmt: skip
    assert not upward, "\n".join(upward)


def test_pipeline_never_imports_streamer_bench_or_the_web():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for line, target in imports(path):
            assert target.split(".")[0] not in ("streamer", "bench", "web"), f"{path}:{line} imports {target}"
    for path in sorted((ROOT / "streamer").rglob("*.py")):
        for line, target in imports(path):
            assert target.split(".")[0] != "bench", f"{path}:{line} imports {target}"


def test_the_floor_check_finds_an_upward_import(tmp_path):
    bad = tmp_path / "balance.py"
    bad.write_text("def measure():\n    from pipeline.engine import Engine\n    return Engine\n")
    assert imports(bad) == [(2, "pipeline.engine")]
    assert floor("pipeline.engine") > floor("pipeline.stages.balance")
    assert graph()["pipeline.stages.balance"] == set()  # balance builds no engine any more
