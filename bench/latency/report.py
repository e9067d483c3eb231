"""The report: the JSON, the table, the plot, and ``--compare`` against an earlier report."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bench.engine import machine as base_machine
from bench.latency import efficiency
from bench.latency.common import PATHS, distribution
from pipeline.config import SystemConfig

SCHEMA = 1


def config_json(config: SystemConfig, args: argparse.Namespace) -> dict[str, Any]:
    random = bool(getattr(args, "random_weights", False)) or config.model.weights == "random"
    return {"file": args.config, **config.summary(), "random_weights": random}


def machine(paths: dict[str, Any]) -> dict[str, Any]:
    import aiortc

    info: dict[str, Any] = {**base_machine(), "cpu_count": os.cpu_count(), "aiortc": aiortc.__version__}
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine skews every number
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")  # with cores busy, 2 threads can be slower than 1
    if "chromium" in paths.get("browser", {}):
        info["chromium"] = paths["browser"]["chromium"]
    return info


def build_report(
    paths: dict[str, Any],
    measured: dict[str, Any] | None,
    config: SystemConfig,
    args: argparse.Namespace,
    argv: list[str],
) -> dict:
    """The JSON: the served (webrtc) path's numbers on top, every path's detail under ``paths``;
    ``measured``: the interleaved efficiency rounds (t2v), if they ran."""
    served = paths.get("webrtc", {})
    latency = served.get("latency_ms") or distribution([])
    return {
        "schema": SCHEMA,
        "mode": args.mode,
        "target_ms": args.target_ms,
        "ttff_ms": served.get("ttff_ms"),
        "fps": served.get("fps"),
        "latency_ms": {k: latency.get(k) for k in ("p50", "p95", "p99", "max")},
        "deadline_miss_rate": served.get("deadline_miss_rate"),
        "latency_source": served.get("latency_source"),
        **efficiency.summary(paths, measured, config.fps),
        "realtime_fps": config.fps,
        "paths": paths,
        "config": config_json(config, args),
        "machine": machine(paths),
        "command": " ".join(["python -m bench.latency", *argv]),
    }


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """One line per path, then efficiency and stage times."""
    print(
        f"{'path':<9}{'ttff ms':>9}{'fps':>8}{'period':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'miss':>7}  source"
    )
    for name in PATHS:
        p = report["paths"].get(name, {})
        if "fps" not in p:
            print(f"{name:<9}  {'skipped: ' + p['skipped'] if 'skipped' in p else 'error: ' + str(p.get('error'))}")
            continue
        lat = p["latency_ms"]
        print(
            f"{name:<9}{fmt(p['ttff_ms']):>9}{fmt(p['fps'], 2):>8}{fmt(p['period_ms']['p50']):>8}{fmt(lat['p50']):>9}"
            f"{fmt(lat['p95']):>9}{fmt(lat['p99']):>9}{fmt(lat['max']):>9}{fmt(p['deadline_miss_rate'], 2):>7}"
            f"  {p['latency_source']}"
        )
    print(
        f"efficiency ({report.get('efficiency_definition')}): {fmt(report['efficiency'], 3)}; "
        f"against min(engine, {report['realtime_fps']} fps real time): {fmt(report['efficiency_capped'], 3)}"
    )
    detail = report.get("efficiency_detail")
    if detail:
        fps, cpu = detail["fps"], detail["cpu_ms_per_frame"]
        print(
            f"efficiency rounds ({detail['window_s']:g} s windows): client process "
            + ", ".join(f"{row['process']['ratio']:.3f}" for row in detail["rounds"])
            + "; inline client "
            + ", ".join(f"{row['inline']['ratio']:.3f}" for row in detail["rounds"])
            + f" (median {detail['efficiency_inline_client']:.3f})"
        )
        print(
            "  median fps / server-process CPU ms per frame: "
            + ", ".join(f"{side} {fps[side]:.2f} / {cpu[side]:.1f}" for side in fps)
        )
    for name in PATHS:
        stages = report["paths"].get(name, {}).get("stages_ms")
        if stages:
            print(f"{name} ms per call, p50: " + ", ".join(f"{k} {fmt(v['p50'])}" for k, v in stages.items()))


def plot(report: dict[str, Any], out: str) -> None:
    """Per path, latency over time and its histogram (Agg backend, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PATHS), 2, figsize=(12, 3.2 * len(PATHS)), squeeze=False)
    target = report["target_ms"]
    for (ax_t, ax_h), name in zip(axes, PATHS, strict=True):
        p = report["paths"].get(name, {})
        s = p.get("series") or {}
        ax_t.set_title(f"{name}: latency over time ({p.get('latency_source', '-')})", fontsize=10)
        ax_h.set_title(f"{name}: latency histogram", fontsize=10)
        if not s.get("latency_ms"):
            why = p.get("skipped") or p.get("error") or "no per-frame latency"
            ax_t.text(0.5, 0.5, why[:90], ha="center", va="center", transform=ax_t.transAxes, fontsize=8)
            ax_h.axis("off")
            continue
        ax_t.plot(s["t_s"], s["latency_ms"], ".", markersize=3)
        ax_t.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target:g} ms")
        ax_t.set_xlabel("s since the first frame")
        ax_t.set_ylabel("ms")
        ax_t.legend(loc="upper right", fontsize=8)
        ax_h.hist(s["latency_ms"], bins=40)
        ax_h.axvline(target, color="tab:red", linestyle="--", linewidth=1)
        ax_h.set_xlabel("ms")
        ax_h.set_ylabel("frames")
    cfg = report["config"]
    fig.suptitle(f"bench.latency: {cfg['model']} {cfg['width']}x{cfg['height']} {report['mode']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


COMPARED: list[tuple[str, int, float]] = [
    ("ttff_ms", +1, 1.0),
    ("fps", -1, 0.5),
    ("latency_ms.p50", +1, 1.0),
    ("latency_ms.p95", +1, 1.0),
    ("latency_ms.p99", +1, 1.0),
    ("deadline_miss_rate", +1, 0.05),
    ("efficiency", -1, 0.01),
] + [
    (f"paths.{p}.{key}", sign, floor)
    for p in ("engine", "browser")
    for key, sign, floor in (
        ("ttff_ms", +1, 1.0),
        ("fps", -1, 0.5),
        ("latency_ms.p50", +1, 1.0),
        ("latency_ms.p95", +1, 1.0),
    )
]


def lookup(report: dict[str, Any], key: str) -> float | None:
    value: Any = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def compare(new: dict[str, Any], old: dict[str, Any], tolerance: float) -> tuple[list[str], list[str]]:
    """(what got worse, every compared line). Worse: moved the bad way by more than tolerance x max(|old|, floor)."""
    worse, lines = [], []
    for key, sign, floor in COMPARED:
        a, b = lookup(old, key), lookup(new, key)
        if a is None or b is None:
            continue
        change = (b - a) / max(abs(a), floor)
        verdict = "worse" if sign * change > tolerance else "better" if -sign * change > tolerance else "same"
        line = f"{key:<28}{a:>12.3f}{b:>12.3f}{change:>+10.1%}  {verdict}"
        lines.append(line)
        if verdict == "worse":
            worse.append(line)
    return worse, lines


def print_comparison(new: dict[str, Any], old: dict[str, Any], old_path: str, tolerance: float) -> bool:
    """Print the comparison; True when something got worse."""
    for what in ("mode", "config"):
        if new.get(what) != old.get(what):
            print(f"note: {what} differs from {old_path}: {old.get(what)} -> {new.get(what)}")
    worse, lines = compare(new, old, tolerance)
    print(f"\ncompared with {old_path} (tolerance {tolerance:.0%}):")
    print(f"{'metric':<28}{'old':>12}{'new':>12}{'change':>10}")
    print("\n".join(lines))
    print(f"{len(worse)} worse" + (":\n" + "\n".join(worse) if worse else ""))
    return bool(worse)


def read_report(path: str) -> dict[str, Any]:
    """A report written by ``--json``; ValueError naming the file when it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} cannot be read as a report: {e}") from None
    if not isinstance(report, dict) or "paths" not in report:
        raise ValueError(f"{path!r} is not a bench.latency report (no 'paths')")
    return report
