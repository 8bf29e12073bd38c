import warnings

import pytest
import yaml

from smpo_cli.config import bundled_recipes, dump_recipe, find_bundled, load_recipe, resolve_recipe_path
from smpo_cli.config import loader as loader_mod
from smpo_cli.errors import RecipeError

MINIMAL = {
    "stage": "train",
    "output_dir": "runs/x",
    "model": {"pretrained": "tiny-sd15"},
    "data": {"path": "data/x"},
    "train": {"max_steps": 2},
}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_minimal_recipe_fills_defaults(tmp_path):
    loaded = load_recipe(str(write(tmp_path, MINIMAL)), "train")
    r = loaded.recipe
    assert r.method.name == "smpo" and r.method.beta == 5000 and r.inversion.source == "online"
    assert r.logging.report_to == ["jsonl"]
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        r.seed = 3  # frozen


def test_overrides_and_sugar_precedence(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = load_recipe(str(path), "train", ["seed=5", "train.max_steps=9"], {"output_dir": "runs/y"}).recipe
    assert (r.seed, r.train.max_steps, r.output_dir) == (5, 9, "runs/y")


def test_same_key_as_override_and_flag_is_an_error(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(str(write(tmp_path, MINIMAL)), "train", ["output_dir=a"], {"output_dir": "b"})
    assert "keep one" in str(info.value)


def test_all_problems_reported_together_with_paths_and_suggestions(tmp_path):
    bad = {
        **MINIMAL,
        "trian": {},
        "model": {"pretrained": "x", "dtyp": "float16"},
        "train": {"max_steps": 0, "batch_size": "two"},
        "method": {"name": "ppo"},
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(str(write(tmp_path, bad)), "train")
    text = "\n".join(info.value.problems)
    assert "trian: unknown key (did you mean train?)" in text
    assert "model.dtyp: unknown key (did you mean model.dtype?)" in text
    assert "train.max_steps: Input should be greater than or equal to 1" in text
    assert "train.batch_size:" in text
    assert "method.name: Input should be 'smpo', 'dpo' or 'sft'" in text
    assert len(info.value.problems) == 5


def test_missing_required_key(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "model"}
    with pytest.raises(RecipeError) as info:
        load_recipe(str(write(tmp_path, data)), "train")
    assert info.value.problems == ["model: required key is missing"]


def test_cross_field_message_uses_override_spelling(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(str(write(tmp_path, MINIMAL)), "train", ["inversion.source=cache"])
    assert "inversion.cache_path must be set when inversion.source=cache" in info.value.problems[0]


def test_tilde_reverts_to_default(tmp_path):
    data = {**MINIMAL, "method": {"beta": 2000}}
    r = load_recipe(str(write(tmp_path, data)), "train", ["~method.beta"]).recipe
    assert r.method.beta == 5000


def test_stage_must_match(tmp_path):
    with pytest.raises(RecipeError, match="is a 'score' recipe, not a 'train' recipe"):
        load_recipe(str(write(tmp_path, {**MINIMAL, "stage": "score"})), "train")
    with pytest.raises(RecipeError, match="missing 'stage:'"):
        load_recipe(str(write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "stage"})), "train")


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "stage: train\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"line \d+"):
        load_recipe(str(path), "train")


def test_non_mapping_yaml(tmp_path):
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(str(write(tmp_path, "- a\n- b\n")), "train")


def test_resolve_bundled_names_and_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sdxl = find_bundled("sdxl_smpo")
    assert sdxl is not None and sdxl.stage == "train"
    for spelling in ("sdxl_smpo", "sdxl_smpo.yaml", "train/sdxl_smpo", "sdxl.yaml", "sdxl"):
        assert resolve_recipe_path(spelling, "train") == sdxl.path
    assert resolve_recipe_path("sd15.yaml", "train").name == "sd15_smpo.yaml"


def test_local_file_wins_over_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, MINIMAL, "sdxl.yaml")
    assert resolve_recipe_path("sdxl.yaml", "train").resolve() == (tmp_path / "sdxl.yaml").resolve()


def test_unknown_recipe_lists_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        resolve_recipe_path("nope", "train")
    assert "sdxl_smpo" in info.value.hint


def test_dump_roundtrip_reproduces_recipe(tmp_path):
    r = load_recipe("sdxl_smpo", "train", ["train.max_steps=3"]).recipe
    again = load_recipe(str(write(tmp_path, dump_recipe(r))), "train").recipe
    assert again == r


def test_renamed_key_is_migrated_with_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(loader_mod.RENAMED_KEYS, "train.grad_accum", ("train.grad_accum_steps", "0.4.0"))
    data = {**MINIMAL, "train": {"max_steps": 2, "grad_accum": 4}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_recipe(str(write(tmp_path, data)), "train")
    assert loaded.recipe.train.grad_accum_steps == 4
    assert any(issubclass(w.category, FutureWarning) and "0.4.0" in str(w.message) for w in caught)


def test_newer_schema_version_refused(tmp_path):
    with pytest.raises(RecipeError, match="newer than this smpo"):
        load_recipe(str(write(tmp_path, {**MINIMAL, "schema_version": 99})), "train")


def test_bundled_recipes_have_summaries():
    recs = bundled_recipes()
    assert {"sd15_smpo", "sdxl_smpo"} <= {r.name for r in recs}
    assert all(r.summary for r in recs)
