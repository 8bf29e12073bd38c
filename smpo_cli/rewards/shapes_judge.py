"""The shapes world's exact judge as a reward model (``shapes-judge``): what "judge as reward" ablations use.

It reads each image against its caption (``shapes.judge``), with no weights to load:

``score``
    the judge's continuous score in [0, 1]: mean partial credit over the caption's constraints (object,
    count, colour, position); its min-max range is [0, 1], so SmPO's normalisation is the identity;
``correct``
    1.0 when every constraint holds, else 0.0.

Prompts must be sentences of the shapes world's grammar (``shapes.world.parse_caption``); images are
read at any size the renderer produced (32x32 for the testbed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from smpo_cli.errors import DataError
from smpo_cli.rewards.base import RewardModel

SOURCE = "builtin"


class ShapesJudge(RewardModel):
    name = "shapes-judge"
    output_names = ("score", "correct")
    default_output = "score"

    def __init__(self, source: str = SOURCE, **kwargs: Any) -> None:
        if str(source) != SOURCE:
            raise DataError(f"shapes-judge has no weights to load (got path {source!r})", hint="leave reward.path empty")
        super().__init__(version="shapes-judge", source=SOURCE, **kwargs)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        from smpo_cli.shapes.judge import judge_batch
        from smpo_cli.shapes.world import parse_caption

        captions = []
        for prompt in prompts:
            try:
                captions.append(parse_caption(prompt))
            except ValueError as exc:
                raise DataError(f"shapes-judge: prompt {prompt!r} is not a shapes-world caption ({exc})",
                                hint="the judge reads only captions of smpo's shapes world") from None  # fmt: skip
        verdicts = judge_batch(np.stack([np.asarray(im) for im in images]), captions)
        return {
            "score": torch.tensor([v.score for v in verdicts], dtype=torch.float32),
            "correct": torch.tensor([float(v.correct) for v in verdicts], dtype=torch.float32),
        }

    def known_range(self, output: str) -> tuple[float, float] | None:
        return (0.0, 1.0)


load = ShapesJudge
