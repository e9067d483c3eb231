"""The report: the machine, the versions measured, the summary printed, and the plot."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

SCHEMA = 1


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict[str, Any]:
    import aioice
    import aiortc

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews the timings
        "aiortc": aiortc.__version__,
        "aioice": aioice.__version__,
    }


def git(root: Path) -> dict[str, Any]:
    """The commit a checkout is at, and whether it has uncommitted changes (what ran was not that commit)."""

    def run(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def failed_checks(report: dict[str, Any]) -> list[str]:
    return [
        f"{name}.{check}"
        for name, s in report["scenarios"].items()
        for check, c in s.get("checks", {}).items()
        if not c["passed"]
    ]


def print_summary(report: dict[str, Any]) -> None:
    """One line per scenario with its headline figures, then every check."""
    s = report["scenarios"]
    lines = []
    if "churn" in s and "error" not in s["churn"]:
        c = s["churn"]
        lines.append(
            f"churn    {c['cycles']} cycles ({c['clients']} clients): freed max {c['max_free_s']} s "
            f"(median {c['median_free_s']}), not freed {c['not_freed']}; RSS {c['rss_mib']['start']} -> "
            f"{c['rss_mib']['tail_median']} MiB, slope {c['rss_slope_mib_per_100_cycles']} MiB/100 cycles; "
            f"threads {c['threads']['start']} -> {c['threads']['last']}, fds {c['fds']['start']} -> {c['fds']['last']}"
        )
    if "stream" in s and "error" not in s["stream"]:
        t = s["stream"]
        lines.append(
            f"stream   {t['seconds']} s: {t['frames']} frames, {t['fps']} fps, worst gap {t['worst_gap_s']} s, "
            f"{t['stalls']} stalls over {t['stall_threshold_s']} s, fewest frames in a window {t['min_window_frames']}"
        )
    if "fuzz" in s and "error" not in s["fuzz"]:
        z = s["fuzz"]
        big = z["big_message"]
        lines.append(
            f"fuzz     {z['passed']}/{z['corpus']} passed ({z['sent']} sent, {z['answered']} answered, "
            f"{z['unanswered']} not, "
            f"{z['closed_under_limit']} closed under the limit, {z['sessions_lost']} sessions lost); "
            f"{big['bytes']} B message: {big['answer']}, closed {big['closed']} after {big['answer_s']} s, "
            f"victim's worst gap {big['victim_during']['worst_gap_s']} s "
            f"(before {big['victim_before']['worst_gap_s']} s)"
        )
    if "offers" in s and "error" not in s["offers"]:
        o = s["offers"]
        c, h, b = o["concurrent"], o["held"], o["slow_bodies"]
        lines.append(
            f"offers   concurrent {c['statuses']} for {c['free_slots_before']} free; held {h['free_s']} "
            f"(deadline {h['connect_deadline_s']} s), health {h['health']['status_when_full']}; "
            f"slow bodies {b['answers']}"
        )
    for name, scenario in s.items():
        if "error" in scenario:
            lines.append(f"{name:<9}error: {scenario['error']}")
    print("\n".join(lines))
    for name, scenario in s.items():
        for check, c in scenario.get("checks", {}).items():
            print(f"  {'ok  ' if c['passed'] else 'FAIL'} {name}.{check}: {c['value']} (allowed: {c['allowed']})")


def plot(report: dict[str, Any], out: str) -> None:
    """Churn: RSS, threads and open files per cycle, and each kind's time to free; the long stream's
    frames per window; the fuzz corpus passed per category (Agg backend, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = report["scenarios"]
    fig, ((ax_mem, ax_free), (ax_fps, ax_fuzz)) = plt.subplots(2, 2, figsize=(13, 8))
    churn = s.get("churn", {})
    if churn.get("rows"):
        rows = churn["rows"]
        x = [r["cycle"] for r in rows]
        ax_mem.plot(x, [r["rss_mib"] for r in rows], ".-", color="tab:blue", label="RSS MiB")
        ax_mem.set_ylabel("RSS MiB")
        twin = ax_mem.twinx()
        twin.plot(x, [r["threads"] for r in rows], "s-", color="tab:orange", markersize=3, label="threads")
        twin.plot(x, [r["fds"] for r in rows], "^-", color="tab:green", markersize=3, label="open files")
        twin.set_ylabel("threads, open files")
        twin.set_ylim(bottom=0)
        ax_mem.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        for kind, marker in (("clean", "o"), ("kill", "x"), ("drop", "s")):
            ax_free.plot(x, [r["free_s"][kind] for r in rows], marker, label=kind, markersize=5)
        ax_free.axhline(15, color="tab:red", linestyle="--", linewidth=1, label="15 s")
        ax_free.set_ylabel("s from the client's end to a free slot")
        ax_free.legend(fontsize=8)
    for ax in (ax_mem, ax_free):
        ax.set_xlabel("churn cycle")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mem.set_title("churn: the server's memory, threads and files per cycle", fontsize=10)
    ax_free.set_title("churn: time to free the slot", fontsize=10)
    stream = s.get("stream", {})
    if stream.get("frames_per_window"):
        counts = stream["frames_per_window"]
        ax_fps.plot(range(len(counts)), counts, "-", linewidth=1)
        ax_fps.axhline(report["server"]["fps"], color="tab:red", linestyle="--", linewidth=1, label="model fps")
        ax_fps.set_ylim(0, 1.15 * max(*counts, report["server"]["fps"]))
        ax_fps.legend(fontsize=8, loc="lower right")
    ax_fps.set_title(f"long stream: frames per 1-s window (worst gap {stream.get('worst_gap_s')} s)", fontsize=10)
    ax_fps.set_xlabel("s since the first frame")
    fuzz = s.get("fuzz", {})
    if fuzz.get("by_category"):
        cats = sorted(fuzz["by_category"])
        corpus = [fuzz["by_category"][c]["corpus"] for c in cats]
        ok = [fuzz["by_category"][c]["passed"] for c in cats]
        ax_fuzz.barh(cats, corpus, color="tab:red", label="in the corpus")
        ax_fuzz.barh(cats, ok, color="tab:green", label="answered (or closed over the limit)")
        ax_fuzz.legend(loc="lower right", fontsize=8)
    ax_fuzz.set_title(f"fuzz: {fuzz.get('passed')}/{fuzz.get('corpus')} control messages passed", fontsize=10)
    fig.suptitle(
        f"bench.soak: {report['server']['config']} {report['server']['size']} on {report['machine']['cpu_model']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
