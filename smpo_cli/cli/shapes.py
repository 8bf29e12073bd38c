"""``smpo shapes``: the shapes testbed, a tiny world with known preferences (base model, experiment)."""

from __future__ import annotations

import typer

from smpo_cli.cli._console import out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import DryRunOpt, JsonOpt, OutputDirOpt, OverridesArg, OverwriteOpt, RecipeOpt

app = typer.Typer(
    help="The shapes testbed: a world of coloured shapes whose true preferences are known, small enough for a CPU.",
    no_args_is_help=True,
    epilog="Examples:\n\n  smpo shapes pretrain --recipe shapes_base_cpu      # the base model, ~25 min on 2 CPU cores\n\n"
    "  smpo shapes reward --recipe shapes_pickscore_cpu  # the world's PickScore, trained on votes\n\n"
    "  smpo shapes run                                   # SmPO vs DPO, 3 seeds, ~37 min on 2 CPU cores",
)


@app.command(
    "pretrain",
    epilog="Examples:\n\n  smpo shapes pretrain --recipe shapes_base_cpu -o runs/shapes/base\n\n"
    "  smpo shapes pretrain --recipe shapes_base_cpu unet.steps=500 vae.steps=200 --dry-run",
)
def pretrain(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the shapes world's base model (VAE, CLIP text encoder, UNet in the SD1.5 layout) from scratch.

    Writes tokenizer/, pipeline/ (a diffusers StableDiffusionPipeline, EMA weights) and summary.json.
    """
    from smpo_cli.shapes.base_model import run_pretrain

    sugar = {"output_dir": str(output_dir) if output_dir else None}
    result = run_stage("shapes_pretrain", recipe=recipe or "shapes_base_cpu", overrides=overrides, sugar=sugar,
                       dry_run=dry_run, overwrite=overwrite, core=run_pretrain)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    out.print(f"pipeline: {result.pipeline_dir}  (VAE mse {result.vae_mse}, final loss {result.final_loss}, "
              f"{result.seconds:.0f} s)", highlight=False)  # fmt: skip


@app.command(
    "reward",
    epilog="Examples:\n\n  smpo shapes reward --recipe shapes_pickscore_cpu -o runs/shapes/reward\n\n"
    "  smpo shapes reward --recipe shapes_pickscore_cpu contrastive.steps=200 votes.steps=100 --dry-run",
)
def reward(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train shapes-pickscore: a PickScore-architecture CLIP, pretrained on renders, fine-tuned on annotator votes.

    Samples pairs from the recipe's models, lets simulated annotators vote, trains, and reports held-out
    vote accuracy next to the judge's and the population's. Writes reward/ (load with
    reward.name=pickscore reward.path=<run>/reward) and summary.json.
    """
    from smpo_cli.shapes.reward_run import resume_ok, run_shapes_reward

    sugar = {"output_dir": str(output_dir) if output_dir else None}
    result = run_stage("shapes_reward", recipe=recipe or "shapes_pickscore_cpu", overrides=overrides, sugar=sugar,
                       dry_run=dry_run, overwrite=overwrite, resume=resume_ok, core=run_shapes_reward)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    acc = result.vote_accuracy
    out.print(f"held-out votes ({acc['pairs']} pairs) predicted by: "
              + ", ".join(f"{k} {100 * acc[k]['accuracy']:.1f}% [{100 * acc[k]['ci95'][0]:.1f}, "
                          f"{100 * acc[k]['ci95'][1]:.1f}]" for k in ("reward", "judge", "population")),
              highlight=False)  # fmt: skip
    out.print(f"reward: {result.reward_dir}  ({result.seconds:.0f} s)", highlight=False)


EPILOG_RUN = (
    "Examples:\n\n  smpo shapes run   (recipe shapes_alignment_cpu: SmPO vs DPO with the learned reward, paired intervals)\n\n"
    "  smpo shapes run --recipe shapes_experiment_cpu -o runs/shapes/experiment   (the ablations on shapes-sd15)\n\n"
    "  smpo bench shapes --recipe shapes_experiment_cpu train.seeds=[0] pairs.count=256   (a quick look)\n\n"
    "  smpo shapes run --recipe shapes_experiment_cpu pairs.reward_noise_std=0.1   (an imperfect reward model)"
)


def run_experiment(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """SmPO vs Diffusion-DPO (and ablations) on the same pairs and budget, several seeds, with error bars.

    Samples pairs from the base model (best vs worst by pairs.reward), adds simulated annotators' votes, trains
    every arm with smpo train (workers at a time), evaluates with the exact judge, and writes
    results.json, results.md, curves.png, over_optimisation.png and grid.png. A rerun resumes.
    """
    from smpo_cli.shapes.experiment import resume_ok, run_shapes_bench

    sugar = {"output_dir": str(output_dir) if output_dir else None}
    result = run_stage("shapes_bench", recipe=recipe or "shapes_alignment_cpu", overrides=overrides, sugar=sugar,
                       dry_run=dry_run, overwrite=overwrite, resume=resume_ok, core=run_shapes_bench)  # fmt: skip
    if printed_as_json(result, as_json):
        return
    from pathlib import Path

    out.print((Path(result.output_dir) / "results.md").read_text(), markup=False, highlight=False)


app.command("run", epilog=EPILOG_RUN)(run_experiment)
