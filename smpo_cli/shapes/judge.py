"""An exact, programmatic judge for the shapes world: image + caption -> per-constraint verdict.

Detection (numpy only, batched):

1. **Pixel colour.** Each pixel p is read as a mix of the background b and one palette colour c:
   p ~ b + t (c - b). For every colour, t is the projection of p - b on c - b (clipped below at 0) and
   the residual is the distance from p - b to t (c - b). The pixel takes the colour with the smallest
   residual; it is foreground when t >= 0.5 (at least half-way from background to the colour, so a
   blurred edge is cut where the sharp edge was) and the residual is <= ``max_residual`` (90 RGB
   units; farther from every palette colour = background). Unlike a nearest-palette rule, a dimmed
   or blurred orange pixel is not mistaken for red, and washed-out colours still read correctly.
2. **Objects.** 4-connected components of same-colour foreground pixels, at least ``min_area`` (5) px.
3. **Shape.** Upright triangle when the mask's mass sits low in its bounding box (vertical asymmetry
   (centroid y - bbox centre y) / height >= 0.05; ideal triangle 1/6, circle and square 0); otherwise
   square when the fill ratio area / bbox area >= 0.87, else circle. The asymmetry test replaces the
   fill-ratio "triangle < 0.66" rule because blur erases a small triangle's one-pixel apex, which
   lifts its fill ratio to 0.73-0.84 (into circle range) but leaves its mass low in the box.
4. **Position.** Bounding-box centres (as GenEval uses box centres): A is "left of" B when
   A.x < B.x and |dx| > |dy| (the relation's axis dominates); likewise right of / above / below (y down).

Constraints (only those the caption asks for), each with a boolean check and a partial credit in [0, 1]
that equals 1 exactly when the check passes:

* ``object{k}``: at least one detected object of caption object k's shape. Credit 1 or 0.
* ``count{k}`` (count >= 2 only): exactly N objects of that shape (any colour). Credit
  ``max(0, 1 - |n - N| / N)``: right count (1) > off by one (1 - 1/N) > ... > none (0).
* ``color{k}`` (colour given only): at least N objects of that shape in that colour (GenEval's rule).
  Credit ``min(1, n_coloured / N)``.
* ``position``: every (A, B) pair satisfies the relation, where A ranges over detections of object 0's
  shape (restricted to its colour when the caption gives one and such detections exist) and B likewise
  for object 1. Credit = fraction of pairs that satisfy it (0 when either is missing).

``score`` is the mean credit over the caption's constraints, so ``score == 1`` iff ``correct``.
``crispness`` and ``object_size`` describe image quality; they are not constraints (annotators may use them).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from smpo_cli.shapes.world import BACKGROUND, COLOR_NAMES, PALETTE, SHAPES, Caption

MAX_RESIDUAL = 90.0  # RGB units from the nearest background-to-colour segment; farther = background
MIN_AREA = 5  # pixels; smaller components are specks, not objects
FOREGROUND_T = 0.5  # fraction of the way from background to the colour
# Shape rules, calibrated on clean, blurred and resampled renders (tests/shapes/test_judge.py):
TRIANGLE_ASYMMETRY = 0.05  # triangles 0.16 clean, >= 0.06 degraded; circles and squares |.| <= 0.02
SQUARE_FILL = 0.87  # squares 1.0 clean, >= 0.92 degraded; circles <= 0.80
_CRISP_T, _CRISP_RESIDUAL, _HALO_T = 0.85, 30.0, 0.15  # crispness: solid pixels among all coloured ones

_DIRECTIONS = PALETTE.astype(np.float32) - np.array(BACKGROUND, np.float32)  # (8, 3)
_DIRECTION_SQ = (_DIRECTIONS**2).sum(axis=1)  # (8,)


@dataclass(frozen=True)
class Detection:
    """One detected object: bbox is (x0, y0, x1, y1), inclusive pixels; center is the bbox centre (x, y)."""

    shape: str
    color: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    fill: float  # area / bbox area: square 1.0, circle 0.75-0.80, upright triangle ~0.5 (clean renders)
    asymmetry: float  # (mask centroid y - bbox centre y) / bbox height: upright triangle ~0.16, others ~0


@dataclass(frozen=True)
class Verdict:
    """The judge's reading of one image against one caption (see the module docstring for definitions)."""

    caption: Caption
    checks: Mapping[str, bool]  # constraint -> satisfied, e.g. {"object0": True, "color0": False}
    credits: Mapping[str, float]  # constraint -> partial credit in [0, 1]
    correct: bool  # every check passes
    score: float  # mean credit, in [0, 1]
    crispness: float  # solid pixels / all coloured pixels, in [0, 1]; 1 for a clean render
    object_size: float  # mean detected bbox side / image side, in [0, 1]; 0 without detections
    detections: tuple[Detection, ...] = field(repr=False)

    @property
    def criteria(self) -> dict[str, float]:
        """Mean credit per kind of constraint present: "object", "count", "color", "position"."""
        by_kind: dict[str, list[float]] = {}
        for name, credit in self.credits.items():
            by_kind.setdefault(constraint_kind(name), []).append(credit)
        return {kind: sum(values) / len(values) for kind, values in by_kind.items()}


