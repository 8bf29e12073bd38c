import math

import numpy as np
import pytest

from smpo_cli.benchmark.metrics import mean_ci, paired_bootstrap, win_rate


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


def test_paired_bootstrap_constant_and_normal_limits():
    import numpy as np

    const = paired_bootstrap([1.0, 0.5, 0.0, 1.0], [0.5, 0.0, -0.5, 0.5])
    assert const["mean"] == pytest.approx(0.5) and const["ci95"] == pytest.approx([0.5, 0.5])
    rng = np.random.default_rng(3)
    a, b = rng.random(4000) < 0.6, rng.random(4000) < 0.5
    boot = paired_bootstrap(a, b)
    d = a.astype(float) - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)  # the normal interval, which the bootstrap must approach
    assert boot["ci95"][0] == pytest.approx(d.mean() - half, abs=0.004)
    assert boot["ci95"][1] == pytest.approx(d.mean() + half, abs=0.004)
    assert paired_bootstrap(a, b) == boot  # seeded


def test_paired_bootstrap_clusters_widen_the_interval():
    import numpy as np

    # 20 prompts x 8 images; the difference is a per-prompt effect, identical within a prompt
    effect = np.repeat(np.linspace(-1, 1, 20), 8)
    flat = paired_bootstrap(effect, np.zeros_like(effect))
    clustered = paired_bootstrap(effect, np.zeros_like(effect), groups=np.repeat(np.arange(20), 8))
    assert clustered["groups"] == 20 and flat["groups"] == 160
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(clustered) > 2.3 * width(flat)  # sqrt(8) ~ 2.8 in the limit
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_task_mean_bootstrap_weights_tasks_not_images():
    from smpo_cli.benchmark.metrics import paired_bootstrap_task_mean

    # task a: 90 images all +1; task b: 10 images all 0 -> GenEval's mean is 0.5 (the image mean would be 0.9)
    tasks = ["a"] * 90 + ["b"] * 10
    model, base = np.r_[np.ones(90), np.zeros(10)], np.zeros(100)
    out = paired_bootstrap_task_mean(model, base, tasks)
    assert out["mean"] == pytest.approx(0.5) and out["ci95"] == pytest.approx([0.5, 0.5])
    assert out["per_task"]["a"]["mean"] == 1.0 and out["per_task"]["b"]["n"] == 10
    assert out["model"] == pytest.approx(0.5) and out["baseline"] == 0.0
    # noise inside one task widens the interval; the stratified draw keeps each task's size fixed
    rng = np.random.default_rng(0)
    noisy = paired_bootstrap_task_mean(rng.integers(0, 2, 200).astype(float), np.zeros(200), ["a", "b"] * 100)
    lo, hi = noisy["ci95"]
    assert lo < noisy["mean"] < hi and 0.05 < hi - lo < 0.3
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_task_mean([1.0], [1.0], ["a", "b"])
