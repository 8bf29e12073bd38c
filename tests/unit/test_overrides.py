import pytest

from smpo_cli.config.overrides import (
    REMOVE,
    apply_overrides,
    check_override_keys,
    parse_overrides,
    parse_value,
    schema_keys,
    suggest,
)
from smpo_cli.config.schema import TrainRecipe
from smpo_cli.errors import RecipeError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", 3),
        ("1e-5", 1e-5),
        ("1.0e-8", 1e-8),
        ("true", True),
        ("null", None),
        ("[a, b]", ["a", "b"]),
        ("[jsonl,wandb]", ["jsonl", "wandb"]),
        ("runs/x", "runs/x"),
        ("", ""),
        ("{a: 1}", {"a": 1}),
        ("'007'", "007"),
        ("a: b: c", "a: b: c"),  # invalid YAML stays a string
    ],
)
def test_parse_value_is_yaml_typed(text, expected):
    assert parse_value(text) == expected


def test_parse_overrides_kinds():
    ovs = parse_overrides(["train.max_steps=10", "model.vae=null", "~optim.lr", "output_dir=a=b"])
    assert [(o.key, o.value) for o in ovs] == [
        ("train.max_steps", 10),
        ("model.vae", None),
        ("optim.lr", REMOVE),
        ("output_dir", "a=b"),
    ]


def test_parse_overrides_reports_every_bad_token():
    with pytest.raises(RecipeError) as info:
        parse_overrides(["--train.max_steps=3", "novalue", "bad key=1", "ok.key=1"])
    problems = info.value.problems
    assert len(problems) == 3
    assert "train.max_steps=VALUE" in problems[0]
    assert "KEY=VALUE" in problems[1]


def test_apply_overrides_sets_removes_and_creates_blocks():
    data = {"train": {"max_steps": 5, "batch_size": 2}, "optim": {"lr": 1.0}}
    out = apply_overrides(data, parse_overrides(["train.max_steps=7", "~optim.lr", "model.pretrained=x"]))
    assert out == {"train": {"max_steps": 7, "batch_size": 2}, "optim": {}, "model": {"pretrained": "x"}}
    assert data["train"]["max_steps"] == 5  # input untouched


def test_apply_override_into_a_value_is_an_error():
    with pytest.raises(RecipeError, match="is a value, not a block"):
        apply_overrides({"seed": 1}, parse_overrides(["seed.x=2"]))


def test_schema_keys_cover_nested_blocks():
    keys = schema_keys(TrainRecipe)
    assert "train.max_steps" in keys and "inversion.renoise_iterations" in keys and "model" in keys


def test_unknown_override_keys_get_suggestions():
    problems = check_override_keys(parse_overrides(["train.max_step=1", "optim.learning_rate=1", "zzz=1"]), TrainRecipe)
    assert "did you mean train.max_steps?" in problems[0]
    assert "unknown key zzz" in problems[2] and "did you mean" not in problems[2]


def test_suggest_by_leaf_name():
    assert suggest("max_steps", schema_keys(TrainRecipe)) == "train.max_steps"
