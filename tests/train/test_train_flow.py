"""`smpo train` end to end on the tiny flow-matching models (tiny-sd3, tiny-flux) and scored toy pairs (CPU, fp32).

SmPO with online flow ReNoise inversion, Diffusion-DPO and SFT through the real loader, LoRA on the
transformer's attention projections (reference = adapters off) and full fine-tuning (deep-copied reference).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from smpo_cli.config import load_recipe
from smpo_cli.errors import SmpoError
from smpo_cli.runs import execute
from smpo_cli.training.runner import run_training

pytestmark = pytest.mark.integration
FLOW = ["tiny-sd3", "tiny-flux"]
LORA = ("train.lora_rank=4",)


def train(model: str, scored: Path, out: Path, *extra: str, recipe: str = "tiny_smpo_cpu"):
    loaded = load_recipe(
        recipe, "train", [f"data.path={scored}", f"output_dir={out}", f"model.pretrained={model}", *extra]
    )
    return execute("train", loaded, run_training, resume=lambda r: r.train.resume is not None)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def lora_file(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((folder / "transformer").glob("*.safetensors"))))


@pytest.mark.parametrize("model", FLOW)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_p_one_half_changes_no_weight(scored, tmp_path, model, lora):
    """SmPO with p = 0.5 for every pair: coefficient 0, loss log 2, an optimiser step changes no weight."""
    half = tmp_path / "half"
    shutil.copytree(scored, half)
    for f in (half / "data").glob("*.parquet"):
        table = pq.read_table(f)
        i = table.column_names.index("pickscore_p")
        pq.write_table(table.set_column(i, "pickscore_p", pa.array([0.5] * table.num_rows)), f)
    out = tmp_path / "run"
    extra = [*LORA] if lora else []
    result = train(model, half, out, "train.max_steps=1", "optim.max_grad_norm=null", "optim.lr=1e-3", *extra)
    assert result.final_loss == pytest.approx(math.log(2), abs=1e-7)
    if lora:
        assert all(
            not v.any() for k, v in lora_file(out).items() if "lora_B" in k
        )  # lora_B starts (and stays) 0
    else:
        from smpo_cli.models.tiny import materialize_tiny

        trained, base = transformer_state(out / "pipeline"), transformer_state(materialize_tiny(model))
        assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.parametrize("model", FLOW)
def test_smpo_dpo_sft_run_end_to_end(scored, tmp_path, model):
    smpo = train(model, scored, tmp_path / "smpo", "train.max_steps=2", *LORA)
    assert smpo.steps == 2 and smpo.ranks_in_sync and smpo.skipped_pairs == 0
    first = rows(tmp_path / "smpo")[0]
    for key in ("loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l", "implicit_acc", "mean_p", "mean_t",
                "grad_norm"):  # fmt: skip
        assert math.isfinite(first[key]), key
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts equal to the reference
    assert 0 < first["mean_t"] < 1000
    # 2 micro-batches x (inversion: at most 5 levels x (1 + 1 re-noise) + policy + reference)
    assert 2 * 2 < first["unet_calls"] <= 2 * (5 * 2 + 2)
    dpo = train(model, scored, tmp_path / "dpo", "train.max_steps=2", *LORA, recipe="tiny_dpo_cpu")
    assert dpo.steps == 2 and dpo.unet_calls_per_step == 2 * 2 and math.isfinite(dpo.final_loss)
    sft = train(
        model, scored, tmp_path / "sft", "train.max_steps=1", "method.name=sft", *LORA, recipe="tiny_dpo_cpu"
    )
    assert sft.steps == 1 and sft.unet_calls_per_step == 2 and sft.final_loss > 0


def _pipeline_latents(pipe, seed: int = 0) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images  # fmt: skip


@pytest.mark.parametrize("model", FLOW)
def test_the_lora_loads_with_the_stock_pipeline_and_changes_its_output(scored, tmp_path, model):
    from peft import get_peft_model_state_dict

    from smpo_cli.models import load_components

    out = tmp_path / "run"
    train(model, scored, out, "train.max_steps=1", "optim.lr=1e-3", *LORA)
    info = json.loads((out / "lora" / "smpo_lora.json").read_text())
    assert info["family"] == model.removeprefix("tiny-") and "add_q_proj" in info["target_modules"]
    pipe = load_components(model, device="cpu").pipeline()
    base = _pipeline_latents(pipe)
    assert torch.equal(base, _pipeline_latents(pipe))  # deterministic
    pipe.load_lora_weights(str(out / "lora"))  # the stock SD3 / FLUX loader
    (name,) = pipe.get_list_adapters()["transformer"]
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
    trained = load_file(str(out / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert loaded.keys() == trained.keys() and len(trained) > 0
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert any(trained[k].any() for k in trained if "lora_B" in k)
    assert (_pipeline_latents(pipe) - base).abs().max() > 1e-4


def test_full_fine_tuning_saves_a_stock_pipeline(scored, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "full"
    result = train("tiny-sd3", scored, out, "train.max_steps=1", "optim.lr=1e-4", recipe="tiny_dpo_cpu")
    assert result.steps == 1 and result.model_path.endswith("pipeline")
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    assert _pipeline_latents(pipe).shape == (1, 16, 16, 16)


@pytest.mark.parametrize("model", FLOW)
def test_resume_continues_exactly(scored, tmp_path, model):
    """Stopped after step 2 (its checkpoint) and resumed to step 3: the same LoRA as an uninterrupted run."""
    args = ["optim.lr=1e-3", "train.checkpoint_every_steps=1", *LORA]
    train(model, scored, tmp_path / "straight", "train.max_steps=3", *args)
    train(model, scored, tmp_path / "stopped", "train.max_steps=2", *args)
    resumed = train(model, scored, tmp_path / "stopped", "train.max_steps=3", "train.resume=auto", *args)
    assert resumed.resumed_from == 2 and resumed.steps == 3
    a, b = lora_file(tmp_path / "straight"), lora_file(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "straight")] == [r["loss"] for r in rows(tmp_path / "stopped")]


@pytest.mark.parametrize("setting", ["inversion.source=plan", "inversion.timestep_mode=grid"])
def test_unsupported_flow_settings_are_refused(scored, tmp_path, setting):
    extra = [setting, "inversion.cache_path=nowhere"] if "plan" in setting else [setting]
    with pytest.raises(SmpoError, match="online|exact"):
        train("tiny-sd3", scored, tmp_path / "x", "train.max_steps=1", "model.family=sd3", *extra, *LORA)


def invert_cache(model: str, scored: Path, out: Path, levels: list[int], *extra: str):
    from smpo_cli.inversion.runner import resume_ok, run_inversion

    loaded = load_recipe(None, "invert", [f"data.path={scored}", f"output_dir={out}", f"model.pretrained={model}",
                                          "data.resolution=32", "data.num_workers=0", "inversion.num_steps=5",
                                          f"inversion.levels={levels}", "inversion.cache_dtype=float32", *extra])  # fmt: skip
    return execute("invert", loaded, run_inversion, resume=resume_ok)


@pytest.mark.parametrize("model", FLOW)
def test_cache_training_equals_online_training_at_the_cached_levels(scored, tmp_path, monkeypatch, model):
    """SmPO from the `smpo invert` cache and online SmPO that draws s among the same levels with the same draws:
    the same losses and the same LoRA after 2 steps (float tolerance), without inversion calls."""
    import smpo_cli.training.flow_step as flow_step

    levels = [250, 600, 999]
    cache = tmp_path / "cache"
    invert_cache(model, scored, cache, levels, "data.latents=mean")
    same = ["train.max_steps=2", "optim.lr=1e-3", "data.latents=mean", "data.empty_prompt_prob=0", *LORA]
    from_cache = ["inversion.source=cache", f"inversion.cache_path={cache}"]
    cached = train(model, scored, tmp_path / "cached", *same, *from_cache)
    assert cached.steps == 2 and cached.unet_calls_per_step == 2 * 2  # policy + reference, no inversion

    def among_levels(draws, shift):  # the cache's draw: one level index per pair
        return torch.tensor(levels, dtype=torch.float64)[draws.randint(len(levels))] / 1000

    monkeypatch.setattr(flow_step, "sample_pair_sigmas", among_levels)
    online = train(model, scored, tmp_path / "online", *same)
    assert online.unet_calls_per_step > cached.unet_calls_per_step
    a, b = rows(tmp_path / "cached"), rows(tmp_path / "online")
    sums = {sum(c) for c in itertools.combinations_with_replacement(levels, 4)}  # 2 micro-batches x 2 pairs
    assert all(4 * r["mean_t"] in sums for r in a)
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l", "reward_margin", "mean_t"):  # fmt: skip
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    la, lb = lora_file(tmp_path / "cached"), lora_file(tmp_path / "online")
    assert la.keys() == lb.keys() and any(la[k].any() for k in la if "lora_B" in k)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=1e-5, rtol=1e-4)


def test_a_cache_of_another_model_is_refused_in_one_line(scored, tmp_path):
    cache = tmp_path / "cache"
    invert_cache("tiny-sd15", scored, cache, [999])
    with pytest.raises(SmpoError, match="another model"):
        train("tiny-sd3", scored, tmp_path / "run", "train.max_steps=1", "inversion.source=cache",
              f"inversion.cache_path={cache}", *LORA)  # fmt: skip


def test_the_plan_cache_refuses_a_flow_model(scored, tmp_path):
    from smpo_cli.inversion.runner import resume_ok, run_inversion

    loaded = load_recipe(None, "invert", [f"data.path={scored}", f"output_dir={tmp_path / 'plan'}",
                                          "model.pretrained=tiny-sd3", "plan.train_recipe=tiny_smpo_cpu",
                                          f"plan.train_overrides=[data.path={scored},model.pretrained=tiny-sd3]"])  # fmt: skip
    with pytest.raises(SmpoError, match=r"flow-matching model \(sd3\)"):
        execute("invert", loaded, run_inversion, resume=resume_ok)


def test_two_processes_train_the_same_lora_as_one(scored, tmp_path):
    """DDP on a flow model: 2 processes (torchrun, gloo) and 1 process with the same 8 pairs per step end with
    the same LoRA (split-independent draws; only the gradient summation order differs)."""
    import os
    import socket
    import subprocess
    import sys

    from smpo_cli.models.tiny import materialize_tiny

    materialize_tiny("tiny-sd3")  # once, before the processes start
    args = ["train", "--recipe", "tiny_smpo_cpu", f"data.path={scored}", "model.pretrained=tiny-sd3", *LORA,
            "train.max_steps=2", "train.global_batch_size=8", "train.batch_size=2"]  # fmt: skip
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "smpo_cli", "-q",
                           *args, "-o", str(tmp_path / "two"), "--json"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["ranks_in_sync"]
    from smpo_cli.cli.main import run

    assert run(["-q", *args, "-o", str(tmp_path / "one")]) == 0
    a, b = lora_file(tmp_path / "two"), lora_file(tmp_path / "one")
    moved = sum(float(b[k].double().pow(2).sum()) for k in b if "lora_B" in k) ** 0.5  # lora_B starts at 0
    apart = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b) ** 0.5
    assert moved > 0 and apart < 0.01 * moved, (moved, apart)
    assert [r["loss"] for r in rows(tmp_path / "two")] == pytest.approx([r["loss"] for r in rows(tmp_path / "one")], abs=1e-4)
