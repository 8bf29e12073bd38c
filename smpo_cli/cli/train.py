"""``smpo train``: SmPO, Diffusion-DPO and SFT training on accelerate."""

from __future__ import annotations

from pathlib import Path
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

GpuMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--gpu-memory", metavar="GIB", show_default=False,
        help="Memory budget per GPU in GiB: the plan warns when the estimate exceeds it and names what to change "
        "(with --dry-run; a real run warns before it starts).",
        rich_help_panel="Run control",
    ),
]  # fmt: skip
AccelerateConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--accelerate-config", metavar="PATH", show_default=False,
        help="accelerate config file the memory plan reads the process count and sharding from (DDP, FSDP or DeepSpeed ZeRO); default "
        "$ACCELERATE_CONFIG_FILE, else one process.",
        rich_help_panel="Run control",
    ),
]  # fmt: skip

EPILOG = (
    "Examples:\n\n"
    "  smpo train --recipe sdxl.yaml                                  # the bundled SDXL SmPO recipe\n\n"
    "  smpo train --recipe sd15_smpo train.max_steps=50 -o runs/try1\n\n"
    "  smpo train --recipe sdxl_smpo --dry-run --gpu-memory 80   # memory plan per GPU, warns over 80 GiB\n\n"
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
    gpu_memory: GpuMemoryOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
) -> None:
    """Train a UNet with SmPO, Diffusion-DPO or SFT on scored preference pairs.

    Reads a scored dataset (`smpo score` output) and, with inversion.source=cache, an `smpo invert`
    cache. Writes checkpoints/ (every train.checkpoint_every_steps; train.resume=auto continues a killed
    run), metrics.jsonl (one line per step), and the final model: pipeline/ (a diffusers pipeline) or,
    with train.lora_rank, lora/ (diffusers LoRA weights for pipeline.load_lora_weights).

    --dry-run also prints a memory plan per GPU (parameter counts, weights, gradients, optimiser state,
    reference, activations with and without gradient checkpointing), loading no weight.
    """
    from smpo_cli.errors import UsageError
    from smpo_cli.training.memory import MemoryRequest, requested
    from smpo_cli.training.runner import run_training

    if gpu_memory is not None and not gpu_memory > 0:
        raise UsageError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory:g}")
    request = MemoryRequest(gpu_memory, str(accelerate_config) if accelerate_config else None)
    core = run_training
    if gpu_memory is not None and not dry_run:

        def core(r):
            _warn_over_budget(r, request)
            return run_training(r)

    sugar = {"output_dir": str(output_dir) if output_dir else None, "seed": seed}
    with requested(request):  # plan_lines adds the memory plan to the dry run's plan
        result = run_stage(
            "train", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run, overwrite=overwrite,
            resume=lambda r: r.train.resume is not None, core=core,
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


def _warn_over_budget(recipe, request) -> None:
    """Before a real run with --gpu-memory: the estimate, and a warning when it exceeds the budget."""
    from smpo_cli.training import memory as memory_plan
    from smpo_cli.utils.distributed import is_main_process

    if not is_main_process():
        return
    plan = memory_plan.plan_memory(recipe, accelerate_config=request.accelerate_config)
    for level, text in memory_plan.plan_lines(plan, request.gpu_memory_gib):
        if level == "warn":
            err.print(f"[yellow]warning:[/] {text}", markup=True, highlight=False)
