"""The memory plan of `smpo train --dry-run` (smpo_cli.training.memory): parameter counts of the shipped
UNet configs on the meta device, the closed-form parts, sharding as the trainer does it (and the launches it
refuses), the measured activations against a real step's allocations, and the command line. No weights, no
network."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from smpo_cli.config import load_recipe
from smpo_cli.training import memory as mp
from smpo_cli.training.memory import activations, cache, models

ROOT = Path(__file__).resolve().parents[2]
SD15_UNET = 859_520_964
SDXL_UNET = 2_567_463_684
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 49408,
          "max_position_embeddings": 77, "projection_dim": 768}  # fmt: skip
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "vocab_size": 49408,
             "max_position_embeddings": 77, "projection_dim": 1280}  # fmt: skip


def sd15_recipe(*overrides: str, output_dir: Path | None = None):
    extra = [f"output_dir={output_dir}"] if output_dir else []
    return load_recipe("sd15_smpo", "train", [*extra, *overrides]).recipe


# ----------------------------------------------------------------------------- the shipped configs
def test_shipped_unet_configs_are_the_hub_files_byte_for_byte():
    # sha256 of unet/config.json in runwayml/stable-diffusion-v1-5 (main, "Update unet/config.json (#14)") and
    # in stabilityai/stable-diffusion-xl-base-1.0 (its git-lfs pointer: oid sha256, size 1680)
    folder = ROOT / "smpo_cli" / "models" / "assets" / "unet_configs"
    sd15, sdxl = (folder / "sd15.json").read_bytes(), (folder / "sdxl.json").read_bytes()
    assert (
        hashlib.sha256(sd15).hexdigest() == "78f474de6bab3d893868f37be97b636ae65c0df3073ed3256ca458ff599b5f96"
    )
    assert (
        hashlib.sha256(sdxl).hexdigest() == "30ebc70750223e59006f7f2b4e1e6c102570aa19a9c4ae3e1fbe7591332dbae6"
    )
    assert len(sdxl) == 1680
    assert mp.shipped_unet_config("sd15")["cross_attention_dim"] == 768
    assert mp.shipped_unet_config("sdxl")["addition_embed_type"] == "text_time"


def test_unet_parameter_counts_built_on_the_meta_device():
    assert mp.count_unet_params(mp.shipped_unet_config("sd15")) == SD15_UNET
    assert mp.count_unet_params(mp.shipped_unet_config("sdxl")) == SDXL_UNET


def test_frozen_parameter_counts():
    assert mp.clip_text_params(CLIP_L) == 123_060_480
    assert mp.clip_text_params(CLIP_BIGG, projection=True) == 694_659_840
    assert models._count_vae(mp.SD_VAE_CONFIG) == 83_653_863
    assert mp.FAMILY_FROZEN["sd15"] == {"vae": 83_653_863, "text_encoder": 123_060_480}
    assert sum(mp.FAMILY_FROZEN["sdxl"].values()) == 83_653_863 + 123_060_480 + 694_659_840


def test_a_shipped_model_uses_its_own_config(tmp_path):
    """shapes-sd15 ships its weights: the meta count equals the tensors in its safetensors file."""
    spec = load_recipe("sd15_smpo", "train", [f"output_dir={tmp_path}", "model.pretrained=shapes-sd15",
                                              "~model.unet"]).recipe.model  # fmt: skip
    info = mp.resolve_model(spec)
    assert info.source == "shipped model shapes-sd15" and info.family == "sd15"
    weights = (
        ROOT
        / "smpo_cli"
        / "models"
        / "assets"
        / "shapes-sd15"
        / "unet"
        / "diffusion_pytorch_model.safetensors"
    )
    with weights.open("rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    on_disk = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    assert mp.count_unet_params(info.unet_config) == on_disk
    assert set(info.frozen_counts) == {"vae", "text_encoder"}


def test_known_hub_ids_map_to_the_shipped_configs_and_others_are_unknown(tmp_path):
    sdxl = load_recipe("sdxl_smpo", "train", [f"output_dir={tmp_path}"]).recipe
    info = mp.resolve_model(sdxl.model)
    assert info.unet_config == mp.shipped_unet_config("sdxl") and info.family == "sdxl"
    assert "shipped SDXL UNet config" in info.source
    other = sd15_recipe("model.pretrained=someone/a-custom-model", "~model.unet", output_dir=tmp_path)
    plan = mp.plan_memory(other)
    assert isinstance(plan, mp.UnknownPlan) and "parameter count unknown offline" in plan.reason
    lines = mp.plan_lines(plan, budget_gib=24)
    assert lines[0][0] == "ok" and lines[-1][0] == "warn"
    explicit = sd15_recipe("model.pretrained=someone/a-custom-model", "~model.unet", "model.family=sd15",
                           output_dir=tmp_path)  # fmt: skip
    assert mp.resolve_model(explicit.model).unet_config == mp.shipped_unet_config("sd15")


# ----------------------------------------------------------------------------- closed forms
def test_optimizer_state_closed_forms():
    shapes = [(320, 4, 3, 3), (320,), (1280, 768)]
    n = sum(math.prod(s) for s in shapes)
    assert mp.optimizer_state_bytes("adamw", shapes) == 2 * 4 * n  # exp_avg + exp_avg_sq, fp32
    assert mp.optimizer_step_bytes("adamw", shapes) == 4 * n  # foreach sqrt(exp_avg_sq)
    # Adafactor: factored over the last two dims (rows: all but the last; columns: all but the second last)
    assert mp.optimizer_state_bytes("adafactor", [(1280, 768)]) == 4 * (1280 + 768)
    assert mp.optimizer_state_bytes("adafactor", [(320, 4, 3, 3)]) == 4 * (320 * 4 * 3 + 320 * 4 * 3)
    assert mp.optimizer_state_bytes("adafactor", [(320,)]) == 4 * 320
    assert mp.optimizer_step_bytes("adafactor", shapes) == 3 * 4 * 1280 * 768
    # bitsandbytes 8-bit AdamW: two uint8 states + fp32 absmax per 256 values; small tensors stay fp32
    assert mp.optimizer_state_bytes("adamw8bit", [(4096,)]) == 2 * (4096 + 4 * 16)
    assert mp.optimizer_state_bytes("adamw8bit", [(100,)]) == 8 * 100
    with pytest.raises(ValueError):
        mp.optimizer_state_bytes("sgd", shapes)


def test_lora_adapter_shapes_target_the_attention_projections():
    linears = [("down.attn1.to_q", 320, 320), ("down.attn2.to_k", 768, 320), ("down.attn1.to_out.0", 320, 320),
               ("down.ff.net.2", 1280, 320), ("time_embedding.linear_1", 320, 1280)]  # fmt: skip
    shapes = mp.lora_adapter_shapes(linears, rank=4)
    assert shapes == [(4, 320), (320, 4), (4, 768), (320, 4), (4, 320), (320, 4)]


def test_shard_bytes_divides_and_rounds_up():
    assert mp.shard_bytes(12, 4) == 3 and mp.shard_bytes(13, 4) == 4 and mp.shard_bytes(13, 1) == 13


# ----------------------------------------------------------------------------- accelerate configs
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"distributed_type": "NO", "num_processes": 1}, ("NO", 1)),
        ({"distributed_type": "NO", "num_processes": 4}, ("NO", 1)),
        ({"distributed_type": "MULTI_GPU", "num_processes": 8}, ("MULTI_GPU", 8)),
        ({"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD"}},
         ("FSDP", 4)),
        ({"distributed_type": "fsdp", "num_processes": 4, "fsdp_config": {"fsdp_sharding_strategy": 2}}, ("FSDP", 4)),
        ({"distributed_type": "DEEPSPEED", "num_processes": 8, "deepspeed_config": {"zero_stage": 3}},
         ("DEEPSPEED", 8)),
    ],
)  # fmt: skip
def test_sharding_from_accelerate_configs(config, expected):
    """Like the trainer, the plan reads only the distributed type and the number of processes."""
    s = mp.sharding_from_config(config)
    assert (s.distributed_type, s.processes) == expected


def test_read_sharding_from_a_file_the_environment_or_nothing(tmp_path):
    from smpo_cli.errors import UsageError

    assert mp.read_sharding(None, env={}) == mp.Sharding()
    path = tmp_path / "fsdp.yaml"
    path.write_text("distributed_type: FSDP\nnum_processes: 4\nfsdp_config:\n  fsdp_version: 2\n"
                    "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                    "  fsdp_transformer_layer_cls_to_wrap: BasicTransformerBlock,ResnetBlock2D\n")  # fmt: skip
    from_env = mp.read_sharding(None, env={"ACCELERATE_CONFIG_FILE": str(path)})
    assert (from_env.distributed_type, from_env.processes, from_env.source) == ("FSDP", 4, str(path))
    assert mp.read_sharding(path, env={}) == from_env
    with pytest.raises(UsageError, match="does not exist"):
        mp.read_sharding(tmp_path / "missing.yaml", env={})
    # a real run under accelerate launch, without a config file: the launcher's environment
    launched = mp.read_sharding(None, env={"WORLD_SIZE": "8"})
    assert (launched.distributed_type, launched.processes) == ("MULTI_GPU", 8)
    zero3 = {"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert mp.read_sharding(None, env=zero3).distributed_type == "DEEPSPEED"
    assert mp.read_sharding(None, env={"ACCELERATE_USE_DEEPSPEED": "true"}).distributed_type == "DEEPSPEED"
    fsdp = {"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}
    assert (mp.read_sharding(None, env=fsdp).distributed_type, mp.read_sharding(None, env=fsdp).processes) == (
        "FSDP", 4)  # fmt: skip


def test_launches_the_trainer_refuses_get_one_line(tmp_path):
    """DeepSpeed with offload or ZeRO-1, and sharding with fp16 or LoRA: `smpo train` stops (check_sharding), so
    the plan says so in one line instead of an estimate, with or without a budget."""
    deepspeed = mp.sharding_from_config({"distributed_type": "DEEPSPEED", "num_processes": 8,
                                         "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "cpu"}})  # fmt: skip
    fsdp = mp.sharding_from_config({"distributed_type": "FSDP", "num_processes": 4})
    refused = [
        ("offload", mp.plan_memory(sd15_recipe("train.mixed_precision=bf16", output_dir=tmp_path),
                                   sharding=deepspeed)),
        ("fp16", mp.plan_memory(sd15_recipe(output_dir=tmp_path), sharding=fsdp)),  # sd15_smpo trains in fp16
        ("fp16", mp.plan_memory(sd15_recipe("train.sharding=fsdp", output_dir=tmp_path), sharding=mp.Sharding())),
        ("lora_rank", mp.plan_memory(sd15_recipe("train.lora_rank=4", "train.mixed_precision=bf16",
                                                 output_dir=tmp_path), sharding=fsdp)),
    ]  # fmt: skip
    for what, plan in refused:
        assert isinstance(plan, mp.RefusedPlan) and what in plan.reason, (what, plan)
        for budget in (None, 24):
            lines = mp.plan_lines(plan, budget_gib=budget)
            assert len(lines) == 1 and lines[0][0] == "warn"
            assert lines[0][1].startswith("memory per GPU: not estimated, smpo train refuses this run: ")
    assert "smpo does not offload yet" in refused[0][1].reason


def test_zero_plans_split_what_deepspeed_splits(tmp_path):
    """ZeRO-3 splits like FSDP2 (weights, gradients, optimiser state, reference); ZeRO-2 only the gradients and
    the optimiser state, and keeps the UNet and the reference whole on every process."""
    bf16 = sd15_recipe("train.mixed_precision=bf16", output_dir=tmp_path)
    P = SD15_UNET
    ds = lambda stage: mp.sharding_from_config({"distributed_type": "DEEPSPEED", "num_processes": 4,  # noqa: E731
                                                "deepspeed_config": {"zero_stage": stage}})  # fmt: skip
    z3, z2 = mp.plan_memory(bf16, sharding=ds(3)), mp.plan_memory(bf16, sharding=ds(2))
    assert z3.sharded and z3.sharding == "DeepSpeed ZeRO-3 x4"
    assert z3.weights == mp.shard_bytes(4 * P, 4) and z3.reference == mp.shard_bytes(2 * P, 4)
    assert z3.optimizer == mp.shard_bytes(8 * P, 4) and 0 < z3.gathered < 4 * P
    assert z2.sharded and z2.sharding == "DeepSpeed ZeRO-2 x4"
    assert z2.weights == 4 * P + mp.shard_bytes(4 * P, 4) and z2.reference == 2 * P
    assert z2.gradients == mp.shard_bytes(4 * P, 4) and z2.optimizer == mp.shard_bytes(8 * P, 4)
    assert z3.total < z2.total
    assert mp.plan_memory(sd15_recipe("train.mixed_precision=bf16", "train.sharding=zero3", output_dir=tmp_path),
                          sharding=mp.sharding_from_config({"distributed_type": "MULTI_GPU", "num_processes": 4})).sharding == "DeepSpeed ZeRO-3 x4"  # fmt: skip


# ----------------------------------------------------------------------------- the plan
@pytest.fixture(scope="module")
def sd15_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recipe = sd15_recipe(output_dir=out)
    return recipe, mp.plan_memory(recipe, sharding=mp.Sharding())


def test_plan_parts_of_full_fine_tuning(sd15_plan):
    recipe, plan = sd15_plan
    P = SD15_UNET
    assert plan.unet_params == plan.trainable_params == P
    assert plan.weights == 4 * P  # fp32 master weights
    assert plan.gradients == 4 * P
    assert plan.optimizer == 8 * P  # AdamW: 2 fp32 states
    assert plan.reference == 2 * P  # frozen deep copy in model.dtype=float16
    assert plan.frozen == 2 * (83_653_863 + 123_060_480)
    assert plan.optimizer_step == 4 * P
    assert plan.activation_method == "meta" and not plan.checkpointing
    assert (
        0 < plan.activations_with_checkpointing < plan.activations_without_checkpointing == plan.activations
    )
    # autocast keeps an fp16 copy of every fp32 weight until the forward ends: part of the activations
    assert plan.activations_with_checkpointing > 2 * P
    persistent = plan.weights + plan.gradients + plan.optimizer + plan.reference + plan.frozen
    assert plan.total == persistent + max(plan.activations, plan.optimizer_step, plan.vae_encode)
    assert 15 * mp.GiB < plan.total < 25 * mp.GiB  # SD1.5, 512 px, 2 images, fp16: about 19 GiB


def test_sharding_divides_the_state_and_the_reference(sd15_plan, tmp_path):
    """smpo's FSDP2 (train.sharding=fsdp, or an accelerate FSDP config whose plugin settings it ignores) splits
    weights, gradients, optimiser state and the reference; DDP replicates them and adds its buckets."""
    recipe, ddp1 = sd15_plan
    bf16 = sd15_recipe("train.mixed_precision=bf16", output_dir=tmp_path)  # sharding refuses fp16
    P = SD15_UNET
    fsdp = mp.plan_memory(bf16, sharding=mp.sharding_from_config(
        {"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD"}}))  # fmt: skip
    assert fsdp.sharded and fsdp.sharding == "FSDP2 x4 (distributed_type FSDP)"
    assert fsdp.weights == mp.shard_bytes(4 * P, 4) and fsdp.gradients == mp.shard_bytes(4 * P, 4)
    assert fsdp.optimizer == mp.shard_bytes(8 * P, 4) and fsdp.optimizer_step == mp.shard_bytes(4 * P, 4)
    assert fsdp.reference == mp.shard_bytes(2 * P, 4)  # model.dtype float16: the reference is sharded too
    assert fsdp.ddp_buckets == 0 and 0 < fsdp.gathered < 4 * P
    assert any("BasicTransformerBlock/ResnetBlock2D units are gathered" in n for n in fsdp.notes)
    one = mp.plan_memory(bf16, sharding=mp.Sharding())
    assert fsdp.activations == one.activations and not one.sharded and one.sharding == "DDP x1"
    # the plugin's strategy, wrap classes, offload and machines are not smpo's: the same plan
    plugin = mp.plan_memory(bf16, sharding=mp.sharding_from_config(
        {"distributed_type": "FSDP", "num_processes": 4, "num_machines": 2,
         "fsdp_config": {"fsdp_sharding_strategy": "HYBRID_SHARD_ZERO2", "fsdp_offload_params": True,
                         "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                         "fsdp_transformer_layer_cls_to_wrap": "Transformer2DModel"}}))  # fmt: skip
    assert replace(plugin, seconds=0) == replace(fsdp, seconds=0)  # (the first one measured)
    own = mp.plan_memory(sd15_recipe("train.mixed_precision=bf16", "train.sharding=fsdp", output_dir=tmp_path),
                         sharding=mp.sharding_from_config({"distributed_type": "MULTI_GPU", "num_processes": 4}))  # fmt: skip
    assert own.sharding == "FSDP2 x4 (train.sharding=fsdp)"
    assert (own.weights, own.gradients, own.optimizer, own.reference, own.gathered, own.total) == (
        fsdp.weights, fsdp.gradients, fsdp.optimizer, fsdp.reference, fsdp.gathered, fsdp.total)  # fmt: skip
    alone = mp.plan_memory(sd15_recipe("train.mixed_precision=bf16", "train.sharding=fsdp", output_dir=tmp_path),
                           sharding=mp.Sharding())  # fmt: skip
    assert not alone.sharded and alone.total == one.total  # one process: nothing to split
    ddp8 = mp.plan_memory(
        recipe, sharding=mp.sharding_from_config({"distributed_type": "MULTI_GPU", "num_processes": 8})
    )
    assert not ddp8.sharded and ddp8.sharding == "DDP x8" and ddp8.reference == ddp1.reference
    assert ddp8.ddp_buckets == ddp8.gradients and ddp8.total == ddp1.total + ddp8.gradients


def test_lora_trains_adapters_only(tmp_path):
    plan = mp.plan_memory(sd15_recipe("train.lora_rank=4", output_dir=tmp_path), sharding=mp.Sharding())
    shapes = mp.unet_shapes(mp.shipped_unet_config("sd15"))
    adapters = sum(math.prod(s) for s in mp.lora_adapter_shapes(shapes.linears, 4))
    assert plan.trainable_params == adapters and 0 < adapters < 2_000_000
    assert plan.weights == 2 * SD15_UNET + 4 * adapters  # fp16 base + fp32 adapters
    assert plan.gradients == 4 * adapters and plan.optimizer == 8 * adapters
    assert plan.reference == 0  # the reference is the same UNet with its adapters off
    assert not any("sharding" in tip for tip in mp.advice(plan))  # the trainer shards full fine-tuning only


def test_budget_lines_warn_and_name_what_to_change(sd15_plan):
    _, plan = sd15_plan
    fits = mp.plan_lines(plan, budget_gib=80)
    assert fits[-1][0] == "ok" and "fits --gpu-memory 80 GiB" in fits[-1][1]
    over = mp.plan_lines(plan, budget_gib=8)
    level, text = over[-1]
    assert level == "warn" and "exceeds --gpu-memory 8 GiB" in text
    assert (
        "train.gradient_checkpointing=true" in text
        and "train.lora_rank" in text
        and "train.batch_size" in text
    )
    assert "train.sharding=fsdp with train.mixed_precision=bf16" in text  # sd15_smpo trains in fp16


def test_measurements_are_cached_in_memory_and_on_disk(sd15_plan):
    recipe, _ = sd15_plan
    again = mp.plan_memory(recipe, sharding=mp.Sharding())
    assert again.seconds == 0  # both measurements came from the cache
    assert any(k.startswith("step:") for k in json.loads(cache._cache_file().read_text()))


# ----------------------------------------------------------------------------- the measurement itself
def _small_config():
    """The shapes testbed's UNet (SD1.5 layout, 3 levels, 1 layer per block): few ops, so quick to run."""
    return json.loads(
        (ROOT / "smpo_cli" / "models" / "assets" / "shapes-sd15" / "unet" / "config.json").read_text()
    )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_measured_activations_match_a_real_step_on_the_cpu(checkpointing):
    """The meta-device measurement against torch's own allocation timeline of the same step run for real."""
    import copy

    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    if not hasattr(profile, "export_memory_timeline"):
        pytest.skip("this torch has no profiler memory timeline")
    config = _small_config()
    shape = mp.StepShape(resolution=128, images=2, policy_dtype="float32", autocast=None, reference="copy",
                         reference_dtype="float32", checkpointing=checkpointing)  # fmt: skip
    estimate = mp.measure_activations(config, shape, use_cache=False)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    ref = copy.deepcopy(unet).requires_grad_(False).eval()
    inputs = activations._unet_inputs(config, shape, torch.device("cpu"))

    def micro():
        pred = activations._forward(unet, config, inputs)
        with torch.no_grad():
            target = activations._forward(ref, config, inputs)
        loss = (pred - target).pow(2).mean()
        del pred, target
        loss.backward()

    micro()  # the gradients exist from here on, as in every micro-batch after a step's first
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        micro()
    timeline = Path(pytest.importorskip("tempfile").mkdtemp()) / "timeline.json"
    prof.export_memory_timeline(str(timeline), device="cpu")
    total = np.array(json.loads(timeline.read_text())[1]).sum(axis=1)
    measured = total.max() - total[0]
    assert estimate.method == "meta"
    assert abs(estimate.bytes - measured) <= 0.05 * measured, (estimate.bytes, measured)


