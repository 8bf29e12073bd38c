"""load_components on every source kind, through the real diffusers / transformers loaders."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from ldm_convert import save_single_file, unet_to_ldm
from safetensors.torch import save_file

from smpo_cli.errors import AssetNotFoundError, ModelLoadError, UsageError
from smpo_cli.models.loading import (
    DiffusionComponents,
    detect_family,
    load_components,
    resolve_device,
    resolve_dtype,
)

PROMPT = "a photo of a cat"

# 3x3 bottom-right corner of the last channel of the 64x64 image for PROMPT, seed 0, 2 steps,
# default guidance, on CPU in float32. Regenerate (only in a commit that says why) with
#   SMPO_PRINT_GOLDEN=1 python -m pytest tests/models -k golden -s
GOLDEN = {
    "sd15": [0.5908, 0.6603, 0.5178, 0.5404, 0.5960, 0.5224, 0.5267, 0.5269, 0.4998],
    "sdxl": [0.5577, 0.6086, 0.4486, 0.5088, 0.5848, 0.4427, 0.5165, 0.5015, 0.4666],
}


def generate(components: DiffusionComponents, seed: int = 0, **kwargs) -> np.ndarray:
    pipe = components.pipeline(**kwargs)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def images(loaded):
    """Seed-0 images of both families (generated once for the module)."""
    return {fam: generate(c) for fam, c in loaded.items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_name_loads_and_generates_golden(family, loaded, images):
    components = load_components(f"tiny-{family}", device="cpu")
    assert components.family == family
    assert components.dtype == torch.float32 and components.device == torch.device("cpu")
    assert components.prediction_type == "epsilon"
    assert (components.text_encoder_2 is not None) == (family == "sdxl")
    assert_same_weights(components.unet, loaded[family].unet)
    image = images[family]
    assert image.shape == (1, 64, 64, 3)
    corner = image[0, -3:, -3:, -1].flatten()
    if os.environ.get("SMPO_PRINT_GOLDEN"):
        print(f'"{family}": [{", ".join(f"{v:.4f}" for v in corner)}],')
    np.testing.assert_allclose(corner, GOLDEN[family], atol=1e-2)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_same_seed_same_image_other_seed_other_image(family, loaded, images):
    again = generate(loaded[family], seed=0)
    other = generate(loaded[family], seed=1)
    np.testing.assert_array_equal(again, images[family])
    assert np.abs(other - images[family]).max() > 1e-3


def test_pipeline_scheduler_override_and_components_checks(loaded):
    pipe = loaded["sd15"].pipeline(scheduler="EulerDiscreteScheduler")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.beta_end == 0.012
    assert pipe.safety_checker is None
    assert type(loaded["sdxl"].pipeline()).__name__ == "StableDiffusionXLPipeline"
    with pytest.raises(UsageError):
        loaded["sd15"].pipeline(scheduler="NotAScheduler")


# --- family detection -----------------------------------------------------------------------


def test_detect_family(tiny_dirs):
    assert detect_family("tiny-sd15") == "sd15"
    assert detect_family(tiny_dirs["sdxl"]) == "sdxl"


def test_detect_family_from_unet_config_when_class_name_is_generic(copy_of):
    folder = copy_of("sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "DiffusionPipeline"
    del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert detect_family(folder) == "sdxl"


def test_forced_family(tiny_dirs):
    assert load_components(str(tiny_dirs["sd15"]), family="sd15", components=["scheduler"]).family == "sd15"
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(tiny_dirs["sdxl"]), family="sd15")
    text = one_line(exc)
    assert "sdxl" in text and "family=sd15" in text and str(tiny_dirs["sdxl"]) in text
    with pytest.raises(UsageError):
        load_components("tiny-sd15", family="sd9")


# --- components, dtype, device --------------------------------------------------------------


def test_components_restricts_what_is_loaded(tiny_dirs):
    c = load_components(str(tiny_dirs["sdxl"]), components=["unet", "text_encoder_2", "scheduler"])
    assert c.unet is not None and c.text_encoder_2 is not None and c.scheduler is not None
    assert c.vae is None and c.text_encoder is None and c.tokenizer is None and c.tokenizer_2 is None
    assert c.prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="vae"):
        c.pipeline()
    with pytest.raises(UsageError, match="vea"):
        load_components("tiny-sd15", components=["vea"])


def test_real_sd15_layout_extras_are_ignored(copy_of):
    # stable-diffusion-v1-5 lists a safety checker and feature extractor: never loaded here
    folder = copy_of("sd15")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    c = load_components(str(folder))
    assert c.pipeline().safety_checker is None


def test_weights_variant(copy_of):
    folder = copy_of("sd15")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert load_components(str(folder), variant="fp16", components=["unet"]).unet is not None
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        load_components(str(folder), components=["unet"])


def test_package_exports_the_loader():
    import smpo_cli.models as models
    from smpo_cli.models import loading

    assert models.load_components is loading.load_components
    assert models.DiffusionComponents is DiffusionComponents


def test_dtype_is_applied(tiny_dirs):
    c = load_components(str(tiny_dirs["sd15"]), dtype="bf16", components=["text_encoder", "vae"])
    assert c.dtype == torch.bfloat16
    assert next(c.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(c.vae.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("spec", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.float16),
        ("fp32", "cpu", torch.float32),
        ("float16", "cuda", torch.float16),
        ("fp16", "cuda", torch.float16),
        ("bf16", "cuda", torch.bfloat16),
        ("bfloat16", "cpu", torch.bfloat16),
        (torch.float32, "cpu", torch.float32),
    ],
)
def test_resolve_dtype(spec, device, expected):
    assert resolve_dtype(spec, device) == expected


def test_resolve_dtype_and_device_errors():
    with pytest.raises(UsageError):
        resolve_dtype("int8", "cpu")
    with pytest.raises(UsageError):
        resolve_device("tpu-ish")
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            resolve_device("cuda")


# --- separate VAE / UNet --------------------------------------------------------------------


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)
    return module


def test_separate_vae_and_unet_folders_replace_the_pipelines(tiny_dirs, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = tiny_dirs["sd15"]
    vae = _perturbed(AutoencoderKL.from_pretrained(base, subfolder="vae"))
    vae.save_pretrained(tmp_path / "my-vae")  # a VAE-only folder (config.json at the root)
    unet = _perturbed(UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
    unet.save_pretrained(tmp_path / "sft-run" / "unet")  # an SFT run folder with unet/ inside

    c = load_components(str(base), vae=str(tmp_path / "my-vae"), unet=str(tmp_path / "sft-run"))
    assert_same_weights(c.vae, vae)
    assert_same_weights(c.unet, unet)
    plain = load_components(str(base), components=["unet"])
    assert not torch.equal(plain.unet.conv_in.weight, c.unet.conv_in.weight)


def test_separate_unet_single_file(tiny_dirs, loaded, tmp_path):
    unet = loaded["sd15"].unet
    path = tmp_path / "unet-ldm.safetensors"
    save_file(unet_to_ldm(unet.state_dict(), dict(unet.config)), str(path))
    c = load_components(str(tiny_dirs["sd15"]), unet=str(path), components=["unet"])
    assert_same_weights(c.unet, unet)


def test_unet_of_the_wrong_family_is_refused(tiny_dirs):
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(tiny_dirs["sd15"]), unet=str(tiny_dirs["sdxl"]))
    assert "sdxl" in one_line(exc)


# --- single-file checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_round_trip(family, tiny_dirs, loaded, images, tmp_path):
    path = save_single_file(loaded[family], family, tmp_path / f"tiny-{family}.safetensors")
    assert detect_family(path) == family
    c = load_components(str(path), config=str(tiny_dirs[family]), local_files_only=True)
    assert c.family == family and c.source == str(path)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(loaded[family], name) is not None:
            assert_same_weights(getattr(c, name), getattr(loaded[family], name))
    np.testing.assert_array_equal(generate(c), images[family])


def test_single_file_ckpt_is_loaded_weights_only(loaded, tmp_path):
    from ldm_convert import pipeline_to_ldm

    state = pipeline_to_ldm(loaded["sd15"], "sd15")
    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, good)
    c = load_components(str(good), config="tiny-sd15", components=["unet", "text_encoder"])
    assert_same_weights(c.unet, loaded["sd15"].unet)
    assert c.vae is None

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callback": shutil.Error("pickled object")}, evil)
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(evil), config="tiny-sd15")
    assert "evil.ckpt" in one_line(exc) and "weights_only" in one_line(exc)


def test_single_file_without_config_offline(loaded, tmp_path):
    path = save_single_file(loaded["sd15"], "sd15", tmp_path / "model.safetensors")
    with pytest.raises(AssetNotFoundError) as exc:
        load_components(str(path), local_files_only=True)
    text = one_line(exc)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in text and "config=" in text


# --- hub ids through the local HF cache -----------------------------------------------------


def test_hub_id_from_the_cache_offline(tiny_dirs, hf_cache):
    hf_cache("smpo-test/tiny-sdxl", tiny_dirs["sdxl"])
    c = load_components("smpo-test/tiny-sdxl", local_files_only=True)
    assert c.family == "sdxl" and c.source == "smpo-test/tiny-sdxl"
    assert c.tokenizer_2.pad_token == "!"


def test_hub_id_partially_cached(tiny_dirs, hf_cache):
    snapshot = hf_cache("smpo-test/tiny-sd15", tiny_dirs["sd15"])
    shutil.rmtree(snapshot / "vae")
    shutil.rmtree(snapshot / "tokenizer")
    assert load_components("smpo-test/tiny-sd15", components=["unet"]).vae is None
    for part in ("vae", "tokenizer"):
        with pytest.raises(AssetNotFoundError) as exc:
            load_components("smpo-test/tiny-sd15", components=[part])
        text = one_line(exc)
        assert part in text and "smpo-test/tiny-sd15" in text and "hf download smpo-test/tiny-sd15" in text


def test_separate_vae_from_a_cached_hub_repo(tiny_dirs, hf_cache, tmp_path):
    # like model.vae=madebyollin/sdxl-vae-fp16-fix: a repo with config.json at its root
    from diffusers import AutoencoderKL

    vae = _perturbed(AutoencoderKL.from_pretrained(tiny_dirs["sdxl"], subfolder="vae"))
    vae.save_pretrained(tmp_path / "vae-repo")
    hf_cache("smpo-test/tiny-vae-fix", tmp_path / "vae-repo")
    c = load_components("tiny-sdxl", vae="smpo-test/tiny-vae-fix", components=["vae"])
    assert_same_weights(c.vae, vae)
    with pytest.raises(AssetNotFoundError, match="smpo-test/not-cached-vae"):
        load_components("tiny-sdxl", vae="smpo-test/not-cached-vae", components=["vae"])


def test_unknown_hub_id_offline(hf_cache):
    with pytest.raises(AssetNotFoundError) as exc:
        load_components("nobody/no-such-model")
    text = one_line(exc)
    assert "nobody/no-such-model" in text and "cache" in text and "HF_HUB_OFFLINE" in text
    assert "hf download nobody/no-such-model" in exc.value.hint
    assert "model.pretrained" in exc.value.hint


@pytest.mark.slow
def test_unknown_hub_id_without_network(hf_cache, monkeypatch):
    # Not offline, but the Hub cannot be reached (huggingface_hub retries for ~20 s first).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(AssetNotFoundError, match="cannot be reached"):
        load_components("nobody/no-such-model", local_files_only=False)


# --- broken inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["/no/such/folder", "./missing-model", "weights/missing.safetensors"])
def test_missing_local_path(spec):
    with pytest.raises(AssetNotFoundError) as exc:
        load_components(spec)
    assert spec in one_line(exc)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_components(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("component", "file"),
    [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")],
)
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(copy_of, component, file, damage):
    folder = copy_of("sd15")
    weights = folder / component / file
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 64)
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(folder))
    text = one_line(exc)
    assert component in text and file in text and "safetensors" in text


@pytest.mark.parametrize("component", ["vae", "text_encoder_2", "tokenizer", "scheduler"])
def test_missing_subfolder(copy_of, component):
    folder = copy_of("sdxl")
    shutil.rmtree(folder / component)
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(folder))
    text = one_line(exc)
    assert component in text and str(folder / component) in text


@pytest.mark.parametrize(
    ("component", "edit"),
    [
        ("unet", {"block_out_channels": [48, 96]}),
        ("vae", {"latent_channels": 8}),
        ("text_encoder", {"hidden_size": 64}),
    ],
)
def test_config_that_does_not_match_the_weights(copy_of, component, edit):
    folder = copy_of("sd15")
    config_path = folder / component / "config.json"
    config = json.loads(config_path.read_text())
    config.update(edit)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(folder))
    assert component in one_line(exc)


def test_invalid_json_config(copy_of):
    folder = copy_of("sd15")
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as exc:
        load_components(str(folder))
    assert "unet" in one_line(exc) and "JSON" in one_line(exc)


def test_empty_tokenizer_folder_is_refused(copy_of):
    folder = copy_of("sd15")
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_components(str(folder))


def test_an_unreachable_hub_fails_at_once_not_after_retries(monkeypatch):
    """Offline, a hub id not in the cache is an error in well under the ~30 s huggingface_hub spends retrying."""
    import time

    from smpo_cli.errors import AssetNotFoundError
    from smpo_cli.models import hub, loading

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)  # what hub._hub_download calls
    monkeypatch.setattr(loading, "_offline", lambda local_files_only: False)  # downloads allowed (the tests set HF_HUB_OFFLINE)
    started = time.monotonic()
    with pytest.raises(AssetNotFoundError, match="the Hub cannot be reached"):
        loading.load_components("made-up-user/not-a-model")
    assert time.monotonic() - started < 10
