"""GenEval's correctness rules, separate from any detector (Ghosh et al. 2023; evaluation.md section 1).

Given the detections of one image (per class: boxes with scores, in the detector's order, as mmdet's
per-class arrays) and the prompt's metadata line, decide whether the image is correct, exactly as the
official evaluator (``evaluation/evaluate_images.py``) does:

* rank each class's detections as ``np.argsort(scores)[::-1]`` does under the numpy GenEval pins (1.23):
  by score, ties in the order numpy 1.23's introsort leaves them (:func:`official_ranking`; for a tie
  of two among at most 16 detections the later one comes first);
* keep those with score > ``threshold`` (strictly, and in float32 as the official code compares mmdet's
  float32 scores: a score of exactly float32(0.3) is dropped) (``counting_threshold`` for counting
  prompts), at most ``max_objects`` of them, optional greedy NMS (``max_overlap`` 1.0 = off);
* ``include`` clauses are ANDed: the top-``count`` detections of the class must exist; with a colour, at
  least ``count`` of them must be classified as that colour; with a position ``[relation, group]``, every
  (object, target) pair must satisfy the relation against the objects found for that earlier group;
* ``exclude`` clauses are ORed: ``count`` or more detections of the class make the image wrong (counting
  prompts say "exactly N" as include N + exclude N+1);
* relative position: centre offset A - B, each axis shrunk toward 0 by ``position_threshold`` x (size_A +
  size_B) on that axis, sizes being absolute box widths and heights; no relation when both shrunk parts
  are ~0; otherwise divided by the unshrunk offset's norm: left of (dx < -0.5), right of (dx > 0.5),
  above (dy < -0.5), below (dy > 0.5). All in float32, as the official code on mmdet's float32 boxes.

Aggregation: accuracy per task = fraction of images correct; overall = the unweighted mean of the tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # GenEval's order
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (mmdet's +1 convention: x2 = last column + 1)
    score: float
    index: int = 0  # which detection of its class (its place in the detector's order), for the colour classifier
    # the binary instance mask (H, W) bool, for the colour judge; not part of equality
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Rules:
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # greedy NMS IoU; 1.0 disables it (the default)
    position_threshold: float = 0.1


@dataclass
class ImageVerdict:
    correct: bool
    reason: str
    kept: dict[str, list[Detection]] = field(default_factory=dict)


def _iou(a, b) -> float:
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1) + 1), max(0.0, min(ay2, by2) - max(ay1, by1) + 1)
    inter = iw * ih
    area = (ax2 - ax1 + 1) * (ay2 - ay1 + 1) + (bx2 - bx1 + 1) * (by2 - by1 + 1) - inter
    return inter / area if area > 0 else 0.0


# numpy 1.23's introsort (npysort/quicksort.cpp aquicksort_ and npysort_heapsort.h aheapsort_), which
# np.argsort's default kind runs on float32 there (SIMD argsort came with numpy 1.25). Its order of equal
# scores is what GenEval's evaluator ranks by; later numpy versions (and stable sorts) order ties differently.
_SMALL_QUICKSORT = 15


def _less(a: float, b: float) -> bool:
    return a < b or (b != b and a == a)  # numpy's float order: NaN last


def _sift_down(v: list[float], tosort: list[int], base: int, i: int, n: int, tmp: int) -> None:
    """numpy's aheapsort sift-down of ``tmp`` from heap position ``i`` in a heap of ``n`` (1-based)."""
    j = i << 1
    while j <= n:
        if j < n and _less(v[tosort[base + j]], v[tosort[base + j + 1]]):
            j += 1
        if _less(v[tmp], v[tosort[base + j]]):
            tosort[base + i] = tosort[base + j]
            i, j = j, j + j
        else:
            break
    tosort[base + i] = tmp


def _aheapsort(v: list[float], tosort: list[int], start: int, n: int) -> None:
    base = start - 1  # heap indices are 1-based: a[k] is tosort[base + k]
    for lo in range(n >> 1, 0, -1):
        _sift_down(v, tosort, base, lo, n, tosort[base + lo])
    while n > 1:
        tmp = tosort[base + n]
        tosort[base + n] = tosort[base + 1]
        n -= 1
        _sift_down(v, tosort, base, 1, n, tmp)


def numpy123_argsort(values: Sequence[float]) -> list[int]:
    """``np.argsort(np.float32(values))`` exactly as numpy 1.23 returns it, ties included."""
    return _introsort([float(x) for x in np.asarray(values, dtype=np.float32)])


