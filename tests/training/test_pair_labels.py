"""Which label orders each training pair (data.labels) and what p goes with it; no model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from smpo_cli.config import load_recipe
from smpo_cli.config.schema import TrainRecipe
from smpo_cli.errors import DataError
from smpo_cli.training.data import load_pair_table

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "train"

# label (label_0 semantics), the reward's winner and p of each row; what each labelling must make of it
ROWS = [
    {"label": 1.0, "pickscore_winner": 1, "pickscore_p": 0.7},  # human and reward disagree
    {"label": 0.0, "pickscore_winner": 1, "pickscore_p": 0.8},  # they agree
    {"label": 0.5, "pickscore_winner": 0, "pickscore_p": 0.6},  # human tie: dropped (data.drop_ties)
    {"label": 1.0, "pickscore_winner": 0, "pickscore_p": 0.5},  # exact reward tie (stored winner 0, as before)
    {"label": None, "pickscore_winner": 0, "pickscore_p": 0.9},  # no human label
]


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"image_0": f"{i}a.png", "image_1": f"{i}b.png", "prompt": f"p{i}", "smpo_row": i, **r}
            for i, r in enumerate(ROWS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(path, method: str = "smpo", **data) -> TrainRecipe:
    return TrainRecipe.model_validate({
        "output_dir": "unused", "model": {"pretrained": "tiny-sd15"}, "train": {"max_steps": 1},
        "data": {"path": str(path), **data}, "method": {"name": method},
        "inversion": {"source": "online" if method == "smpo" else "none"},
    })  # fmt: skip


@pytest.mark.parametrize("method, expected", [("smpo", "reward"), ("dpo", "human"), ("sft", "human")])
def test_null_labels_resolve_to_the_methods_paper_default(tmp_path, method, expected):
    r = recipe(tmp_path / "x.jsonl", method)
    assert r.data.labels == expected  # written into recipe.resolved.yaml as such
    assert recipe(tmp_path / "x.jsonl", method, labels="reward").data.labels == "reward"
    assert recipe(tmp_path / "x.jsonl", method, labels="human").data.labels == "human"


def test_bundled_baselines_use_human_labels_and_smpo_the_reward():
    for name in ("sd15_dpo", "sdxl_dpo", "sd15_sft", "tiny_dpo_cpu"):
        assert load_recipe(name, "train").recipe.data.labels == "human", name
        assert yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["data"]["labels"] == "human", name  # said, not implied
    for name in ("sd15_smpo", "sdxl_smpo", "tiny_smpo_cpu"):
        assert load_recipe(name, "train").recipe.data.labels == "reward", name
    # the default follows the method an override picks, unless the labels are set too
    assert load_recipe("sd15_smpo", "train", ["method.name=dpo", "inversion.source=none"]).recipe.data.labels == "human"
    assert load_recipe("sd15_dpo", "train", ["data.labels=reward"]).recipe.data.labels == "reward"


def test_reward_labels_follow_the_reward_and_give_image_1_an_exact_tie(pairs):
    t = load_pair_table(recipe(pairs, "smpo"))
    assert (t.labels, t.label_column) == ("reward", "pickscore_winner")
    assert t.rows.tolist() == [0, 1, 3, 4]  # the human tie is dropped, the unlabelled pair kept
    assert t.winner.tolist() == [1, 1, 1, 0]  # row 3: p = 0.5, image 1 wins as in the official code
    assert t.p.tolist() == pytest.approx([0.7, 0.8, 0.5, 0.9])
    assert load_pair_table(recipe(pairs, "dpo", labels="reward")).p.tolist() == [1.0] * 4


def test_human_labels_follow_label_0_and_orient_p(pairs):
    dpo = load_pair_table(recipe(pairs, "dpo"))
    assert (dpo.labels, dpo.label_column) == ("human", "label")
    assert dpo.rows.tolist() == [0, 1, 3]  # human tie and missing label dropped
    assert dpo.winner.tolist() == [0, 1, 0]
    assert dpo.p.tolist() == [1.0, 1.0, 1.0]  # Diffusion-DPO trusts the human winner fully
    smpo = load_pair_table(recipe(pairs, "smpo", labels="human"))
    # the reward's probability that the human winner is preferred: 1 - p where they disagree
    assert smpo.winner.tolist() == [0, 1, 0] and smpo.p.tolist() == pytest.approx([0.3, 0.8, 0.5])
    sft = load_pair_table(recipe(pairs, "sft"))
    assert sft.winner.tolist() == [0, 1, 0]


def test_human_labels_without_a_label_column_is_a_clear_error(tmp_path):
    path = tmp_path / "unlabelled.jsonl"
    row = {"image_0": "a.png", "image_1": "b.png", "prompt": "p", "pickscore_winner": 0, "pickscore_p": 0.6}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="needs a human label column") as err:
        load_pair_table(recipe(path, "dpo"))
    assert "data.labels=reward" in err.value.hint
    assert load_pair_table(recipe(path, "dpo", labels="reward")).winner.tolist() == [0]
    # dpo / sft on human labels need no reward columns at all
    bare = tmp_path / "human.jsonl"
    bare.write_text(json.dumps({"image_0": "a.png", "image_1": "b.png", "prompt": "p", "label": 0.0}) + "\n")
    assert load_pair_table(recipe(bare, "dpo")).winner.tolist() == [1]
