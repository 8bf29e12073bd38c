"""LAION aesthetic predictor: linear head (by hand) on L2-normalised CLIP image embeddings."""

from __future__ import annotations

import shutil

import pytest
import torch

from smpo_cli.rewards import load_reward
from smpo_cli.rewards.aesthetic import DEFAULT_BACKBONE, DEFAULT_REPO, HEAD_FILES


def test_score_is_head_of_normalised_embedding(tiny_dirs, tiny_reward, images):
    import transformers
    from transformers import CLIPVisionModelWithProjection

    folder = tiny_dirs("aesthetic")
    rm = tiny_reward("aesthetic")
    out = rm.score(images)

    pil_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).eval()
    processor = pil_cls.from_pretrained(str(folder), local_files_only=True)
    head = torch.load(folder / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    with torch.no_grad():
        px = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        emb = vision(pixel_values=px).image_embeds
    h = emb / emb.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # no activations: one affine map
        h = h @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    torch.testing.assert_close(out["score"], h[:, 0], atol=1e-5, rtol=0)


def test_defaults():
    assert DEFAULT_REPO == "trl-lib/ddpo-aesthetic-predictor"
    assert DEFAULT_BACKBONE == "openai/clip-vit-large-patch14"
    assert HEAD_FILES == ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")


def test_head_file_and_separate_backbone(tiny_dirs, tiny_reward, images, tmp_path):
    """The head as a lone file (TRL's name), the backbone given as a separate folder."""
    head = tmp_path / "aesthetic-model.pth"
    shutil.copy(tiny_dirs("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth", head)
    rm = load_reward("aesthetic", head, backbone=str(tiny_dirs("aesthetic")))
    assert rm.metadata["head"] == str(head) and rm.version.startswith("aesthetic(")  # not the published file
    torch.testing.assert_close(rm.score(images)["score"], tiny_reward("aesthetic").score(images)["score"])


def test_unknown_option_is_a_usage_error(tiny_dirs):
    from smpo_cli.errors import UsageError

    with pytest.raises(UsageError, match="antialias"):
        load_reward("aesthetic", tiny_dirs("aesthetic"), antialias=True)
