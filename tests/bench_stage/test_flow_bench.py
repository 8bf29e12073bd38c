"""`smpo bench rewards` and `smpo bench geneval` on the tiny flow-matching models (tiny-sd3, tiny-flux): the
benchmarks take a flow model as they take an SD one (the stock pipeline generates), with tiny reward models."""

import json

import pytest

from smpo_cli.cli.main import run

pytestmark = pytest.mark.integration
FLOW = ["tiny-sd3", "tiny-flux"]
SAMPLING = ["sampling.images_per_prompt=2", "sampling.num_inference_steps=2", "sampling.height=32",
            "sampling.width=32"]  # fmt: skip


@pytest.mark.parametrize("model", FLOW)
def test_bench_rewards_on_a_flow_model(tmp_path, capsys, model):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "bench"
    args = ["bench", "rewards", "--model", model, "--baseline", model, "--prompts", str(tmp_path / "p.txt"),
            "-o", str(out), *SAMPLING, "rewards=[{name: pickscore, path: tiny}]"]  # fmt: skip
    assert run(["-q", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 2 and result["images_per_model"] == 4
    m = result["metrics"]["pickscore"]
    assert m["model"]["n"] == 4
    # the same flow model with the same seeds makes the same images: every pair ties
    assert m["model"]["mean"] == pytest.approx(m["baseline"]["mean"], abs=1e-6)
    assert m["win_rate_vs_baseline"]["win_rate"] == pytest.approx(50.0)
    from PIL import Image

    images = sorted((out / "model_images").rglob("*.png"))
    assert len(images) == 4 and Image.open(images[0]).size == (32, 32)
    assert json.loads((out / "run.json").read_text())["status"] == "success"


@pytest.mark.parametrize("model", FLOW)
def test_bench_geneval_on_a_flow_model(tmp_path, capsys, model):
    meta = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]  # fmt: skip
    meta.write_text("".join(json.dumps(m) + "\n" for m in rows))
    out = tmp_path / "geneval"
    args = ["-q", "bench", "geneval", "--model", model, "--metadata", str(meta), "-o", str(out),
            "detector.path=tiny", "colour.path=tiny", *SAMPLING, "--json"]  # fmt: skip
    assert run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 2 and result["images"] == 4 and result["judged_now"] == 4
    assert (out / "images" / "00001" / "samples" / "0001.png").is_file()
    verdicts = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(verdicts) == 4 and set(result["tasks"]) == {"single_object", "colors"}
    assert run(args) == 0  # a rerun reuses images and verdicts
    assert json.loads(capsys.readouterr().out)["judged_now"] == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_train_step_bench_times_the_flow_variants(family):
    """bench/train_step.py --family sd3|flux: DPO, online SmPO and cached SmPO steps on the tiny transformer."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(root / "bench" / "train_step.py"), "--family", family, "--size", "tiny", "--rounds", "1",
           "--threads", "1", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["family"] == family and set(figures["ms_per_step"]) == {"dpo", "smpo-online", "smpo-cache"}
    calls = figures["unet_calls_per_step"]
    # policy + reference, and the inversion online
    assert calls["dpo"] == calls["smpo-cache"] == 2 and calls["smpo-online"] > 2
    assert figures["cache_vs_dpo"] > 0 and "online_vs_dpo" in figures
    bad = subprocess.run([*cmd[:3], "sd15", "--size", "tiny"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a sd15 size" in bad.stderr
