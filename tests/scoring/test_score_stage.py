"""`smpo score` end to end on a real (tiny) PickScore model and real on-disk dataset formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpo_cli.cli._runner import run_stage
from smpo_cli.cli.main import run
from smpo_cli.config import load_recipe
from smpo_cli.errors import DataError, OutputDirError
from smpo_cli.scoring.preference import PICKSCORE_COSINE_R_MAX, PICKSCORE_COSINE_R_MIN
from smpo_cli.scoring.runner import resume_ok, run_scoring

pytestmark = pytest.mark.integration


def score(data, out, reward_path, *extra):
    overrides = [f"data.path={data}", f"output_dir={out}", f"reward.path={reward_path}", "data.num_workers=0", *extra]
    return run_stage("score", recipe=None, overrides=overrides, resume=resume_ok, core=run_scoring)


def read_out(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "data")


def test_pickapic_parquet_scores_skips_and_smooths(pickapic_parquet, tiny_pickscore, tmp_path):
    out = tmp_path / "scored"
    result = score(pickapic_parquet, out, tiny_pickscore, "data.rows_per_shard=5", "data.max_image_pixels=100000")
    df = read_out(out)
    # 12 rows: 4 ties dropped (rows 2, 5, 8, 11); rows 3 (corrupt) and 10 (oversized) skipped whole
    assert result.rows == 12 and result.ties_dropped == 4 and result.scored == 6
    assert result.skipped == {"cannot decode": 1, "oversized": 1}
    assert sorted(df["smpo_row"]) == [0, 1, 4, 6, 7, 9]
    # every input column is kept, with its own values, next to the new ones
    assert {"caption", "jpg_0", "jpg_1", "label_0", "image_0_uid", "model_0"} <= set(df.columns)
    assert all(df["image_0_uid"] == [f"u{r}a" for r in df["smpo_row"]])
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["row"], s["reason"].split(":")[0]) for s in skipped] == [(3, "image_1"), (10, "image_0")]
    # p is the official smoothing of the cosine, and the winner has the larger cosine
    c0, c1 = df["pickscore_cosine_0"].to_numpy(np.float64), df["pickscore_cosine_1"].to_numpy(np.float64)
    a = (c0 - PICKSCORE_COSINE_R_MIN) / (PICKSCORE_COSINE_R_MAX - PICKSCORE_COSINE_R_MIN)
    b = (c1 - PICKSCORE_COSINE_R_MIN) / (PICKSCORE_COSINE_R_MAX - PICKSCORE_COSINE_R_MIN)
    p0 = np.exp(a) / (np.exp(a) + np.exp(b))
    np.testing.assert_allclose(df["pickscore_p"], np.maximum(p0, 1 - p0), rtol=1e-12)
    np.testing.assert_array_equal(df["pickscore_winner"], np.where(c0 >= c1, 0, 1))
    # the stored scores are what the reward model gives for those exact images
    from smpo_cli.rewards import load_reward
    from smpo_cli.scoring.decode import open_image

    rm = load_reward("pickscore", str(tiny_pickscore))
    row = df.iloc[2]  # row 4: grayscale PNG on side 0
    direct = rm.score([open_image(row["jpg_0"], Path("."))], [row["caption"]])
    assert direct["cosine"][0].item() == pytest.approx(row["pickscore_cosine_0"], abs=1e-6)
    assert direct["score"][0].item() == pytest.approx(row["pickscore_score_0"], abs=1e-4)
    # agreement with the human labels among labelled non-tie pairs
    human = np.where(df["label_0"] == 1.0, 0, 1)
    assert result.agreement["labelled_pairs"] == 6
    assert result.agreement["reward_agrees_with_human"] == pytest.approx(np.mean(human == df["pickscore_winner"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 6 and summary["p"]["count"] == 6 and summary["shards"] == 3
    # readable by datasets and by pandas
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert ds.num_rows == 6 and "pickscore_p" in ds.column_names


def test_keep_ties_and_dataset_normalisation(pickapic_parquet, tiny_pickscore, tmp_path):
    out = tmp_path / "scored"
    result = score(pickapic_parquet, out, tiny_pickscore, "data.drop_ties=false", "reward.normalization=dataset")
    df = read_out(out)
    assert result.ties_dropped == 0 and result.scored == 12 - 1  # only the corrupt pair (400x300 is fine by default)
    assert (df["label_0"] == 0.5).sum() == 4
    lo = min(df["pickscore_cosine_0"].min(), df["pickscore_cosine_1"].min())
    hi = max(df["pickscore_cosine_0"].max(), df["pickscore_cosine_1"].max())
    assert result.normalization == {"mode": "dataset", "r_min": pytest.approx(lo), "r_max": pytest.approx(hi)}
    meta = json.loads(pq.read_schema(next((out / "data").glob("*.parquet"))).metadata[b"smpo"])
    assert meta["normalization"]["r_min"] == pytest.approx(lo) and meta["reward"]["name"] == "pickscore"


def test_pairs_jsonl_relative_paths_and_missing_file(pairs_jsonl, tiny_pickscore, tmp_path):
    out = tmp_path / "scored"
    result = score(pairs_jsonl, out, tiny_pickscore)
    df = read_out(out)
    assert result.scored == 4 and result.skipped == {"file not found": 1}
    assert list(df["id"]) == [0, 1, 3, 4] and result.agreement == {"labelled_pairs": 0}


def test_save_to_disk_folder_with_splits(tiny_pickscore, tmp_path):
    import datasets

    from tests.scoring.conftest import pickapic_rows

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(pickapic_rows(6)),
                               "test": datasets.Dataset.from_dict(pickapic_rows(3))})  # fmt: skip
    dd.save_to_disk(tmp_path / "hf")
    with pytest.raises(DataError, match="several splits"):
        score(tmp_path / "hf", tmp_path / "o1", tiny_pickscore)
    result = score(tmp_path / "hf", tmp_path / "o2", tiny_pickscore, "data.split=train")
    assert result.rows == 6 and result.scored == 4


def test_csv_with_custom_columns_and_missing_columns_message(tmp_path, tiny_pickscore):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "b.png")
    (tmp_path / "p.csv").write_text("left,right,text\na.png,b.png,a red square\n")
    with pytest.raises(DataError) as info:
        score(tmp_path / "p.csv", tmp_path / "o1", tiny_pickscore)
    assert "columns found: left, right, text" in info.value.message
    result = score(tmp_path / "p.csv", tmp_path / "o2", tiny_pickscore,
                   "data.image_0_column=left", "data.image_1_column=right", "data.prompt_column=text")  # fmt: skip
    assert result.scored == 1


def test_rerun_resumes_and_other_settings_refused(pickapic_parquet, tiny_pickscore, tmp_path):
    out = tmp_path / "scored"
    first = score(pickapic_parquet, out, tiny_pickscore, "data.rows_per_shard=4")
    before = read_out(out)
    (out / "data" / "part-00001.parquet").unlink()  # as if killed while writing shard 1
    again = score(pickapic_parquet, out, tiny_pickscore, "data.rows_per_shard=4")
    assert again.shards_resumed == first.shards - 1
    pd.testing.assert_frame_equal(read_out(out), before)
    with pytest.raises(OutputDirError, match=r"other settings \(data.rows_per_shard\)"):
        score(pickapic_parquet, out, tiny_pickscore, "data.rows_per_shard=3")


def test_cli_summary_and_json(pickapic_parquet, tiny_pickscore, tmp_path, capsys):
    out = tmp_path / "scored"
    code = run(["score", "--data", str(pickapic_parquet), "-o", str(out), f"reward.path={tiny_pickscore}",
                "data.num_workers=0", "--limit", "6"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "pairs scored" in text and "ties dropped" in text and "agrees with humans" in text
    code = run(["score", "--data", str(pickapic_parquet), "-o", str(tmp_path / "j"), f"reward.path={tiny_pickscore}",
                "data.num_workers=0", "--json"])  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["scored"] == 7  # 12 - 4 ties - 1 corrupt
    # a missing dataset is one line, exit 1
    assert run(["score", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_loads_nothing(tmp_path, capsys):
    assert run(["score", "--recipe", "pickscore_pickapic", "--dry-run", f"output_dir={tmp_path / 'o'}"]) == 0
    assert "r_min: 0.11543526500463486" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny_pickscore, tmp_path):
    """A process killed with SIGKILL loses at most the shard in flight; the resumed result is identical."""
    import pyarrow as pa

    from tests.scoring.conftest import pickapic_rows

    data = tmp_path / "data.parquet"
    pq.write_table(pa.table(pickapic_rows(240)), data)
    args = ["--data", str(data), f"reward.path={tiny_pickscore}", "data.rows_per_shard=3", "data.num_workers=0"]
    reference = tmp_path / "reference"
    assert run(["-q", "score", "-o", str(reference), *args]) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "smpo_cli", "-q", "score", "-o", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "data").glob("part-0000[3-9].parquet")):
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "data").glob("part-*.parquet")))
    assert 0 < finished < 80, f"kill landed outside the run ({finished} shards); stderr: {proc.stderr.read()[-500:]}"
    assert run(["-q", "score", "-o", str(out), *args]) == 0
    pd.testing.assert_frame_equal(read_out(out), read_out(reference))
    assert (out / "skipped.jsonl").read_text() == (reference / "skipped.jsonl").read_text()
    ref_summary = json.loads((reference / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for key in ("rows", "scored", "ties_dropped", "skipped", "normalization", "agreement", "p"):
        assert summary[key] == ref_summary[key], key
    assert summary["shards_resumed"] == finished


def test_recipe_output_key_must_exist(pickapic_parquet, tiny_pickscore, tmp_path):
    with pytest.raises(DataError, match="not an output of pickscore"):
        score(pickapic_parquet, tmp_path / "o", tiny_pickscore, "reward.output=nope")


def test_fixed_normalisation_needs_range():
    from smpo_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="reward.normalization=fixed needs"):
        load_recipe(None, "score", ["data.path=x", "output_dir=o", "reward.name=hpsv2", "reward.normalization=fixed"])


def test_two_processes_split_shards_and_match_one_process(tiny_pickscore, tmp_path):
    """Under torchrun (as under `accelerate launch`) each rank scores its own shards; rank 0 finalises."""
    import shutil

    import pyarrow as pa

    from tests.scoring.conftest import pickapic_rows

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun ships with torch"
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table(pickapic_rows(30)), data)
    args = ["--data", str(data), f"reward.path={tiny_pickscore}", "data.rows_per_shard=4", "data.num_workers=0"]
    assert run(["-q", "score", "-o", str(tmp_path / "single"), *args]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "smpo_cli", "-q", "score",
         "-o", str(tmp_path / "multi"), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    pd.testing.assert_frame_equal(read_out(tmp_path / "multi"), read_out(tmp_path / "single"))
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["scored"] == json.loads((tmp_path / "single" / "summary.json").read_text())["scored"]
