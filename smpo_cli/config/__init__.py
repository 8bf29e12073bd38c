"""Recipes: ``load_recipe(name_or_path, stage, overrides)`` -> validated, frozen recipe."""

from smpo_cli.config.loader import (
    LoadedRecipe,
    bundled_recipes,
    dump_recipe,
    find_bundled,
    load_recipe,
    resolve_recipe_path,
)
from smpo_cli.config.schema import STAGE_SCHEMAS

__all__ = [
    "STAGE_SCHEMAS",
    "LoadedRecipe",
    "bundled_recipes",
    "dump_recipe",
    "find_bundled",
    "load_recipe",
    "resolve_recipe_path",
]
