import math

import numpy as np
import pytest

from smpo_cli.scoring.preference import (
    PICKSCORE_COSINE_R_MAX,
    PICKSCORE_COSINE_R_MIN,
    human_winner,
    p_distribution,
    prob_first_preferred,
    smoothed_p,
)


def test_closed_form_against_softmax():
    r0, r1, lo, hi = 0.25, 0.20, PICKSCORE_COSINE_R_MIN, PICKSCORE_COSINE_R_MAX
    a, b = (r0 - lo) / (hi - lo), (r1 - lo) / (hi - lo)
    expected = math.exp(a) / (math.exp(a) + math.exp(b))
    assert prob_first_preferred(np.array([r0]), np.array([r1]), lo, hi)[0] == pytest.approx(expected, abs=1e-15)


def test_winner_p_is_at_least_half_and_symmetric():
    r0 = np.array([0.2, 0.1, 0.3, 0.25])
    r1 = np.array([0.1, 0.2, 0.3, 0.15])
    winner, p = smoothed_p(r0, r1, 0.1, 0.3)
    assert winner.tolist() == [0, 1, 1, 0]  # an exact tie goes to image 1, as the official preprocessing
    assert np.all(p >= 0.5)
    assert p[0] == pytest.approx(p[1])  # mirrored pair, same confidence
    assert p[2] == 0.5  # equal rewards: no preference, zero SmPO gradient
    # 2p - 1 = tanh((r'_w - r'_l) / 2)
    assert 2 * p[3] - 1 == pytest.approx(math.tanh((0.25 - 0.15) / 0.2 / 2))


def test_large_gaps_are_stable():
    winner, p = smoothed_p(np.array([1e6]), np.array([-1e6]), 0.0, 1.0)
    assert p[0] == 1.0 and np.isfinite(p).all()


def test_bad_range():
    with pytest.raises(ValueError):
        prob_first_preferred(np.array([0.1]), np.array([0.2]), 0.3, 0.3)


def test_human_winner_from_label_0():
    assert human_winner(np.array([1.0, 0.0, 0.5, np.nan])).tolist() == [0, 1, -1, -1]


def test_p_distribution():
    d = p_distribution(np.array([0.5, 0.6, 0.7, 1.0]))
    assert d["count"] == 4 and d["mean"] == pytest.approx(0.7) and sum(d["histogram"]["counts"]) == 4
    assert p_distribution(np.array([]))["count"] == 0
