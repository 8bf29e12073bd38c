"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe", "-r",
        help="Recipe file, or a bundled recipe name (see `smpo recipe ls`).",
        rich_help_panel="Recipe",
    ),
]  # fmt: skip
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="KEY=VALUE",
        help="Recipe overrides: a.b=value (YAML-typed), a.b=null, ~a.b (back to the default).",
        show_default=False,
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Validate and print the resolved recipe and the plan; load nothing, write nothing.",
        rich_help_panel="Run control",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an earlier run in a non-empty output folder.", rich_help_panel="Output"
    ),
]
OutputDirOpt = Annotated[
    Path | None,
    typer.Option("--output-dir", "-o", help="Output folder (sets output_dir).", rich_help_panel="Output"),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Random seed (sets seed).", rich_help_panel="Run control")
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.", rich_help_panel="Run control"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
