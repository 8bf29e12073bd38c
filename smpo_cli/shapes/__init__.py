"""A benchmark world with ground truth: coloured shapes, an exact judge, and simulated annotators.

* ``world``: captions in GenEval's six skills (single_object, two_object, counting, colors,
  position, color_attr), their grammar (``Caption.text`` / ``parse_caption``), a held-out split, and
  a deterministic renderer of small images (``render``, ``render_batch``, ``make_dataset``).
* ``judge``: reads an image against a caption and returns per-constraint checks, partial credits,
  ``correct`` and a continuous ``score``; robust to the blur and noise of a small diffusion model.
* ``annotators``: a population of annotators who weigh the judge's criteria differently; a pair's
  label is one sampled annotator's vote, its true preference the population's mean; the reward
  model for SmPO smoothing is the judge's score, optionally noisy.

numpy and PIL only (no torch), so the benchmark can be imported and tested anywhere.
"""

from smpo_cli.shapes.annotators import (
    CRITERIA,
    DEFAULT_POPULATION,
    Annotator,
    PairLabels,
    Population,
    criteria_values,
    judge_reward,
    judge_rewards,
    sample_label,
    true_preference,
)
from smpo_cli.shapes.judge import (
    Detection,
    Verdict,
    constraint_kind,
    detect,
    detect_batch,
    judge,
    judge_batch,
)
from smpo_cli.shapes.world import (
    BACKGROUND,
    COLOR_NAMES,
    COLORS,
    COUNTS,
    DEFAULT_SIZE,
    RELATIONS,
    SHAPES,
    SKILLS,
    VOCABULARY,
    Caption,
    DrawnObject,
    ObjectSpec,
    PlacementError,
    Scene,
    ShapesDataset,
    all_captions,
    draw_scene,
    make_dataset,
    meaning_group,
    parse_caption,
    render,
    render_batch,
    sample_caption,
    sample_captions,
    split_captions,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "COLOR_NAMES",
    "COUNTS",
    "CRITERIA",
    "DEFAULT_POPULATION",
    "DEFAULT_SIZE",
    "RELATIONS",
    "SHAPES",
    "SKILLS",
    "VOCABULARY",
    "Annotator",
    "Caption",
    "Detection",
    "DrawnObject",
    "ObjectSpec",
    "PairLabels",
    "PlacementError",
    "Population",
    "Scene",
    "ShapesDataset",
    "Verdict",
    "all_captions",
    "constraint_kind",
    "criteria_values",
    "detect",
    "detect_batch",
    "draw_scene",
    "judge",
    "judge_batch",
    "judge_reward",
    "judge_rewards",
    "make_dataset",
    "meaning_group",
    "parse_caption",
    "render",
    "render_batch",
    "sample_caption",
    "sample_captions",
    "sample_label",
    "split_captions",
    "true_preference",
]
