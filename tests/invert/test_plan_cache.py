"""The plan cache (`smpo invert plan.*` -> `smpo train inversion.source=plan`) on the embedded tiny SD1.5 model and
scored toy pairs (CPU, fp32): the same weights as online exact-t training with the reference model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smpo_cli.cli.main import run
from smpo_cli.config import load_recipe
from smpo_cli.errors import SmpoError
from smpo_cli.runs import execute
from smpo_cli.training.runner import run_training

pytestmark = pytest.mark.integration
# the run both trainings make: 3 steps of 2 pairs x 2 micro-batches, posterior-sampled latents, 20% empty prompts,
# random flips (all drawn per position, so the plan cache replays them)
RUN = ["train.max_steps=3", "data.random_flip=true", "inversion.model=reference", "inversion.timestep_mode=exact"]


def train(scored: Path, out: Path, *extra: str):
    loaded = load_recipe("tiny_smpo_cpu", "train", [f"data.path={scored}", f"output_dir={out}", *RUN, *extra])
    return execute("train", loaded, run_training, resume=lambda r: r.train.resume is not None)


def invert_plan(scored: Path, out: Path, *extra: str):
    from smpo_cli.inversion.runner import resume_ok, run_inversion

    overrides = "[" + ",".join([f"data.path={scored}", *RUN]) + "]"
    loaded = load_recipe(None, "invert", [f"data.path={scored}", f"output_dir={out}", "model.pretrained=tiny-sd15",
                                          "plan.train_recipe=tiny_smpo_cpu", f"plan.train_overrides={overrides}",
                                          "plan.steps_per_shard=2", "inversion.cache_dtype=float32", *extra])  # fmt: skip
    return execute("invert", loaded, run_inversion, resume=resume_ok)


def unet_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def unet_state_base() -> dict[str, torch.Tensor]:
    from smpo_cli.models.tiny import materialize_tiny

    return unet_state(materialize_tiny("tiny-sd15"))


@pytest.fixture(scope="module")
def plan(scored, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    result = invert_plan(scored, root / "cache")
    return root / "cache", result


def test_the_plan_lists_every_visit_of_the_run_with_the_cached_t(scored, plan):
    """(c) max_steps x G visits, positions 0..max_steps*G-1 in order; the cache holds each one's t."""
    from safetensors.torch import load_file

    from smpo_cli.training.visit_plan import pairs_per_step, visit_plan

    recipe = load_recipe("tiny_smpo_cpu", "train", [f"data.path={scored}", "output_dir=unused", *RUN]).recipe
    G = pairs_per_step(recipe)
    visits = visit_plan(recipe)
    assert G == 4 and len(visits) == 3 * G
    assert [v.position for v in visits] == list(range(3 * G))
    assert [v.step for v in visits] == [p // G for p in range(3 * G)]
    cache, result = plan
    assert result.layout == "plan" and result.inverted == 3 * G and result.shards == 2  # steps [0, 2), [2, 3)
    stored = {}
    for f in sorted((cache / "plan").glob("part-*.safetensors")):
        part = load_file(str(f))
        stored.update(zip(part["positions"].tolist(), part["t"].tolist(), strict=True))
    assert stored == {v.position: v.t for v in visits}
    again = invert_plan(scored, cache)  # the same command again resumes: every shard is done
    assert again.shards_resumed == 2 and again.inverted == 3 * G


def test_training_from_the_plan_cache_equals_online_exact_t_training(scored, plan, tmp_path):
    """(a) the same t per step and the same final weights as online exact-t inversion by the reference model."""
    cache, _ = plan
    online = train(scored, tmp_path / "online")
    cached = train(scored, tmp_path / "plan", "inversion.source=plan", f"inversion.cache_path={cache}")
    assert online.steps == cached.steps == 3
    rows = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(tmp_path / "online"), rows(tmp_path / "plan")
    assert [r["mean_t"] for r in a] == [r["mean_t"] for r in b]
    assert all(r["unet_calls"] == 2 * 2 for r in b) and all(r["unet_calls"] > 2 * 2 for r in a)
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-9)
    wa, wb = unet_state(tmp_path / "online" / "pipeline"), unet_state(tmp_path / "plan" / "pipeline")
    # tolerance 0: the cache is float32, micro-batches are composed as in training and the inversion is the online
    # code (step._invert) on the same inputs with the same reference weights, so on one CPU thread every op repeats
    # bit for bit (a GPU or another thread count could differ by float32 rounding: then atol ~1e-7 would be the bound)
    diff = max(float((wb[k].double() - wa[k].double()).abs().max()) for k in wa)
    assert diff == 0.0, diff
    assert any(not torch.equal(wa[k], base) for k, base in unet_state_base().items())  # training moved the weights


@pytest.mark.parametrize("other", ["seed=1", "train.max_steps=2", "train.global_batch_size=2", "data.random_flip=false",
                                   "inversion.num_steps=4"])  # fmt: skip
def test_a_plan_cache_made_for_other_settings_is_refused(scored, plan, tmp_path, other):
    """(b) one line naming the setting that differs."""
    cache, _ = plan
    key = other.split("=")[0]
    key = "train.pairs_per_step" if key == "train.global_batch_size" else key
    with pytest.raises(SmpoError, match=rf"planned for {key}=.*this run has {key}="):
        train(scored, tmp_path / "x", "inversion.source=plan", f"inversion.cache_path={cache}", other)


def test_dry_runs_print_unet_calls_and_bytes_online_full_and_plan(tmp_path, capsys):
    """(d) the paper's runs: 200 steps x 1,024 pairs (8 processes) on ~851k Pick-a-Pic pairs."""
    printed = {}
    for name in ("sd15_smpo", "sdxl_smpo"):
        assert run(["train", "--recipe", name, "--dry-run", f"output_dir={tmp_path / name}",
                    "data.path=datasets/pickapic_v2_scored"]) == 0  # fmt: skip
        captured = capsys.readouterr()
        printed[name] = captured.out + captured.err
    assert run(["invert", "--dry-run", f"output_dir={tmp_path / 'inv'}", "data.path=datasets/pickapic_v2_scored",
                "model.pretrained=stabilityai/stable-diffusion-xl-base-1.0", "plan.train_recipe=sdxl_smpo",
                "plan.processes=8"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    printed["invert sdxl plan"] = captured.out + captured.err
    for name, text in printed.items():
        print(f"--- {name}\n{text}")
        flat = " ".join(text.split())
        assert "200 steps x 1,024 pairs" in flat and "204,800 pair visits" in flat, name
        assert "online (exact t)" in flat and "full cache" in flat and "plan cache (the 204,800 visits" in flat, name
        assert "851,293 pairs" in flat, name
    sdxl = " ".join(printed["sdxl_smpo"].split())
    assert "2.8 MiB per pair" in sdxl and "512.1 KiB per visit" in sdxl
    sd15 = " ".join(printed["sd15_smpo"].split())
    assert "128.1 KiB per visit" in sd15
