"""Benchmark arithmetic as pure functions: means with confidence intervals and win rates.

* mean: the sample mean with a normal-approximation 95% interval, mean +/- 1.96 * sd / sqrt(n);
* win rate of model over baseline on the same (prompt, sample index): wins count 1, exact ties 0.5,
  reported in percent (the unit of the Diffusion-DPO / SmPO tables), with a 95% Wilson interval.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054

# The output each reward model is reported in, in the units papers use.
REPORT_OUTPUT = {
    "pickscore": ("score", "logit_scale x cosine (PickScore paper units, ~20-23)"),
    "hpsv2": ("score_x100", "100 x cosine (HPSv2 benchmark tables)"),
    "imagereward": ("score", "normalised ImageReward"),
    "aesthetic": ("score", "LAION aesthetic, 1-10"),
    "clip": ("clip_score", "max(100 x cosine, 0), OpenAI ViT-L/14 (torchmetrics)"),
    "hpsv3": ("score", "HPSv3 mu (Qwen2-VL-7B reward head, the official inferencer's score)"),
    "shapes-judge": ("score", "the shapes world's exact judge, [0, 1]"),
}


def mean_ci(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    sd = float(v.std(ddof=1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    mean = float(v.mean())
    return {"n": int(n), "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def win_rate(model, baseline) -> dict:
    """Percent of paired samples where the model scores higher (ties count half), with a Wilson 95% interval."""
    a, b = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores, got {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        return {"n": 0, "win_rate": None, "ci95": None}
    wins = float((a > b).sum() + 0.5 * (a == b).sum())
    lo, hi = wilson_interval(wins, n)
    return {"n": int(n), "wins": wins, "win_rate": 100 * wins / n, "ci95": [100 * lo, 100 * hi]}


def wilson_interval(hits: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of the proportion hits / n (NaNs when n is 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return centre - half, centre + half


def paired_bootstrap(model, baseline, groups=None, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """Mean of model - baseline over paired samples with a percentile-bootstrap 95% interval.

    ``groups`` (e.g. the prompt of each sample) makes it a cluster bootstrap: whole groups are resampled, so
    images of one prompt, which are not independent, do not narrow the interval. Seeded: the same inputs give
    the same interval.
    """
    a, b = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    if a.size == 0:
        return {"n": 0, "mean": None, "ci95": None}
    diff = a - b
    labels = np.arange(diff.size) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sums = np.bincount(labels, weights=diff)
    counts = np.bincount(labels).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, sums.size, size=(n_boot, sums.size))
    boots = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"n": int(diff.size), "groups": int(sums.size), "mean": float(diff.mean()), "ci95": [float(lo), float(hi)]}


def paired_bootstrap_task_mean(model, baseline, tasks, groups=None, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """GenEval's overall score, the unweighted mean over tasks of each task's mean, as model - baseline.

    Each image counts through its task's mean, so a task with many images does not outweigh one with few (GenEval
    averages its six task accuracies). The bootstrap is stratified by task: within each task whole ``groups``
    are resampled (a prompt's images together; pass one group per image where the evaluation holds every prompt
    of the task, so that only the seeds vary). Also returns each task's paired change.
    """
    a, b = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    task = np.asarray(tasks)
    if a.shape != b.shape or a.ndim != 1 or task.shape != a.shape:
        raise ValueError(f"paired_bootstrap_task_mean needs equal-length 1-D arrays, got {a.shape}, {b.shape}, {task.shape}")
    group = np.arange(a.size) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    diff = a - b
    rng = np.random.default_rng(seed)
    names = sorted(set(task.tolist()))
    boots = np.zeros(n_boot)
    per_task = {}
    for name in names:
        sel = task == name
        labels = np.unique(group[sel], return_inverse=True)[1]
        sums = np.bincount(labels, weights=diff[sel])
        counts = np.bincount(labels).astype(np.float64)
        pick = rng.integers(0, sums.size, size=(n_boot, sums.size))
        draws = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
        boots += draws / len(names)
        lo, hi = np.percentile(draws, [2.5, 97.5])
        per_task[name] = {"n": int(sel.sum()), "groups": int(sums.size), "baseline": float(b[sel].mean()),
                          "model": float(a[sel].mean()), "mean": float(diff[sel].mean()), "ci95": [float(lo), float(hi)]}  # fmt: skip
    lo, hi = np.percentile(boots, [2.5, 97.5])
    mean = float(np.mean([t["mean"] for t in per_task.values()]))
    return {"n": int(a.size), "tasks": len(names), "mean": mean, "ci95": [float(lo), float(hi)],
            "baseline": float(np.mean([t["baseline"] for t in per_task.values()])),
            "model": float(np.mean([t["model"] for t in per_task.values()])), "per_task": per_task}  # fmt: skip
