"""``smpo bench``: benchmarks of trained models (reward models on prompt sets; GenEval)."""

from __future__ import annotations

from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import DryRunOpt, JsonOpt, OutputDirOpt, OverridesArg, OverwriteOpt, RecipeOpt
from smpo_cli.cli.shapes import EPILOG_RUN, run_experiment

app = typer.Typer(
    help="Benchmark a model (and a baseline) on prompt sets.",
    no_args_is_help=True,
    epilog="Examples:\n\n  smpo bench rewards --model runs/sdxl-smpo/pipeline --baseline stabilityai/stable-diffusion-xl-base-1.0 "
    "--prompts PartiPrompts.tsv -o bench/parti\n\n"
    "  smpo bench geneval --model runs/sdxl-smpo/pipeline --metadata geneval/prompts/evaluation_metadata.jsonl -o bench/geneval",
)


@app.command(
    "rewards",
    epilog="Examples:\n\n"
    "  smpo bench rewards --model runs/sdxl-smpo/pipeline --baseline stabilityai/stable-diffusion-xl-base-1.0 "
    "--prompts hpdv2/ -o bench/hpdv2\n\n"
    "  smpo bench rewards --model tiny-sd15 --prompts p.txt -o /tmp/b rewards=[{name: aesthetic, path: tiny}] --dry-run",
)
def rewards(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model (sets model.pretrained).", rich_help_panel="Recipe")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", "-b", help="Baseline (sets baseline.pretrained).", rich_help_panel="Recipe")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", "-p", help="Prompt set (sets prompts.path).", rich_help_panel="Recipe")] = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate (or reuse) images of a model and a baseline on a prompt set and score them with reward models.

    Writes model_images/ and baseline_images/ (smpo generate, same seed per prompt and sample),
    scores.jsonl, results.json (means with 95% intervals; win rates in percent), results.md,
    chart.png and a self-contained report.html with side-by-side samples.
    """
    from smpo_cli.benchmark.runner import run_benchmark

    sugar = {"model.pretrained": model, "baseline.pretrained": baseline, "prompts.path": prompts,
             "output_dir": str(output_dir) if output_dir else None}  # fmt: skip
    result = run_stage("bench", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run,
                       overwrite=overwrite, resume=lambda r: True, core=run_benchmark)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    from pathlib import Path

    out.print((Path(result.output_dir) / "results.md").read_text(), markup=False, highlight=False)
    err.print(f"report: {result.output_dir}/report.html", highlight=False)



@app.command(
    "geneval",
    epilog="Examples:\n\n"
    "  smpo bench geneval --model runs/sdxl-smpo/pipeline --metadata geneval/prompts/evaluation_metadata.jsonl -o bench/geneval\n\n"
    "  smpo bench geneval --images outputs/geneval_sdxl -o bench/geneval-sdxl   (an existing GenEval image folder)\n\n"
    "  smpo bench geneval --images imgs/ -o /tmp/g detector.backend=mmdet detector.path=mask2former_swin-s.pth",
)
def geneval(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Generate with this model (sets model.pretrained).", rich_help_panel="Recipe")] = None,
    metadata: Annotated[str | None, typer.Option("--metadata", help="GenEval's evaluation_metadata.jsonl, a path or hf://datasets/... (sets metadata).", rich_help_panel="Recipe")] = None,
    images: Annotated[str | None, typer.Option("--images", help="Evaluate an existing GenEval image folder (sets images).", rich_help_panel="Recipe")] = None,
    detector: Annotated[str | None, typer.Option("--detector", help="Detector weights: folder, hub id, .pth (mmdet) or tiny (sets detector.path).", rich_help_panel="Recipe")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="The first N prompts only (sets limit; not a GenEval score).", rich_help_panel="Recipe")] = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """GenEval (object, counting, colour and position skills): generate 553 prompts x 4 images, or judge a folder.

    Writes images/ (when generating), results.jsonl (one line per image, like the official evaluator),
    results.json, results.md (the paper's per-task table) and failures.html (failed images per task with
    their detections drawn). A rerun with the same settings resumes.
    """
    from smpo_cli.benchmark.geneval import resume_ok, run_geneval

    sugar = {"model.pretrained": model, "metadata": metadata, "images": images, "detector.path": detector,
             "limit": limit, "output_dir": str(output_dir) if output_dir else None}  # fmt: skip
    result = run_stage("geneval", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run,
                       overwrite=overwrite, resume=resume_ok, core=run_geneval)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    from pathlib import Path

    out.print((Path(result.output_dir) / "results.md").read_text(), markup=False, highlight=False)
    err.print(f"failures: {result.output_dir}/failures.html", highlight=False)


# the shapes experiment lives in `smpo shapes run`; `smpo bench shapes` is the same command
app.command("shapes", epilog=EPILOG_RUN)(run_experiment)
