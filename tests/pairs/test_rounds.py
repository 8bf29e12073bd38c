"""``smpo rounds`` on the shipped shapes model: each round samples from the last round's model, a killed run
resumes to the same final model, LoRA rounds are fused, and bad recipes fail before anything runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from smpo_cli.cli.main import run

pytestmark = pytest.mark.integration

PAIRS = "pairs.overrides=[prompts.limit=2, sampling.images_per_prompt=2, sampling.num_inference_steps=2, logging.progress=false]"
TRAIN = ("train.overrides=[model.dtype=float32, inversion.source=cache, train.max_steps=2, train.checkpoint_every_steps=1, "
         "data.empty_prompt_prob=0.0, logging.progress=false]")  # fmt: skip
INVERT = ("invert.overrides=[device=cpu, model.dtype=float32, data.resolution=32, data.num_workers=0, "
          "inversion.num_steps=2, 'inversion.levels=[499,999]', inversion.batch_size=8, logging.progress=false]")  # fmt: skip


def _args(out, *extra):
    return ["-q", "rounds", "--recipe", "rounds_tiny_cpu", "-o", str(out), PAIRS, TRAIN, INVERT, *extra]


def _unet(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _resolved(folder):
    import yaml

    return yaml.safe_load((folder / "recipe.resolved.yaml").read_text())


def test_each_round_samples_from_the_last_rounds_model_and_the_final_model_is_compared_seed_for_seed(tmp_path, capsys):
    out = tmp_path / "rounds"
    assert run(_args(out, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    r0, r1 = result["rounds"]
    assert r0["sampled_from"] == "shapes-sd15" and r1["sampled_from"] == r0["trained_model"]
    assert r0["trained_model"] == str(out / "round_0" / "train" / "pipeline")
    assert result["final_model"] == r1["trained_model"]
    # round r: seed + r for sampling and training; the train and the cache read this round's pairs
    assert _resolved(out / "round_0" / "pairs")["seed"] == 0 and _resolved(out / "round_1" / "pairs")["seed"] == 1
    train1 = _resolved(out / "round_1" / "train")
    assert train1["model"]["pretrained"] == r0["trained_model"] and train1["seed"] == 1
    assert train1["data"]["path"] == str(out / "round_1" / "pairs") and train1["data"]["reward"] == "pickscore"
    assert train1["inversion"]["cache_path"] == str(out / "round_1" / "cache")
    assert _resolved(out / "round_1" / "cache")["model"]["pretrained"] == r0["trained_model"]
    # every round trained: its model differs from the one it sampled from
    assert not torch.equal(_unet(out / "round_1" / "train" / "pipeline")["conv_in.weight"],
                           _unet(out / "round_0" / "train" / "pipeline")["conv_in.weight"])  # fmt: skip
    # the evaluation samples the final model with round 0's seeds: a paired comparison
    ev = result["evaluation"]
    assert ev["model"] == result["final_model"] and _resolved(out / "eval")["seed"] == 0
    change = ev["vs_start"]["pickscore"]
    assert change["change"]["n"] == 4 and change["change"]["groups"] == 2
    assert change["change"]["mean"] == pytest.approx(change["final"] - change["start"])
    assert json.loads((out / "summary.json").read_text())["final_model"] == result["final_model"]


def test_a_killed_run_resumes_to_the_same_final_model_and_keeps_finished_rounds(tmp_path, monkeypatch):
    from smpo_cli.training import runner as train_runner

    whole = tmp_path / "whole"
    assert run(_args(whole, "evaluate_final=false")) == 0

    killed = tmp_path / "killed"
    real = train_runner.save_checkpoint

    def dies_after_round_1s_first_checkpoint(output_dir, step, *args, **kwargs):
        real(output_dir, step, *args, **kwargs)
        if "round_1" in str(output_dir):
            raise KeyboardInterrupt  # a kill between round 1's two optimiser steps

    monkeypatch.setattr(train_runner, "save_checkpoint", dies_after_round_1s_first_checkpoint)
    assert run(_args(killed, "evaluate_final=false")) != 0
    monkeypatch.undo()
    assert [p.name for p in (killed / "round_1" / "train" / "checkpoints").iterdir()] == ["step-000001"]
    kept = (killed / "round_0" / "train" / "run.json").stat().st_mtime_ns
    assert run(_args(killed, "evaluate_final=false")) == 0
    assert (killed / "round_0" / "train" / "run.json").stat().st_mtime_ns == kept  # round 0 not trained again
    assert json.loads((killed / "round_1" / "train" / "run.json").read_text())["result"]["resumed_from"] == 1
    a, b = _unet(whole / "round_1" / "train" / "pipeline"), _unet(killed / "round_1" / "train" / "pipeline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_rounds_fuse_each_adapter_into_the_next_rounds_model(tmp_path):
    from smpo_cli.models.loading import load_components

    out = tmp_path / "lora"
    lora_train = TRAIN.replace("train.max_steps=2", "train.max_steps=2, train.lora_rank=4")
    assert run(["-q", "rounds", "--recipe", "rounds_tiny_cpu", "-o", str(out), PAIRS, lora_train, INVERT, "rounds=1",
                "evaluate_final=false"]) == 0  # fmt: skip
    fused = out / "round_0" / "model"
    assert (out / "round_0" / "train" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    parts = load_components(str(fused), dtype="float32")  # a plain checkpoint: no adapter left
    base = load_components("shapes-sd15", dtype="float32")
    moved = [n for n, p in parts.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert moved and all("attn" in n or "to_" in n or "proj" in n for n in moved)  # only LoRA-targeted weights moved


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["pairs.overrides=[model.pretrained=tiny-sd15]"], "pairs.overrides sets model.pretrained"),
        (["invert=null"], "no invert stage"),
        (["train.recipe=pairs_tiny_cpu"], "not a 'train' recipe"),
        (["train.overrides=[train.max_stepz=2]"], "train.max_stepz"),
    ],
)
def test_bad_rounds_recipes_fail_before_anything_runs(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    base = [PAIRS, TRAIN, INVERT] if not any(e.startswith("train.overrides") for e in extra) else [PAIRS, INVERT]
    code = run(["rounds", "--recipe", "rounds_tiny_cpu", "-o", str(out), *base, *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "round_0").exists()


def test_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "rounds"
    assert run(_args(out, "rounds=1", "evaluate_final=false")) == 0
    assert run(_args(out, "rounds=1", "evaluate_final=false", "seed=5")) == 2
    assert "other settings" in capsys.readouterr().err
