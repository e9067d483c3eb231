"""How well the ``demo`` model follows its prompt, measured on its own synthetic world.

    python -m bench.demo_quality --json out.json --plot out.png [--grid grid.png] [--streams 24 --chunks 16]

Streams are made by the real engine (configs/demo.yaml, StreamBatch, 4 sessions at a time) for a fixed set of
prompts and seeds; every frame is read back by a detector that knows the world's palette and shapes
(pipeline/shapes.py), so nothing here needs a person to look:

- **background accuracy**: of the frames, those mostly of the prompt's background colour;
- **colour accuracy**: of the frames, those where every prompted colour is there (an object of at least
  ``MIN_AREA`` of a small object's area) and no other object colour is;
- **shape accuracy**: of the objects found whole (not touching the frame's edge nor another object), those
  whose shape is the prompt's: the shape whose ideal outline, of the object's area at its centroid, overlaps
  it most (IoU);
- **temporal consistency** (prompts whose objects bounce, so every object stays in the frame): vanishings (an
  object there in a frame and gone in the next), split between chunk boundaries and inside chunks; jumps (the
  centroid moves more than ``JUMP`` of the frame between two frames: 3x the fastest object); flicker (its area
  changes by more than half);
- **prompt change**: chunks from the first chunk made with a new prompt until the frames show it (its colours
  there, the old ones gone), for a soft change and for a hard cut.

The thresholds the regression test holds the shipped weights to are set from these numbers (tests/pipeline/
test_demo.py); the numbers and a sample grid are in the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZE_RANGE,
    SPEED_RANGE,
    Spec,
    _distance,
    caption,
    parse_caption,
    random_scene,
)

COLOUR_DISTANCE = 0.3  # a pixel has a named colour when it is this close to it (RGB in [0, 1]) and nearest to it
MIN_AREA = 0.35  # an object is there when its colour covers this share of the smallest object's area
JUMP = 3 * SPEED_RANGE[1]  # of the frame's shorter side, between two frames


@dataclass(frozen=True)
class Found:
    """One named colour in one frame."""

    colour: str
    area: int  # pixels
    centroid: tuple[float, float]  # x, y in pixels
    touches_edge: bool
    touches_other: bool  # its box touches another object's: one may hide the other
    shape: str | None  # the best-fitting shape (None when it touches the edge or another object: not judged)


def palette_labels(frame: np.ndarray, background: str) -> np.ndarray:
    """Per pixel, the index into [background, *COLOURS] of its nearest named colour within COLOUR_DISTANCE;
    -1 where none is near (edges, smudges). frame: uint8 [H, W, 3]."""
    names = [BACKGROUNDS[background], *COLOURS.values()]
    ref = np.array(names, dtype=np.float32)  # [P, 3]
    px = frame.astype(np.float32) / 255.0
    dist = np.linalg.norm(px[:, :, None, :] - ref[None, None], axis=-1)  # [H, W, P]
    best = dist.argmin(axis=-1)
    return np.where(dist.min(axis=-1) <= COLOUR_DISTANCE, best, -1)


def best_shape(mask: np.ndarray) -> str:
    """The shape whose ideal outline (the mask's area, at its centroid) overlaps ``mask`` most."""
    import torch

    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    r = float(np.sqrt(len(xs) / np.pi))
    h, w = mask.shape
    gy = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
    gx = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
    m = torch.from_numpy(mask)
    scores = {}
    for shape in SHAPES:
        ideal = _distance(shape, gx - float(cx), gy - float(cy), r) <= 0
        scores[shape] = float((ideal & m).sum()) / float((ideal | m).sum())
    return max(scores, key=lambda s: scores[s])


def detect(frame: np.ndarray, background: str) -> dict[str, Found]:
    """The object colours present in ``frame`` (uint8 [H, W, 3]), each with its area, centroid and shape."""
    h, w, _ = frame.shape
    unit = min(h, w)
    min_area = MIN_AREA * np.pi * (SIZE_RANGE[0] * unit) ** 2
    labels = palette_labels(frame, background)
    masks = {name: labels == i for i, name in enumerate(COLOURS, start=1)}
    masks = {name: m for name, m in masks.items() if m.sum() >= min_area}
    boxes = {}
    for name, m in masks.items():
        ys, xs = np.nonzero(m)
        boxes[name] = (xs.min(), ys.min(), xs.max(), ys.max())

    def overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        return a[0] <= b[2] + 1 and b[0] <= a[2] + 1 and a[1] <= b[3] + 1 and b[1] <= a[3] + 1

    out = {}
    for name, mask in masks.items():
        box = boxes[name]
        ys, xs = np.nonzero(mask)
        edge = bool(box[0] == 0 or box[1] == 0 or box[2] == w - 1 or box[3] == h - 1)
        near = any(overlaps(box, other) for o, other in boxes.items() if o != name)
        shape = None if edge or near else best_shape(mask)
        out[name] = Found(name, int(mask.sum()), (float(xs.mean()), float(ys.mean())), edge, near, shape)
    return out


def background_follows(frame: np.ndarray, background: str) -> bool:
    """Most of the frame is the prompted background colour."""
    return bool((palette_labels(frame, background) == 0).mean() > 0.5)


def frame_follows(found: dict[str, Found], spec: Spec) -> bool:
    """Every prompted colour there and no other."""
    return set(found) == {c for c, _ in spec.objects}


def following(frames: list[np.ndarray], prompt: str) -> tuple[float, float]:
    """Shares of ``frames`` (uint8 [H, W, 3]) with the prompt's background, and with its colours and no other."""
    spec = parse_caption(prompt)
    background = sum(background_follows(f, spec.background) for f in frames) / len(frames)
    return background, sum(frame_follows(detect(f, spec.background), spec) for f in frames) / len(frames)


@dataclass
class Tally:
    frames: int = 0
    background_ok: int = 0
    colour_ok: int = 0
    objects_judged: int = 0
    shape_ok: int = 0
    transitions: int = 0  # object-frame pairs (t, t+1) of bounce prompts where it was there at t
    vanish_boundary: int = 0
    vanish_inside: int = 0
    boundaries: int = 0  # of those pairs, across a chunk boundary
    jumps: int = 0
    flicker: int = 0
    per_colour: dict[str, list[int]] = field(default_factory=dict)  # colour -> [there, asked]
    per_shape: dict[str, list[int]] = field(default_factory=dict)  # shape -> [right, judged]
    vanished: list[dict[str, Any]] = field(default_factory=list)  # each vanishing: where, and how it was last seen

    def add_stream(self, spec: Spec, frames: list[np.ndarray], chunk_starts: set[int], name: str = "") -> None:
        unit = min(frames[0].shape[:2])
        prev: dict[str, Found] | None = None
        for t, frame in enumerate(frames):
            found = detect(frame, spec.background)
            self.frames += 1
            self.background_ok += background_follows(frame, spec.background)
            self.colour_ok += frame_follows(found, spec)
            for colour, shape in spec.objects:
                c = self.per_colour.setdefault(colour, [0, 0])
                c[0] += colour in found
                c[1] += 1
                f = found.get(colour)
                if f is not None and f.shape is not None:
                    s = self.per_shape.setdefault(shape, [0, 0])
                    s[0] += f.shape == shape
                    s[1] += 1
                    self.objects_judged += 1
                    self.shape_ok += f.shape == shape
                if spec.motion != "bounce" or prev is None or colour not in prev:
                    continue
                self.transitions += 1
                boundary = t in chunk_starts
                self.boundaries += boundary
                if f is None:
                    p = prev[colour]
                    self.vanished.append(
                        {
                            "stream": name,
                            "frame": t,
                            "colour": colour,
                            "at_chunk_boundary": boundary,
                            "last_area": p.area,
                            "last_centroid": [round(p.centroid[0], 1), round(p.centroid[1], 1)],
                            "last_touched_edge": p.touches_edge,
                            "last_touched_other": p.touches_other,
                        }
                    )
                    if boundary:
                        self.vanish_boundary += 1
                    else:
                        self.vanish_inside += 1
                    continue
                p = prev[colour]
                if np.hypot(f.centroid[0] - p.centroid[0], f.centroid[1] - p.centroid[1]) > JUMP * unit:
                    self.jumps += 1
                if abs(f.area - p.area) > 0.5 * max(f.area, p.area):
                    self.flicker += 1
            prev = found

    def summary(self) -> dict[str, Any]:
        def rate(a: int, b: int) -> float:
            return a / b if b else float("nan")

        return {
            "frames": self.frames,
            "background_accuracy": rate(self.background_ok, self.frames),
            "colour_accuracy": rate(self.colour_ok, self.frames),
            "shape_accuracy": rate(self.shape_ok, self.objects_judged),
            "objects_judged": self.objects_judged,
            "colour_present": {k: rate(*v) for k, v in sorted(self.per_colour.items())},
            "shape_by_prompt": {k: rate(*v) for k, v in sorted(self.per_shape.items())},
            "transitions": self.transitions,
            "vanish_at_chunk_boundaries": self.vanish_boundary,
            "vanish_inside_chunks": self.vanish_inside,
            "vanished": self.vanished,
            "chunk_boundaries": self.boundaries,
            "jumps": self.jumps,
            "flicker": self.flicker,
        }


def prompt_set(n: int, seed: int = 0) -> list[str]:
    """``n`` fixed prompts of objects that bounce (the vanish check needs every object in the frame): every colour
    and shape, one and two objects, both backgrounds."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        scene = random_scene(rng)
        text = caption(scene)
        if scene.motion == "bounce" and text not in out:
            out.append(text)
    return out


def stream(
    engine: Any, jobs: list[tuple[str, int]], chunks: int, change: dict[int, tuple[str, bool]] | None = None
) -> list[list[Any]]:
    """Run ``jobs`` (prompt, seed) as sessions at once for ``chunks`` chunks each; ``change``: at job index ->
    (new prompt, hard cut), applied once the session has delivered ``chunks // 2`` chunks. Chunks per job, in order."""
    from pipeline.commands import Close, Cut, Demand, Open, SetParams
    from pipeline.types import UserParams

    sids = [engine.apply(Open(UserParams(prompt=p, seed=s))).session_id for p, s in jobs]
    out: dict[str, list[Any]] = {sid: [] for sid in sids}
    half = chunks // 2
    changed: set[str] = set()
    for sid in sids:
        engine.apply(Demand(sid, half if change else chunks))
    try:
        while any(len(v) < chunks for v in out.values()):
            for c in engine.step().chunks:
                out[c.envelope.session_id].append(c)
            for i, sid in enumerate(sids):
                if change is None or sid in changed or len(out[sid]) < half:
                    continue
                changed.add(sid)
                prompt, cut = change.get(i, (None, False))
                if prompt is not None:
                    engine.apply(SetParams.of(sid, prompt=prompt))
                    if cut:
                        engine.apply(Cut(sid, demand=chunks - half))
                        continue
                engine.apply(Demand(sid, chunks - half))
    finally:
        for sid in sids:
            engine.apply(Close(sid))
    return [out[sid][:chunks] for sid in sids]


def response_chunks(chunks: list[Any], new: str) -> int | None:
    """Chunks from the first one made with prompt ``new`` until one whose frames all show it (None: never)."""
    spec = parse_caption(new)
    first = next((i for i, c in enumerate(chunks) if c.envelope.params.prompt == new), None)
    if first is None:
        return None
    for i in range(first, len(chunks)):
        if all(frame_follows(detect(f, spec.background), spec) for f in chunks[i].frames):
            return i - first
    return None


def other_prompt(text: str) -> str:
    """A prompt of the same form with different colours and shapes (what a prompt change asks for)."""
    spec = parse_caption(text)
    used = {c for c, _ in spec.objects}
    colours = [c for c in COLOURS if c not in used]
    objects = tuple(
        (colours[i % len(colours)], SHAPES[(SHAPES.index(s) + 1) % len(SHAPES)])
        for i, (_, s) in enumerate(spec.objects)
    )
    things = " and ".join(f"a {c} {s}" for c, s in objects)
    bg = next(b for b in BACKGROUNDS if b != spec.background)
    return f"{things} on {bg}"


def measure(
    config_path: str | Path,
    streams: int,
    chunks: int,
    seed: int = 0,
    changes: int | None = None,
    model: str | None = None,
) -> tuple[dict[str, Any], list[tuple[str, list[np.ndarray]]]]:
    """The whole report, and some streams' frames (for a grid). ``model``: another weights folder (a run's)."""
    from pipeline.config import load_system_config
    from pipeline.engine import Engine
    from pipeline.models.loader import load_models

    config = load_system_config(config_path, model_source=model)
    engine = Engine(config, load_models(config))
    prompts = prompt_set(streams, seed)
    tally = Tally()
    shown: list[tuple[str, list[np.ndarray]]] = []
    soft: list[int | None] = []
    hard: list[int | None] = []
    try:
        per = config.max_sessions
        jobs = [(p, seed + i) for i, p in enumerate(prompts)]
        for at in range(0, len(jobs), per):
            for (prompt, s), made in zip(jobs[at : at + per], stream(engine, jobs[at : at + per], chunks), strict=True):
                frames = [f for c in made for f in c.frames]
                starts, t = set(), 0
                for c in made:
                    starts.add(t)
                    t += c.num_frames
                tally.add_stream(parse_caption(prompt), frames, starts - {0}, f"{prompt!r} seed {s}")
                if len(shown) < 6:
                    shown.append((prompt, frames))
        n_change = streams // 2 if changes is None else changes
        for cut, results in ((False, soft), (True, hard)):
            cjobs = jobs[:n_change]
            for at in range(0, len(cjobs), per):
                part = cjobs[at : at + per]
                change = {i: (other_prompt(p), cut) for i, (p, _) in enumerate(part)}
                for i, made in enumerate(stream(engine, part, chunks, change)):
                    results.append(response_chunks(made, change[i][0]))
    finally:
        engine.close()
    report = tally.summary()

    def summarise(values: list[int | None]) -> dict[str, Any]:
        got = [v for v in values if v is not None]
        return {
            "streams": len(values),
            "followed": len(got),
            "median_chunks": statistics.median(got) if got else None,
            "max_chunks": max(got) if got else None,
            "chunks": values,
        }

    report["prompt_change"] = summarise(soft)
    report["hard_cut"] = summarise(hard)
    report["streams"], report["chunks_per_stream"], report["seed"] = streams, chunks, seed
    report["prompts"] = prompts
    return report, shown


def write_grid(shown: list[tuple[str, list[np.ndarray]]], path: Path, every: int = 4, columns: int = 10) -> None:
    """One row per stream: every ``every``-th frame, with the prompt written above."""
    from PIL import Image, ImageDraw

    rows = []
    for prompt, frames in shown:
        strip = np.concatenate(frames[::every][:columns], axis=1)
        label = Image.new("RGB", (strip.shape[1], 14), (255, 255, 255))
        ImageDraw.Draw(label).text((3, 1), prompt, fill=(0, 0, 0))
        rows += [np.asarray(label), strip]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = report["colour_present"]
    axes[0].bar(list(colours), list(colours.values()), color=[tuple(COLOURS[c]) for c in colours], edgecolor="k")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title(f"colour there (all frames: {report['colour_accuracy']:.0%} right)")
    shapes = report["shape_by_prompt"]
    axes[1].bar(list(shapes), list(shapes.values()), color="0.5")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title(f"shape right (all: {report['shape_accuracy']:.0%})")
    for label, key in (("prompt change", "prompt_change"), ("hard cut", "hard_cut")):
        got = [v for v in report[key]["chunks"] if v is not None]
        axes[2].hist(
            got, bins=range(0, max([*got, 1]) + 2), alpha=0.6, label=f"{label} ({len(got)}/{report[key]['streams']})"
        )
    axes[2].set_title("chunks until the new prompt shows")
    axes[2].set_xlabel("chunks after the first with the new prompt")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo_quality", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--streams", type=int, default=24, help="fixed prompts, one stream each")
    p.add_argument("--chunks", type=int, default=16, help="chunks per stream (4 frames each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="weights to measure instead of the preset's (e.g. runs/demo/model)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None, help="a sample grid: six streams, every 4th frame")
    a = p.parse_args(argv)
    report, shown = measure(a.config, a.streams, a.chunks, a.seed, model=a.model)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    if a.plot:
        plot(report, a.plot)
    if a.grid:
        write_grid(shown, a.grid)
    print(
        f"demo quality over {report['streams']} streams x {report['chunks_per_stream']} chunks: "
        f"background {report['background_accuracy']:.1%}, colour {report['colour_accuracy']:.1%}, "
        f"shape {report['shape_accuracy']:.1%} "
        f"({report['objects_judged']} judged); vanish {report['vanish_at_chunk_boundaries']} at chunk boundaries, "
        f"{report['vanish_inside_chunks']} inside ({report['transitions']} object-frame pairs); "
        f"jumps {report['jumps']}, "
        f"flicker {report['flicker']}; prompt change: median {report['prompt_change']['median_chunks']} chunks "
        f"({report['prompt_change']['followed']}/{report['prompt_change']['streams']}), hard cut: median "
        f"{report['hard_cut']['median_chunks']} ({report['hard_cut']['followed']}/{report['hard_cut']['streams']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
