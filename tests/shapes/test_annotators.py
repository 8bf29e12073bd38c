"""Simulated annotators: population probabilities, symmetry, label frequencies, disagreement, rewards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smpo_cli.shapes import (
    DEFAULT_POPULATION,
    Annotator,
    DrawnObject,
    Population,
    Scene,
    Verdict,
    criteria_values,
    draw_scene,
    judge,
    judge_batch,
    judge_reward,
    judge_rewards,
    make_dataset,
    parse_caption,
    sample_label,
    true_preference,
)

RELATION_CAPTION = parse_caption("a red circle to the left of a blue square")


def hand_verdict(credits: dict[str, float], crispness: float = 1.0, object_size: float = 0.3) -> Verdict:
    checks = {k: c >= 1.0 for k, c in credits.items()}
    return Verdict(
        caption=parse_caption("three red circles"),
        checks=checks,
        credits=credits,
        correct=all(checks.values()),
        score=float(np.mean(list(credits.values()))),
        crispness=crispness,
        object_size=object_size,
        detections=(),
    )


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def drawn(*objects: tuple[str, str, tuple[int, int], int]) -> np.ndarray:
    return draw_scene(Scene(tuple(DrawnObject(s, c, xy, r) for s, c, xy, r in objects), 32))


@pytest.fixture(scope="module")
def colour_vs_layout() -> tuple[Verdict, Verdict]:
    """A: right colours, wrong side. B: right side, colours swapped."""
    a = drawn(("circle", "red", (24, 16), 5), ("square", "blue", (7, 16), 5))
    b = drawn(("circle", "blue", (7, 16), 5), ("square", "red", (24, 16), 5))
    return judge(a, RELATION_CAPTION), judge(b, RELATION_CAPTION)


def test_population_probability_by_hand() -> None:
    a = hand_verdict({"object0": 1.0, "count0": 1.0, "color0": 1 / 3}, crispness=0.5)  # 3 circles, one red
    b = hand_verdict({"object0": 1.0, "count0": 2 / 3, "color0": 2 / 3}, crispness=1.0)  # 2 red circles
    counter = Annotator("counter", {"count": 2.0, "object": 1.0}, temperature=0.5)
    painter = Annotator("painter", {"color": 3.0, "crispness": 1.0}, temperature=1.0)
    population = Population((counter, painter), (0.75, 0.25))
    # counter: u_a = 2*1 + 1 = 3, u_b = 2*(2/3) + 1 = 7/3  -> sigmoid((2/3) / 0.5)
    # painter: u_a = 3*(1/3) + 0.5 = 1.5, u_b = 3*(2/3) + 1 = 3 -> sigmoid(-1.5 / 1.0)
    p_counter, p_painter = sigmoid((2 / 3) / 0.5), sigmoid(-1.5)
    assert counter.preference(a, b) == pytest.approx(p_counter)
    assert painter.preference(a, b) == pytest.approx(p_painter)
    assert population.annotator_preferences(a, b) == pytest.approx([p_counter, p_painter])
    assert true_preference(a, b, population) == pytest.approx(0.75 * p_counter + 0.25 * p_painter)
    assert criteria_values(a) == pytest.approx(
        {"object": 1.0, "count": 1.0, "color": 1 / 3, "correct": 0.0, "crispness": 0.5, "object_size": 0.3}
    )


def test_preferences_are_antisymmetric(colour_vs_layout) -> None:
    data = make_dataset(40, seed=5)
    verdicts = judge_batch(data.images, data.captions)
    other = make_dataset(40, seed=6)
    pairs = [colour_vs_layout]
    for verdict, image in zip(verdicts, other.images, strict=True):  # same caption, another image
        pairs.append((verdict, judge(image, verdict.caption)))
    for a, b in pairs:
        assert true_preference(a, b) == pytest.approx(1.0 - true_preference(b, a), abs=1e-12)
        assert DEFAULT_POPULATION.annotator_preferences(a, b) == pytest.approx(
            1.0 - DEFAULT_POPULATION.annotator_preferences(b, a), abs=1e-12
        )
        assert true_preference(a, a) == pytest.approx(0.5)


def test_annotators_disagree_on_colour_versus_layout(colour_vs_layout) -> None:
    a, b = colour_vs_layout
    assert a.checks == {"object0": True, "color0": True, "object1": True, "color1": True, "position": False}
    assert b.checks == {"object0": True, "color0": False, "object1": True, "color1": False, "position": True}
    by_name = dict(zip(DEFAULT_POPULATION.names, DEFAULT_POPULATION.annotator_preferences(a, b), strict=True))
    assert by_name["colour_first"] > 0.9  # colours right beats layout right
    assert by_name["layout_first"] < 0.1  # and the other way round
    assert 0.2 < true_preference(a, b) < 0.8  # so the population is genuinely split


def test_label_frequency_approaches_the_true_probability(colour_vs_layout) -> None:
    a, b = colour_vs_layout
    n = 20_000
    result = DEFAULT_POPULATION.label_pairs(np.random.default_rng(0), [a] * n, [b] * n)
    p = true_preference(a, b)
    assert result.true_preference == pytest.approx(np.full(n, p))
    assert abs(result.labels.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)  # ~1.4 points at n = 20k
    shares = np.bincount(result.annotator, minlength=4) / n
    assert shares == pytest.approx(DEFAULT_POPULATION.shares, abs=0.015)
    # each voter's label follows their own probability
    per_annotator = DEFAULT_POPULATION.annotator_preferences(a, b)
    for k, q in enumerate(per_annotator):
        votes = result.labels[result.annotator == k]
        assert abs(votes.mean() - q) < 4 * math.sqrt(max(q * (1 - q), 1e-4) / len(votes)) + 1e-3


def test_sampling_is_seeded(colour_vs_layout) -> None:
    a, b = colour_vs_layout
    draw = [sample_label(np.random.default_rng(s), a, b) for s in range(200)]
    assert draw == [sample_label(np.random.default_rng(s), a, b) for s in range(200)]
    assert set(draw) == {0, 1}
    first = DEFAULT_POPULATION.label_pairs(
        np.random.default_rng(3), [a, b] * 50, [b, a] * 50, reward_noise_std=0.1
    )
    again = DEFAULT_POPULATION.label_pairs(
        np.random.default_rng(3), [a, b] * 50, [b, a] * 50, reward_noise_std=0.1
    )
    for name in ("labels", "true_preference", "annotator", "reward_a", "reward_b"):
        assert np.array_equal(getattr(first, name), getattr(again, name))


def test_judge_reward_is_the_score_with_optional_noise(colour_vs_layout) -> None:
    a, b = colour_vs_layout
    assert judge_reward(a) == a.score == 0.8 and judge_reward(b) == b.score == 0.6
    assert np.array_equal(judge_rewards([a, b]), [0.8, 0.6])
    noisy = judge_rewards([a] * 5000, noise_std=0.2, rng=np.random.default_rng(0))
    assert noisy.mean() == pytest.approx(0.8, abs=0.01) and noisy.std() == pytest.approx(0.2, abs=0.01)
    assert np.array_equal(noisy, judge_rewards([a] * 5000, noise_std=0.2, rng=np.random.default_rng(0)))
    assert judge_reward(a, 0.1, np.random.default_rng(1)) == judge_reward(a, 0.1, np.random.default_rng(1))
    with pytest.raises(ValueError, match="needs an rng"):
        judge_reward(a, noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std"):
        judge_reward(a, noise_std=-1.0)


def test_invalid_inputs_are_refused(colour_vs_layout) -> None:
    a, _ = colour_vs_layout
    other = judge(drawn(("circle", "red", (16, 16), 5)), parse_caption("a red circle"))
    with pytest.raises(ValueError, match="one caption"):
        true_preference(a, other)
    with pytest.raises(ValueError, match="unknown criteria"):
        Annotator("x", {"beauty": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        Annotator("x", {"color": 1.0}, temperature=0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        Population((Annotator("x", {"color": 1.0}),), (0.5,))
