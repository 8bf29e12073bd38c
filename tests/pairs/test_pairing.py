"""The pure pairing functions against hand-computed values."""

import math

import numpy as np
import pytest

from smpo_cli.pairs import pairing


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_mixture_is_the_weighted_mean_of_each_models_softmax():
    # model A: normalised rewards 0.9 vs 0.1; model B: 0.2 vs 0.6 (disagrees); weights 3 : 1
    p0_a = pairing.model_p0(np.array([0.9]), np.array([0.1]))
    p0_b = pairing.model_p0(np.array([0.2]), np.array([0.6]))
    assert p0_a[0] == pytest.approx(sig(0.8)) and p0_b[0] == pytest.approx(sig(-0.4))
    p0, winner, p = pairing.mixture(np.stack([p0_a, p0_b]), np.array([3.0, 1.0]))
    expected = (3 * sig(0.8) + sig(-0.4)) / 4
    assert p0[0] == pytest.approx(expected) and winner[0] == 0 and p[0] == pytest.approx(expected)
    # with the weights the other way round, B's side wins and p is the winner's probability
    p0, winner, p = pairing.mixture(np.stack([p0_a, p0_b]), np.array([1.0, 30.0]))
    expected = (sig(0.8) + 30 * sig(-0.4)) / 31
    assert winner[0] == 1 and p[0] == pytest.approx(1 - expected)
    with pytest.raises(ValueError, match="weight"):
        pairing.mixture(np.stack([p0_a, p0_b]), np.array([1.0]))


def test_quantile_range_and_normalise():
    scores = np.arange(101, dtype=float)
    assert pairing.quantile_range(scores, (0.01, 0.99)) == pytest.approx((1.0, 99.0))
    np.testing.assert_allclose(pairing.normalise(np.array([1.0, 50.0, 99.0]), 1.0, 99.0), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="coincide"):
        pairing.quantile_range(np.ones(10))


U = np.array([[0.2, 0.9, 0.5, 0.1],   # best 1, worst 3
              [0.4, 0.4, 0.4, 0.7]])  # best 3, then ties broken by sample index: worst is 2  # fmt: skip


def test_best_worst_all_and_top_bottom_pick_the_documented_pairs():
    np.testing.assert_array_equal(pairing.choose_pairs(U, "best_worst"), [[0, 1, 3], [1, 2, 3]])
    everything = pairing.choose_pairs(U, "all")
    assert len(everything) == 12 and set(map(tuple, everything[:6])) == {
        (0, a, b) for a in range(4) for b in range(a + 1, 4)
    }
    tb = pairing.choose_pairs(U, "top_bottom", k=2)
    # prompt 0: top {1, 2} x bottom {0, 3}; always (smaller index, larger index)
    assert set(map(tuple, tb[tb[:, 0] == 0])) == {(0, 0, 1), (0, 1, 3), (0, 0, 2), (0, 2, 3)}
    with pytest.raises(ValueError, match="top_bottom"):
        pairing.choose_pairs(U, "top_bottom", k=3)


def test_min_margin_drops_close_pairs_and_random_is_reproducible():
    kept = pairing.choose_pairs(U, "all", min_margin=0.25)
    gaps = np.abs(U[kept[:, 0], kept[:, 1]] - U[kept[:, 0], kept[:, 2]])
    assert (gaps >= 0.25).all()
    # prompt 0: all but 0.2-0.1; prompt 1: each 0.4 against the 0.7, not the 0.4-0.4 ties
    assert {tuple(map(int, r)) for r in kept} == {(0, 0, 1), (0, 0, 2), (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 0, 3),
                                                  (1, 1, 3), (1, 2, 3)}
    r1 = pairing.choose_pairs(U, "random", pairs_per_prompt=3, rng=np.random.default_rng(4))
    r2 = pairing.choose_pairs(U, "random", pairs_per_prompt=3, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(r1, r2)
    assert len(r1) == 6 and len({tuple(r) for r in r1}) == 6
    with pytest.raises(ValueError, match="rng"):
        pairing.choose_pairs(U, "random")


def test_pair_summary_counts_ties():
    s = pairing.pair_summary(np.array([0.0, 0.5, -0.5, 0.0]), np.array([0.5, 0.6, 0.6, 0.5]))
    assert s["pairs"] == 4 and s["tie_fraction"] == 0.5 and s["gap"]["mean"] == pytest.approx(0.25)