def test_autocast_emulation_keeps_half_weight_copies_until_the_forward_ends():
    config = _small_config()
    params = mp.count_unet_params(config)
    base = dict(resolution=64, images=2, reference="none")
    fp32 = mp.measure_activations(config, mp.StepShape(**base, checkpointing=True), use_cache=False)
    fp16 = mp.measure_activations(
        config, mp.StepShape(**base, autocast="float16", checkpointing=True), use_cache=False
    )
    # checkpointed: few activations, but autocast's cached fp16 copies of all weights (2 bytes each)
    assert fp16.bytes - fp32.bytes > 1.5 * params


def test_a_meta_failure_falls_back_to_a_scaled_cpu_measurement(monkeypatch):
    config = _small_config()
    real = activations._simulate

    def meta_fails(config, shape, device_type):
        if device_type == "meta":
            raise NotImplementedError("no meta kernel for some op")
        return real(config, shape, device_type)

    monkeypatch.setattr(activations, "_simulate", meta_fails)
    shape = mp.StepShape(resolution=64, images=2, reference="none")
    result = mp.measure_activations(config, shape, use_cache=False)
    assert result.method.startswith("cpu-scaled") and "NotImplementedError" in result.method
    monkeypatch.setattr(activations, "_simulate", real)
    meta = mp.measure_activations(config, shape, use_cache=False)
    assert 0.3 * meta.bytes < result.bytes < 3 * meta.bytes  # a rough stand-in, not the measurement


