"""ImageReward (Xu et al., 2023) on transformers' BLIP classes, reading the original ``ImageReward.pt``.

Network (``THUDM/ImageReward``, ``ImageReward-v1.0``): BLIP ViT-L/16 at 224 px
(``BlipVisionModel``) whose patch tokens feed, as cross-attention states, a BERT-base "MED" text
encoder (``BlipTextModel(add_pooling_layer=False)``); the text encoder's first-token ([CLS]) output
goes through a 5-Linear head without activations. Reward = ``(head - 0.16717362830052426) /
1.0333394966054072``. The original checkpoint's keys are renamed on load (:func:`convert_state_dict`);
no code of the ``image-reward`` package is used (it needs ``timm==0.6.13`` and breaks on
transformers 5). Numerically equal to it: see ``tests/rewards/test_imagereward_parity.py``.

Preprocessing as the reference: resize the shorter side to 224 with PIL bicubic (longer side
``int(224 * long / short)``), centre crop 224, ToTensor, OpenAI mean/std. Tokenizer:
``bert-base-uncased`` plus ``[DEC]`` (bos) and ``[ENC]``, prompts padded/truncated to 35 tokens
with ``[CLS]`` first. Images are converted to RGB before resizing (the reference resizes first,
which differs only for palette/RGBA/CMYK inputs).

Outputs (float32, one per image): ``score`` = the normalised reward (what ``ImageReward.score``
returns and papers report; roughly standard normal); ``raw`` = the head output before
normalisation.

Unlike the CLIP-like models, the text encoder attends to the image, so :meth:`score_pairs` cannot
share the text pass between the two images of a pair: it scores their concatenation.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from smpo_cli.errors import AssetNotFoundError, ModelLoadError
from smpo_cli.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RewardModel,
    hf_from_pretrained,
    linear_head_from_state_dict,
    load_state_dict_file,
    looks_like_hub_id,
    quiet_transformers,
    read_json,
    resolve_file,
)
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG_NAME = "med_config.json"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
IMAGE_SIZE = 224
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's timm-style ViT (transformers' default would be 1e-5)
VISION_HEAD_DIM = 64  # every BLIP ViT (B: 768/12, L: 1024/16); heads are not stored in the checkpoint

# THUDM/ImageReward med_config.json (BERT-base with cross-attention), used when none is found.
DEFAULT_MED_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30524,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an ``ImageReward.pt`` state dict into (vision, text, head) dicts with transformers names.

    ``blip.visual_encoder.*`` -> ``BlipVisionModel`` names; ``blip.text_encoder.*`` keeps its names
    (``BlipTextModel`` uses BLIP's own), minus the ``position_ids`` buffer; ``mlp.layers.*`` ->
    the head. Keys the reward does not use (``blip.vision_proj``, ``blip.text_proj``, ...) are
    dropped. An unknown vision key raises :class:`ModelLoadError`.
    """
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            sub = key[len("blip.visual_encoder.") :]
            for pattern, repl in _VISION_RENAMES:
                new, n = re.subn(pattern, repl, sub)
                if n:
                    vision[new] = value
                    break
            else:
                raise ModelLoadError(f"unexpected ImageReward vision key {key!r}")
        elif key.startswith("blip.text_encoder."):
            sub = key[len("blip.text_encoder.") :]
            if not sub.endswith("position_ids"):
                text[sub] = value
        elif key.startswith("mlp.layers."):
            head[key[len("mlp.") :]] = value
    if not vision or not text or not head:
        raise ModelLoadError(
            "not an ImageReward checkpoint: expected blip.visual_encoder.*, blip.text_encoder.* and mlp.layers.* keys"
        )
    return vision, text, head


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Reference transform of one RGB image -> normalised ``(3, size, size)`` float32 tensor."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        image = image.resize((new_w, new_h), Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = (
        torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
        .permute(2, 0, 1)
        .float()
        .div(255)
    )
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def vision_config_from_state(vision: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    n_patches = int(vision["embeddings.position_embedding"].shape[1]) - 1
    side = math.isqrt(n_patches)
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return {
        "hidden_size": width,
        "intermediate_size": int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(num_heads or max(1, width // VISION_HEAD_DIM)),
        "image_size": side * patch,
        "patch_size": patch,
        "layer_norm_eps": VISION_LAYER_NORM_EPS,
        "hidden_act": "gelu",
    }


class ImageReward(RewardModel):
    name = "imagereward"
    output_names = ("score", "raw")
    default_output = "score"

    def __init__(
        self,
        source: str,
        *,
        tokenizer: str | None = None,
        vision_heads: int | None = None,
        **kwargs: Any,
    ) -> None:
        ckpt = resolve_file(source, [CHECKPOINT_NAME], what="ImageReward checkpoint")
        version = "ImageReward-v1.0" if str(source) == DEFAULT_REPO else Path(str(source)).name
        super().__init__(version=version, source=str(source), **kwargs)
        self.checkpoint = ckpt
        med = dict(DEFAULT_MED_CONFIG)
        med_path = ckpt.parent / MED_CONFIG_NAME
        if not med_path.is_file() and looks_like_hub_id(str(source)):
            try:  # the hub repo keeps it beside the checkpoint; the snapshot folder may lack it
                med_path = resolve_file(source, [MED_CONFIG_NAME], what="ImageReward med_config.json")
            except AssetNotFoundError:
                logger.warning(
                    "%s has no %s; using BERT-base (ImageReward-v1.0) sizes", source, MED_CONFIG_NAME
                )
        if med_path.is_file():
            med.update(read_json(med_path, what="ImageReward med_config.json"))

        if tokenizer is None:
            local = any((ckpt.parent / f).is_file() for f in ("vocab.txt", "tokenizer.json"))
            tokenizer = str(ckpt.parent) if local else DEFAULT_TOKENIZER
        self.tokenizer_source = str(tokenizer)
        self.tokenizer = _load_tokenizer(self.tokenizer_source)

        vision_sd, text_sd, head_sd = convert_state_dict(
            load_state_dict_file(ckpt, what="ImageReward checkpoint")
        )
        self.vision, self.text = self._build_towers(vision_sd, text_sd, med, vision_heads)
        # The head runs in float32 on the float32 [CLS] features, as in the reference.
        self.head = self._place(linear_head_from_state_dict(head_sd, "layers."), dtype=torch.float32)
        self.image_size = int(self.vision.config.image_size)

    def _build_towers(self, vision_sd, text_sd, med, vision_heads):
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vcfg = BlipVisionConfig(**vision_config_from_state(vision_sd, vision_heads))
        word = text_sd.get("embeddings.word_embeddings.weight")
        if word is None:
            raise ModelLoadError(
                "ImageReward checkpoint lacks blip.text_encoder.embeddings.word_embeddings.weight"
            )
        if len(self.tokenizer) > word.shape[0]:
            raise ModelLoadError(
                f"tokenizer {self.tokenizer_source} has {len(self.tokenizer)} tokens, the checkpoint {word.shape[0]}"
            )
        tok = self.tokenizer
        tcfg = BlipTextConfig(
            vocab_size=int(word.shape[0]),
            hidden_size=int(word.shape[1]),
            encoder_hidden_size=vcfg.hidden_size,
            intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]),
            num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(text_sd["embeddings.position_embeddings.weight"].shape[0]),
            hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.sep_token_id,
            sep_token_id=tok.sep_token_id,
            is_decoder=True,  # creates the cross-attention layers; the forward runs as an encoder
        )
        with quiet_transformers():
            vision = BlipVisionModel(vcfg)
            text = BlipTextModel(tcfg, add_pooling_layer=False)
        for module, sd, what in ((vision, vision_sd, "vision"), (text, text_sd, "text")):
            try:
                module.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise ModelLoadError(
                    f"ImageReward {what} weights do not fit: {str(e).splitlines()[0]}",
                    hint=f"{MED_CONFIG_NAME} must describe the checkpoint's text encoder",
                ) from e
        return self._place(vision), self._place(text)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        px = torch.stack([preprocess(im, self.image_size) for im in images])
        px = px.to(device=self.device, dtype=self.dtype)
        image_embeds = self.vision(pixel_values=px).last_hidden_state
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        raw = self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return {"score": (raw - REWARD_MEAN) / REWARD_STD, "raw": raw}

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "tokenizer": self.tokenizer_source,
            "normalisation": {"mean": REWARD_MEAN, "std": REWARD_STD},
            "outputs_meaning": {
                "score": "(head - mean) / std, as ImageReward.score",
                "raw": "head output before normalisation",
            },
        }


def _load_tokenizer(source: str) -> Any:
    """bert-base-uncased with ImageReward's two added special tokens."""
    from transformers import BertTokenizer

    with quiet_transformers():
        tok = hf_from_pretrained(BertTokenizer.from_pretrained, source, what="ImageReward tokenizer")
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


load = ImageReward  # the registry calls load(source, device=..., dtype=..., **options)
