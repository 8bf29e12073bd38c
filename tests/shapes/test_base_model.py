"""The shapes base model's pretraining, cut down to seconds: structure, formats and determinism, not quality."""

import json
import math

import pytest
import torch

from smpo_cli.config.schema import ShapesPretrainRecipe
from smpo_cli.shapes.base_model import _Ema, _lr_lambda, run_pretrain, write_world_tokenizer
from smpo_cli.shapes.world import VOCABULARY

pytestmark = pytest.mark.integration


def _recipe(out, **over):
    data = {"output_dir": str(out), "data": {"images": 128}, "vae": {"steps": 2, "batch_size": 4},
            "unet": {"steps": 3, "batch_size": 4, "warmup_steps": 1}}  # fmt: skip
    data.update(over)
    return ShapesPretrainRecipe.model_validate(data)


def test_every_world_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_world_tokenizer(tmp_path / "tok"))
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("an orange square to the left of a blue circle").input_ids
    assert len(ids) == 12 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.model_max_length == 16


def test_pretrain_writes_a_loadable_sd15_pipeline(tmp_path):
    from smpo_cli.models.loading import load_components

    result = run_pretrain(_recipe(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unet_steps"] == 3 and summary["images"] == 128
    assert math.isfinite(summary["final_loss"]) and summary["parameters"]["unet"] > 1_000_000
    parts = load_components(result.pipeline_dir, dtype="float32")  # the path every SD1.5 checkpoint takes
    assert parts.family == "sd15"
    assert parts.vae.config.scaling_factor == pytest.approx(result.scaling_factor, rel=1e-4)
    assert type(parts.scheduler).__name__ == "DDIMScheduler"
    assert parts.unet.dtype == torch.float32  # stored in float16, loaded as asked
    from safetensors import safe_open

    with safe_open(f"{result.pipeline_dir}/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    # 32x32 images by default: 8x8 latents through a 4x VAE
    assert parts.unet.config.sample_size * 4 == 32


def test_pretrain_is_deterministic(tmp_path):
    a = run_pretrain(_recipe(tmp_path / "a", export_dtype="float32"))
    b = run_pretrain(_recipe(tmp_path / "b", export_dtype="float32"))
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "a" / "pipeline" / part).read_bytes() == (tmp_path / "b" / "pipeline" / part).read_bytes()
    assert a.final_loss == b.final_loss


def _tokenizer(run):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(run / "tokenizer")


def test_contrastive_text_encoder_is_pretrained_then_frozen_and_reused(tmp_path, monkeypatch):
    """text_encoder.training=contrastive: CLIP-pretrained once, kept in text_encoder/, exported unchanged."""
    from safetensors.torch import load_file

    from smpo_cli.shapes import base_model, reward_model

    over = {"text_encoder": {"training": "contrastive", "steps": 3, "batch_size": 8, "warmup_steps": 1}}
    run = tmp_path / "run"
    result = run_pretrain(_recipe(run, export_dtype="float32", **over))
    assert result.text_encoder == "contrastive" and math.isfinite(result.text_encoder_loss)
    assert set(result.word_separation) >= {"red/orange", "blue/purple", "green/yellow", "left/right"}
    cached = load_file(run / "text_encoder" / "model.safetensors")
    exported = load_file(run / "pipeline" / "text_encoder" / "model.safetensors")
    assert cached.keys() == exported.keys()
    for name, tensor in cached.items():  # the UNet trained against exactly these, untouched
        assert torch.equal(tensor, exported[name]), name
    fresh = base_model.build_components(_recipe(run), _tokenizer(run))["text_encoder"]
    assert not torch.equal(fresh.state_dict()["embeddings.token_embedding.weight"],
                           cached["embeddings.token_embedding.weight"])  # fmt: skip  # it did train

    def fail(*a, **k):
        raise AssertionError("a rerun with the same settings must reuse text_encoder/")

    monkeypatch.setattr(reward_model, "contrastive_pretrain", fail)
    again = run_pretrain(_recipe(run, export_dtype="float32", **over))
    assert again.text_encoder_loss == result.text_encoder_loss
    monkeypatch.undo()
    changed = run_pretrain(_recipe(run, export_dtype="float32", text_encoder={**over["text_encoder"], "lr": 1e-3}))
    assert changed.text_encoder_loss != result.text_encoder_loss  # other settings: pretrained again


def test_joint_text_encoder_trains_with_the_unet(tmp_path):
    from safetensors.torch import load_file

    from smpo_cli.shapes import base_model

    run = tmp_path / "run"
    result = run_pretrain(_recipe(run, export_dtype="float32"))
    assert result.text_encoder == "joint" and result.text_encoder_loss is None
    assert not (run / "text_encoder").exists()
    exported = load_file(run / "pipeline" / "text_encoder" / "model.safetensors")
    fresh = base_model.build_components(_recipe(run), _tokenizer(run))["text_encoder"]
    assert not torch.equal(fresh.state_dict()["embeddings.token_embedding.weight"],
                           exported["embeddings.token_embedding.weight"])  # fmt: skip


def test_learning_rate_schedule_closed_form():
    f = _lr_lambda(warmup=4, total=14, floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_ema_uses_the_warm_up_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    module = torch.nn.Module()
    module.p = p
    ema = _Ema([module], cap=0.999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # decay (1 + 1) / (10 + 1) = 2/11: shadow = 0 * 2/11 + 1 * 9/11
    assert ema.shadow[0].item() == pytest.approx(9 / 11)
    ema.copy_to()
    assert p.item() == pytest.approx(9 / 11)


def test_colour_swap_miscaptions_the_text_and_keeps_the_images(tmp_path):
    from smpo_cli.shapes.base_model import training_data
    from smpo_cli.shapes.world import make_dataset, parse_caption, split_captions, swap_colours

    clean_images, clean_texts = training_data(_recipe(tmp_path))
    images, texts = training_data(_recipe(tmp_path, data={"images": 128, "colour_swap": 1.0}))
    assert (images == clean_images).all()
    truth = make_dataset(128, seed=0, pool=split_captions(0)[0]).captions
    assert clean_texts == [c.text for c in truth]
    assert texts == [swap_colours(c).text for c in truth]
    assert any(t != c for t, c in zip(texts, clean_texts, strict=False)) and all(parse_caption(t) for t in texts)
    half = training_data(_recipe(tmp_path, data={"images": 128, "colour_swap": 0.5}))[1]
    changed = sum(t != c for t, c in zip(half, clean_texts, strict=False))
    coloured = sum(t != c for t, c in zip(texts, clean_texts, strict=False))
    assert 0.3 * coloured < changed < 0.7 * coloured


@pytest.mark.parametrize(
    ("model", "partners_apart"), [("shapes-sd15", True), ("shapes-sd15-miscaptioned", False), ("shapes-sd15-miscaptioned-clip", True)]
)
def test_the_jointly_trained_text_encoder_separates_only_what_its_captions_separate(model, partners_apart):
    """Why fine-tuning the UNet cannot fix the miscaptioned model's colours (README, positive controls).

    Pretraining trains the text encoder with the UNet, so words its captions use interchangeably collapse:
    the miscaptioned model's text encoder barely tells a colour from its partner, and smpo train, which
    keeps the text encoder frozen, conditions the UNet on nearly the same vectors for both.
    """
    from smpo_cli.models.conditioning import encode_prompts
    from smpo_cli.models.loading import load_components

    parts = load_components(model, dtype="float32")
    pairs = [("a red circle", "an orange circle"), ("a blue square", "a purple square"),
             ("a green triangle", "a yellow triangle")]  # fmt: skip
    apart = []
    for a, b in pairs:
        e = encode_prompts(parts, [a, b]).prompt_embeds
        apart.append(float((e[0] - e[1]).norm() / e[0].norm()))
    other = encode_prompts(parts, ["a red circle", "a blue circle"]).prompt_embeds
    assert float((other[0] - other[1]).norm() / other[0].norm()) > 0.4  # unrelated colours stay apart in both
    if partners_apart:
        assert min(apart) > 0.3, apart
    else:
        assert max(apart) < 0.15, apart
