"""LoRA on the tiny UNets and the exports, read back by the stock diffusers pipelines (CPU, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from smpo_cli.errors import ModelLoadError, UsageError
from smpo_cli.training.export import LORA_INFO_NAME, LORA_WEIGHT_NAME, save_lora, save_pipeline, save_unet
from smpo_cli.training.lora import (
    DEFAULT_TARGETS,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
    reference_outputs,
)

FAMILIES = ("sd15", "sdxl")
TINY = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}
PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def components(family: str):
    """Fresh components (add_lora changes the UNet in place, so never share them between tests)."""
    from smpo_cli.models import load_components

    return load_components(TINY[family], device="cpu")


def stock_pipeline(path):
    """A pipeline loaded by diffusers alone from a folder, as a user of the export would."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(unet) -> dict:
    """One fixed UNet input (with SDXL's text_time conditioning when the UNet wants it)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    size = cfg.sample_size
    kwargs = {
        "sample": torch.randn(2, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 7, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return kwargs


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


def perturb_lora(unet, seed: int = 1) -> None:
    """Random lora_B weights, so the adapter changes the output (it starts as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def lora_params(unet) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in b)


# --------------------------------------------------------------------------------------------
# add_lora
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_add_lora_trains_only_the_adapter_and_starts_at_the_base(family):
    unet = components(family).unet
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    assert add_lora(unet, rank=4, seed=0) is unet
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    lora = lora_params(unet)
    assert lora and trainable == set(lora)
    adapted = {n.split(".lora_")[0] for n in lora}
    assert all(name.endswith(DEFAULT_TARGETS) for name in adapted)
    assert any(name.endswith("to_out.0") for name in adapted)
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.items() if "lora_B" in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in lora.items() if "lora_A" in n)
    torch.testing.assert_close(run(unet, inputs), base, rtol=0, atol=0)


