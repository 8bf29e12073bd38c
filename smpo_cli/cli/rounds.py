"""``smpo rounds``: iterative (self-play) alignment, pairs -> invert -> train, each round on the last round's model."""

from __future__ import annotations

from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import DryRunOpt, JsonOpt, OutputDirOpt, OverridesArg, OverwriteOpt, RecipeOpt

EPILOG = (
    "Examples:\n\n"
    "  smpo rounds --recipe rounds_tiny_cpu                 # 2 rounds on the shapes model, CPU\n\n"
    "  smpo rounds --recipe rounds_tiny_cpu rounds=3 -o runs/rounds/three\n\n"
    "  smpo rounds --recipe rounds_sd15 model=runwayml/stable-diffusion-v1-5 --dry-run"
)


def rounds(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Start model (sets model).", rich_help_panel="Recipe")
    ] = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run pairs -> invert (cache) -> train for R rounds, each round sampling from the previous round's model.

    Every stage of every round is its own run folder (OUTPUT_DIR/round_<r>/pairs, cache, train); a rerun keeps
    finished stages and resumes the interrupted one. With evaluate_final the last model is sampled with round 0's
    seeds (OUTPUT_DIR/eval) and its rewards are compared image by image with the start model's.
    """
    from smpo_cli.pairs.rounds import check, resume_ok, run_rounds

    sugar = {"model": model, "output_dir": str(output_dir) if output_dir else None}
    if dry_run:
        from smpo_cli.config import load_recipe

        loaded = load_recipe(recipe or "rounds_tiny_cpu", "rounds", overrides, sugar)
        for line in check(loaded.recipe):
            err.print(f" [green]-[/] {line}", markup=True, highlight=False)
    result = run_stage("rounds", recipe=recipe or "rounds_tiny_cpu", overrides=overrides, sugar=sugar, dry_run=dry_run,
                       overwrite=overwrite, resume=resume_ok, core=run_rounds)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    for r in result.rounds:
        means = ", ".join(f"{k} {v:.4g}" for k, v in r["reward_mean"].items())
        out.print(f"round {r['round']}: {r['pairs']} pairs from {r['sampled_from']} (mean reward {means}; "
                  f"mean p {r['mean_p']:.3f}, ties {100 * r['tie_fraction']:.1f}%) -> {r['trained_model']}",
                  highlight=False)  # fmt: skip
    if result.evaluation:
        for label, v in result.evaluation["vs_start"].items():
            c = v["change"]
            out.print(f"final vs start, {label}: {v['start']:.4g} -> {v['final']:.4g}, change {c['mean']:+.4g} "
                      f"[{c['ci95'][0]:+.4g}, {c['ci95'][1]:+.4g}] (95% CI over {c['groups']} prompts, same seeds); "
                      f"final wins {100 * v['final_wins']:.1f}% of images", highlight=False)  # fmt: skip
    out.print(f"final model: {result.final_model}  (summary: {result.summary_path})", highlight=False)
