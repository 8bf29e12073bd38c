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
    chunks = sorted((out / "scores" / "shapes-judge").glob("0*.json"))
    assert len(chunks) == 1  # 4 prompts x 3 images fit one chunk of reward_batch_size=32
    scores = chunks[0].stat().st_mtime_ns
    assert run(args + ["pairing.strategy=best_worst"]) == 0  # same samples: resumes
    assert chunks[0].stat().st_mtime_ns == scores
    assert pq.read_table(out / "pairs.parquet").equals(pq.read_table(__import__("io").BytesIO(first)))
    assert run(args + ["sampling.guidance_scale=2"]) == 2  # other samples in the same folder: refused


def test_a_relative_output_folder_works(tmp_path, monkeypatch):
    """-o runs/x from the working directory: the scorer finds the images generation wrote there."""
    monkeypatch.chdir(tmp_path)
    assert run(["-q", "pairs", "--recipe", "pairs_tiny_cpu", "-o", "runs/pairs", *FAST, "rewards=[{name: shapes-judge}]"]) == 0
    table = pq.read_table(tmp_path / "runs" / "pairs" / "pairs.parquet").to_pandas()
    assert len(table) == 4 and (tmp_path / "runs" / "pairs" / table["image_0"][0]).is_file()


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

    # a batch with a missing image is drawn again whole: the same batches, the same pixels
    for a, b in zip(sorted((tmp_path / "whole" / "samples" / "images").glob("*.png")),
                    sorted((cut / "samples" / "images").glob("*.png")), strict=True):  # fmt: skip
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


CLIP = "rewards=[{name: shapes-judge}, {name: pickscore, path: shapes-pickscore}]"
SMALL = ["sampling.num_inference_steps=2", "sampling.images_per_prompt=2", "prompts.limit=6", "device=cpu",
         "logging.progress=false", "reward_batch_size=4", "sampling.batch_size=3", CLIP]  # fmt: skip


def _smpo(args, env_extra=None, **kw):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "smpo_cli", "-q", *args], env=env, **kw)


def test_pipelined_sequential_killed_and_two_process_runs_write_identical_pairs(tmp_path):
    """Scoring while generating, after, after a SIGKILL, and split over 2 torchrun processes: the same bytes of scores."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    base = ["pairs", "--recipe", "pairs_tiny_cpu", *SMALL, "pairing.strategy=all"]
    whole = tmp_path / "whole"
    assert _smpo([*base, "-o", str(whole)]).wait(timeout=300) == 0
    assert len(list((whole / "scores" / "pickscore").glob("0*.json"))) == 3  # 6 prompts, 2 per chunk of 4 images
    after = tmp_path / "sequential"
    assert _smpo([*base, "-o", str(after), "pipeline=false"]).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = _smpo([*base, "-o", str(killed)], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((killed / "scores" / "pickscore").glob("000000.json")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: some chunks scored, some images not yet drawn
    proc.wait()
    assert not (killed / "pairs.parquet").exists()
    assert _smpo([*base, "-o", str(killed)]).wait(timeout=300) == 0

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29523", "-m", "smpo_cli", "-q",
                           *base, "-o", str(two)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    reference = pq.read_table(whole / "pairs.parquet")
    for other in (after, killed, two):
        assert pq.read_table(other / "pairs.parquet").equals(reference), other.name
        assert (other / "image_scores.jsonl").read_text() == (whole / "image_scores.jsonl").read_text(), other.name


def test_pairs_can_carry_the_image_bytes_and_smpo_train_reads_them(tmp_path):
    import io

    from PIL import Image

    out = tmp_path / "pairs"
    assert run(["-q", "pairs", "--recipe", "pairs_tiny_cpu", "-o", str(out), *FAST, "rewards=[{name: shapes-judge}]",
                "images=bytes"]) == 0  # fmt: skip
    table = pq.read_table(out / "pairs.parquet").to_pandas()
    first = Image.open(io.BytesIO(table["image_0"][0]))
    assert first.size == (32, 32)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (out / "pairs.parquet").rename(moved / "pairs.parquet")  # self-contained: no samples/ next to it
    train = tmp_path / "train"
    assert run(["-q", "train", "--recipe", "tiny_smpo_cpu", "-o", str(train), f"data.path={moved}",
                "data.reward=shapes-judge", "model.pretrained=shapes-sd15", "data.resolution=32", "train.max_steps=1",
                "inversion.source=none", "data.num_workers=0", "train.checkpoint_every_steps=null",
                "data.drop_ties=false"]) == 0  # fmt: skip
    result = json.loads((train / "run.json").read_text())["result"]
    assert result["skipped_pairs"] == 0
