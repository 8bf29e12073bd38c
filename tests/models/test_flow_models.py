"""SD3 / SD3.5 and FLUX.1: tiny builders, the real loading path, the stock pipelines and `smpo generate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from smpo_cli.errors import ModelLoadError
from smpo_cli.models.flow import build_t5_tokenizer, family_from_keys, t5_vocab
from smpo_cli.models.loading import detect_family, load_components
from smpo_cli.models.tiny import (
    ALL_TINY_MODELS,
    BUILDER_VERSION,
    PROMPT_WORDS,
    TINY_FLOW_MODELS,
    build_tiny_components,
    is_materialized,
    materialize_tiny,
)

FAMILIES = ("sd3", "flux")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
T5_NAME = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="session")
def flow_dirs(_tiny_cache) -> dict[str, Path]:
    return {fam: materialize_tiny(f"tiny-{fam}") for fam in FAMILIES}


@pytest.fixture(scope="session")
def flow_loaded(flow_dirs):
    return {fam: load_components(str(path), device="cpu") for fam, path in flow_dirs.items()}


def sample(components, seed: int = 0) -> np.ndarray:
    pipe = components.pipeline()
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        PROMPT, num_inference_steps=2, generator=generator, height=32, width=32, output_type="np"
    ).images


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizer ------------------------------------------------------------------------------


def test_tiny_t5_tokenizer_is_built_offline_and_round_trips(tmp_path):
    tok = build_t5_tokenizer(PROMPT_WORDS)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    for word in PROMPT_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("A photo of an astronaut zq!").input_ids
    assert (
        ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    )  # unknown words fall back to characters
    assert tok.decode(ids, skip_special_tokens=True) == "A photo of an astronaut zq!"
    assert tok.unk_token_id in tok("日本").input_ids
    assert t5_vocab(PROMPT_WORDS) == t5_vocab(PROMPT_WORDS)  # deterministic
    tok.save_pretrained(tmp_path / "t5")
    from transformers import T5Tokenizer

    again = T5Tokenizer.from_pretrained(str(tmp_path / "t5"), local_files_only=True)
    assert again("a red car, 4k").input_ids == tok("a red car, 4k").input_ids
    assert len(again("a cat", padding="max_length", max_length=256).input_ids) == 256


# --- builders and materialisation -----------------------------------------------------------


def test_flow_models_are_tiny_names():
    assert set(TINY_FLOW_MODELS) == {"tiny-sd3", "tiny-flux"} and set(TINY_FLOW_MODELS) <= set(
        ALL_TINY_MODELS
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_builders_are_deterministic_and_leave_the_rng_alone(family):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_components(f"tiny-{family}")
    assert torch.equal(torch.rand(3), expected_next)
    second = build_tiny_components(f"tiny-{family}")
    modules = {k for k, v in first.items() if isinstance(v, torch.nn.Module)}
    expected = {"transformer", "vae", "text_encoder", "text_encoder_2"} | (
        {"text_encoder_3"} if family == "sd3" else set()
    )
    assert modules == expected
    for key in modules:
        assert_same_weights(first[key], second[key])
    assert type(first["transformer"]).__name__ == TRANSFORMERS[family]
    assert type(first["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert first["scheduler"].config.shift == 3.0
    assert first["vae"].config.latent_channels == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_materialize_writes_the_diffusers_format(flow_dirs, smpo_cache, family):
    path = flow_dirs[family]
    assert path == smpo_cache / "models" / f"tiny-{family}-v{BUILDER_VERSION}"
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    assert index["transformer"] == ["diffusers", TRANSFORMERS[family]]
    assert index[T5_NAME[family]][1] in ("T5Tokenizer", "T5TokenizerFast")
    models = ["transformer", "vae", "text_encoder", "text_encoder_2"] + (
        ["text_encoder_3"] if family == "sd3" else []
    )
    for sub in models:
        assert (path / sub / "config.json").is_file() and list((path / sub).glob("*.safetensors")), sub
    assert (path / T5_NAME[family] / "tokenizer.json").is_file()
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pkl"))
    assert is_materialized(path)


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_name_loads_through_the_real_loader(family, flow_dirs, flow_loaded):
    c = load_components(f"tiny-{family}", device="cpu")
    assert c.family == family and c.is_flow and c.unet is None
    assert type(c.transformer).__name__ == TRANSFORMERS[family] and c.denoiser is c.transformer
    assert c.prediction_type == "flow_prediction"
    assert_same_weights(c.transformer, flow_loaded[family].transformer)
    t5 = c.text_encoder_3 if family == "sd3" else c.text_encoder_2
    assert type(t5).__name__ == "T5EncoderModel"
    assert type(getattr(c, T5_NAME[family])).__name__ == "T5Tokenizer"
    assert (c.text_encoder_3 is None) == (family == "flux") and (c.tokenizer_3 is None) == (family == "flux")
    assert set(c.modules()) >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    pipe = c.pipeline()
    assert type(pipe).__name__ == PIPELINES[family]
    assert pipe.transformer is c.transformer and pipe.vae is c.vae
    assert detect_family(f"tiny-{family}") == family and detect_family(flow_dirs[family]) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_image(family, flow_loaded):
    a, b, other = (
        sample(flow_loaded[family]),
        sample(flow_loaded[family]),
        sample(flow_loaded[family], seed=1),
    )
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - other).max() > 1e-3


def test_forced_family_and_restricted_components(flow_dirs):
    c = load_components(str(flow_dirs["flux"]), family="flux", components=["transformer", "scheduler"])
    assert c.transformer is not None and c.vae is None and c.text_encoder_2 is None
    with pytest.raises(ModelLoadError, match="family=sd3"):
        load_components(str(flow_dirs["flux"]), family="sd3")
    with pytest.raises(ModelLoadError, match="cannot build a pipeline"):
        c.pipeline()


def test_generic_class_name_is_detected_from_the_transformer(flow_dirs, tmp_path):
    folder = tmp_path / "generic"
    shutil.copytree(flow_dirs["sd3"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "DiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    assert detect_family(folder) == "sd3"


@pytest.mark.parametrize(
    "name", ["FluxFillPipeline", "FluxKontextPipeline", "StableDiffusion3ControlNetPipeline"]
)
def test_other_pipelines_of_the_families_are_refused(flow_dirs, tmp_path, name):
    folder = tmp_path / "other"
    shutil.copytree(flow_dirs["flux"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = name
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=name):
        load_components(str(folder))


def test_hub_id_from_the_cache_offline(flow_dirs, flow_loaded, hf_cache):
    hf_cache("smpo-test/tiny-flux", flow_dirs["flux"])
    c = load_components("smpo-test/tiny-flux", local_files_only=True)
    assert c.family == "flux" and c.source == "smpo-test/tiny-flux"
    assert_same_weights(c.transformer, flow_loaded["flux"].transformer)
    assert c.tokenizer_2("a cat").input_ids == flow_loaded["flux"].tokenizer_2("a cat").input_ids


def test_separate_transformer_folder_and_single_file(flow_dirs, flow_loaded, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    transformer = SD3Transformer2DModel.from_pretrained(flow_dirs["sd3"], subfolder="transformer")
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.01)
    transformer.save_pretrained(tmp_path / "run" / "transformer")
    c = load_components(str(flow_dirs["sd3"]), unet=str(tmp_path / "run"), components=["transformer"])
    assert_same_weights(c.transformer, transformer)
    assert not torch.equal(
        c.transformer.pos_embed.proj.weight, flow_loaded["sd3"].transformer.pos_embed.proj.weight
    )
    path = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(path))
    c = load_components(str(flow_dirs["sd3"]), unet=str(path), components=["transformer"])
    assert_same_weights(c.transformer, transformer)
    with pytest.raises(ModelLoadError):  # a FLUX transformer is not an SD3 one
        load_components(str(flow_dirs["sd3"]), unet=str(flow_dirs["flux"]), components=["transformer"])


def test_parts_that_do_not_fit_are_refused(flow_dirs, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(flow_dirs["flux"], folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    # a transformer trained for another T5 width (config and weights agree, the T5 does not)
    from diffusers import FluxTransformer2DModel

    config.pop("_class_name"), config.pop("_diffusers_version")
    other = FluxTransformer2DModel(**{**config, "joint_attention_dim": 48})
    weights.unlink()
    other.save_pretrained(folder / "transformer")
    with pytest.raises(ModelLoadError, match="T5 encoder"):
        load_components(str(folder))


def test_single_file_keys_name_the_family():
    assert (
        family_from_keys(["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"])[0]
        == "sd3"
    )
    assert family_from_keys(["double_blocks.0.img_attn.norm.key_norm.scale"])[0] == "flux"
    assert family_from_keys(["model.diffusion_model.input_blocks.0.0.weight"])[0] is None


# --- single-file checkpoints ----------------------------------------------------------------


def _swap(w: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): the original final modulation's order."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_transformer_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict in the original MMDiT layout (SD3 / SD3.5 single files),
    the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``."""
    s = dict(state)
    out = {}
    out["pos_embed"] = s.pop("pos_embed.pos_embed")
    for wb in ("weight", "bias"):
        out[f"x_embedder.proj.{wb}"] = s.pop(f"pos_embed.proj.{wb}")
        out[f"t_embedder.mlp.0.{wb}"] = s.pop(f"time_text_embed.timestep_embedder.linear_1.{wb}")
        out[f"t_embedder.mlp.2.{wb}"] = s.pop(f"time_text_embed.timestep_embedder.linear_2.{wb}")
        out[f"y_embedder.mlp.0.{wb}"] = s.pop(f"time_text_embed.text_embedder.linear_1.{wb}")
        out[f"y_embedder.mlp.2.{wb}"] = s.pop(f"time_text_embed.text_embedder.linear_2.{wb}")
        out[f"context_embedder.{wb}"] = s.pop(f"context_embedder.{wb}")
        out[f"final_layer.linear.{wb}"] = s.pop(f"proj_out.{wb}")
        out[f"final_layer.adaLN_modulation.1.{wb}"] = _swap(s.pop(f"norm_out.linear.{wb}"))
    n = config["num_layers"]
    for i in range(n):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == n - 1
        for wb in ("weight", "bias"):
            out[o + f"x_block.attn.qkv.{wb}"] = torch.cat([s.pop(d + f"attn.to_{x}.{wb}") for x in "qkv"])
            out[o + f"context_block.attn.qkv.{wb}"] = torch.cat(
                [s.pop(d + f"attn.add_{x}_proj.{wb}") for x in "qkv"]
            )
            out[o + f"x_block.attn.proj.{wb}"] = s.pop(d + f"attn.to_out.0.{wb}")
            out[o + f"x_block.adaLN_modulation.1.{wb}"] = s.pop(d + f"norm1.linear.{wb}")
            ctx = s.pop(d + f"norm1_context.linear.{wb}")
            out[o + f"context_block.adaLN_modulation.1.{wb}"] = _swap(ctx) if last else ctx
            out[o + f"x_block.mlp.fc1.{wb}"] = s.pop(d + f"ff.net.0.proj.{wb}")
            out[o + f"x_block.mlp.fc2.{wb}"] = s.pop(d + f"ff.net.2.{wb}")
            if not last:
                out[o + f"context_block.attn.proj.{wb}"] = s.pop(d + f"attn.to_add_out.{wb}")
                out[o + f"context_block.mlp.fc1.{wb}"] = s.pop(d + f"ff_context.net.0.proj.{wb}")
                out[o + f"context_block.mlp.fc2.{wb}"] = s.pop(d + f"ff_context.net.2.{wb}")
            if i in config.get("dual_attention_layers", ()):
                out[o + f"x_block.attn2.qkv.{wb}"] = torch.cat(
                    [s.pop(d + f"attn2.to_{x}.{wb}") for x in "qkv"]
                )
                out[o + f"x_block.attn2.proj.{wb}"] = s.pop(d + f"attn2.to_out.0.{wb}")
        for a, b in (
            ("norm_q", "x_block.attn.ln_q"),
            ("norm_k", "x_block.attn.ln_k"),
            ("norm_added_q", "context_block.attn.ln_q"),
            ("norm_added_k", "context_block.attn.ln_k"),
        ):
            if d + f"attn.{a}.weight" in s:
                out[o + b + ".weight"] = s.pop(d + f"attn.{a}.weight")
        for a, b in (("norm_q", "x_block.attn2.ln_q"), ("norm_k", "x_block.attn2.ln_k")):
            if d + f"attn2.{a}.weight" in s:
                out[o + b + ".weight"] = s.pop(d + f"attn2.{a}.weight")
    assert not s, sorted(s)[:5]
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def test_sd3_single_file_in_the_original_layout(flow_dirs, flow_loaded, tmp_path):
    from ldm_convert import vae_to_ldm
    from safetensors.torch import save_file

    base = flow_loaded["sd3"]
    state = sd3_transformer_to_original(base.transformer.state_dict(), dict(base.transformer.config))
    state.update(vae_to_ldm(base.vae.state_dict(), dict(base.vae.config)))
    path = tmp_path / "sd3.5-tiny.safetensors"
    save_file(state, str(path))
    assert detect_family(path) == "sd3"
    # transformer and VAE from the file, the three text encoders from the config folder
    c = load_components(str(path), config="tiny-sd3", local_files_only=True)
    assert c.family == "sd3" and c.source == str(path)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert_same_weights(getattr(c, name), getattr(base, name))
    np.testing.assert_array_equal(sample(c), sample(base))


