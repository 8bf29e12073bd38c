"""ImageReward against a from-scratch functional forward pass over the original checkpoint names.

The reference below reads ``ImageReward.pt`` as the ``image-reward`` package names it (timm ViT,
BLIP "MED" BERT) and runs it with plain torch ops, with the reference preprocessing built from
torchvision transforms; it shares no code with ``smpo_cli.rewards.imagereward``. The comparison
with the ``image-reward`` package itself is ``test_imagereward_parity.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from smpo_cli.errors import ModelLoadError
from smpo_cli.rewards import load_reward
from smpo_cli.rewards.imagereward import REWARD_MEAN, REWARD_STD, convert_state_dict


def _reference_transform():
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


def _attention(q, k, v, heads, mask=None):
    b, nq, d = q.shape
    hd = d // heads
    q = q.view(b, nq, heads, hd).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, hd).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / hd**0.5
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)


def _vit(sd, px):
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[-1]
    heads = width // 64
    x = F.conv2d(px, w, sd[p + "patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(_attention(q, k, v, heads), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        i += 1
    return F.layer_norm(x, (width,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


def _bert_cls(sd, med, ids, mask, image_embeds):
    p = "blip.text_encoder."
    d, heads = med["hidden_size"], med["num_attention_heads"]

    def ln(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps=med["layer_norm_eps"])

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    x = (
        sd[p + "embeddings.word_embeddings.weight"][ids]
        + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = ln(x, p + "embeddings.LayerNorm")
    for i in range(med["num_hidden_layers"]):
        b = f"{p}encoder.layer.{i}."
        a = b + "attention."
        ctx = _attention(
            lin(x, a + "self.query"), lin(x, a + "self.key"), lin(x, a + "self.value"), heads, mask
        )
        x = ln(lin(ctx, a + "output.dense") + x, a + "output.LayerNorm")
        c = b + "crossattention."
        ctx = _attention(
            lin(x, c + "self.query"),
            lin(image_embeds, c + "self.key"),
            lin(image_embeds, c + "self.value"),
            heads,
        )
        x = ln(lin(ctx, c + "output.dense") + x, c + "output.LayerNorm")
        h = F.gelu(lin(x, b + "intermediate.dense"))
        x = ln(lin(h, b + "output.dense") + x, b + "output.LayerNorm")
    return x[:, 0]


def _reference_rewards(folder, images, prompts):
    from transformers import BertTokenizer

    sd = torch.load(folder / "ImageReward.pt", map_location="cpu", weights_only=True)
    med = json.loads((folder / "med_config.json").read_text())
    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    transform = _reference_transform()
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):  # one at a time, as ImageReward.score
            px = transform(image.convert("RGB"))[None]
            t = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            cls = _bert_cls(sd, med, t["input_ids"], t["attention_mask"], _vit(sd, px))
            h = cls
            for i in (0, 2, 4, 6, 7):
                h = F.linear(h, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
            out.append(h[0, 0])
    raw = torch.stack(out)
    return raw, (raw - 0.16717362830052426) / 1.0333394966054072


def test_reward_matches_functional_reference(tiny_dirs, tiny_reward, images, prompts):
    rm = tiny_reward("imagereward")
    out = rm.score(images, prompts)
    raw, reward = _reference_rewards(tiny_dirs("imagereward"), images, prompts)
    torch.testing.assert_close(out["raw"], raw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["score"], reward, atol=1e-4, rtol=1e-5)
    assert out["score"].std() > 1e-3  # the tiny head's std makes rewards differ between images


def test_normalisation_constants():
    assert REWARD_MEAN == 0.16717362830052426 and REWARD_STD == 1.0333394966054072


def test_key_map_covers_the_checkpoint(tiny_dirs):
    sd = torch.load(tiny_dirs("imagereward") / "ImageReward.pt", weights_only=True)
    vision, text, head = convert_state_dict(sd)
    used = len(vision) + len(text) + len(head)
    dropped = sorted(
        set(sd) - {k for k in sd if k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp."))}
    )
    assert dropped == [
        "blip.text_proj.bias",
        "blip.text_proj.weight",
        "blip.vision_proj.bias",
        "blip.vision_proj.weight",
    ]
    assert used == len(sd) - len(dropped) - 1  # minus the text position_ids buffer
    assert "embeddings.class_embedding" in vision and "post_layernorm.weight" in vision
    assert set(head) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_unknown_vision_key_is_a_load_error(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "ir"
    shutil.copytree(tiny_dirs("imagereward"), folder)
    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    sd["blip.visual_encoder.something_new"] = torch.zeros(1)
    torch.save(sd, folder / "ImageReward.pt")
    with pytest.raises(ModelLoadError, match="something_new"):
        load_reward("imagereward", folder)


def test_med_config_mismatch_is_a_load_error(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "ir"
    shutil.copytree(tiny_dirs("imagereward"), folder)
    med = json.loads((folder / "med_config.json").read_text())
    med["num_hidden_layers"] = 3
    (folder / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ModelLoadError, match="text weights"):
        load_reward("imagereward", folder)


def test_score_pairs_concatenates(tiny_reward, images, prompts, monkeypatch):
    rm = tiny_reward("imagereward")
    sizes: list[int] = []
    original = rm._score_batch

    def spy(batch_images, batch_prompts):
        sizes.append(len(batch_images))
        return original(batch_images, batch_prompts)

    monkeypatch.setattr(rm, "_score_batch", spy)
    rm.score_pairs(images, images, prompts, batch_size=64)
    assert sizes == [2 * len(images)]
