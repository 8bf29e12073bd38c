"""``smpo invert``: ReNoise / DDIM inversion of images, or the SmPO training cache of scored pairs."""

from __future__ import annotations

from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import DryRunOpt, JsonOpt, OutputDirOpt, OverridesArg, OverwriteOpt, RecipeOpt

EPILOG = (
    "Examples:\n\n"
    "  smpo invert --data images.jsonl --model tiny-sd15 -o inverted/ inversion.levels=[999]\n\n"
    "  smpo invert --recipe renoise_sdxl_cache data.path=datasets/pickapic_v2_scored\n\n"
    "  smpo invert --recipe renoise_sdxl_cache --dry-run      # storage per pair before you start\n\n"
    "  accelerate launch --num_processes 8 -m smpo_cli invert --recipe renoise_sdxl_cache"
)


def invert(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Images+prompts file/folder, or a scored pair dataset (sets data.path).",
                     rich_help_panel="Recipe"),
    ] = None,  # fmt: skip
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model (sets model.pretrained).", rich_help_panel="Recipe")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="First N rows only (sets data.limit).", rich_help_panel="Recipe")
    ] = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Invert images with ReNoise (or DDIM) and reconstruct them, or cache the inversions of scored pairs.

    Images (JSONL/CSV with image and prompt columns, or a folder with metadata.jsonl): writes
    noise/<id>.safetensors, reconstruction/<id>.png and results.jsonl with reconstruction PSNR and
    latent error. Scored pairs (the output of `smpo score`): writes cache/part-*.safetensors with both
    images' latents and their inversions at every inversion.levels entry, for `smpo train` with
    inversion.source=cache. Resumable, and split across processes under accelerate.
    """
    from smpo_cli.inversion.runner import resume_ok, run_inversion

    sugar = {
        "data.path": data,
        "model.pretrained": model,
        "data.limit": limit,
        "output_dir": str(output_dir) if output_dir else None,
    }
    result = run_stage(
        "invert", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run, overwrite=overwrite,
        resume=resume_ok, core=run_inversion,
    )  # fmt: skip
    if printed_as_json(result, as_json):
        return
    from rich.table import Table

    table = Table(title=f"smpo invert ({result.layout})", title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    unit = "pairs" if result.layout == "pairs" else "images"
    table.add_row(f"{unit} inverted", f"{result.inverted} of {result.rows}  ({result.images_per_second:.2f} images/s)")
    skipped = sum(result.skipped.values())
    table.add_row("skipped", str(skipped) + (f"  ({result.skipped}; see skipped.jsonl)" if skipped else ""))
    table.add_row("levels", ", ".join(map(str, result.levels)))
    table.add_row("model evaluations per image", f"{result.unet_calls_per_image:g}")
    if result.storage_bytes_per_pair:
        table.add_row("storage per pair", f"{result.storage_bytes_per_pair / 1024:.1f} KiB")
    rec = result.reconstruction
    if rec:
        table.add_row("reconstruction PSNR", f"{rec['psnr_db_mean']:.2f} dB mean, {rec['psnr_db_min']:.2f} dB min "
                      f"(VAE alone: {rec['vae_psnr_db_mean']:.2f} dB)")  # fmt: skip
        table.add_row("latent MSE", f"{rec['latent_mse_mean']:.3g}")
    out.print(table)
    if rec and rec.get("per_image"):
        per = Table(title="per image", title_justify="left")
        for col in ("id", "PSNR dB", "VAE PSNR dB", "latent MSE", "noise std"):
            per.add_column(col)
        for r in rec["per_image"][:20]:
            per.add_row(r["id"], f"{r['psnr_db']:.2f}", f"{r['vae_psnr_db']:.2f}", f"{r['latent_mse']:.3g}", f"{r['noise_std']:.3f}")
        out.print(per)
    err.print(f"output: {result.output_dir}", highlight=False)
