"""Smoothed preference labels (SmPO, method.md section 2) as pure array functions.

    r' = (r - r_min) / (r_max - r_min)                 global min-max normalisation
    p0 = exp(r'_0) / (exp(r'_0) + exp(r'_1))           probability that image 0 is preferred
       = sigmoid(r'_0 - r'_1)

The reward winner is the image with the larger reward; the stored ``p`` is the probability that
the reward winner is preferred, so p >= 0.5 and 2p - 1 = tanh((r'_w - r'_l) / 2) >= 0.
"""

from __future__ import annotations

import numpy as np

# PickScore raw cosine (no logit scale), as in the official SmPO preprocessing.
PICKSCORE_COSINE_R_MIN = 0.11543526500463486
PICKSCORE_COSINE_R_MAX = 0.28201571106910706

# label_0 of Pick-a-Pic: 1 -> image 0 preferred, 0 -> image 1 preferred, 0.5 -> tie.
TIE_LABEL = 0.5


def normalize(r: np.ndarray, r_min: float, r_max: float) -> np.ndarray:
    if not r_max > r_min:
        raise ValueError(f"r_max ({r_max}) must be greater than r_min ({r_min})")
    return (np.asarray(r, dtype=np.float64) - r_min) / (r_max - r_min)


def prob_first_preferred(r0: np.ndarray, r1: np.ndarray, r_min: float, r_max: float) -> np.ndarray:
    """p0 = softmax([r'_0, r'_1])[0], computed stably as sigmoid(r'_0 - r'_1)."""
    diff = normalize(r0, r_min, r_max) - normalize(r1, r_min, r_max)
    return 0.5 * (1.0 + np.tanh(0.5 * diff))


def reward_winner(r0: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """0 where image 0 has the larger reward, else 1: an exact tie goes to image 1, as the official
    preprocessing's ``ps_label_0 = 1 if ps_score > ps_score_2 else 0`` (p = 0.5 then)."""
    return np.where(np.asarray(r0) > np.asarray(r1), 0, 1).astype(np.int8)


def smoothed_p(r0: np.ndarray, r1: np.ndarray, r_min: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(reward winner index, probability that the reward winner is preferred)."""
    p0 = prob_first_preferred(r0, r1, r_min, r_max)
    winner = reward_winner(r0, r1)
    return winner, np.where(winner == 0, p0, 1.0 - p0)


def human_winner(label_0: np.ndarray) -> np.ndarray:
    """0 / 1 for the human-preferred image, -1 for ties and missing labels."""
    label = np.asarray(label_0, dtype=np.float64)
    out = np.full(label.shape, -1, dtype=np.int8)
    out[label == 1.0] = 0
    out[label == 0.0] = 1
    return out


def p_distribution(p: np.ndarray, bins: int = 10) -> dict:
    """Mean, spread, quantiles and a histogram of p over [0.5, 1]."""
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return {"count": 0}
    counts, edges = np.histogram(p, bins=bins, range=(0.5, 1.0))
    q = np.quantile(p, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "count": int(p.size),
        "mean": float(p.mean()),
        "std": float(p.std()),
        "min": float(p.min()),
        "max": float(p.max()),
        "quantiles": {k: float(v) for k, v in zip(("p10", "p25", "p50", "p75", "p90"), q, strict=True)},
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]},
    }
