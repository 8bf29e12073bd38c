"""``smpo quickstart``: generate -> score -> invert -> train (SmPO and DPO) -> bench on the shipped shapes model, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli.options import JsonOpt

EPILOG = "Examples:\n\n  smpo quickstart\n\n  smpo quickstart --steps 8 -o /tmp/qs --json"


def quickstart(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where every stage writes.")] = Path("runs/quickstart"),
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Training steps per method.")] = 4,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole chain on the shipped shapes model: generate pairs, score, invert, train SmPO and DPO, bench.

    Needs no network and no GPU; every stage is the real one (smpo generate, score, invert, train,
    bench rewards) with tiny recipes; the shapes judge checks the pictures. Earlier quickstart runs in
    the output folder are replaced.
    """
    from smpo_cli.quickstart import run_quickstart

    result = run_quickstart(output_dir, steps=steps)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"smpo quickstart: {result.scored_pairs} pairs sampled from shapes-sd15 and scored", title_justify="left")
    for col in ("method", "steps", "loss", "judge (base)", "change, pts [95% CI]", "verdict", "reward win % [95% CI]"):
        table.add_column(col, no_wrap=col not in ("verdict", "change, pts [95% CI]", "reward win % [95% CI]"))
    for r in result.runs:
        lo, hi = r["judge_difference_ci95"]
        table.add_row(r["method"], str(r["steps"]), "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
                      f"{r['judge_accuracy']:.0%} ({r['base_judge_accuracy']:.0%})",
                      f"{100 * r['judge_difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", r["judge_verdict"],
                      f"{r['reward_win_rate_vs_base']:.0f} [{r['reward_win_rate_ci95'][0]:.0f}, {r['reward_win_rate_ci95'][1]:.0f}]")  # fmt: skip
    out.print(table)
    n = result.runs[0]["judge_images"] if result.runs else 0
    out.print(f"judge: the shapes judge on {n} images per model, same prompts and seeds as the base; interval: "
              "bootstrap over prompts.", highlight=False)  # fmt: skip
    if all(r["judge_verdict"] != "better" for r in result.runs):
        out.print("A few steps at this learning rate are too few to show a gain; the quick start checks that every "
                  "stage runs and that training does not damage the model. What SmPO and DPO do to a model is "
                  "measured by the shapes testbed: README, 'Shapes testbed' (smpo shapes run).", highlight=False)  # fmt: skip
    out.print(f"reward (pairs, p and the reports' win rates): {result.reward}.", highlight=False)
    for r in result.runs:
        out.print(f"{r['method']}: model {r['model']}, report {r['report']}", highlight=False)
    err.print(f"all outputs: {result.output_dir}", highlight=False)