def test_add_lora_seed_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = add_lora(components("sd15").unet, rank=2, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = add_lora(components("sd15").unet, rank=2, seed=7)
    c = add_lora(components("sd15").unet, rank=2, seed=8)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert_same_weights(sa, sb)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_add_lora_errors():
    unet = components("sd15").unet
    with pytest.raises(UsageError, match="rank"):
        add_lora(unet, rank=0)
    with pytest.raises(UsageError, match="alpha"):
        add_lora(unet, rank=4, alpha=0)
    with pytest.raises(UsageError) as info:
        add_lora(unet, rank=4, target_modules=["no_such_layer"])
    assert info.value.hint
    add_lora(unet, rank=4)  # the failed attempt left the UNet usable
    with pytest.raises(UsageError, match="already"):
        add_lora(unet, rank=4)


# --------------------------------------------------------------------------------------------
# reference_outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_outputs_is_the_base_unet(family):
    unet = components(family).unet
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    add_lora(unet, rank=4, alpha=8, seed=0)
    perturb_lora(unet)
    adapted = run(unet, inputs)
    assert (adapted - base).abs().max() > 1e-2
    with reference_outputs(unet) as ref:
        assert ref is unet
        torch.testing.assert_close(run(unet, inputs), base, rtol=0, atol=ATOL)
    torch.testing.assert_close(run(unet, inputs), adapted, rtol=0, atol=0)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(lora_params(unet))


def test_reference_outputs_restores_after_an_exception_and_keeps_frozen_adapters_frozen():
    unet = components("sd15").unet
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    add_lora(unet, rank=4, seed=0)
    perturb_lora(unet)
    adapted = run(unet, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_outputs(unet):
            torch.testing.assert_close(run(unet, inputs), base, rtol=0, atol=ATOL)
            raise RuntimeError("boom")
    torch.testing.assert_close(run(unet, inputs), adapted, rtol=0, atol=0)
    assert all(p.requires_grad for p in lora_params(unet).values())
    # peft's own enable_adapters() would make these trainable again; the context must not.
    for p in lora_params(unet).values():
        p.requires_grad_(False)
    with reference_outputs(unet):
        with reference_outputs(unet):  # nested: the inner exit must not re-enable the adapters
            pass
        torch.testing.assert_close(run(unet, inputs), base, rtol=0, atol=ATOL)
    torch.testing.assert_close(run(unet, inputs), adapted, rtol=0, atol=0)
    assert not any(p.requires_grad for p in unet.parameters())


def test_reference_outputs_needs_an_adapter():
    with pytest.raises(UsageError, match="no LoRA adapter"):
        with reference_outputs(components("sd15").unet):
            pass


# --------------------------------------------------------------------------------------------
# lora_state_dict / load_lora_state_dict (training checkpoints)
# --------------------------------------------------------------------------------------------


def test_lora_state_dict_round_trip_and_mismatches():
    unet = add_lora(components("sd15").unet, rank=4, seed=0)
    perturb_lora(unet)
    inputs = unet_inputs(unet)
    state = lora_state_dict(unet)
    assert set(state) == {k.replace(".default", "") for k in lora_params(unet)}
    expected = run(unet, inputs)
    with torch.no_grad():  # a snapshot, not a view of the live weights
        next(iter(lora_params(unet).values())).add_(1.0)
    assert not torch.equal(run(unet, inputs), expected)

    other = add_lora(components("sd15").unet, rank=4, seed=5)
    load_lora_state_dict(other, state)
    torch.testing.assert_close(run(other, inputs), expected, rtol=0, atol=0)
    assert {n for n, p in other.named_parameters() if p.requires_grad} == set(lora_params(other))

    with pytest.raises(ModelLoadError, match="missing"):
        load_lora_state_dict(other, dict(list(state.items())[1:]))
    with pytest.raises(ModelLoadError, match="rank"):
        load_lora_state_dict(add_lora(components("sd15").unet, rank=2), state)


# --------------------------------------------------------------------------------------------
# save_lora: read back by the stock pipelines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_lora_loads_in_a_fresh_stock_pipeline(family, tmp_path):
    from smpo_cli.models.tiny import materialize_tiny

    unet = components(family).unet
    add_lora(unet, rank=4, alpha=8, seed=0)  # scale alpha/rank = 2: the file must carry it
    perturb_lora(unet)
    inputs = unet_inputs(unet)
    expected = run(unet, inputs)

    dest = save_lora(unet, tmp_path / "lora", family, base_model=TINY[family])
    assert sorted(p.name for p in dest.iterdir()) == sorted([LORA_WEIGHT_NAME, LORA_INFO_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # no temporary left behind
    info = json.loads((dest / LORA_INFO_NAME).read_text())
    assert (info["family"], info["rank"], info["alpha"], info["base_model"]) == (family, 4, 8.0, TINY[family])
    assert info["target_modules"] == sorted(DEFAULT_TARGETS)

    pipe = stock_pipeline(materialize_tiny(TINY[family]))
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    pipe.load_lora_weights(str(dest))
    torch.testing.assert_close(run(pipe.unet, inputs), expected, rtol=0, atol=ATOL)
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.ndim == 4 and images.shape[0] == 1 and images.shape[-1] == 3


def test_save_lora_file_is_right_without_the_adapter_metadata(tmp_path):
    """Loaders that ignore the stored adapter config assume alpha = rank: the scale is in the weights."""
    from safetensors.torch import load_file

    from smpo_cli.models.tiny import materialize_tiny

    unet = add_lora(components("sd15").unet, rank=4, alpha=2, seed=0)
    perturb_lora(unet)
    inputs = unet_inputs(unet)
    dest = save_lora(unet, tmp_path / "lora", "sd15")
    weights = load_file(dest / LORA_WEIGHT_NAME)
    assert weights and all(k.startswith("unet.") for k in weights)
    pipe = stock_pipeline(materialize_tiny("tiny-sd15"))
    pipe.load_lora_weights(weights)  # a plain state dict: no metadata
    torch.testing.assert_close(run(pipe.unet, inputs), run(unet, inputs), rtol=0, atol=ATOL)


def test_save_lora_errors(tmp_path):
    unet = components("sd15").unet
    with pytest.raises(UsageError, match="LoRA adapter"):
        save_lora(unet, tmp_path / "lora", "sd15")
    add_lora(unet, rank=2)
    with pytest.raises(UsageError, match="family"):
        save_lora(unet, tmp_path / "lora", "sd3")
    assert not (tmp_path / "lora").exists()


# --------------------------------------------------------------------------------------------
# save_pipeline / save_unet
# --------------------------------------------------------------------------------------------


def _train_in_place(unet, seed: int = 3) -> None:
    """Stand-in for full fine-tuning: move every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pipeline_round_trip(family, tmp_path):
    comps = components(family)
    unet = comps.unet
    _train_in_place(unet)
    dest = save_pipeline(comps, unet, tmp_path / "pipeline")
    assert (dest / "model_index.json").is_file()
    assert list((dest / "unet").glob("*.safetensors")) and not list(dest.rglob("*.bin"))

    pipe = stock_pipeline(dest)
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    assert_same_weights(pipe.unet.state_dict(), unet.state_dict())
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 1

    _train_in_place(unet, seed=4)  # saving again replaces the folder
    save_pipeline(comps, unet, dest)
    assert torch.equal(stock_pipeline(dest).unet.conv_in.weight, unet.conv_in.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_save_pipeline_refuses_a_lora_unet_or_merges_it_into_a_copy(tmp_path):
    comps = components("sd15")
    unet = add_lora(comps.unet, rank=4, alpha=8, seed=0)
    perturb_lora(unet)
    inputs = unet_inputs(unet)
    expected = run(unet, inputs)
    with pytest.raises(UsageError, match="LoRA") as info:
        save_pipeline(comps, unet, tmp_path / "pipeline")
    assert "save_lora" in info.value.hint
    assert not (tmp_path / "pipeline").exists()

    dest = save_pipeline(comps, unet, tmp_path / "pipeline", merge_lora=True)
    merged = stock_pipeline(dest).unet
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(run(merged, inputs), expected, rtol=0, atol=ATOL)
    assert lora_params(unet) and comps.unet is unet  # the trained UNet keeps its adapter
    torch.testing.assert_close(run(unet, inputs), expected, rtol=0, atol=0)


def test_save_unet_round_trip(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = components("sdxl").unet
    _train_in_place(unet)
    dest = save_unet(unet, tmp_path / "unet")
    assert (dest / "config.json").is_file() and list(dest.glob("*.safetensors"))
    assert_same_weights(UNet2DConditionModel.from_pretrained(str(dest)).state_dict(), unet.state_dict())

    add_lora(unet, rank=2)
    with pytest.raises(UsageError, match="LoRA"):
        save_unet(unet, tmp_path / "unet2")
