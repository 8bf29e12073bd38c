"""``smpo pairs``: preference pairs from your own prompts, scored by one or more reward models."""

from __future__ import annotations

from typing import Annotated

import typer

from smpo_cli.cli._console import out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import DryRunOpt, JsonOpt, OutputDirOpt, OverridesArg, OverwriteOpt, RecipeOpt

EPILOG = (
    "Examples:\n\n"
    "  smpo pairs --recipe pairs_sd15 prompts.path=my_prompts.txt -o runs/pairs\n\n"
    "  smpo pairs --recipe pairs_tiny_cpu pairing.strategy=all\n\n"
    "  smpo pairs --recipe pairs_shapes_cpu -o runs/shapes-pairs   # the shapes world, shapes-pickscore\n\n"
    "  smpo train --recipe sd15_smpo data.path=runs/pairs           # train on them, unchanged"
)


def pairs(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model to sample from (sets model.pretrained).", rich_help_panel="Recipe")
    ] = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", "-p", help="Prompt file or dataset (sets prompts.path).", rich_help_panel="Recipe")
    ] = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample N images per prompt, score every image with the recipe's reward models, write preference pairs.

    Writes OUTPUT_DIR/pairs.parquet in the format smpo invert and smpo train read (data.path=OUTPUT_DIR,
    data.reward=the printed prefix), with each reward model's scores and p and the weighted mixture's winner
    and p; samples/, image_scores.jsonl and summary.json. A rerun resumes generation and reuses scores.
    """
    from smpo_cli.pairs.runner import resume_ok, run_pairs

    sugar = {"model.pretrained": model, "prompts.path": prompts, "output_dir": str(output_dir) if output_dir else None}
    result = run_stage("pairs", recipe=recipe or "pairs_tiny_cpu", overrides=overrides, sugar=sugar, dry_run=dry_run,
                       overwrite=overwrite, resume=resume_ok, core=run_pairs)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    s = result.summary[result.prefix]
    out.print(f"{result.pairs} pairs from {result.prompts} prompts x {result.images // max(1, result.prompts)} images; "
              f"exact utility ties {100 * s['tie_fraction']:.1f}%, median gap {s['gap']['p50']:.3g}, "
              f"mean p {s['p'].get('mean', float('nan')):.3f}", highlight=False)  # fmt: skip
    for r in result.rewards:
        norm = r["normalization"]
        agree = result.summary[r["label"]]["agreement_with_mixture"]
        out.print(f"  {r['label']}: {r['output']}, weight {r['weight']:g}, range {norm['mode']} "
                  f"[{norm['r_min']:.4g}, {norm['r_max']:.4g}], agrees with the pair's winner {100 * agree:.0f}%",
                  highlight=False)  # fmt: skip
    out.print(f"pairs: {result.pairs_path}  (smpo train data.path={result.output_dir} data.reward={result.prefix})",
              highlight=False)  # fmt: skip
