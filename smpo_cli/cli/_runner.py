"""The driver every stage command shares.

resolve recipe -> validate -> ``--dry-run``: print resolved recipe (stdout) + plan (stderr)
-> otherwise ``smpo_cli.runs.execute``: prepare the output folder, write recipe.resolved.yaml and
run.json, call the core ``run_<stage>(recipe)``, record the exit status in run.json.
"""

from __future__ import annotations

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

    loaded = load_recipe(recipe, stage, overrides, sugar)
    for note in loaded.warnings:
        err.print(f"[yellow]warning:[/] {note}", markup=True)
    if dry_run:
        out.print(dump_recipe(loaded.recipe), end="", markup=False, highlight=False)
        print_plan(plan_lines(loaded.recipe))
        return None
    from smpo_cli.runs import execute
    from smpo_cli.utils.distributed import is_main_process

    result = execute(stage, loaded, core, overwrite=overwrite, resume=resume)
    return result if is_main_process() else None  # under accelerate the main process reports


def printed_as_json(result: Any, as_json: bool) -> bool:
    """Nothing to show (dry run, non-main rank), or ``--json`` printed: the command is done."""
    if result is None:
        return True
    if as_json:
        import json

        out.print_json(json.dumps(result.to_dict()))
        return True
    return False
