"""The driver every stage command shares.

resolve recipe -> validate -> ``--dry-run``: print resolved recipe (stdout) + plan (stderr)
-> otherwise: prepare the output folder, write recipe.resolved.yaml and run.json, call the core
``run_<stage>(recipe)``, record the exit status in run.json.
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
    from smpo_cli.utils.distributed import barrier, is_main_process
    from smpo_cli.utils.rundir import RunDir

    loaded = load_recipe(recipe, stage, overrides, sugar)
    for note in loaded.warnings:
        err.print(f"[yellow]warning:[/] {note}", markup=True)
    resolved = dump_recipe(loaded.recipe)
    if dry_run:
        out.print(resolved, end="", markup=False, highlight=False)
        print_plan(plan_lines(loaded.recipe))
        return None
    # Under accelerate/torchrun only the main process owns the run folder; the others wait until
    # it is ready (an --overwrite may be emptying it) and then run the same core function.
    main = is_main_process()
    rundir = RunDir(loaded.recipe.output_dir)
    if main:
        rundir.prepare(overwrite=overwrite, resume=not overwrite and resume(loaded.recipe))
        rundir.write_recipe(resolved)
        rundir.start(stage=stage, recipe_source=loaded.source)
    barrier()
    try:
        result = core(loaded.recipe)
    except KeyboardInterrupt:
        if main:
            rundir.finish("interrupted")
        raise
    except BaseException as exc:
        if main:
            rundir.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if main:
        summary = result.to_dict() if hasattr(result, "to_dict") else None
        rundir.finish("success", result=summary)
    return result
