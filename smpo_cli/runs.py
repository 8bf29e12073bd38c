"""Run one stage into its output folder: what every stage command (and ``smpo quickstart``) shares.

Prepare the folder (refuse a non-empty one unless overwriting or resuming), write
``recipe.resolved.yaml`` and ``run.json``, call the core ``run_<stage>(recipe)``, record the exit
status. Under accelerate/torchrun only the main process owns the folder; the others wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smpo_cli.config import LoadedRecipe, dump_recipe
from smpo_cli.utils.distributed import barrier, is_main_process
from smpo_cli.utils.rundir import RunDir


def execute(
    stage: str,
    loaded: LoadedRecipe,
    core: Callable[[Any], Any],
    *,
    overwrite: bool = False,
    resume: Callable[[Any], bool] = lambda recipe: False,
) -> Any:
    main = is_main_process()
    rundir = RunDir(loaded.recipe.output_dir)
    if main:
        if rundir.holds_no_results():  # a run that failed on bad input: the corrected rerun starts afresh here
            rundir.clear()
        resuming = not overwrite and resume(loaded.recipe)
        rundir.prepare(overwrite=overwrite, resume=resuming)
        if resuming:
            rundir.remove_temporaries()
        rundir.write_recipe(dump_recipe(loaded.recipe))
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
            try:
                rundir.finish("failed", error=f"{type(exc).__name__}: {exc}")
            except OSError:  # a full disk: run.json may not be writable either; the error still surfaces
                pass
        raise
    if main:
        rundir.finish("success", result=result.to_dict() if hasattr(result, "to_dict") else None)
    return result


def execute_nested(stage: str, data: dict[str, Any], core: Callable[[Any], Any], resume: Callable[[Any], bool],
                   caller: str) -> Any:  # fmt: skip
    """Run another stage from inside one (``smpo pairs`` generating, the shapes testbed's stages) from a recipe dict.

    The nested stage gets its own run folder (``recipe.resolved.yaml``, ``run.json``) and resumes it when ``resume``
    says the settings match, so an interrupted outer stage redoes only what is missing.
    """
    from smpo_cli.config.loader import validate

    source = f"({caller}: {stage})"
    recipe = validate(data, stage, source=source)
    return execute(stage, LoadedRecipe(recipe, source), core, resume=resume)