# ----------------------------------------------------------------------------- command line
def test_dry_run_prints_the_memory_plan_without_weights_or_network(tmp_path, capsys):
    import time

    from smpo_cli.cli.main import run

    started = time.perf_counter()
    assert run(["train", "--recipe", "sd15_smpo", "--dry-run", f"output_dir={tmp_path / 'run'}"]) == 0
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert "parameters: UNet 859.5M (trainable 859.5M)" in err
    assert (
        "memory per GPU (estimate, fp16 mixed precision, DDP x1): weights 3.2 GiB, gradients 3.2 GiB, " in err
    )
    assert "with gradient checkpointing)" in err and "exceeds" not in err
    assert not (tmp_path / "run").exists()
    assert seconds < 120, seconds  # measured once per session (then cached): seconds on one core


def test_gpu_memory_budget_warns(tmp_path, capsys):
    from smpo_cli.cli.main import run

    assert (
        run(["train", "--recipe", "sd15_smpo", "--dry-run", "--gpu-memory", "1", f"output_dir={tmp_path}"])
        == 0
    )
    err = capsys.readouterr().err
    assert "exceeds --gpu-memory 1 GiB" in err and "train.gradient_checkpointing=true" in err
    assert (
        run(["train", "--recipe", "sd15_smpo", "--dry-run", "--gpu-memory", "0", f"output_dir={tmp_path}"])
        == 2
    )


