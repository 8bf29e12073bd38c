"""``smpo selftest``: check an installation end to end on the embedded tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli.options import DeviceOpt, JsonOpt

EPILOG = (
    "Examples:\n\n  smpo selftest\n\n  smpo selftest --family sdxl --steps 4 -o /tmp/selftest\n\n"
    "  smpo selftest --json"
)


def selftest(
    family: Annotated[
        list[str] | None, typer.Option("--family", "-f", help="sd15 and/or sdxl (default: both).")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps per image.")] = 2,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where the images and run.json go.")
    ] = Path("runs/selftest"),
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Build the tiny SD1.5- and SDXL-shaped models, load them through the real loader, and sample.

    Reads nothing and needs no network: the tiny models are built from configs, saved in the real
    diffusers format under the smpo cache ($SMPO_CACHE, default ~/.cache/smpo) and loaded back.
    Writes one PNG per family, recipe-free run.json, into the output folder (an earlier selftest
    there is replaced).
    """
    from smpo_cli.errors import UsageError
    from smpo_cli.selftest import FAMILIES, run_selftest
    from smpo_cli.utils.rundir import RunDir

    families = tuple(family or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UsageError(f"unknown family {unknown[0]!r}", hint="choose from: " + ", ".join(FAMILIES))
    rundir = RunDir(output_dir)
    rundir.prepare(overwrite=True)
    rundir.start(stage="selftest", recipe_source="(none)")
    try:
        result = run_selftest(output_dir, families=families, steps=steps, device=device)
    except BaseException as exc:
        rundir.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    rundir.finish("success", result=result.to_dict())
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"smpo selftest ({result.device}, {steps} steps)", title_justify="left")
    for col in ("model", "UNet params", "load s", "sample s", "deterministic", "image"):
        table.add_column(col)
    for row in result.rows:
        table.add_row(
            row.model,
            f"{row.unet_params / 1e6:.2f}M",
            f"{row.load_seconds:.2f}",
            f"{row.generate_seconds:.2f}",
            "yes" if row.deterministic else "[red]NO[/]",
            row.image,
        )
    out.print(table)
    if not all(r.deterministic for r in result.rows):
        from smpo_cli.errors import SmpoError

        raise SmpoError("the same seed gave different images", hint="report this with `smpo env`")
    err.print(f"run folder: {output_dir}", highlight=False)
