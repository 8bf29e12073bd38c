"""`smpo train` end to end on the embedded tiny SD1.5 model and scored toy pairs (CPU, fp32)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from smpo_cli.cli.main import run
from smpo_cli.config import load_recipe
from smpo_cli.errors import SmpoError
from smpo_cli.runs import execute
from smpo_cli.training.runner import run_training

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def train(recipe: str, scored: Path, out: Path, *extra: str):
    loaded = load_recipe(recipe, "train", [f"data.path={scored}", f"output_dir={out}", *extra])
    return execute("train", loaded, run_training, resume=lambda r: r.train.resume is not None)


def unet_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def base_unet_state() -> dict[str, torch.Tensor]:
    from smpo_cli.models.tiny import materialize_tiny

    return unet_state(materialize_tiny("tiny-sd15"))


def test_smpo_trains_writes_metrics_and_a_stock_pipeline(scored, tmp_path):
    out = tmp_path / "smpo"
    result = train("tiny_smpo_cpu", scored, out, "train.max_steps=2")
    assert result.steps == 2 and result.ranks_in_sync and result.skipped_pairs == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l", "implicit_acc", "mean_p",
                "grad_norm", "lr", "pairs_per_s", "unet_calls"):  # fmt: skip
        assert key in rows[0], key
    # 2 micro-batches x (ReNoise: up to 5 grid steps x 2 estimates + policy + reference)
    assert 2 * 2 < rows[0]["unet_calls"] <= 2 * (5 * 2 + 2)
    assert rows[0]["lr"] == pytest.approx(4e-6) and 0.5 <= rows[0]["mean_p"] <= 1
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None, requires_safety_checker=False)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    trained, base = unet_state(out / "pipeline"), base_unet_state()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "success" and manifest["result"]["steps"] == 2


def test_p_one_half_changes_no_weight(scored, tmp_path):
    """With p = 0.5 for every pair the SmPO coefficient is 0: an optimiser step changes no weight."""
    half = tmp_path / "half"
    shutil.copytree(scored, half)
    for f in (half / "data").glob("*.parquet"):
        table = pq.read_table(f)
        i = table.column_names.index("pickscore_p")
        import pyarrow as pa

        table = table.set_column(i, "pickscore_p", pa.array([0.5] * table.num_rows))
        pq.write_table(table, f)
    out = tmp_path / "run"
    result = train("tiny_smpo_cpu", half, out, "train.max_steps=1", "optim.max_grad_norm=null")
    assert result.final_loss == pytest.approx(0.6931471805599453)
    trained, base = unet_state(out / "pipeline"), base_unet_state()
    assert all(torch.equal(trained[k], base[k]) for k in base)


def test_dpo_and_sft(scored, tmp_path):
    dpo = train("tiny_dpo_cpu", scored, tmp_path / "dpo", "train.max_steps=1")
    assert dpo.steps == 1 and dpo.unet_calls_per_step == 2 * 2  # policy + reference, 2 micro-batches
    # Diffusion-DPO orders pairs by the human label (its paper's labels); the run summary says so
    assert (dpo.labels, dpo.label_column) == ("human", "label")
    summary = json.loads((tmp_path / "dpo" / "run.json").read_text())["result"]
    assert (summary["labels"], summary["label_column"]) == ("human", "label")
    assert "labels: human" in (tmp_path / "dpo" / "recipe.resolved.yaml").read_text()
    reward = train("tiny_dpo_cpu", scored, tmp_path / "dpo-reward", "train.max_steps=1", "data.labels=reward")
    assert (reward.labels, reward.label_column) == ("reward", "pickscore_winner")
    sft = train("tiny_dpo_cpu", scored, tmp_path / "sft", "train.max_steps=1", "method.name=sft")
    assert sft.steps == 1 and sft.unet_calls_per_step == 2


@pytest.mark.parametrize("mode", ["official", "official_0_22"])
def test_official_inversion_modes_train(scored, tmp_path, mode):
    """The official loop (smpo_cli.inversion.official) inside a training step: its 5-entry grid, 2 UNet calls
    per inverse step (at most 5 steps), then policy + reference."""
    result = train("tiny_smpo_cpu", scored, tmp_path / mode, "train.max_steps=1", f"inversion.timestep_mode={mode}")
    assert result.steps == 1 and 0 < result.final_loss < 10
    assert 2 * 2 < result.unet_calls_per_step <= 2 * (5 * 2 + 2)


def test_lora_saves_diffusers_lora_weights(scored, tmp_path):
    out = tmp_path / "lora"
    result = train("tiny_smpo_cpu", scored, out, "train.max_steps=2", "train.lora_rank=4", "optim.lr=1e-3")
    assert result.model_path.endswith("lora")
    from diffusers import StableDiffusionPipeline

    from smpo_cli.models.tiny import materialize_tiny

    pipe = StableDiffusionPipeline.from_pretrained(materialize_tiny("tiny-sd15"), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(str(out / "lora"))
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_training_from_the_inversion_cache(scored, tmp_path):
    from smpo_cli.inversion.runner import resume_ok, run_inversion

    cache = tmp_path / "cache"
    loaded = load_recipe(None, "invert", [f"data.path={scored}", f"output_dir={cache}", "model.pretrained=tiny-sd15",
                                          "data.resolution=32", "data.num_workers=0", "inversion.num_steps=5",
                                          "inversion.levels=[199,599,999]"])  # fmt: skip
    execute("invert", loaded, run_inversion, resume=resume_ok)
    result = train("tiny_smpo_cpu", scored, tmp_path / "run", "train.max_steps=2", "inversion.source=cache",
                   f"inversion.cache_path={cache}")  # fmt: skip
    assert result.steps == 2 and result.unet_calls_per_step == 2 * 2  # no inversion calls: cached


def test_a_cache_of_another_version_of_the_table_is_refused(scored, tmp_path, capsys):
    """The cache holds each row's latents and inversions; training reads the labels from the table. A table
    regenerated or edited after smpo invert would pair old latents with new labels: training and an invert
    resume refuse it, while a copy of the same table elsewhere still trains from the cache."""
    import pyarrow as pa

    data, cache = tmp_path / "scored", tmp_path / "cache"
    shutil.copytree(scored, data)
    invert = ["invert", "-o", str(cache), f"data.path={data}", "model.pretrained=tiny-sd15", "data.resolution=32",
              "data.num_workers=0", "inversion.num_steps=3", "inversion.levels=[499,999]", "data.rows_per_shard=8"]  # fmt: skip
    assert run(["-q", *invert]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    result = train("tiny_smpo_cpu", copy, tmp_path / "run", "train.max_steps=1", "inversion.source=cache",
                   f"inversion.cache_path={cache}")  # fmt: skip
    assert result.steps == 1
    table_file = next(data.rglob("*.parquet"))
    table = pq.read_table(table_file)
    pq.write_table(pa.concat_tables([table.slice(1), table.slice(0, 1)]), table_file)  # the same rows, reordered
    capsys.readouterr()
    assert run(["train", "--recipe", "tiny_smpo_cpu", "-o", str(tmp_path / "stale"), f"data.path={data}",
                "train.max_steps=1", "inversion.source=cache", f"inversion.cache_path={cache}"]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "made from another version of data.path" in err and "smpo invert --overwrite" in err and "Traceback" not in err
    # an interrupted cache resumed on the changed table: its finished shards are refused too
    shard = next((cache / "cache").glob("part-*.safetensors"))
    shard.unlink()
    assert run(invert) != 0
    err = capsys.readouterr().err
    assert "inverted from another version of data.path" in err and "--overwrite" in err
    assert run(["-q", *invert, "--overwrite"]) == 0


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(scored, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SmpoError, match="non-finite"):
        train("tiny_dpo_cpu", scored, out, "train.max_steps=6", "optim.lr=1e30", "train.max_nonfinite_steps=1",
              "train.checkpoint_every_steps=1", "optim.max_grad_norm=null")  # fmt: skip
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_resume_with_other_settings_is_refused_but_more_steps_are_fine(scored, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["-q", "train", "--recipe", "tiny_smpo_cpu", "-o", str(out), f"data.path={scored}", "train.max_steps=2",
            "train.checkpoint_every_steps=1", "inversion.source=none"]  # fmt: skip
    assert run(args) == 0
    capsys.readouterr()
    assert run([*args, "train.resume=auto", "train.max_steps=4", "optim.lr=1e-5"]) == 2  # other lr: refused
    err = capsys.readouterr().err
    assert "made with other settings: optim.lr: 1e-06 -> 1e-05" in err and "Traceback" not in err
    assert run([*args, "train.resume=auto", "train.max_steps=4"]) == 0  # train longer: allowed
    assert json.loads((out / "run.json").read_text())["result"]["resumed_from"] == 2


def test_a_torn_metrics_line_does_not_block_the_resume(scored, tmp_path):
    out = tmp_path / "run"
    args = ["-q", "train", "--recipe", "tiny_smpo_cpu", "-o", str(out), f"data.path={scored}", "train.max_steps=2",
            "train.checkpoint_every_steps=1", "inversion.source=none"]  # fmt: skip
    assert run(args) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # the disk filled mid-line
    assert run([*args, "train.resume=auto", "train.max_steps=3"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3]  # the torn line is dropped (its step's numbers are lost), training resumes at 2
    assert json.loads((out / "run.json").read_text())["result"]["resumed_from"] == 2


def test_sigkill_then_resume_matches_uninterrupted(scored, tmp_path):
    """On CPU in fp32, a run killed with SIGKILL and resumed ends with identical weights."""
    args = ["--recipe", "tiny_smpo_cpu", f"data.path={scored}", "train.max_steps=6", "train.checkpoint_every_steps=2"]
    reference = tmp_path / "reference"
    assert run(["-q", "train", "-o", str(reference), *args]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "smpo_cli", "-q", "train", "-o", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-000002" / "state.json").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "pipeline").exists(), "the kill landed after the run finished"
    assert run(["-q", "train", "-o", str(out), *args, "train.resume=auto"]) == 0
    assert json.loads((out / "run.json").read_text())["result"]["resumed_from"] >= 2
    a, b = unet_state(out / "pipeline"), unet_state(reference / "pipeline")
    assert all(torch.equal(a[k], b[k]) for k in b)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_two_processes_keep_identical_weights(scored, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "smpo_cli", "-q", "train",
         "--recipe", "tiny_dpo_cpu", f"data.path={scored}", "-o", str(tmp_path / "ddp"), "train.max_steps=2", "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ranks_in_sync"] and result["steps"] == 2


def test_a_two_process_run_killed_and_resumed_on_one_process_continues_the_same_steps(scored, tmp_path):
    """Elastic resume: 2 processes x batch 2 x accumulation 2 = 8 pairs per step; killed after step 2 and resumed
    on 1 process (accumulation 4), the run ends where the uninterrupted 2-process run ends. Not bit-identical:
    DDP's all-reduce adds the two processes' gradients in another order than accumulation does."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--recipe", "tiny_dpo_cpu", f"data.path={scored}", "train.max_steps=8", "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=8"]  # fmt: skip

    def launch(out: Path) -> subprocess.Popen:
        import socket

        with socket.socket() as sock:  # a free port: a fixed one may still be held by an earlier run
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "smpo_cli", "-q",
                                 "train", "-o", str(out), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # fmt: skip

    from smpo_cli.models.tiny import materialize_tiny

    materialize_tiny("tiny-sd15")  # once, before the processes start
    whole = launch(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    killed_dir = tmp_path / "killed"
    killed = launch(killed_dir)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoints" / "step-000002" / "state.json").exists():
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        time.sleep(0.01)
    import psutil  # accelerate's dependency

    # the launcher and both workers (torchrun starts each worker in its own session)
    for proc in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    killed.wait()
    assert not (killed_dir / "pipeline").exists(), "the kill landed after the run finished"
    state = json.loads((killed_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["pairs_per_step"] == 8 and state["processes"] == 2
    assert run(["-q", "train", "-o", str(killed_dir), *args, "train.resume=auto"]) == 0  # one process
    assert json.loads((killed_dir / "run.json").read_text())["result"]["resumed_from"] >= 2
    a, b = unet_state(killed_dir / "pipeline"), unet_state(tmp_path / "whole" / "pipeline")
    base = base_unet_state()
    # Adam moves a weight by about lr whatever its gradient's size, so rounding can flip the sign of a weight's
    # update where its gradient is ~0: compare the runs' distance with the distance they travelled, as norms
    moved = sum(float((b[k] - base[k]).double().pow(2).sum()) for k in b) ** 0.5
    apart = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b) ** 0.5
    assert apart < 0.01 * moved, (moved, apart)
    loss = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()}
    again = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (killed_dir / "metrics.jsonl").read_text().splitlines()}
    # the logged numbers are means over both processes' pairs, so the 1-process steps log the same
    # within the rounding Adam amplifies (above); a lost or repeated step moves the loss by ~1e-2
    assert again.keys() == loss.keys() and all(again[s] == pytest.approx(loss[s], abs=1e-3) for s in loss)


