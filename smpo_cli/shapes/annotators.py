"""Simulated human preferences: a population of annotators who weigh the judge's criteria differently.

SmPO's premise is that preference varies across people, so a pair's binary label is one person's
vote while the quantity worth learning is the population's preference probability. Here:

* an ``Annotator`` scores an image by a weighted sum of criteria read off the judge's ``Verdict``
  (``CRITERIA``: per-kind constraint credits, all-correct, and two image-quality terms),
  u = sum_k w_k * criterion_k, and prefers A to B with P = sigmoid((u_A - u_B) / temperature);
* the **true preference** of a pair is the population's share-weighted mean of those probabilities;
* a pair's **human label** is the vote of one annotator drawn by share: Bernoulli(P of that annotator);
* the **reward model** used for SmPO's label smoothing is the judge's continuous score, optionally
  with Gaussian noise (``judge_reward``), so the reward model can be made imperfect on purpose.

Labels use the Diffusion-DPO convention: 1 means the first image (A) is preferred. Every random draw
goes through the ``numpy.random.Generator`` passed in, so results are deterministic by seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smpo_cli.shapes.judge import Verdict

# Criteria an annotator can weigh. The first four are the mean partial credit of the caption's
# constraints of that kind (absent when the caption has none, e.g. "count" for "a red circle");
# "correct" is 1/0; "crispness" and "object_size" are the judge's image-quality readings in [0, 1].
CRITERIA: tuple[str, ...] = ("object", "count", "color", "position", "correct", "crispness", "object_size")


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    # tanh form: no overflow, and sigmoid(-x) == 1 - sigmoid(x) up to rounding
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def criteria_values(verdict: Verdict) -> dict[str, float]:
    """The ``CRITERIA`` present for this verdict's caption, each in [0, 1]."""
    values = dict(verdict.criteria)
    values["correct"] = float(verdict.correct)
    values["crispness"] = verdict.crispness
    values["object_size"] = verdict.object_size
    return values


@dataclass(frozen=True)
class Annotator:
    """One kind of person: criterion weights (missing = 0) and a temperature (higher = noisier votes)."""

    name: str
    weights: Mapping[str, float]
    temperature: float = 0.5

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(CRITERIA)
        if unknown:
            raise ValueError(
                f"annotator {self.name!r}: unknown criteria {sorted(unknown)}; expected {CRITERIA}"
            )
        if not self.temperature > 0:
            raise ValueError(f"annotator {self.name!r}: temperature must be > 0, got {self.temperature}")

    def utility(self, verdict: Verdict) -> float:
        """sum_k w_k * criterion_k over the criteria this verdict has."""
        values = criteria_values(verdict)
        return float(sum(w * values[k] for k, w in self.weights.items() if k in values))

    def preference(self, verdict_a: Verdict, verdict_b: Verdict) -> float:
        """P(this annotator prefers A to B) = sigmoid((u_A - u_B) / temperature)."""
        _check_pair(verdict_a, verdict_b)
        return float(_sigmoid((self.utility(verdict_a) - self.utility(verdict_b)) / self.temperature))


