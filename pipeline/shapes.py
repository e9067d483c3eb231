"""Procedural video of coloured shapes with captions: the ``demo`` model's whole world.

A :class:`Scene` is one or two objects (a shape in a named colour, a size, a start position and a
velocity) on a named background. ``bounce`` scenes keep every object in the frame (they bounce off
the walls); ``pass`` scenes move in straight lines, objects leave at one side and enter again at the
other. Captions come from one small grammar and can be parsed back (:func:`parse_caption`), which is
how ``bench.demo_quality`` knows what a frame should show::

    a red circle on black
    a blue square and a white triangle on grey
    a green triangle passing on black

Rendering is a signed distance per object and pixel with a one-pixel antialiased edge, vectorised
over clips, frames and objects (torch), cheap enough to make every training batch fresh. Geometry is
in units of the frame's shorter side, so a scene renders alike at any size. Frames: float [-1, 1],
[B, 3, N, H, W]. Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.22),
    "blue": (0.16, 0.32, 1.00),
    "yellow": (0.98, 0.88, 0.10),
    "white": (1.00, 1.00, 1.00),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (0.0, 0.0, 0.0), "grey": (0.42, 0.42, 0.42)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("bounce", "pass")
MAX_OBJECTS = 2

SIZE_RANGE = (0.075, 0.13)  # an object's radius (a circle's; the others have the same area), of the frame
SPEED_RANGE = (0.008, 0.02)  # of the frame per video frame (1 to 2.5 pixels at 128)
TWO_OBJECTS = 0.5  # of scenes
PASSING = 0.2  # of scenes

# Half side of a square and half side of an equilateral triangle with a circle's area (same radius).
SQUARE_HALF = math.sqrt(math.pi) / 2
TRIANGLE_HALF = math.sqrt(math.pi / math.sqrt(3))


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: float  # radius of the circle of the same area, in units of the frame's shorter side
    x: float  # centre (a triangle's centroid) at frame 0, in units of the shorter side
    y: float
    vx: float  # per video frame
    vy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    motion: str  # "bounce" or "pass"


def caption(scene: Scene) -> str:
    """The scene in the grammar's words (a one-to-one map from (shapes, colours, background, motion))."""
    things = " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects)
    verb = " passing" if scene.motion == "pass" else ""
    return f"{things}{verb} on {scene.background}"


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: (colour, shape) per object, the background and the motion."""

    objects: tuple[tuple[str, str], ...]
    background: str
    motion: str


_OBJECT = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"^{_OBJECT}(?: and {_OBJECT})?( passing)? on ({'|'.join(BACKGROUNDS)})$")


def parse_caption(text: str) -> Spec:
    """The inverse of :func:`caption`; a text outside the grammar is a ``ValueError`` naming it."""
    m = _CAPTION.match(text.strip().lower())
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the demo grammar: 'a <colour> <shape>[ and a <colour> <shape>][ passing] on "
            f"<background>' with colours {list(COLOURS)}, shapes {list(SHAPES)}, backgrounds {list(BACKGROUNDS)}"
        )
    c1, s1, c2, s2, passing, bg = m.groups()
    objects = ((c1, s1),) if c2 is None else ((c1, s1), (c2, s2))
    if len({c for c, _ in objects}) != len(objects):
        raise ValueError(f"caption {text!r}: two objects of one colour are not in the demo grammar")
    return Spec(objects, bg, "pass" if passing else "bounce")


def vocabulary() -> list[str]:
    """Every word the grammar uses (the demo tokenizer's vocabulary)."""
    return sorted({"a", "and", "on", "passing", *COLOURS, *SHAPES, *BACKGROUNDS})


# Where a ``canonical`` scene's objects are at its first frame (one object; two), in units of the frame, and
# their size: what an epoch's first chunk shows is then a function of its caption alone, so a model that
# predicts the mean picture draws it sharp; where they go from there (their velocities) is random.
CANONICAL = {1: ((0.5, 0.5),), 2: ((0.3, 0.5), (0.7, 0.5))}
CANONICAL_SIZE = 0.1


def random_scene(
    rng: np.random.Generator, spec: Spec | None = None, aspect: float = 1.0, layout: str = "random"
) -> Scene:
    """A scene drawn from ``rng``: random words, or those of ``spec``; random velocities; random sizes and
    places (``layout="random"``) or the canonical ones (``"canonical"``, the demo DiT's clips: CANONICAL).
    ``aspect``: width / height of the frame the scene is for."""
    if spec is None:
        n = 2 if rng.random() < TWO_OBJECTS else 1
        colours = rng.choice(list(COLOURS), size=n, replace=False)
        shapes = rng.choice(SHAPES, size=n)
        wanted = tuple((str(c), str(s)) for c, s in zip(colours, shapes, strict=True))
        spec = Spec(wanted, str(rng.choice(list(BACKGROUNDS))), "pass" if rng.random() < PASSING else "bounce")
    extent = (max(aspect, 1.0), max(1.0 / aspect, 1.0))  # the frame in units of its shorter side
    objects = []
    for k, (colour, shape) in enumerate(spec.objects):
        size = float(rng.uniform(*SIZE_RANGE))
        angle = float(rng.uniform(0, 2 * math.pi))
        speed = float(rng.uniform(*SPEED_RANGE))
        x, y = (float(rng.uniform(size * 1.4, e - size * 1.4)) for e in extent)
        if layout == "canonical":
            size = CANONICAL_SIZE
            x, y = (c * e for c, e in zip(CANONICAL[len(spec.objects)][k], extent, strict=True))
        objects.append(Obj(shape, colour, size, x, y, speed * math.cos(angle), speed * math.sin(angle)))
    return Scene(tuple(objects), spec.background, spec.motion)


def _fold(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bounce: torch.Tensor) -> torch.Tensor:
    """Positions ``p`` folded into [lo, hi]: reflected off the ends (bounce) or wrapped around (pass)."""
    span = hi - lo
    u = torch.remainder(p - lo, 2 * span)
    reflected = lo + torch.where(u < span, u, 2 * span - u)
    wrapped = lo + torch.remainder(p - lo, span)
    return torch.where(bounce, reflected, wrapped)


def trajectories(scenes: list[Scene], frames: int, start: int = 0, aspect: float = 1.0) -> torch.Tensor:
    """Centres of every object at video frames ``start .. start+frames-1``: [B, K, N, 2] (x, y), in units of
    the shorter side, K = MAX_OBJECTS (missing objects: NaN). float64."""
    out = torch.full((len(scenes), MAX_OBJECTS, frames, 2), float("nan"), dtype=torch.float64)
    t = torch.arange(start, start + frames, dtype=torch.float64)
    extent = (max(aspect, 1.0), max(1.0 / aspect, 1.0))
    for b, scene in enumerate(scenes):
        bounce = torch.tensor(scene.motion == "bounce")
        for k, o in enumerate(scene.objects):
            for axis, (p0, v, e) in enumerate(((o.x, o.vx, extent[0]), (o.y, o.vy, extent[1]))):
                # bounce: the shape's outline touches the wall; pass: it is wholly outside before it wraps
                margin = o.size * (1.1 if scene.motion == "bounce" else -1.6)
                lo, hi = torch.tensor(margin, dtype=torch.float64), torch.tensor(e - margin, dtype=torch.float64)
                out[b, k, :, axis] = _fold(p0 + v * t, lo, hi, bounce)
    return out


def _distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (negative inside) to a shape of circle-equivalent radius ``r`` centred at 0."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        a = r * SQUARE_HALF
        qx, qy = dx.abs() - a, dy.abs() - a
        outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
        return outside + torch.minimum(torch.maximum(qx, qy), torch.zeros_like(qx))
    # equilateral triangle pointing up, centroid at 0 (Inigo Quilez's exact distance)
    h = r * TRIANGLE_HALF
    k = math.sqrt(3.0)
    px, py = dx.abs() - h, -dy + h / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * h, 0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def render(scenes: list[Scene], frames: int, height: int, width: int, start: int = 0) -> torch.Tensor:
    """Video frames ``start .. start+frames-1`` of each scene: [B, 3, N, H, W] float32 in [-1, 1]."""
    unit = min(height, width)
    centres = trajectories(scenes, frames, start, width / height) * unit  # pixels
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5
    video = torch.empty(len(scenes), 3, frames, height, width)
    for b, scene in enumerate(scenes):
        img = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1, 1).expand(3, frames, height, width).clone()
        for k, o in enumerate(scene.objects):
            cx = centres[b, k, :, 0].float().view(frames, 1, 1)
            cy = centres[b, k, :, 1].float().view(frames, 1, 1)
            alpha = (0.5 - _distance(o.shape, xs - cx, ys - cy, o.size * unit)).clamp(0, 1)  # [N, H, W]
            colour = torch.tensor(COLOURS[o.colour]).view(3, 1, 1, 1)
            img = img * (1 - alpha) + colour * alpha
        video[b] = img
    return video * 2 - 1
