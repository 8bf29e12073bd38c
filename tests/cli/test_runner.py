"""The shared stage driver: dry run, run folder, manifest status."""

import json

import pytest
import yaml

from smpo_cli.cli._runner import run_stage
from smpo_cli.config import dump_recipe, load_recipe
from smpo_cli.errors import OutputDirError


def _never_called(recipe):
    raise AssertionError("core must not run under --dry-run")


def test_dry_run_prints_resolved_recipe_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_stage("train", recipe="sdxl_smpo", overrides=["train.max_steps=3"], dry_run=True, core=_never_called)
    captured = capsys.readouterr()
    expected = dump_recipe(load_recipe("sdxl_smpo", "train", ["train.max_steps=3"]).recipe)
    assert captured.out == expected
    assert yaml.safe_load(captured.out)["train"]["max_steps"] == 3
    assert "plan" in captured.err and "does not exist yet" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_real_run_writes_recipe_and_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    class Result:
        def to_dict(self):
            return {"steps": 3}

    def core(recipe):
        seen["recipe"] = recipe
        return Result()

    run_stage("train", recipe="sdxl_smpo", overrides=["output_dir=out"], core=core)
    assert seen["recipe"].output_dir == "out"
    manifest = json.loads((tmp_path / "out/run.json").read_text())
    assert manifest["status"] == "success" and manifest["result"] == {"steps": 3}
    assert yaml.safe_load((tmp_path / "out/recipe.resolved.yaml").read_text())["output_dir"] == "out"
    with pytest.raises(OutputDirError):
        run_stage("train", recipe="sdxl_smpo", overrides=["output_dir=out"], core=core)
    run_stage("train", recipe="sdxl_smpo", overrides=["output_dir=out"], overwrite=True, core=core)


@pytest.mark.parametrize("exc, status", [(RuntimeError("nan"), "failed"), (KeyboardInterrupt(), "interrupted")])
def test_failed_and_interrupted_runs_are_recorded(tmp_path, monkeypatch, exc, status):
    monkeypatch.chdir(tmp_path)

    def core(recipe):
        raise exc

    with pytest.raises(type(exc)):
        run_stage("train", recipe="sdxl_smpo", overrides=["output_dir=out"], core=core)
    manifest = json.loads((tmp_path / "out/run.json").read_text())
    assert manifest["status"] == status and manifest["ended_at"]
