"""``smpo quickstart``: the whole chain on the embedded tiny models, offline, on a CPU.

toy preference pairs -> ``smpo score`` (tiny PickScore-architecture reward) -> ``smpo train`` with
SmPO (online ReNoise inversion) and with Diffusion-DPO, each through the same stage runner and bundled
recipes (``tiny_score_cpu``, ``tiny_smpo_cpu``, ``tiny_dpo_cpu``) a user would run by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QuickstartResult:
    output_dir: str
    scored_pairs: int
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_quickstart(output_dir: str | Path, *, steps: int = 4, pairs: int = 16) -> QuickstartResult:
    from smpo_cli.config import load_recipe
    from smpo_cli.data.toy_pairs import write_toy_pairs
    from smpo_cli.runs import execute
    from smpo_cli.scoring.runner import run_scoring
    from smpo_cli.training.runner import run_training

    root = Path(output_dir)
    pairs_file = write_toy_pairs(root / "pairs", n=pairs)
    scored_dir = root / "scored"
    score = execute(
        "score",
        load_recipe("tiny_score_cpu", "score", [f"data.path={pairs_file}", f"output_dir={scored_dir}"]),
        run_scoring,
        overwrite=True,
    )
    result = QuickstartResult(str(root), score.scored)
    for method in ("smpo", "dpo"):
        overrides = [f"data.path={scored_dir}", f"output_dir={root / method}", f"train.max_steps={steps}"]
        trained = execute("train", load_recipe(f"tiny_{method}_cpu", "train", overrides), run_training, overwrite=True)
        last = trained.metrics[-1] if trained.metrics else {}
        result.runs.append({
            "method": method, "steps": trained.steps, "final_loss": trained.final_loss,
            "implicit_acc": last.get("implicit_acc"), "mean_p": last.get("mean_p"),
            "pairs_per_second": trained.pairs_per_second, "unet_calls_per_step": trained.unet_calls_per_step,
            "seconds": trained.seconds, "model": trained.model_path,
        })  # fmt: skip
    return result
