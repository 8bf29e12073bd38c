import math

import pytest

from smpo_cli.benchmark.metrics import mean_ci, win_rate


def test_win_rate_hand_computed():
    # 5 pairs: 3 wins, 1 tie, 1 loss -> (3 + 0.5) / 5 = 70 %
    out = win_rate([2, 3, 4, 1, 0], [1, 2, 3, 1, 5])
    assert out["wins"] == 3.5 and out["win_rate"] == pytest.approx(70.0)
    z, n, p = 1.959963984540054, 5, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert out["ci95"] == pytest.approx([100 * (centre - half), 100 * (centre + half)])
    assert win_rate([1, 1], [1, 1])["win_rate"] == 50.0
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_mean_ci():
    out = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((x - 2.5) ** 2 for x in (1, 2, 3, 4)) / 3)
    assert out["mean"] == 2.5 and out["ci95"] == pytest.approx([2.5 - 1.959963984540054 * sd / 2, 2.5 + 1.959963984540054 * sd / 2])
    assert mean_ci([])["n"] == 0
