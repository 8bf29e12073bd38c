"""Every recipe under recipes/ loads, validates and dry-runs (recursively)."""

from pathlib import Path

import pytest
import yaml

from smpo_cli.cli._runner import run_stage
from smpo_cli.config import bundled_recipes, load_recipe
from smpo_cli.config.loader import bundled_recipes_dir

ROOT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# recipes/accelerate/ holds accelerate launch configs (tests/unit/test_accelerate_configs.py), not smpo recipes
RECIPES = sorted(p for p in ROOT_RECIPES.rglob("*.yaml") if p.relative_to(ROOT_RECIPES).parts[0] != "accelerate")


def test_bundled_dir_is_the_top_level_recipes_folder():
    assert bundled_recipes_dir().resolve() == (Path(__file__).resolve().parents[2] / "recipes").resolve()
    assert len(bundled_recipes()) == len(RECIPES) > 0


def test_bundled_names_are_unique():
    names = [r.name for r in bundled_recipes()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_dry_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stage = yaml.safe_load(path.read_text())["stage"]
    assert path.parent.name == stage, "recipes live in a folder named after their stage"
    text = path.read_text()
    assert text.startswith("#") and "--dry-run" in text, "header comment with a dry-run line"
    load_recipe(str(path), stage)
    run_stage(stage, recipe=str(path), overrides=[], dry_run=True, core=lambda r: None)
    assert yaml.safe_load(capsys.readouterr().out)["stage"] == stage