def test_flux_transformer_only_single_file(flow_dirs, flow_loaded, tmp_path):
    from safetensors.torch import save_file

    base = flow_loaded["flux"]
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in base.transformer.state_dict().items()}, str(path))
    assert detect_family(path) == "flux"
    c = load_components(str(path), config=str(flow_dirs["flux"]), local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(c, name), getattr(base, name))
    np.testing.assert_array_equal(sample(c), sample(base))


# --- smpo generate --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_smpo_generate_is_deterministic(family, flow_dirs, tmp_path):
    from PIL import Image

    from smpo_cli.cli.main import run

    (tmp_path / "p.txt").write_text("a photo of a cat\na red car on a street\n")
    common = ["--model", f"tiny-{family}", "--prompts", str(tmp_path / "p.txt"), "--seed", "7",
              "sampling.num_inference_steps=2", "sampling.height=32", "sampling.width=32",
              "sampling.guidance_scale=4.0"]  # fmt: skip
    assert run(["-q", "generate", "-o", str(tmp_path / "a"), *common]) == 0
    assert run(["-q", "generate", "-o", str(tmp_path / "b"), *common, "sampling.batch_size=1"]) == 0
    files = sorted((tmp_path / "a" / "images").glob("*.png"))
    assert [f.name for f in files] == ["00000_00.png", "00001_00.png"]
    pixels = [np.asarray(Image.open(f)) for f in files]
    assert pixels[0].shape == (32, 32, 3) and np.abs(pixels[0].astype(int) - pixels[1]).max() > 0
    for f, a in zip(files, pixels, strict=True):
        b = np.asarray(Image.open(tmp_path / "b" / "images" / f.name))
        assert np.abs(a.astype(int) - b).max() <= 1  # another batch size: float rounding at most
    assert run(["-q", "generate", "-o", str(tmp_path / "c"), *common]) == 0
    for f, a in zip(files, pixels, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c" / "images" / f.name)), a)
    meta = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in meta] == ["a photo of a cat", "a red car on a street"]
    assert all(m["model"] == f"tiny-{family}" for m in meta)
