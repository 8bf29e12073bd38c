"""``smpo score``: reward scores and smoothed preference labels for a pair dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli._runner import printed_as_json, run_stage
from smpo_cli.cli.options import DryRunOpt, JsonOpt, OutputDirOpt, OverridesArg, OverwriteOpt, RecipeOpt

EPILOG = (
    "Examples:\n\n"
    "  smpo score --recipe pickscore_pickapic data.path=/data/pickapic_v2\n\n"
    "  smpo score --data pairs.jsonl --reward hpsv2 -o scored/ reward.options.variant=v2.0\n\n"
    "  smpo score --recipe pickscore_pickapic data.limit=1000 --dry-run\n\n"
    "  accelerate launch --num_processes 8 -m smpo_cli score --recipe pickscore_pickapic"
)


def score(
    recipe: RecipeOpt = None,
    overrides: OverridesArg = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Pair dataset (sets data.path).", rich_help_panel="Recipe")
    ] = None,
    reward: Annotated[
        str | None,
        typer.Option("--reward", help="pickscore | hpsv2 | imagereward | aesthetic | clip (sets reward.name).",
                     rich_help_panel="Recipe"),
    ] = None,  # fmt: skip
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Score the first N rows (sets data.limit).", rich_help_panel="Recipe")
    ] = None,
    output_dir: OutputDirOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score both images of every preference pair and add the smoothed preference p.

    Reads Pick-a-Pic v2 (save_to_disk folder or parquet shards), an earlier `smpo score` output, or
    a JSONL/CSV pairs file. Writes parquet shards under OUTPUT_DIR/data with every input column plus,
    for the reward model, both images' scores, the reward winner and p; skipped.jsonl; summary.json.
    A rerun with the same settings resumes; corrupt images skip their whole pair.
    """
    from smpo_cli.scoring.runner import resume_ok, run_scoring

    sugar = {
        "data.path": data,
        "reward.name": reward,
        "data.limit": limit,
        "output_dir": str(output_dir) if output_dir else None,
    }
    result = run_stage(
        "score", recipe=recipe, overrides=overrides, sugar=sugar, dry_run=dry_run, overwrite=overwrite,
        resume=resume_ok, core=run_scoring,
    )  # fmt: skip
    if printed_as_json(result, as_json):
        return
    _print_summary(result)


def _print_summary(result) -> None:
    from rich.table import Table

    table = Table(title=f"smpo score: {result.reward['name']} ({result.reward['version']})", title_justify="left",
                  show_header=False, box=None, pad_edge=False)  # fmt: skip
    table.add_column(style="bold")
    table.add_column()
    table.add_row("rows read", str(result.rows))
    table.add_row("pairs scored", f"{result.scored}  ({result.pairs_per_second:.1f} pairs/s)")
    table.add_row("ties dropped", str(result.ties_dropped))
    skipped = sum(result.skipped.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items()))
    table.add_row("pairs skipped", f"{skipped}" + (f"  ({detail}; see skipped.jsonl)" if skipped else ""))
    table.add_row("shards", f"{result.shards} ({result.shards_resumed} resumed)")
    norm = result.normalization
    table.add_row("p from", f"{result.output}, {norm.get('mode')} r_min={norm.get('r_min'):.6g} r_max={norm.get('r_max'):.6g}")
    agree = result.agreement
    if agree.get("labelled_pairs"):
        table.add_row("agrees with humans", f"{agree['reward_agrees_with_human']:.1%} of {agree['labelled_pairs']} labelled pairs")
    p = result.p
    if p.get("count"):
        q = p["quantiles"]
        table.add_row("p", f"mean {p['mean']:.3f}, p10 {q['p10']:.3f}, median {q['p50']:.3f}, p90 {q['p90']:.3f}")
        hist = p["histogram"]
        peak = max(hist["counts"]) or 1
        for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"], strict=True):
            table.add_row("", f"[{lo:.2f}, {hi:.2f})  {'#' * round(20 * c / peak):<20} {c}")
    out.print(table)
    err.print(f"scored dataset: {result.output_dir}/data", highlight=False)
