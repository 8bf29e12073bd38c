"""The driver every stage command shares.

resolve recipe -> validate -> ``--dry-run``: print resolved recipe (stdout) + plan (stderr)
-> otherwise ``smpo_cli.runs.execute``: prepare the output folder, write recipe.resolved.yaml and
run.json, call the core ``run_<stage>(recipe)``, record the exit status in run.json.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from smpo_cli.cli._console import err, out


def print_plan(lines: list[tuple[str, str]]) -> None:
    err.print("[bold]plan[/]", markup=True)
    for level, text in lines:
        mark = "[yellow]![/]" if level == "warn" else "[green]-[/]"
        err.print(f" {mark} {text}", markup=True, highlight=False)


def run_stage(
    stage: str,
    *,
    recipe: str | None,
    overrides: list[str] | None,
    sugar: dict[str, Any] | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: Callable[[Any], bool] = lambda recipe: False,
    core: Callable[[Any], Any],
) -> Any:
    """Run one stage; ``core`` is imported lazily by the caller so --help never loads torch."""
    from smpo_cli.config import dump_recipe, load_recipe
    from smpo_cli.config.plan import plan_lines
    from smpo_cli.errors import RecipeError

    try:
        loaded = load_recipe(recipe, stage, overrides, sugar)
    except RecipeError as exc:
        if recipe is None and any(p.endswith(MISSING) for p in exc.problems) and exc.hint is None:
            exc.hint = "no --recipe given: `smpo recipe ls` lists the bundled ones"
        exc.problems = [_with_flag(p) for p in exc.problems]
        raise
    for note in loaded.warnings:
        err.print(f"[yellow]warning:[/] {note}", markup=True)
    if dry_run:
        out.print(dump_recipe(loaded.recipe), end="", markup=False, highlight=False)
        print_plan(plan_lines(loaded.recipe))
        return None
    from smpo_cli.runs import execute
    from smpo_cli.utils.distributed import is_main_process

    # stdout holds results only; what a library prints while the stage runs (DeepSpeed logs to stdout) goes to
    # stderr, and so does a logging handler a library creates meanwhile on sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = execute(stage, loaded, core, overwrite=overwrite, resume=resume)
    return result if is_main_process() else None  # under accelerate the main process reports


MISSING = "required key is missing"


def _with_flag(problem: str) -> str:
    """``prompts: required key is missing`` -> ``...; set it with --prompts/-p (sets prompts.path)``.

    The flags come from the running command's options whose help says ``(sets KEY)``."""
    import re

    from typer._click.globals import get_current_context  # typer 0.29 vendors click

    key, _, what = problem.partition(": ")
    ctx = get_current_context(silent=True)
    if what != MISSING or ctx is None:
        return problem
    flags = []
    for param in ctx.command.params:
        found = re.search(r"\(sets ([\w.]+)", getattr(param, "help", None) or "")
        if found and found.group(1) in (key, f"{key}.path", f"{key}.pretrained", f"{key}.name"):
            flags.append(f"{'/'.join(param.opts)} (sets {found.group(1)})")
    return f"{problem}; set it with {' or '.join(flags)}" if flags else problem


def printed_as_json(result: Any, as_json: bool) -> bool:
    """Nothing to show (dry run, non-main rank), or ``--json`` printed: the command is done."""
    if result is None:
        return True
    if as_json:
        import json

        out.print_json(json.dumps(result.to_dict()))
        return True
    return False