def test_an_impossible_batch_split_is_refused_before_loading(scored, tmp_path, capsys):
    args = ["-q", "train", "--recipe", "tiny_dpo_cpu", f"data.path={scored}", "-o", str(tmp_path / "o")]
    assert run([*args, "train.global_batch_size=6", "train.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size: 6 pairs per optimiser step cannot be split" in err
    assert "train.batch_size=3 (grad_accum 2) or train.batch_size=6 (grad_accum 1)" in err
    assert not (tmp_path / "o" / "checkpoints").exists()
    # a global batch that splits: accumulation is derived (6 = 3 x 2 x 1 process)
    assert run([*args, "--overwrite", "train.global_batch_size=6", "train.batch_size=3", "train.max_steps=1"]) == 0
    row = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["pairs"] == 6


def test_cli_dry_run_and_bundled_alias(tmp_path, capsys):
    assert run(["train", "--recipe", "sdxl.yaml", "--dry-run", f"output_dir={tmp_path / 'x'}"]) == 0
    captured = capsys.readouterr()
    assert "stabilityai/stable-diffusion-xl-base-1.0" in captured.out and "optimiser: adafactor" in captured.err


def test_sdxl_smpo_trains(scored, tmp_path):
    """SDXL path: two text encoders, pooled embeddings, per-image size/crop time ids."""
    result = train("tiny_smpo_cpu", scored, tmp_path / "xl", "train.max_steps=1", "model.pretrained=tiny-sdxl")
    assert result.steps == 1 and result.final_loss is not None and Path(result.model_path, "text_encoder_2").is_dir()


def test_v_prediction_model_trains(scored, tmp_path):
    from smpo_cli.models.tiny import materialize_tiny

    model = tmp_path / "tiny-v"
    shutil.copytree(materialize_tiny("tiny-sd15"), model)
    cfg_path = model / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    result = train("tiny_smpo_cpu", scored, tmp_path / "v", "train.max_steps=1", f"model.pretrained={model}")
    assert result.steps == 1 and 0 < result.final_loss < 10


# Regenerate: SMPO_PRINT_GOLDEN=1 pytest tests/train -k golden -s  (and paste the printed lists here).
# "mean" is the posterior-mean ablation: it draws no latent noise. History: the lists changed when Diffusion-DPO
# moved to its paper's human labels (data.labels=human, issue 14) and again when t and noise came to be drawn
# pair by pair from (seed, step, position) instead of once per micro-batch and process (elastic resume, issue 16).
GOLDEN_DPO_LOSSES = {"sample": [0.693147, 0.711527, 0.628843], "mean": [0.693147, 0.69144, 0.703359]}


@pytest.mark.parametrize("latents", ["sample", "mean"])
def test_golden_losses_tiny_dpo(scored, tmp_path, latents):
    result = train("tiny_dpo_cpu", scored, tmp_path / "g", "train.max_steps=3", f"data.latents={latents}")
    losses = [round(m["loss"], 6) for m in result.metrics]
    if os.environ.get("SMPO_PRINT_GOLDEN"):
        print("GOLDEN_DPO_LOSSES", latents, "=", losses)
    assert losses[0] == pytest.approx(0.693147, abs=1e-6)  # the policy starts as the reference
    assert losses == pytest.approx(GOLDEN_DPO_LOSSES[latents], abs=2e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_reference_starts_equal_to_the_policy(scored, tmp_path, dtype):
    """Half-precision weights without autocast: the fp32 policy and its frozen reference must predict the same
    at step 1 (margin 0); a reference left in half precision biased every DPO/SmPO step by its rounding."""
    out = tmp_path / dtype
    train("tiny_dpo_cpu", scored, out, "train.max_steps=1", f"model.dtype={dtype}")  # mixed_precision: no (default)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["model_mse_w"] == row["ref_mse_w"] and row["model_mse_l"] == row["ref_mse_l"]
    assert row["loss"] == pytest.approx(0.693147, abs=1e-6)


def test_training_latents_are_posterior_samples(tmp_path):
    """Fine-tuning sees the latent distribution the model was pretrained on: posterior samples (diffusers,
    Diffusion-DPO), not the posterior mean, unless data.latents=mean asks for the ablation."""
    from smpo_cli.models import load_components
    from smpo_cli.models import vae as vae_ops

    comps = load_components("tiny-sd15", dtype="float32", device="cpu")
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    mean = vae_ops.encode(comps.vae, pixels)
    a = vae_ops.encode(comps.vae, pixels, sample=True, generator=torch.Generator().manual_seed(0))
    b = vae_ops.encode(comps.vae, pixels, sample=True, seeds=[5, 6, 7, 8])
    b_again = vae_ops.encode(comps.vae, pixels[2:], sample=True, seeds=[7, 8])
    std = comps.vae.encode(pixels).latent_dist.std * comps.vae.config.scaling_factor
    # the residual from the mean is the posterior std times unit noise
    z = ((a - mean) / std).flatten()
    assert abs(float(z.std()) - 1.0) < 0.05 and abs(float(z.mean())) < 0.05
    torch.testing.assert_close(b[2:], b_again)  # per-image seeds: independent of the batch
    assert not torch.allclose(a, mean)
    from smpo_cli.config.schema import TrainRecipe

    assert TrainRecipe.model_fields["data"].annotation.model_fields["latents"].default == "sample"


def test_a_step_without_one_readable_pair_is_an_error_not_a_silent_no_op(tmp_path, capsys):
    """Image paths resolved against the wrong folder used to skip every pair and leave the model unchanged."""
    from smpo_cli.data.toy_pairs import write_toy_pairs

    pairs = write_toy_pairs(tmp_path / "pairs", n=4)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    moved = tmp_path / "elsewhere.jsonl"  # relative image paths now point at nothing
    moved.write_text("".join(json.dumps({**r, "sft_winner": 0, "sft_p": 1.0}) + "\n" for r in rows))
    code = run(["-q", "train", "--recipe", "tiny_dpo_cpu", "-o", str(tmp_path / "out"), f"data.path={moved}",
                "method.name=sft", "data.reward=sft", "train.max_steps=2", "train.checkpoint_every_steps=null"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "found no readable pair" in err and "file not found" in err
