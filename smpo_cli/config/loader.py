"""Resolve, load, migrate, override and validate recipes: the one path every stage shares.

1. ``--recipe`` is an existing file, else a bundled recipe name (``sdxl_smpo``, ``sdxl_smpo.yaml``,
   ``train/sdxl_smpo``) or a stage alias (``smpo train --recipe sdxl.yaml`` -> ``sdxl_smpo``).
2. YAML is read with ``safe_load``; its ``stage:`` must match the command.
3. Renamed keys are migrated with a FutureWarning.
4. ``KEY=VALUE`` overrides, then sugar flags (``--output-dir``...), are applied; unknown keys are
   reported with a did-you-mean.
5. pydantic validates; every problem is reported at once with its dotted path.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from smpo_cli.config.overrides import (
    Override,
    apply_overrides,
    check_override_keys,
    parse_overrides,
    unknown_key_problems,
)
from smpo_cli.config.schema import SCHEMA_VERSION, STAGE_SCHEMAS
from smpo_cli.errors import RecipeError
from smpo_cli.utils.logging import deprecated

# ``smpo <stage> --recipe ALIAS``: short names that pick the bundled SmPO recipe of a stage.
RECIPE_ALIASES: dict[str, dict[str, str]] = {
    "train": {"sdxl": "sdxl_smpo", "sd15": "sd15_smpo"},
}

# Renamed recipe keys: old dotted key -> (new dotted key, version that drops the old one).
RENAMED_KEYS: dict[str, tuple[str, str]] = {}


@dataclass(frozen=True)
class BundledRecipe:
    name: str
    stage: str
    path: Path
    summary: str


@dataclass
class LoadedRecipe:
    """A validated recipe plus where it came from (for run.json and the dry-run plan)."""

    recipe: BaseModel
    source: str
    overrides: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- bundled recipes
def bundled_recipes_dir() -> Path:
    """The bundled recipes: ``smpo_cli/_recipes`` in a wheel, ``recipes/`` in a source checkout."""
    packaged = importlib.resources.files("smpo_cli") / "_recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    return checkout


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""


# folders of bundled files that are not smpo recipes (accelerate launch configs)
NOT_RECIPES = ("accelerate",)


def bundled_recipes() -> list[BundledRecipe]:
    root = bundled_recipes_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        if path.relative_to(root).parts[0] in NOT_RECIPES:
            continue
        stage = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else ""
        found.append(BundledRecipe(path.stem, stage, path, _summary(path)))
    return found


def find_bundled(name: str, stage: str | None = None) -> BundledRecipe | None:
    stem = name[:-5] if name.endswith((".yaml", ".yml")) else name
    stem = stem[:-1] if stem.endswith(".") else stem
    stem = stem.replace("\\", "/")
    candidates = bundled_recipes()
    for rec in candidates:
        if stem in (rec.name, f"{rec.stage}/{rec.name}"):
            return rec
    stages = [stage] if stage is not None else list(RECIPE_ALIASES)
    aliases = {RECIPE_ALIASES.get(s, {}).get(stem) for s in stages} - {None}
    if len(aliases) == 1:  # without a stage an alias counts only when it is unambiguous
        target = aliases.pop()
        return next((r for r in candidates if r.name == target), None)
    return None


def resolve_recipe_path(name_or_path: str, stage: str | None = None) -> Path:
    """An existing file wins; otherwise a bundled recipe; otherwise a RecipeError listing them."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    found = find_bundled(name_or_path, stage)
    if found is not None:
        return found.path
    names = [r.name for r in bundled_recipes() if stage is None or r.stage == stage]
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        message = f"recipe {name_or_path!r} not found: no such file and no bundled recipe of that name"
    else:
        message = f"no bundled recipe named {name_or_path!r}"
    raise RecipeError(
        message,
        hint=("bundled recipes" + (f" for '{stage}'" if stage else "") + ": " + ", ".join(names))
        if names
        else "see `smpo recipe ls`",
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys, not a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- migration
def migrate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map renamed keys to their new names; return the data and one warning per renamed key."""
    notes = []
    for old, (new, removal) in RENAMED_KEYS.items():
        old_parts = old.split(".")
        node = data
        for part in old_parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and old_parts[-1] in node:
            value = node.pop(old_parts[-1])
            data = apply_overrides(data, [Override(new, value, f"{new}=...")])
            msg = f"recipe key {old} was renamed to {new}; the old name stops working in smpo {removal}"
            deprecated(msg)
            notes.append(msg)
    if data.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise RecipeError(
            f"recipe schema_version {data['schema_version']} is newer than this smpo understands "
            f"({SCHEMA_VERSION})",
            hint="upgrade smpo",
        )
    return data, notes


# ----------------------------------------------------------------------------- validation
def _format_loc(loc: tuple[Any, ...]) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith(("function-after", "function-before")) or "[" in str(item):
            continue  # pydantic's internal validator names
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        if err["type"] == "extra_forbidden":
            continue  # reported with suggestions by unknown_key_problems
        loc = _format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required key is missing"
        problems.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return problems


def validate(data: dict[str, Any], stage: str, source: str = "recipe") -> BaseModel:
    schema = STAGE_SCHEMAS[stage]
    problems = unknown_key_problems(data, schema)
    try:
        recipe = schema.model_validate(data)
    except ValidationError as exc:
        problems.extend(validation_problems(exc))
        recipe = None
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s) in the {stage} recipe:", problems)
    assert recipe is not None
    return recipe


def load_recipe(
    recipe: str | None,
    stage: str,
    overrides: list[str] | None = None,
    sugar: dict[str, Any] | None = None,
) -> LoadedRecipe:
    """Resolve, read, migrate, override and validate a recipe for ``stage``."""
    if stage not in STAGE_SCHEMAS:
        raise RecipeError(f"unknown stage {stage!r}", hint="stages: " + ", ".join(STAGE_SCHEMAS))
    tokens = list(overrides or [])
    parsed = parse_overrides(tokens)
    schema = STAGE_SCHEMAS[stage]
    if recipe is None:
        data: dict[str, Any] = {"stage": stage}
        source = "(no recipe: defaults + overrides)"
    else:
        path = resolve_recipe_path(recipe, stage)
        data = read_yaml(path)
        source = str(path)
        file_stage = data.get("stage")
        if file_stage is None:
            raise RecipeError(f"{path}: missing 'stage:' key", hint=f"add `stage: {stage}` at the top")
        if file_stage != stage:
            raise RecipeError(
                f"{path} is a '{file_stage}' recipe, not a '{stage}' recipe",
                hint=f"run it with `smpo {file_stage} --recipe {recipe}`",
            )
    data, notes = migrate(data)
    problems = check_override_keys(parsed, schema)
    known = [ov for ov in parsed if not any(p.startswith(ov.token + ":") for p in problems)]
    sugar_items = {k: v for k, v in (sugar or {}).items() if v is not None}
    for key in sugar_items:
        clash = [ov.token for ov in parsed if ov.key == key]
        if clash:
            problems.append(f"{key} is set both by {clash[0]} and by its command-line flag; keep one")
    data = apply_overrides(data, known)
    data = apply_overrides(data, [Override(k, v, f"{k}={v}") for k, v in sugar_items.items()])
    try:
        validated = validate(data, stage, source)
    except RecipeError as exc:
        problems.extend(exc.problems)
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s) in the {stage} recipe:", problems)
    return LoadedRecipe(validated, source, tokens, notes)


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML (defaults filled in); re-running it reproduces the run."""
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
