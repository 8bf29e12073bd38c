"""The shapes experiment end to end, cut down to seconds (a barely trained base model: plumbing, not results)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from smpo_cli.cli.main import run
from smpo_cli.shapes.experiment import _stratified, mean_ci

pytestmark = pytest.mark.integration


def test_mean_ci_is_the_t_interval():
    m = mean_ci([0.1, 0.2, 0.3])
    assert m["mean"] == pytest.approx(0.2) and m["n"] == 3
    assert m["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert mean_ci([0.5])["ci95"] is None and mean_ci([])["mean"] is None


def test_stratified_covers_every_skill():
    from smpo_cli.shapes.world import all_captions

    pool = list(all_captions(geneval_only=True))
    chosen = _stratified(pool, 12, np.random.default_rng(0))
    assert len(chosen) == 12 and {c.skill for c in chosen} == {c.skill for c in pool}
    assert [pool.index(c) for c in chosen] == sorted(pool.index(c) for c in chosen)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from smpo_cli.config.schema import ShapesPretrainRecipe
    from smpo_cli.shapes.base_model import run_pretrain

    out = tmp_path_factory.mktemp("base")
    recipe = ShapesPretrainRecipe.model_validate({"output_dir": str(out), "data": {"images": 256},
                                                  "vae": {"steps": 2, "batch_size": 8},
                                                  "unet": {"steps": 4, "batch_size": 8, "warmup_steps": 1}})  # fmt: skip
    return run_pretrain(recipe).pipeline_dir


def test_experiment_runs_every_arm_and_reports(tmp_path, capsys, tiny_base):
    out = tmp_path / "exp"
    args = ["-q", "shapes", "run", "--recipe", "shapes_experiment_cpu", "-o", str(out), f"model={tiny_base}", "pairs.count=8", "pairs.num_inference_steps=2",
            "train.steps=2", "train.batch_size=4", "train.seeds=[0,1]", "train.inversion_steps=3",
            "eval.heldout_captions=3", "eval.train_captions=3", "eval.images_per_caption=2", "--json"]  # fmt: skip
    assert run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["arms"]) == {"dpo", "smpo", "smpo_no_inversion", "smpo_binary", "sft"}
    assert len(result["runs"]) == 10
    for arm in result["arms"].values():
        assert arm["accuracy"]["n"] == 2 and arm["distance"]["mean"] >= 0
    pairs = [json.loads(x) for x in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8
    for p in pairs:
        assert p["human_winner"] == (0 if p["label"] == 1.0 else 1)  # the voter's choice orders DPO's pair
        lo, hi = sorted((p["judge_score_0"], p["judge_score_1"]))
        assert p["judge_p"] == pytest.approx(1 / (1 + math.exp(-(hi - lo))))  # softmax of [0, 1] scores
        assert p["judge_winner"] == (0 if p["judge_score_0"] >= p["judge_score_1"] else 1)
        assert 0.0 < p["true_p0"] < 1.0
    # every arm trained on the same pairs with the same budget; the SmPO arms read the inversion cache
    for name in ("smpo", "smpo_binary"):
        resolved = (out / "runs" / f"{name}-s0" / "recipe.resolved.yaml").read_text()
        assert "source: cache" in resolved and "max_steps: 2" in resolved
    assert "reward: human" in (out / "runs" / "dpo-s0" / "recipe.resolved.yaml").read_text()
    assert "reward: reward" in (out / "runs" / "smpo-s0" / "recipe.resolved.yaml").read_text()
    for png in ("curves.png", "over_optimisation.png", "grid.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| smpo |" in md and "Per-skill accuracy" in md and "Pairs per skill" in md
    # a rerun reuses every finished run
    assert run(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in result["runs"]]
    # ... but not runs made with another budget
    assert run([*args[:-1], "train.steps=3"]) == 2
    assert "other settings (train.steps)" in capsys.readouterr().err


def _image_scores(folder):
    return {json.loads(x)["file"]: json.loads(x)["reward"]
            for x in (folder / "pairs" / "sampled" / "image_scores.jsonl").read_text().splitlines()}  # fmt: skip


def test_experiment_pairs_come_from_smpo_pairs_best_and_worst_of_n(tmp_path, tiny_base):
    """pairs.images_per_caption=4, pairs.reward=shapes-judge: smpo pairs samples 4 per caption and the pair is the
    judge's best and worst; the reward columns are then the judge's."""
    from smpo_cli.config.schema import ShapesBenchRecipe
    from smpo_cli.shapes.experiment import make_pairs

    recipe = ShapesBenchRecipe.model_validate({
        "output_dir": str(tmp_path), "model": tiny_base, "device": "cpu",
        "pairs": {"count": 6, "images_per_caption": 4, "num_inference_steps": 2, "batch_size": 8, "reward": "shapes-judge"},
        "logging": {"progress": False}})  # fmt: skip
    stats = make_pairs(recipe, tmp_path)
    assert stats["pairs"] == 6 and stats["reward"] == "shapes-judge"
    scores = _image_scores(tmp_path)
    for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        mine = [v for f, v in scores.items() if f.startswith(f"samples/images/{row['image_0'].split('/')[-1][:5]}_")]
        assert len(mine) == 4
        assert sorted((row["judge_score_0"], row["judge_score_1"])) == pytest.approx([min(mine), max(mine)], abs=1e-6)
        assert (row["reward_winner"], row["reward_p"]) == (row["judge_winner"], row["judge_p"])


def test_experiment_pairs_are_picked_and_labelled_by_the_learned_reward(tmp_path, tiny_base):
    """The default pairs.reward=shapes-pickscore: best vs worst of 4 by the learned reward's cosine, whose winner
    and p (not the judge's) the reward arms train on; the judge still scores both images for the ablation."""
    from smpo_cli.config.schema import ShapesBenchRecipe
    from smpo_cli.shapes.experiment import make_pairs

    recipe = ShapesBenchRecipe.model_validate({
        "output_dir": str(tmp_path), "model": tiny_base, "device": "cpu",
        "pairs": {"count": 6, "images_per_caption": 4, "num_inference_steps": 2, "batch_size": 8},
        "logging": {"progress": False}})  # fmt: skip
    stats = make_pairs(recipe, tmp_path)
    assert stats["reward"] == "shapes-pickscore" and 0.0 <= stats["label_agreement"]["reward"] <= 1.0
    scores = _image_scores(tmp_path)
    for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        stem = lambda path: "samples/images/" + path.split("/")[-1]  # noqa: E731
        mine = [v for f, v in scores.items() if f.startswith(f"samples/images/{row['image_0'].split('/')[-1][:5]}_")]
        pair = [scores[stem(row["image_0"])], scores[stem(row["image_1"])]]
        assert sorted(pair) == pytest.approx([min(mine), max(mine)], abs=1e-6)  # best and worst by the reward
        assert row["reward_winner"] == (0 if pair[0] > pair[1] else 1)
        assert 0.5 <= row["reward_p"] <= 1.0
        assert {"judge_score_0", "judge_winner", "human_winner"} <= set(row)


def test_balanced_experiment_reports_seed_paired_intervals(tmp_path, capsys, tiny_base, monkeypatch):
    """eval.images_per_skill > 0: every model samples the same balanced captions with the same seeds, and the
    results hold each arm - base and arm - arm with a bootstrap interval and the per-seed changes. The output
    folder is relative to the working directory, as a user's -o runs/x is, through every stage."""
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "exp"
    args = ["-q", "shapes", "run", "--recipe", "shapes_experiment_cpu", "-o", str(out), f"model={tiny_base}", "pairs.count=6", "pairs.images_per_caption=3",
            "pairs.num_inference_steps=2", "pairs.guidance_scale=2", "eval.guidance_scale=4", "train.steps=2",
            "train.warmup_steps=1", "train.empty_prompt_prob=0.1", "train.batch_size=4", "train.seeds=[0,1]",
            "eval.images_per_skill=3", "eval.max_captions_per_skill=2", "workers=2",
            "train.lr=5e-5", "arms=[{name: smpo, method: smpo, labels: reward}, "
            "{name: dpo, method: dpo, labels: human, lr: 2.5e-5, beta: 5000}]",
            "--json"]  # fmt: skip
    assert run(args) == 0
    result = json.loads(capsys.readouterr().out)
    paired = result["paired"]
    assert paired["eval_images"] == 18 and set(paired["arms"]) == {"smpo", "dpo"} and set(paired["comparisons"]) == {"smpo - dpo"}
    for d in [*paired["arms"].values(), *paired["comparisons"].values()]:
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1] and len(d["per_seed"]) == 2
    captions = (out / "eval" / "captions.txt").read_text().splitlines()
    assert len(captions) == 18 and len(list((out / "eval" / "base" / "images").glob("*.png"))) == 18
    resolved = (out / "runs" / "smpo-s0" / "recipe.resolved.yaml").read_text()
    assert "reward: reward" in resolved and "warmup_steps: 1" in resolved and "empty_prompt_prob: 0.1" in resolved
    assert "guidance_scale: 4.0" in (out / "eval" / "base" / "recipe.resolved.yaml").read_text()
    assert "guidance_scale: 2.0" in (out / "pairs" / "sampled" / "recipe.resolved.yaml").read_text()
    # each arm trains at its own lr and beta where it names them, else at train's
    assert "lr: 5.0e-05" in resolved and "beta: 2000.0" in resolved
    dpo_resolved = (out / "runs" / "dpo-s0" / "recipe.resolved.yaml").read_text()
    assert "lr: 2.5e-05" in dpo_resolved and "beta: 5000.0" in dpo_resolved
    report = (out / "results.md").read_text()
    assert "| smpo - dpo |" in report and "(dpo: lr 2.5e-05, beta 5000)" in report
    # the runs went to 2 one-thread processes and came back in recipe order
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [("smpo", 0), ("smpo", 1), ("dpo", 0), ("dpo", 1)]
    # a rerun with another number of workers resumes: workers do not change what is computed
    assert run([*args[:-1], "workers=1", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in result["runs"]]
    # a folder made before the arms left the fingerprint (arms in it, no arm.json) resumes as well
    stored = out / ".smpo" / "fingerprint.json"
    legacy = json.loads(stored.read_text())
    legacy["arms"] = [{"name": "smpo", "method": "smpo", "labels": "reward", "inversion": "none", "binary_labels": False,
                       "beta": None, "lr": None},
                      {"name": "dpo", "method": "dpo", "labels": "human", "inversion": "none", "binary_labels": False,
                       "beta": 5000.0, "lr": 2.5e-5}]  # fmt: skip
    stored.write_text(json.dumps(legacy))
    for made in (out / "runs").glob("*/arm.json"):
        made.unlink()
    assert run([*args[:-1], "--json"]) == 0
    assert [r["seconds"] for r in json.loads(capsys.readouterr().out)["runs"]] == [r["seconds"] for r in result["runs"]]
    assert len(list((out / "runs").glob("*/arm.json"))) == 4 and "arms" not in json.loads(stored.read_text())
    # an arm added to the finished experiment trains alone; the other runs are reused
    arms = args[-2].replace("]", ", {name: sft, method: sft, labels: human}]")
    assert run([*args[:-2], arms, "--json"]) == 0
    more = json.loads(capsys.readouterr().out)
    assert [r["seconds"] for r in more["runs"][:4]] == [r["seconds"] for r in result["runs"]]
    assert [(r["arm"], r["seed"]) for r in more["runs"][4:]] == [("sft", 0), ("sft", 1)]
    assert set(more["paired"]["comparisons"]) == {"smpo - dpo", "smpo - sft", "dpo - sft"}
    assert not list((out / "runs" / "sft-s0").glob("checkpoints/step-*"))  # resume-only checkpoints are gone
    # ... but an arm whose settings changed under its old name is refused before anything runs
    assert run([*args[:-2], args[-2].replace("beta: 5000", "beta: 2500"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "was trained as another arm 'dpo' (beta)" in err and "Traceback" not in err
    # a run killed before it finished is trained again (its stale evaluation dropped), not refused
    manifest = out / "runs" / "dpo-s1" / "run.json"
    manifest.write_text(manifest.read_text().replace('"status": "success"', '"status": "running"'))
    assert run([*args[:-1], "--json"]) == 0
    last = json.loads(capsys.readouterr().out)
    assert last["runs"][3]["seconds"] != result["runs"][3]["seconds"]
    assert last["runs"][3]["final_loss"] == result["runs"][3]["final_loss"]  # the same run, trained again


def test_skill_weights_set_the_pair_captions_mix_and_the_pairs_are_counted_per_skill(tmp_path, tiny_base):
    """pairs.skill_weights: only the weighted skills are sampled, in proportion; pair_stats counts each skill's
    pairs, judge ties and pairs with exactly one correct image."""
    from smpo_cli.config.schema import ShapesBenchRecipe
    from smpo_cli.shapes.experiment import make_pairs

    recipe = ShapesBenchRecipe.model_validate({
        "output_dir": str(tmp_path), "model": tiny_base, "device": "cpu",
        "pairs": {"count": 12, "images_per_caption": 2, "num_inference_steps": 2, "batch_size": 8,
                  "reward": "shapes-judge", "skill_weights": {"colors": 3, "counting": 1, "position": 0}},
        "logging": {"progress": False}})  # fmt: skip
    stats = make_pairs(recipe, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert {r["skill"] for r in rows} <= {"colors", "counting"}
    skills = stats["skills"]
    assert sum(d["pairs"] for d in skills.values()) == 12 and skills["colors"]["pairs"] > skills.get("counting", {"pairs": 0})["pairs"]
    for skill, d in skills.items():
        mine = [r for r in rows if r["skill"] == skill]
        assert d["one_correct"] == pytest.approx(np.mean([r["correct_0"] != r["correct_1"] for r in mine]))
        assert d["judge_ties"] == pytest.approx(np.mean([r["judge_score_0"] == r["judge_score_1"] for r in mine]))
        assert d["one_correct"] + d["both_wrong"] <= 1.0


def test_headroom_weights_are_the_laplace_smoothed_one_correct_share():
    from smpo_cli.shapes.experiment import headroom_weights

    weights = headroom_weights({"colors": 30, "position": 0, "counting": 8}, {"colors": 32, "position": 32, "counting": 32})
    assert weights == {"colors": 31 / 34, "position": 1 / 34, "counting": 9 / 34}  # no skill drops to 0


def test_the_pilot_size_is_in_the_fingerprint_only_when_a_pilot_runs():
    """A folder made before pilots existed (or with the uniform mix) resumes; a headroom folder with another pilot
    size does not."""
    from smpo_cli.config.schema import ShapesBenchRecipe
    from smpo_cli.shapes.experiment import fingerprint

    uniform = ShapesBenchRecipe.model_validate({"output_dir": "x", "pairs": {"pilot_captions_per_skill": 8}})
    assert "pilot_captions_per_skill" not in fingerprint(uniform)["pairs"]
    assert fingerprint(uniform) == fingerprint(ShapesBenchRecipe.model_validate({"output_dir": "x"}))
    headroom = ShapesBenchRecipe.model_validate({"output_dir": "x", "pairs": {"skill_weights": "headroom"}})
    assert fingerprint(headroom)["pairs"]["pilot_captions_per_skill"] == 32


def test_headroom_pilot_sets_the_caption_mix_and_is_reported(tmp_path, tiny_base):
    """pairs.skill_weights=headroom: a pilot of every skill's captions is sampled and judged like the pairs, its
    one-correct counts give the weights, the pairs follow them, and a rerun reuses the pilot."""
    from smpo_cli.config.schema import ShapesBenchRecipe
    from smpo_cli.shapes.experiment import headroom_weights, make_pairs
    from smpo_cli.shapes.report import _caption_mix

    recipe = ShapesBenchRecipe.model_validate({
        "output_dir": str(tmp_path), "model": tiny_base, "device": "cpu",
        "pairs": {"count": 12, "images_per_caption": 2, "num_inference_steps": 2, "batch_size": 8,
                  "reward": "shapes-judge", "skill_weights": "headroom", "pilot_captions_per_skill": 3},
        "logging": {"progress": False}})  # fmt: skip
    stats = make_pairs(recipe, tmp_path)
    pilot = stats["pilot"]
    pilot_pairs = (tmp_path / "pairs" / "pilot" / "captions.txt").read_text().splitlines()
    assert len(pilot_pairs) == 3 * len(pilot["one_correct"]) == 18  # every skill of the training pool, 3 captions
    assert all(0 <= k <= 3 for k in pilot["one_correct"].values())
    assert stats["skill_weights"] == pilot["weights"] == headroom_weights(pilot["one_correct"], dict.fromkeys(pilot["one_correct"], 3))
    assert sum(d["pairs"] for d in stats["skills"].values()) == 12
    assert "weighted toward headroom by a pilot of 3 captions per skill" in _caption_mix(
        {"weights": stats["skill_weights"], "pilot": pilot})
    (tmp_path / "pairs" / "pilot" / "sampled").rename(tmp_path / "moved")  # the rerun must not sample the pilot again
    assert make_pairs(recipe, tmp_path)["skill_weights"] == stats["skill_weights"]
    assert not (tmp_path / "pairs" / "pilot" / "sampled").exists()  # resampling would give the same weights
    assert _caption_mix({"weights": None, "pilot": None}) == "Caption mix: the world's uniform mix of skills."


@pytest.mark.parametrize(("weights", "message"), [
    ("{colour: 1}", "pairs.skill_weights"),
    ("{colors: 0, counting: 0}", "at least one skill"),
    ("{colors: -1}", "pairs.skill_weights"),
    ("headrooom", "pairs.skill_weights"),
])  # fmt: skip
def test_bad_skill_weights_are_one_line_recipe_errors(tmp_path, capsys, weights, message):
    assert run(["shapes", "run", "-o", str(tmp_path / "exp"), f"pairs.skill_weights={weights}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "shapes_alignment_cpu.yaml" in err  # the default recipe: the setup that aligns
    assert message in err and "Traceback" not in err
