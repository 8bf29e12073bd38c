"""PickScore and CLIP score against their formulas, computed here from the raw transformers model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from smpo_cli.rewards import load_reward
from smpo_cli.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _raw_cosines(folder, images, prompts):
    """cos(text, image) from the saved CLIPModel, with the processor read back from the same folder."""
    import transformers
    from transformers import CLIPModel, CLIPTokenizer

    pil_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    image_processor = pil_cls.from_pretrained(str(folder), local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    rgb = [im.convert("RGB") for im in images]
    with torch.no_grad():
        px = image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=px)
        img = getattr(img, "pooler_output", img)
        tok = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1), model.logit_scale.exp().item()


def test_pickscore_is_logit_scale_times_cosine(tiny_dirs, tiny_reward, images, prompts):
    rm = tiny_reward("pickscore")
    out = rm.score(images, prompts)
    cos, logit_scale = _raw_cosines(tiny_dirs("pickscore"), images, prompts)
    assert logit_scale == pytest.approx(100.0, rel=1e-5)  # the tiny model stores PickScore's scale
    torch.testing.assert_close(out["cosine"], cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["score"], logit_scale * cos, atol=1e-3, rtol=0)
    assert rm.metadata["logit_scale"] == pytest.approx(logit_scale)


def test_clip_score_is_100_cosine_clamped_at_zero(tiny_dirs, tiny_reward, images, prompts):
    rm = tiny_reward("clip")
    out = rm.score(images, prompts)
    cos, _ = _raw_cosines(tiny_dirs("clip"), images, prompts)
    torch.testing.assert_close(out["cosine"], cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["clip_score"], torch.clamp(100 * cos, min=0), atol=1e-3, rtol=0)
    # Clamp applies per image: a negative cosine scores 0.
    negative = out["cosine"] < 0
    assert (out["clip_score"][negative] == 0).all()


def test_clip_family_uses_the_pil_image_path(tiny_reward):
    rm = tiny_reward("pickscore")
    assert "Fast" not in type(rm.processor.image_processor).__name__
    # A 300x200 image: shorter side -> 224 (PIL bicubic), centre crop 224 (offset 56), rescale, normalise.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    px = rm.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    resized = np.asarray(image.resize((336, 224), Image.BICUBIC), dtype=np.float32)[:, 56:280] / 255.0
    expected = (resized - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    torch.testing.assert_close(px, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=0)


def test_pickscore_processor_defaults(tiny_dirs):
    from smpo_cli.rewards.pickscore import DEFAULT_PROCESSOR, PickScore

    assert DEFAULT_PROCESSOR == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    rm = load_reward("pickscore", tiny_dirs("pickscore"), processor=str(tiny_dirs("clip")))
    assert isinstance(rm, PickScore) and rm.processor_source == str(tiny_dirs("clip"))


def test_missing_weights_are_refused_not_randomised(tiny_dirs, tmp_path):
    """A CLIP folder lacking tensors must fail loudly rather than score with random weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from smpo_cli.errors import ModelLoadError

    folder = tmp_path / "broken"
    shutil.copytree(tiny_dirs("pickscore"), folder)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("visual_projection.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="visual_projection"):
        load_reward("pickscore", folder)
