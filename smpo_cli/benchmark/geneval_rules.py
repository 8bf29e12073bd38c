"""GenEval's correctness rules, separate from any detector (Ghosh et al. 2023; evaluation.md section 1).

Given the detections of one image (per class: boxes with scores, best first or not) and the prompt's
metadata line, decide whether the image is correct, exactly as the official evaluator does:

* keep per class the detections with score > ``threshold`` (strictly, as the official code) (``counting_threshold`` for counting
  prompts), at most ``max_objects`` of them by score, optional greedy NMS (``max_overlap`` 1.0 = off);
* ``include`` clauses are ANDed: the top-``count`` detections of the class must exist; with a colour, at
  least ``count`` of them must be classified as that colour; with a position ``[relation, group]``, every
  (object, target) pair must satisfy the relation against the objects found for that earlier group;
* ``exclude`` clauses are ORed: ``count`` or more detections of the class make the image wrong (counting
  prompts say "exactly N" as include N + exclude N+1);
* relative position: centre offset A - B, each axis shrunk toward 0 by ``position_threshold`` x (size_A +
  size_B) on that axis; no relation when both shrunk parts are ~0; otherwise divided by the unshrunk
  offset's norm: left of (dx < -0.5), right of (dx > 0.5), above (dy < -0.5), below (dy > 0.5).

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
    index: int = 0  # which detection of its class, for the colour classifier
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


def keep_detections(dets: Sequence[Detection], threshold: float, rules: Rules) -> list[Detection]:
    kept = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[: rules.max_objects]
    if rules.max_overlap < 1.0:
        out: list[Detection] = []
        for d in kept:
            if all(_iou(d.box, o.box) < rules.max_overlap for o in out):
                out.append(d)
        kept = out
    return kept


def relations(a: Sequence[float], b: Sequence[float], margin: float) -> set[str]:
    """The relative positions of box ``a`` with respect to box ``b``."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    size = np.array([(a[2] - a[0]) + (b[2] - b[0]), (a[3] - a[1]) + (b[3] - b[1])])
    offset = ca - cb
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * size, 0)
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
