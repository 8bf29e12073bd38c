"""``smpo generate``: images for a prompt set, traceable to prompt, seed and settings."""

from __future__ import annotations

from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import (
    DryRunOpt,
    JsonOpt,
    OutputDirOpt,
    OverridesArg,
    OverwriteOpt,
    RecipeOpt,
    SeedOpt,
)

EPILOG = (
    "Examples:\n\n"
    "  smpo generate --model runs/sdxl-smpo/pipeline --prompts parti/PartiPrompts.tsv -o samples/parti\n\n"
    "  smpo generate --model tiny-sd15 --prompts prompts.txt sampling.images_per_prompt=4 sampling.num_inference_steps=2\n\n"
    "  smpo generate --model M --prompts geneval/evaluation_metadata.jsonl layout=geneval sampling.images_per_prompt=4\n\n"
    "  accelerate launch --num_processes 8 -m smpo_cli generate --model M --prompts hpdv2/ -o samples/hpdv2"
)


def generate(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model (sets model.pretrained).", rich_help_panel="Recipe")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", "-p", help="Prompt set (sets prompts.path).", rich_help_panel="Recipe")] = None,
    output_dir: OutputDirOpt = None,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate images for a prompt set with a model (folder, single file, hub id, tiny name) and optional LoRA.

    Image k of prompt i always gets the seed derived from (seed, i, k), whatever the batch size or number
    of GPUs. Writes images/ + metadata.jsonl (or the GenEval layout with layout=geneval) and
    summary.json; a rerun skips the images already there.
    """
    from smpo_cli.generation.runner import resume_ok, run_generation

    sugar = {"model.pretrained": model, "prompts.path": prompts, "output_dir": str(output_dir) if output_dir else None,
             "seed": seed}  # fmt: skip
    result = run_stage("generate", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run,
                       overwrite=overwrite, resume=resume_ok, core=run_generation)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    out.print(f"{result.images} images for {result.prompts} prompts ({result.generated} new, "
              f"{result.skipped_existing} already there, {result.images_per_second:.2f} images/s)", highlight=False)  # fmt: skip
    err.print(f"output: {result.output_dir}", highlight=False)
