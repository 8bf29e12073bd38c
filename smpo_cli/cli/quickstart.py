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
    for col in ("method", "steps", "loss", "acc", "mean p", "UNet/step", "train s", "win % vs base", "judge ok (base)"):
        table.add_column(col, no_wrap=True)
    for r in result.runs:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        table.add_row(r["method"], str(r["steps"]), fmt(r["final_loss"], ".4f"), fmt(r["implicit_acc"], ".2f"),
                      fmt(r["mean_p"], ".3f"), fmt(r["unet_calls_per_step"], "g"), fmt(r["seconds"], ".1f"),
                      fmt(r["pickscore_win_rate_vs_base"], ".1f"),
                      f"{r['judge_accuracy']:.0%} ({r['base_judge_accuracy']:.0%})")  # fmt: skip
    out.print(table)
    for r in result.runs:
        out.print(f"{r['method']}: model {r['model']}, report {r['report']}", highlight=False)
    err.print(f"all outputs: {result.output_dir}", highlight=False)