def constraint_kind(name: str) -> str:
    """ "color1" -> "color"; "position" -> "position"."""
    return name.rstrip("0123456789")


# ----------------------------------------------------------------------------------------------
# Detection


def _as_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected images of shape (H, W, 3) or (N, H, W, 3), got {batch.shape}")
    if batch.dtype != np.uint8 and batch.size and float(batch.max()) <= 1.0 + 1e-6:
        raise ValueError("expected pixel values in 0..255 (uint8 or float); got floats in [0, 1]")
    return batch.astype(np.float32, copy=False)


def _classify_pixels(batch: np.ndarray, max_residual: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: colour index (-1 = background), mix fraction t, residual (all (N, H, W))."""
    p = batch - np.array(BACKGROUND, np.float32)
    dots = p @ _DIRECTIONS.T  # (N, H, W, 8)
    t = np.maximum(dots / _DIRECTION_SQ, 0.0)
    residual_sq = (p**2).sum(-1, keepdims=True) - 2 * t * dots + t**2 * _DIRECTION_SQ
    best = residual_sq.argmin(-1)
    t_best = np.take_along_axis(t, best[..., None], -1)[..., 0]
    residual = np.sqrt(np.maximum(np.take_along_axis(residual_sq, best[..., None], -1)[..., 0], 0.0))
    colour = np.where((t_best >= FOREGROUND_T) & (residual <= max_residual), best, -1)
    return colour, t_best, residual


def _label_components(colour: np.ndarray) -> np.ndarray:
    """4-connected same-colour component labels over a batch (N, H, W): a component's label is the flat
    index of one of its pixels; background is -1. Min-label propagation with pointer jumping."""
    n, h, w = colour.shape
    fg = colour >= 0
    big = np.iinfo(np.int64).max
    labels = np.where(fg, np.arange(n * h * w, dtype=np.int64).reshape(n, h, w), big)
    same_x = fg[:, :, 1:] & (colour[:, :, 1:] == colour[:, :, :-1])  # pixel joins its left neighbour
    same_y = fg[:, 1:, :] & (colour[:, 1:, :] == colour[:, :-1, :])  # pixel joins its upper neighbour
    flat = labels.reshape(-1)
    fg_idx = np.flatnonzero(fg)
    for _ in range(h * w):  # bound; converges in a handful of rounds thanks to pointer jumping
        old = labels.copy()
        np.minimum(labels[:, :, 1:], np.where(same_x, labels[:, :, :-1], big), out=labels[:, :, 1:])
        np.minimum(labels[:, :, :-1], np.where(same_x, labels[:, :, 1:], big), out=labels[:, :, :-1])
        np.minimum(labels[:, 1:, :], np.where(same_y, labels[:, :-1, :], big), out=labels[:, 1:, :])
        np.minimum(labels[:, :-1, :], np.where(same_y, labels[:, 1:, :], big), out=labels[:, :-1, :])
        for _ in range(2):
            flat[fg_idx] = flat[flat[fg_idx]]
        if np.array_equal(labels, old):
            break
    return np.where(fg, labels, -1)


def detect_batch(
    images: np.ndarray | Sequence[np.ndarray], max_residual: float = MAX_RESIDUAL, min_area: int = MIN_AREA
) -> tuple[list[tuple[Detection, ...]], np.ndarray, np.ndarray]:
    """(detections per image, crispness per image (n,), mean object size per image (n,)).

    ``images``: (N, H, W, 3) or a sequence of (H, W, 3), uint8 or float in 0..255.
    """
    batch = _as_batch(images)
    n, h, w, _ = batch.shape
    colour, t, residual = _classify_pixels(batch, max_residual)

    halo = (t >= _HALO_T) & (residual <= max_residual)
    solid = (t >= _CRISP_T) & (residual <= _CRISP_RESIDUAL)
    halo_count = halo.reshape(n, -1).sum(1)
    crispness = np.where(halo_count > 0, solid.reshape(n, -1).sum(1) / np.maximum(halo_count, 1), 1.0)

    labels = _label_components(colour).reshape(-1)
    pixels = np.flatnonzero(labels >= 0)
    detections: list[list[Detection]] = [[] for _ in range(n)]
    if len(pixels) == 0:
        return [()] * n, crispness, np.zeros(n)
    roots, comp = np.unique(labels[pixels], return_inverse=True)
    area = np.bincount(comp)
    ys, xs = (pixels // w) % h, pixels % w
    order = np.argsort(comp, kind="stable")
    starts = np.r_[0, np.cumsum(area)[:-1]]
    x0, x1 = np.minimum.reduceat(xs[order], starts), np.maximum.reduceat(xs[order], starts)
    y0, y1 = np.minimum.reduceat(ys[order], starts), np.maximum.reduceat(ys[order], starts)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    fill = area / (bw * bh)
    asymmetry = (np.bincount(comp, weights=ys) / area - (y0 + y1) / 2) / bh
    shape_idx = np.where(
        asymmetry >= TRIANGLE_ASYMMETRY,
        SHAPES.index("triangle"),
        np.where(fill >= SQUARE_FILL, SHAPES.index("square"), SHAPES.index("circle")),
    )
    image_idx = roots // (h * w)
    colour_idx = colour.reshape(-1)[roots]
    for k in np.flatnonzero(area >= min_area):
        detections[image_idx[k]].append(
            Detection(
                shape=SHAPES[shape_idx[k]],
                color=COLOR_NAMES[colour_idx[k]],
                center=(float(x0[k] + x1[k]) / 2.0, float(y0[k] + y1[k]) / 2.0),
                bbox=(int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])),
                area=int(area[k]),
                fill=float(fill[k]),
                asymmetry=float(asymmetry[k]),
            )
        )
    sides = [[max(d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]) + 1 for d in ds] for ds in detections]
    sizes = np.array([sum(s) / len(s) / max(h, w) if s else 0.0 for s in sides])
    return [tuple(ds) for ds in detections], crispness, sizes


def detect(
    image: np.ndarray, max_residual: float = MAX_RESIDUAL, min_area: int = MIN_AREA
) -> tuple[Detection, ...]:
    """The objects detected in one (H, W, 3) image (uint8, or float in 0..255)."""
    return detect_batch(np.asarray(image)[None], max_residual, min_area)[0][0]


# ----------------------------------------------------------------------------------------------
# Constraints


def satisfies_relation(a: Detection, b: Detection, relation: str) -> bool:
    """Whether ``a`` is ``relation`` ("left of", "right of", "above", "below") ``b``: sign on the dominant axis."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if relation == "left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "right of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy > 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def _credits(caption: Caption, detections: Sequence[Detection]) -> dict[str, float]:
    credits: dict[str, float] = {}
    candidates = []
    for k, obj in enumerate(caption.objects):
        of_shape = [d for d in detections if d.shape == obj.shape]
        credits[f"object{k}"] = 1.0 if of_shape else 0.0
        if obj.count > 1:
            credits[f"count{k}"] = max(0.0, 1.0 - abs(len(of_shape) - obj.count) / obj.count)
        coloured = [d for d in of_shape if d.color == obj.color] if obj.color else []
        if obj.color:
            credits[f"color{k}"] = min(1.0, len(coloured) / obj.count)
        candidates.append(coloured or of_shape)
    if caption.relation is not None:
        pairs = list(itertools.product(candidates[0], candidates[1]))
        hits = sum(satisfies_relation(a, b, caption.relation) for a, b in pairs)
        credits["position"] = hits / len(pairs) if pairs else 0.0
    return credits


def judge_batch(
    images: np.ndarray | Sequence[np.ndarray],
    captions: Sequence[Caption],
    max_residual: float = MAX_RESIDUAL,
    min_area: int = MIN_AREA,
) -> list[Verdict]:
    """``judge`` for many images at once (vectorised detection; about 1 ms per 32x32 image)."""
    detections, crispness, sizes = detect_batch(images, max_residual, min_area)
    if len(captions) != len(detections):
        raise ValueError(f"got {len(detections)} images but {len(captions)} captions")
    verdicts = []
    for caption, dets, crisp, size in zip(captions, detections, crispness, sizes, strict=True):
        credits = _credits(caption, dets)
        checks = {name: credit >= 1.0 for name, credit in credits.items()}
        verdicts.append(
            Verdict(
                caption=caption,
                checks=checks,
                credits=credits,
                correct=all(checks.values()),
                score=float(np.mean(list(credits.values()))),
                crispness=float(crisp),
                object_size=float(size),
                detections=dets,
            )
        )
    return verdicts


def judge(image: np.ndarray, caption: Caption) -> Verdict:
    """Judge one (H, W, 3) image (uint8, or float in 0..255) against ``caption``."""
    return judge_batch(np.asarray(image)[None], [caption])[0]