def _introsort(v: list) -> list[int]:
    n = len(v)
    tosort = list(range(n))
    if n < 2:
        return tosort
    swap = tosort.__setitem__
    pl, pr = 0, n - 1
    stack: list[tuple[int, int, int]] = []  # (pl, pr, depth) of the partitions left for later
    cdepth = (n.bit_length() - 1) * 2  # 2 x floor(log2(n)): deeper than that, heapsort
    while True:
        if cdepth < 0:
            _aheapsort(v, tosort, pl, pr - pl + 1)
        else:
            while pr - pl > _SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)  # median of three
                if _less(v[tosort[pm]], v[tosort[pl]]):
                    tosort[pm], tosort[pl] = tosort[pl], tosort[pm]
                if _less(v[tosort[pr]], v[tosort[pm]]):
                    tosort[pr], tosort[pm] = tosort[pm], tosort[pr]
                if _less(v[tosort[pm]], v[tosort[pl]]):
                    tosort[pm], tosort[pl] = tosort[pl], tosort[pm]
                vp = v[tosort[pm]]
                pi, pj = pl, pr - 1
                tosort[pm], tosort[pj] = tosort[pj], tosort[pm]
                while True:
                    pi += 1
                    while _less(v[tosort[pi]], vp):
                        pi += 1
                    pj -= 1
                    while _less(vp, v[tosort[pj]]):
                        pj -= 1
                    if pi >= pj:
                        break
                    tosort[pi], tosort[pj] = tosort[pj], tosort[pi]
                pk = pr - 1
                tosort[pi], tosort[pk] = tosort[pk], tosort[pi]
                cdepth -= 1
                if pi - pl < pr - pi:  # the larger partition waits on the stack
                    stack.append((pi + 1, pr, cdepth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, cdepth))
                    pl = pi + 1
            for i in range(pl + 1, pr + 1):  # insertion sort: stable
                vi = tosort[i]
                vv = v[vi]
                j = i
                while j > pl and _less(vv, v[tosort[j - 1]]):
                    swap(j, tosort[j - 1])
                    j -= 1
                swap(j, vi)
        if not stack:
            return tosort
        pl, pr, cdepth = stack.pop()


def official_ranking(scores: Sequence[float]) -> list[int]:
    """Positions of ``scores`` best first, as the official ``np.argsort(scores)[::-1]`` under numpy 1.23.

    With no equal scores this is simply by decreasing score; equal scores come in numpy 1.23's order (for
    up to 16 detections, the later of two equal ones first).
    """
    return numpy123_argsort(scores)[::-1]


def keep_detections(dets: Sequence[Detection], threshold: float, rules: Rules) -> list[Detection]:
    """Rank (:func:`official_ranking` over ``dets`` in the detector's order), threshold in float32, cap, NMS."""
    dets = list(dets)
    limit = np.float32(threshold)
    ranked = [dets[i] for i in official_ranking([d.score for d in dets])]
    kept = [d for d in ranked if np.float32(d.score) > limit][: rules.max_objects]
    if rules.max_overlap < 1.0:
        out: list[Detection] = []
        for d in kept:
            if all(_iou(d.box, o.box) < rules.max_overlap for o in out):
                out.append(d)
        kept = out
    return kept


def relations(a: Sequence[float], b: Sequence[float], margin: float) -> set[str]:
    """The relative positions of box ``a`` with respect to box ``b`` (float32 arithmetic, as the official code)."""
    boxes = np.array([a[:4], b[:4]], dtype=np.float32).reshape(2, 2, 2)  # (box, corner, xy)
    centre_a, centre_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]  # absolute widths and heights
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - np.float32(margin) * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


ColourFn = Callable[[str, Detection], str]  # (class name, detection) -> colour name


def evaluate_image(
    metadata: dict,
    detections: dict[str, Sequence[Detection]],
    colour_of: ColourFn | None = None,
    rules: Rules = Rules(),  # noqa: B008 - immutable
) -> ImageVerdict:
    threshold = rules.counting_threshold if metadata.get("tag") == "counting" else rules.threshold
    kept = {cls: keep_detections(dets, threshold, rules) for cls, dets in detections.items()}
    # A clause whose objects, colour or position fail is "unmatched": later position clauses that
    # refer to it have no target, and its own position is not checked (as the official evaluator).
    matched_groups: list[list[Detection] | None] = []
    correct, reasons = True, []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], int(clause["count"])
        found = kept.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                if colour_of is None:
                    raise ValueError("a colour clause needs a colour classifier")
                colours = [colour_of(cls, d) for d in found]
                wanted = clause["color"]
                if colours.count(wanted) < count:
                    correct = matched = False
                    tally = ", ".join(f"{colours.count(c)} {c}" for c in COLOURS if c in colours)
                    reasons.append(f"expected {wanted} {cls}>={count}, found {colours.count(wanted)} {wanted}; and {tally}")
            if clause.get("position") and matched:
                relation, group = clause["position"][0], int(clause["position"][1])
                targets = matched_groups[group] if group < len(matched_groups) else None
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:  # the first failing pair is reported
                        failing = [t for t in targets if relation not in relations(obj.box, t.box, rules.position_threshold)]
                        if failing:
                            rel = relations(obj.box, failing[0].box, rules.position_threshold)
                            correct = matched = False
                            reasons.append(f"expected {cls} {relation} target, found {' and '.join(sorted(rel))} target")
                            break
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], int(clause["count"])
        if len(kept.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(kept[cls])}")
    return ImageVerdict(correct, "\n".join(reasons), kept)


def summarize(results: Sequence[dict]) -> dict:
    """results: dicts with ``tag``, ``prompt_index`` and ``correct``. Accuracies as fractions."""
    by_task: dict[str, list[bool]] = {}
    by_prompt: dict[int, list[bool]] = {}
    for r in results:
        by_task.setdefault(r["tag"], []).append(bool(r["correct"]))
        by_prompt.setdefault(r["prompt_index"], []).append(bool(r["correct"]))
    tasks = {t: float(np.mean(v)) for t, v in by_task.items()}
    present = [tasks[t] for t in TASKS if t in tasks]
    return {
        "tasks": tasks,
        "overall": float(np.mean(present)) if present else None,
        "images_correct": float(np.mean([r["correct"] for r in results])) if results else None,
        "prompts_with_a_correct_image": float(np.mean([any(v) for v in by_prompt.values()])) if by_prompt else None,
    }
