"""Preference pairs from per-image rewards: normalisation, the mixture of reward models, pairing strategies.

Pure array functions (tested against hand-computed values in tests/pairs):

* each reward model m gives raw scores r_m; ``r'_m = (r_m - lo_m) / (hi_m - lo_m)`` with (lo, hi) the model's
  known range (PickScore's official cosine constants, a shipped model's own range, the shapes judge's [0, 1])
  or, without one, the ``quantiles`` pair of the scores themselves (default the 1st and 99th percentile:
  min/max, as the official constants are, but not set by one outlier image);
* per pair, each model's probability that image 0 is preferred is SmPO's softmax,
  ``p0_m = sigmoid(r'_m(0) - r'_m(1))``; the pair's p0 is the weighted mean ``sum_m w_m p0_m / sum_m w_m``,
  the winner is the side the mixture prefers and p = max(p0, 1 - p0), the probability of the winner;
* pairs are chosen per prompt on the *utility* ``u = sum_m w_m r'_m / sum_m w_m`` of each image
  (``STRATEGIES``); ``min_margin`` drops pairs whose utilities differ by less.
"""

from __future__ import annotations

import itertools

import numpy as np

from smpo_cli.scoring.preference import prob_first_preferred

STRATEGIES = {
    "best_worst": "the highest- against the lowest-utility image of each prompt (one pair per prompt)",
    "all": "every pair of a prompt's images (N(N-1)/2 per prompt)",
    "top_bottom": "each of the k highest- against each of the k lowest-utility images (k*k per prompt, 2k <= N)",
    "random": "pairs_per_prompt distinct random pairs per prompt",
}
DEFAULT_QUANTILES = (0.01, 0.99)


def quantile_range(scores: np.ndarray, quantiles: tuple[float, float] = DEFAULT_QUANTILES) -> tuple[float, float]:
    """(lo, hi) of the scores at the given quantiles; ValueError when they coincide (nothing to normalise)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite scores to take a normalisation range from")
    lo, hi = (float(v) for v in np.quantile(values, quantiles))
    if not hi > lo:
        raise ValueError(f"the scores' {quantiles} quantiles coincide ({lo}): they cannot be min-max normalised")
    return lo, hi


def normalise(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.asarray(scores, dtype=np.float64) - lo) / (hi - lo)


def mixture(p0_per_model: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p0, winner, p) of the weighted mixture of models' p0 (rows: models, columns: pairs).

    winner = 0 where p0 >= 0.5 (an exact tie goes to image 0, as ``smpo score`` does); p = the winner's probability.
    """
    p0s = np.atleast_2d(np.asarray(p0_per_model, dtype=np.float64))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (p0s.shape[0],) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"need one non-negative weight per model with a positive sum, got {weights}")
    p0 = (w[:, None] * p0s).sum(0) / w.sum()
    winner = np.where(p0 >= 0.5, 0, 1).astype(np.int8)
    return p0, winner, np.where(winner == 0, p0, 1.0 - p0)


def model_p0(norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """SmPO's p0 from normalised rewards (min-max already applied: the range is [0, 1])."""
    return prob_first_preferred(norm_a, norm_b, 0.0, 1.0)


def choose_pairs(
    utility: np.ndarray,
    strategy: str,
    *,
    k: int = 1,
    pairs_per_prompt: int = 1,
    min_margin: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(n, 3) int array of (prompt, sample a, sample b) from a (prompts, N) utility matrix.

    Within a pair, a < b by sample index, so which image is image 0 carries no information about the
    reward; the winner column says which one is preferred. Utility ties are broken by sample index.
    """
    u = np.asarray(utility, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] < 2:
        raise ValueError(f"need a (prompts, N >= 2) utility matrix, got shape {u.shape}")
    n_img = u.shape[1]
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "top_bottom" and not 1 <= k <= n_img // 2:
        raise ValueError(f"top_bottom needs 1 <= k <= N/2 = {n_img // 2}, got k={k}")
    if strategy == "random":
        if rng is None:
            raise ValueError("random pairing needs an rng (numpy.random.Generator) for reproducibility")
        if not 1 <= pairs_per_prompt <= n_img * (n_img - 1) // 2:
            raise ValueError(f"pairs_per_prompt must be in [1, {n_img * (n_img - 1) // 2}] for N={n_img}")
    every = np.array(list(itertools.combinations(range(n_img), 2)))
    rows = []
    for i, row in enumerate(u):
        order = np.argsort(-row, kind="stable")  # best first; ties by sample index
        if strategy == "best_worst":
            chosen = [(order[0], order[-1])]
        elif strategy == "all":
            chosen = [tuple(e) for e in every]
        elif strategy == "top_bottom":
            chosen = [(a, b) for a in order[:k] for b in order[n_img - k :]]
        else:
            chosen = [tuple(e) for e in every[rng.choice(len(every), pairs_per_prompt, replace=False)]]
        for a, b in chosen:
            if abs(row[a] - row[b]) >= min_margin:
                rows.append((i, min(a, b), max(a, b)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def pair_summary(gap: np.ndarray, p: np.ndarray) -> dict:
    """Count, exact-tie fraction, and the distribution of the utility gap |u_a - u_b| and of p."""
    from smpo_cli.scoring.preference import p_distribution

    gap = np.abs(np.asarray(gap, dtype=np.float64))
    q = np.quantile(gap, [0.1, 0.5, 0.9]) if gap.size else [float("nan")] * 3
    return {
        "pairs": int(gap.size),
        "tie_fraction": float(np.mean(gap == 0)) if gap.size else float("nan"),
        "gap": {"mean": float(gap.mean()) if gap.size else float("nan"),
                **{k: float(v) for k, v in zip(("p10", "p50", "p90"), q, strict=True)}},  # fmt: skip
        "p": p_distribution(p),
    }
