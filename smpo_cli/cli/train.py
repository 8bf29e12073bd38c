"""``smpo train``: SmPO, Diffusion-DPO and SFT training on accelerate."""

from __future__ import annotations

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
    "  smpo train --recipe sdxl.yaml                                  # the bundled SDXL SmPO recipe\n\n"
    "  smpo train --recipe sd15_smpo train.max_steps=50 -o runs/try1\n\n"
    "  smpo train --recipe sdxl_smpo --dry-run\n\n"
    "  accelerate launch --num_processes 8 -m smpo_cli train --recipe sdxl_smpo train.resume=auto"
)


def train(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    output_dir: OutputDirOpt = None,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a UNet with SmPO, Diffusion-DPO or SFT on scored preference pairs.

    Reads a scored dataset (`smpo score` output) and, with inversion.source=cache, an `smpo invert`
    cache. Writes checkpoints/ (every train.checkpoint_every_steps; train.resume=auto continues a killed
    run), metrics.jsonl (one line per step), and the final model: pipeline/ (a diffusers pipeline) or,
    with train.lora_rank, lora/ (diffusers LoRA weights for pipeline.load_lora_weights).
    """
    from smpo_cli.training.runner import run_training

    sugar = {"output_dir": str(output_dir) if output_dir else None, "seed": seed}
    result = run_stage(
        "train", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run, overwrite=overwrite,
        resume=lambda r: r.train.resume is not None, core=run_training,
    )  # fmt: skip
    if printed_as_json(result, as_json):
        return
    from rich.table import Table

    table = Table(title=f"smpo train: {result.method}", title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("labels", f"{result.labels} ({result.label_column} chose the winners)")
    table.add_row("steps", f"{result.steps}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""))
    if result.final_loss is not None:
        table.add_row("final loss", f"{result.final_loss:.5f}")
    table.add_row("throughput", f"{result.pairs_per_second:.2f} pairs/s, {result.unet_calls_per_step:g} UNet calls per step")
    table.add_row("skipped", f"{result.skipped_pairs} pairs, {result.nonfinite_steps} non-finite steps")
    table.add_row("model", result.model_path)
    out.print(table)
    err.print(f"metrics: {result.output_dir}/metrics.jsonl", highlight=False)
