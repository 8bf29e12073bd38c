"""One arm of two `smpo shapes run` folders compared image by image: runs that differ in their pairs (another
skill mix, reward or draw) but share the evaluation (the same captions and seeds, checked on the base's images).

Each image's correctness is averaged over the training seeds the two folders share; the change in the
GenEval-balanced score gets the skill-stratified paired bootstrap and the per-seed changes, and a t-interval over
the seeds counts the training runs as the noise.

    python bench/shapes_compare_runs.py runs/shapes/alignment-headroom:smpo runs/shapes/alignment:smpo
    python bench/shapes_compare_runs.py A:smpo B:smpo --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smpo_cli.shapes.evaluation import eval_groups_of, paired_change  # noqa: E402


def judged(run: Path, name: str, captions: list) -> np.ndarray:
    from smpo_cli.shapes.experiment import read_images
    from smpo_cli.shapes.judge import judge_batch

    folder = run / "eval" / name
    if not (folder / "summary.json").is_file():
        raise SystemExit(f"{folder}: no finished evaluation (run smpo shapes run to the end first)")
    return np.array([v.correct for v in judge_batch(read_images(folder, len(captions), 1), captions)], dtype=float)


def seeds_of(run: Path, arm: str) -> set[int]:
    return {int(f.name.rsplit("-s", 1)[1]) for f in (run / "eval").glob(f"{arm}-s*") if (f / "summary.json").is_file()}


def compare(a: Path, arm_a: str, b: Path, arm_b: str) -> dict:
    from smpo_cli.shapes.experiment import mean_ci
    from smpo_cli.shapes.world import parse_caption, split_captions

    texts = (a / "eval" / "captions.txt").read_text().splitlines()
    if texts != (b / "eval" / "captions.txt").read_text().splitlines():
        raise SystemExit(f"{a} and {b} evaluate different captions: they cannot be paired")
    captions = [parse_caption(t) for t in texts]
    base = judged(a, "base", captions)
    if not np.array_equal(base, judged(b, "base", captions)):
        raise SystemExit(f"{a} and {b}: their base images are judged differently (another base model or seed)")
    seeds = sorted(seeds_of(a, arm_a) & seeds_of(b, arm_b))
    if not seeds:
        raise SystemExit(f"no training seed evaluated in both {a} ({arm_a}) and {b} ({arm_b})")
    train, _ = split_captions(0)
    groups = eval_groups_of(captions, [c for c in train if c.geneval_form])
    skills = np.array([c.skill for c in captions])
    mine = [judged(a, f"{arm_a}-s{s}", captions) for s in seeds]
    theirs = [judged(b, f"{arm_b}-s{s}", captions) for s in seeds]
    diff = paired_change(mine, theirs, skills, groups)
    diff["t_interval_over_seeds"] = mean_ci(diff["per_seed"])
    return {"a": f"{a}:{arm_a}", "b": f"{b}:{arm_b}", "seeds": seeds, "eval_images": len(captions),
            "a - b": diff, "a - base": paired_change(mine, base, skills, groups),
            "b - base": paired_change(theirs, base, skills, groups),
            "skills": {name: {s: float(np.mean(runs, axis=0)[skills == s].mean()) for s in sorted(set(skills.tolist()))}
                       for name, runs in (("a", mine), ("b", theirs), ("base", [base]))}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="FOLDER:ARM, e.g. runs/shapes/alignment-headroom:smpo")
    ap.add_argument("b", help="FOLDER:ARM to compare against")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    (a, arm_a), (b, arm_b) = (x.rsplit(":", 1) for x in (args.a, args.b))
    r = compare(Path(a), arm_a, Path(b), arm_b)
    if args.json:
        print(json.dumps(r))
        return
    ci = lambda d: f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"  # noqa: E731
    print(f"{r['eval_images']} evaluation images, seeds {r['seeds']}; changes in points of the GenEval-balanced score")
    for key in ("a - base", "b - base", "a - b"):
        d = r[key]
        print(f"{key:9} {ci(d):22} per seed " + ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"]))
    t = r["a - b"]["t_interval_over_seeds"]
    if t["ci95"] is not None:
        print(f"{'':9} t-interval over the {t['n']} seeds: {100 * t['mean']:+.1f} +- {100 * t['ci95']:.1f}")
    skills = list(r["skills"]["base"])
    print(f"{'skill':14} {'a':>6} {'b':>6} {'base':>6}")
    for s in skills:
        print(f"{s:14} " + " ".join(f"{100 * r['skills'][k][s]:5.1f}%" for k in ("a", "b", "base")))


if __name__ == "__main__":
    main()
