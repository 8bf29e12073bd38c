"""``smpo pairs`` end to end on the shipped shapes model: two reward models that disagree, their mixture,
the scored-pairs format smpo train reads, resume, and bad input."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from smpo_cli.cli.main import run
from smpo_cli.pairs import pairing

pytestmark = pytest.mark.integration

FAST = ["sampling.num_inference_steps=2", "sampling.images_per_prompt=3", "prompts.limit=4", "device=cpu",
        "logging.progress=false"]  # fmt: skip
TWO = ("rewards=[{name: shapes-judge, weight: 3}, {name: clip, path: tiny, output: cosine, weight: 1, "
       "label: tinyclip}]")  # fmt: skip


def test_two_disagreeing_rewards_mix_into_p_and_smpo_train_reads_the_pairs(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert run(["pairs", "--recipe", "pairs_tiny_cpu", "-o", str(out), "--json", *FAST, TWO, "pairing.strategy=all"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prefix"] == "mix" and result["prompts"] == 4 and result["images"] == 12 and result["pairs"] == 12
    table = pq.read_table(out / "pairs.parquet").to_pandas()
    # each model's own p stays; the pair's p0 is the 3:1 weighted mean of the models' p0
    p0 = {}
    for label in ("shapes-judge", "tinyclip"):
        p = table[f"{label}_p"].to_numpy()
        p0[label] = np.where(table[f"{label}_winner"] == 0, p, 1 - p)
    assert (table["shapes-judge_winner"] != table["tinyclip_winner"]).any()  # they disagree somewhere
    mix = (3 * p0["shapes-judge"] + p0["tinyclip"]) / 4
    np.testing.assert_allclose(np.where(table["mix_winner"] == 0, table["mix_p"], 1 - table["mix_p"]), mix, atol=1e-9)
    # the judge's [0, 1] range is its own; the random tiny model's comes from this run's quantiles
    norms = {r["label"]: r["normalization"] for r in result["rewards"]}
    assert norms["shapes-judge"] == {"mode": "model", "r_min": 0.0, "r_max": 1.0}
    assert norms["tinyclip"]["mode"] == "quantiles" and norms["tinyclip"]["quantiles"] == [0.01, 0.99]
    judge_p0 = pairing.model_p0(table["shapes-judge_score_0"].to_numpy(), table["shapes-judge_score_1"].to_numpy())
    np.testing.assert_allclose(judge_p0, p0["shapes-judge"], atol=1e-9)
    assert (table["image_0"] != table["image_1"]).all() and (out / table["image_0"][0]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["summary"]["mix"]["tie_fraction"] <= 1 and "agreement_with_mixture" in summary["summary"]["tinyclip"]
    # smpo train reads the folder as it is (paths relative to it), with the mixture's winner and p
    train = tmp_path / "train"
    assert run(["-q", "train", "--recipe", "tiny_smpo_cpu", "-o", str(train), f"data.path={out}", "data.reward=mix",
                "model.pretrained=shapes-sd15", "data.resolution=32", "train.max_steps=1", "inversion.source=none",
                "data.num_workers=0", "train.checkpoint_every_steps=null"]) == 0  # fmt: skip
    assert json.loads((train / "run.json").read_text())["status"] == "success"


def test_a_rerun_resumes_and_reuses_scores_and_changed_sampling_is_refused(tmp_path):
    out = tmp_path / "pairs"
    args = ["-q", "pairs", "--recipe", "pairs_tiny_cpu", "-o", str(out), *FAST, "rewards=[{name: shapes-judge}]"]
    assert run(args) == 0
    first = (out / "pairs.parquet").read_bytes()
    scores = (out / "scores" / "shapes-judge.json").stat().st_mtime_ns
    assert run(args + ["pairing.strategy=best_worst"]) == 0  # same samples: resumes
    assert (out / "scores" / "shapes-judge.json").stat().st_mtime_ns == scores
    assert pq.read_table(out / "pairs.parquet").equals(pq.read_table(__import__("io").BytesIO(first)))
    assert run(args + ["sampling.guidance_scale=2"]) == 2  # other samples in the same folder: refused


def test_bad_recipes_are_one_line_errors(tmp_path, capsys):
    base = ["pairs", "--recipe", "pairs_tiny_cpu", "-o", str(tmp_path / "p"), "--dry-run"]
    assert run(base + ["sampling.images_per_prompt=1"]) == 2
    assert "images_per_prompt must be >= 2" in capsys.readouterr().err
    assert run(base + ["pairing.strategy=top_bottom", "pairing.k=3"]) == 2
    assert run(base + ["rewards=[{name: shapes-judge}, {name: shapes-judge}]"]) == 2
    assert "distinct labels" in capsys.readouterr().err


def test_an_interrupted_run_resumes_to_the_same_pairs(tmp_path):
    """Images lost mid-run and scores and pairs never written: the rerun fills in exactly what is missing."""
    import shutil

    args = ["-q", "pairs", "--recipe", "pairs_tiny_cpu", *FAST, "rewards=[{name: shapes-judge}]", "pairing.strategy=all"]
    assert run(args + ["-o", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    assert run(args + ["-o", str(cut)]) == 0
    images = sorted((cut / "samples" / "images").glob("*.png"))
    for image in images[::4]:
        image.unlink()  # as if the process had died before writing them
    shutil.rmtree(cut / "scores")
    (cut / "pairs.parquet").unlink()
    assert run(args + ["-o", str(cut)]) == 0
    whole, resumed = (pq.read_table(d / "pairs.parquet") for d in (tmp_path / "whole", cut))
    assert resumed.equals(whole)
    from PIL import Image

    # regenerated images come from other batch compositions: equal up to one level of 8-bit rounding
    for a, b in zip(sorted((tmp_path / "whole" / "samples" / "images").glob("*.png")),
                    sorted((cut / "samples" / "images").glob("*.png")), strict=True):  # fmt: skip
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
        assert diff.max() <= 1 and diff.mean() < 1e-3
