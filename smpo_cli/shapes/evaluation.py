"""GenEval-balanced evaluation of shapes models: captions, bootstrap clusters and paired changes.

GenEval's overall score is the unweighted mean of its six skills' accuracies. The balanced evaluation gives every
skill the same number of images: every GenEval-form caption of a small skill, cycled over many seeds, and an
evenly spaced sample of a large one. Differences between models are paired by seed (every model samples the
same captions with the same seeds) and their 95% intervals come from a bootstrap stratified by skill.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def balanced_eval(geneval: list, images_per_skill: int, max_captions: int) -> list:
    """Each skill's GenEval-form captions, cycled to ``images_per_skill`` lines (one image each): all of them
    where a skill has at most ``max_captions``, else an evenly spaced sample of that many."""
    from smpo_cli.shapes.world import SKILLS

    out = []
    for skill in SKILLS:
        captions = [c for c in geneval if c.skill == skill]
        if not captions:
            continue
        if len(captions) > max_captions:
            captions = [captions[i] for i in np.linspace(0, len(captions) - 1, max_captions).round().astype(int)]
        out += [captions[i % len(captions)] for i in range(images_per_skill)]
    return out


def eval_groups_of(evals: list, geneval: list) -> np.ndarray:
    """Bootstrap clusters: one per image where the evaluation holds every caption of the skill (only seeds vary),
    one per caption where it holds a sample of the skill's captions."""
    whole = {s for s in {c.skill for c in evals}
             if {c.text for c in geneval if c.skill == s} <= {c.text for c in evals}}  # fmt: skip
    return np.array([f"image {i}" if c.skill in whole else c.text for i, c in enumerate(evals)])


def balanced_score(correct: np.ndarray, skills: np.ndarray) -> float:
    """The mean over skills of each skill's accuracy."""
    return float(np.mean([correct[skills == s].mean() for s in sorted(set(skills.tolist()))]))


def paired_change(
    per_seed: list[np.ndarray], baseline: list[np.ndarray] | np.ndarray, skills: np.ndarray, groups: np.ndarray
) -> dict[str, Any]:
    """``mean over seeds of per_seed`` minus ``baseline`` (one array, or one per seed), image by image, with the
    skill-stratified paired bootstrap; ``per_seed`` lists each training seed's own change (their spread)."""
    from smpo_cli.benchmark.metrics import paired_bootstrap_task_mean

    base_runs = [baseline] * len(per_seed) if isinstance(baseline, np.ndarray) else list(baseline)
    model, base = np.mean(per_seed, axis=0), np.mean(base_runs, axis=0)
    out = paired_bootstrap_task_mean(model, base, skills, groups)
    out["per_seed"] = [balanced_score(m, skills) - balanced_score(b, skills) for m, b in zip(per_seed, base_runs, strict=True)]
    return out
