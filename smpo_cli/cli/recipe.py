"""``smpo recipe ls | show | validate | cp``: browse, check and copy recipes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from smpo_cli.cli._console import err, out
from smpo_cli.cli.options import OverridesArg
from smpo_cli.errors import RecipeError, UsageError

app = typer.Typer(
    help="List, show, validate and copy recipes (bundled or your own).",
    no_args_is_help=True,
    epilog="Examples:\n\n  smpo recipe ls\n\n  smpo recipe show sdxl_smpo\n\n"
    "  smpo recipe validate my.yaml train.max_steps=10\n\n  smpo recipe cp sdxl_smpo my_sdxl.yaml",
)


@app.command("ls", epilog="Example:\n\n  smpo recipe ls --stage train")
def ls(
    stage: Annotated[str | None, typer.Option("--stage", help="Only recipes of this stage.")] = None,
) -> None:
    """List the bundled recipes with their stage and purpose."""
    from rich.table import Table

    from smpo_cli.config import bundled_recipes

    table = Table(box=None, pad_edge=False)
    table.add_column("name", style="bold")
    table.add_column("stage")
    table.add_column("what it does")
    for rec in bundled_recipes():
        if stage is None or rec.stage == stage:
            table.add_row(rec.name, rec.stage, rec.summary)
    out.print(table)


@app.command("show", epilog="Examples:\n\n  smpo recipe show sd15_smpo\n\n  smpo recipe show sd15_smpo --resolved")
def show(
    name: Annotated[str, typer.Argument(help="Bundled recipe name or a recipe file.")],
    resolved: Annotated[
        bool, typer.Option("--resolved", help="Print with every default filled in instead of the file.")
    ] = False,
) -> None:
    """Print a recipe: the file with its comments, or (--resolved) every key with its value."""
    from smpo_cli.config import dump_recipe, load_recipe, resolve_recipe_path
    from smpo_cli.config.loader import read_yaml

    path = resolve_recipe_path(name)
    if not resolved:
        out.print(path.read_text(encoding="utf-8"), end="", markup=False, highlight=False)
        return
    stage = read_yaml(path).get("stage")
    out.print(dump_recipe(load_recipe(str(path), str(stage)).recipe), end="", markup=False, highlight=False)


@app.command(
    "validate",
    epilog="Examples:\n\n  smpo recipe validate recipes/train/sdxl_smpo.yaml\n\n"
    "  smpo recipe validate sdxl_smpo train.max_steps=10 --quiet",
)
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file or bundled name.")],
    overrides: OverridesArg = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Validate a recipe (and overrides) against its stage schema without loading anything.

    Exit code 0 when valid, 2 with every problem listed when not. The plan printed on stderr flags
    inputs that do not exist yet.
    """
    from smpo_cli.cli._runner import print_plan
    from smpo_cli.config import load_recipe, resolve_recipe_path
    from smpo_cli.config.loader import read_yaml
    from smpo_cli.config.plan import plan_lines
    from smpo_cli.config.schema import STAGE_SCHEMAS

    path = resolve_recipe_path(recipe)
    stage = read_yaml(path).get("stage")
    if stage not in STAGE_SCHEMAS:
        raise RecipeError(
            f"{path}: 'stage: {stage}' is not a known stage",
            hint="stages with recipes: " + ", ".join(STAGE_SCHEMAS),
        )
    loaded = load_recipe(str(path), stage, overrides)
    if not quiet:
        out.print(f"ok: {path} is a valid {stage} recipe", highlight=False)
        print_plan(plan_lines(loaded.recipe))


@app.command("cp", epilog="Examples:\n\n  smpo recipe cp sdxl_smpo my_sdxl.yaml\n\n  smpo recipe cp sd15_smpo configs/")
def cp(
    name: Annotated[str, typer.Argument(help="Bundled recipe name.")],
    dest: Annotated[str, typer.Argument(help="Destination file, or a folder (existing, or ending in /).")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a bundled recipe (with its comments) to edit it."""
    from smpo_cli.config import find_bundled

    found = find_bundled(name)
    if found is None:
        from smpo_cli.config import bundled_recipes

        raise RecipeError(
            f"no bundled recipe named {name!r}", hint="bundled: " + ", ".join(r.name for r in bundled_recipes())
        )
    dest_path = Path(dest)
    target = dest_path / f"{found.name}.yaml" if dest_path.is_dir() or dest.endswith(("/", "\\")) else dest_path
    if target.exists() and not force:
        raise UsageError(f"{target} exists", hint="pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found.path, target)
    err.print(f"copied {found.name} -> {target}", highlight=False)
    out.print(str(target), highlight=False)