def test_accelerate_config_option_shards_the_plan(tmp_path, capsys):
    from smpo_cli.cli.main import run

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(
        "distributed_type: FSDP\nnum_processes: 8\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n"
    )
    args = ["train", "--recipe", "sd15_smpo", "--dry-run", f"output_dir={tmp_path}", "train.mixed_precision=bf16"]  # fmt: skip
    assert run([*args, "--accelerate-config", str(fsdp)]) == 0
    assert (
        "memory per GPU (estimate, bf16 mixed precision, FSDP2 x8 (distributed_type FSDP)): "
        in capsys.readouterr().err
    )
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config:\n  zero_stage: 3\n")
    assert run([*args, "--accelerate-config", str(zero3), "--gpu-memory", "80"]) == 0
    err = capsys.readouterr().err
    assert "memory per GPU (estimate, bf16 mixed precision, DeepSpeed ZeRO-3 x8): " in err
    assert "fits --gpu-memory 80 GiB" in err
    offload = tmp_path / "offload.yaml"
    offload.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config:\n  zero_stage: 3\n"
                       "  offload_param_device: cpu\n")  # fmt: skip
    assert run([*args, "--accelerate-config", str(offload), "--gpu-memory", "80"]) == 0
    err = capsys.readouterr().err
    assert "smpo train refuses this run: accelerate DeepSpeed config offloads (offload_param_device=cpu)" in err
    assert "memory per GPU (estimate" not in err and "--gpu-memory 80" not in err
    assert run([*args, "--accelerate-config", str(tmp_path / "missing.yaml")]) == 2


def test_recipe_validate_stays_without_the_memory_plan(capsys):
    from smpo_cli.cli.main import run

    assert run(["recipe", "validate", "sd15_smpo"]) == 0
    assert "memory per GPU" not in capsys.readouterr().err


def test_bench_runs_the_tiny_cpu_path(capsys):
    spec = importlib.util.spec_from_file_location("bench_memory_plan", ROOT / "bench" / "memory_plan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--device", "cpu", "--size", "tiny", "--json"])
    assert [r["gradient_checkpointing"] for r in result["rows"]] == [False, True]
    assert all(r["measured_gib"] is None and r["estimate_gib"] > 0 for r in result["rows"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["size"] == "tiny"
