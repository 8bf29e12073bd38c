"""HPSv2: the letterbox computed by hand with torch ops, and the cosine from the raw open_clip model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from smpo_cli.errors import ModelLoadError, UsageError
from smpo_cli.rewards import load_reward
from smpo_cli.rewards.hpsv2 import HPS_FILES, letterbox

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def _hand_letterbox(image: Image.Image, size: int = 224, antialias: bool = False) -> torch.Tensor:
    x = torch.tensor(np.array(image.convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255.0
    h, w = x.shape[1:]
    s = size / max(h, w)
    nh, nw = int(round(h * s)), int(round(w * s))
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)[0]
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas = torch.zeros(3, size, size)
    canvas[:, top : top + nh, left : left + nw] = x
    return (canvas - MEAN) / STD


def _noise(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(200, 300), (300, 200), (65, 33), (50, 50), (224, 224), (48, 64)])
def test_letterbox_matches_hand_computation(size):
    h, w = size
    image = _noise(h, w)
    got = letterbox(image, 224, antialias=False)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, _hand_letterbox(image), atol=1e-5, rtol=0)


def test_letterbox_non_square_geometry():
    image = _noise(200, 300)  # H=200, W=300: new size round(200 * 224/300) = 149 x 224
    got = letterbox(image, 224)
    padding = (torch.zeros(3, 1, 1) - MEAN) / STD
    pad_h = 224 - 149
    top = pad_h // 2  # 37 rows on top, 38 below
    assert top == 37
    torch.testing.assert_close(got[:, :top], padding.expand(3, top, 224))
    torch.testing.assert_close(got[:, top + 149 :], padding.expand(3, pad_h - top, 224))
    row = padding[:, 0].expand(3, 224)
    assert not torch.allclose(got[:, top], row)
    assert not torch.allclose(got[:, top + 148], row)


def test_antialias_is_explicit_and_changes_downscaled_inputs():
    image = _noise(300, 450)
    off, on = letterbox(image, 224, antialias=False), letterbox(image, 224, antialias=True)
    torch.testing.assert_close(on, _hand_letterbox(image, antialias=True), atol=1e-5, rtol=0)
    assert (off - on).abs().max() > 0.1


def _raw_hps_scores(folder, images, prompts):
    import open_clip

    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.create_model("ViT-H-14", pretrained=None, **cfg).eval()
    state = torch.load(folder / HPS_FILES["v2.1"], map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    with torch.no_grad():
        px = torch.stack([_hand_letterbox(im) for im in images])
        img = model.encode_image(px)
        txt = model.encode_text(open_clip.tokenize(prompts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


def test_hps_score_is_cosine_of_normalised_features(tiny_dirs, tiny_reward, images, prompts):
    rm = tiny_reward("hpsv2")
    out = rm.score(images, prompts)
    expected = _raw_hps_scores(tiny_dirs("hpsv2"), images, prompts)
    torch.testing.assert_close(out["score"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["score_x100"], 100 * expected, atol=1e-3, rtol=0)


def test_version_and_metadata_record_variant_and_antialias(tiny_dirs):
    rm = load_reward("hpsv2", tiny_dirs("hpsv2"))
    assert rm.version == "HPSv2.1" and rm.metadata["antialias"] is False and rm.metadata["variant"] == "v2.1"
    rm_aa = load_reward("hpsv2", tiny_dirs("hpsv2"), antialias=True)
    assert rm_aa.version == "HPSv2.1+aa" and rm_aa.metadata["antialias"] is True


def test_v2_0_checkpoint(tiny_dirs):
    folder = tiny_dirs("hpsv2", variant="v2.0")
    assert (folder / "HPS_v2_compressed.pt").is_file()
    rm = load_reward("hpsv2", folder, variant="v2.0")
    assert rm.version == "HPSv2.0"
    # The file name alone says which variant it is.
    assert load_reward("hpsv2", folder / "HPS_v2_compressed.pt").version == "HPSv2.0"
    with pytest.raises(UsageError):
        load_reward("hpsv2", folder / "HPS_v2_compressed.pt", variant="v2.1")
    with pytest.raises(UsageError):
        load_reward("hpsv2", folder, variant="v3")


def test_strict_load_rejects_a_mismatched_checkpoint(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "hps"
    shutil.copytree(tiny_dirs("hpsv2"), folder)
    ckpt = folder / HPS_FILES["v2.1"]
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"].pop("logit_scale")
    torch.save(state, ckpt)
    with pytest.raises(ModelLoadError, match="does not match"):
        load_reward("hpsv2", folder)


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint holding arbitrary objects is not unpickled."""

    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / HPS_FILES["v2.1"])
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_reward("hpsv2", tmp_path)


def test_amp_needs_cuda(tiny_dirs):
    with pytest.raises(UsageError):
        load_reward("hpsv2", tiny_dirs("hpsv2"), amp=True)


def test_rounding_of_new_size_uses_round():
    # 7 x 10 -> scale 22.4: 7 * 22.4 = 156.8 -> 157 rows (int() would give 156).
    image = _noise(7, 10)
    got = letterbox(image, 224)
    padding = ((torch.zeros(3, 1, 1) - MEAN) / STD)[:, 0].expand(3, 224)
    rows_with_content = [r for r in range(224) if not torch.allclose(got[:, r], padding)]
    assert len(rows_with_content) == math.floor(7 * 22.4 + 0.5)