@dataclass(frozen=True)
class Population:
    """Annotators and their shares of the population (non-negative, summing to 1)."""

    annotators: tuple[Annotator, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.annotators) != len(self.shares) or not self.annotators:
            raise ValueError("a population needs one share per annotator, and at least one annotator")
        if min(self.shares) < 0 or not np.isclose(sum(self.shares), 1.0):
            raise ValueError(f"shares must be non-negative and sum to 1, got {self.shares}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.annotators)

    def annotator_preferences(self, verdict_a: Verdict, verdict_b: Verdict) -> np.ndarray:
        """P(A > B) for each annotator, in population order."""
        return np.array([a.preference(verdict_a, verdict_b) for a in self.annotators])

    def true_preference(self, verdict_a: Verdict, verdict_b: Verdict) -> float:
        """The population's P(A > B): share-weighted mean of the annotators' probabilities."""
        return float(np.dot(self.shares, self.annotator_preferences(verdict_a, verdict_b)))

    def sample_label(self, rng: np.random.Generator, verdict_a: Verdict, verdict_b: Verdict) -> int:
        """One human label: draw an annotator by share, then their Bernoulli vote (1 = A preferred)."""
        return int(self.label_pairs(rng, [verdict_a], [verdict_b]).labels[0])

    def label_pairs(
        self,
        rng: np.random.Generator,
        verdicts_a: Sequence[Verdict],
        verdicts_b: Sequence[Verdict],
        reward_noise_std: float = 0.0,
    ) -> PairLabels:
        """Labels, true probabilities and judge rewards for many pairs (same draws as ``sample_label`` for one)."""
        if len(verdicts_a) != len(verdicts_b):
            raise ValueError(f"got {len(verdicts_a)} A verdicts but {len(verdicts_b)} B verdicts")
        for a, b in zip(verdicts_a, verdicts_b, strict=True):
            _check_pair(a, b)
        weights = np.array([[a.weights.get(k, 0.0) for k in CRITERIA] for a in self.annotators])  # (K, C)
        temperatures = np.array([a.temperature for a in self.annotators])
        margin = (_criteria_matrix(verdicts_a) - _criteria_matrix(verdicts_b)) @ weights.T  # (n, K) u_A - u_B
        per_annotator = _sigmoid(margin / temperatures).reshape(len(verdicts_a), len(self.annotators))
        who = rng.choice(
            len(self.annotators), size=len(verdicts_a), p=np.asarray(self.shares) / sum(self.shares)
        )
        voter_p = per_annotator[np.arange(len(who)), who]
        labels = (rng.random(len(who)) < voter_p).astype(np.int64)
        return PairLabels(
            labels=labels,
            true_preference=per_annotator @ np.asarray(self.shares, dtype=np.float64),
            annotator=who,
            reward_a=judge_rewards(verdicts_a, reward_noise_std, rng),
            reward_b=judge_rewards(verdicts_b, reward_noise_std, rng),
        )


@dataclass(frozen=True)
class PairLabels:
    """Per pair: the sampled label (1 = A preferred), the population P(A > B), who voted, and judge rewards."""

    labels: np.ndarray  # (n,) int64 in {0, 1}
    true_preference: np.ndarray  # (n,) float64 in (0, 1)
    annotator: np.ndarray  # (n,) index into Population.annotators
    reward_a: np.ndarray  # (n,) judge score of A (+ noise when asked)
    reward_b: np.ndarray  # (n,)


DEFAULT_POPULATION = Population(
    annotators=(
        # Wants exactly what was asked; a wrong count is the worst sin. Sharp (low temperature).
        Annotator(
            "stickler", {"correct": 2.0, "count": 2.0, "object": 1.0, "color": 1.0, "position": 1.0}, 0.3
        ),
        # Judges by colour first: the right colours on the right shapes.
        Annotator(
            "colour_first",
            {"color": 3.0, "object": 1.0, "count": 0.5, "position": 0.5, "crispness": 0.5},
            0.5,
        ),
        # Judges by layout: where things are and how many.
        Annotator("layout_first", {"position": 3.0, "count": 1.5, "object": 1.0, "color": 0.25}, 0.5),
        # Lenient about the caption, likes big crisp shapes; noisier (high temperature).
        Annotator(
            "aesthete",
            {
                "crispness": 2.0,
                "object_size": 1.5,
                "object": 1.0,
                "color": 0.5,
                "count": 0.25,
                "position": 0.25,
            },
            1.0,
        ),
    ),
    shares=(0.3, 0.25, 0.25, 0.2),
)


def true_preference(
    verdict_a: Verdict, verdict_b: Verdict, population: Population = DEFAULT_POPULATION
) -> float:
    """The population's P(A > B) (see ``Population.true_preference``)."""
    return population.true_preference(verdict_a, verdict_b)


def sample_label(
    rng: np.random.Generator,
    verdict_a: Verdict,
    verdict_b: Verdict,
    population: Population = DEFAULT_POPULATION,
) -> int:
    """One sampled annotator's vote, 1 when A is preferred (see ``Population.sample_label``)."""
    return population.sample_label(rng, verdict_a, verdict_b)


def judge_reward(verdict: Verdict, noise_std: float = 0.0, rng: np.random.Generator | None = None) -> float:
    """The reward model for SmPO smoothing: the judge's score, plus N(0, noise_std^2) noise (unclipped)."""
    return float(judge_rewards([verdict], noise_std, rng)[0])


def judge_rewards(
    verdicts: Sequence[Verdict], noise_std: float = 0.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``judge_reward`` for many verdicts; draws noise only when ``noise_std > 0`` (then ``rng`` is required)."""
    scores = np.array([v.score for v in verdicts], dtype=np.float64)
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if noise_std == 0:
        return scores
    if rng is None:
        raise ValueError("a noisy judge reward needs an rng (numpy.random.Generator) for reproducibility")
    return scores + rng.normal(0.0, noise_std, size=scores.shape)


def _criteria_matrix(verdicts: Sequence[Verdict]) -> np.ndarray:
    """(n, len(CRITERIA)) criterion values, 0 where a caption lacks the criterion (same in both images of a pair)."""
    out = np.zeros((len(verdicts), len(CRITERIA)))
    for i, verdict in enumerate(verdicts):
        for k, value in criteria_values(verdict).items():
            out[i, _CRITERION_INDEX[k]] = value
    return out


_CRITERION_INDEX = {name: i for i, name in enumerate(CRITERIA)}


def _check_pair(verdict_a: Verdict, verdict_b: Verdict) -> None:
    if verdict_a.caption != verdict_b.caption:
        raise ValueError(
            f"a preference pair is two images of one caption; got {verdict_a.caption.text!r} "
            f"and {verdict_b.caption.text!r}"
        )
