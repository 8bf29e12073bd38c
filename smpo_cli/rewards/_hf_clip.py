"""Shared by the transformers-CLIP rewards (PickScore, CLIP score, the aesthetic backbone).

Loading goes through ``from_pretrained`` (safetensors, or ``.bin`` with ``weights_only``) and fails
on missing weights instead of initialising them randomly. Images go through the checkpoint's
``CLIPImageProcessor`` on the PIL backend (resize shorter side with PIL bicubic, centre crop,
rescale, normalise): the numerics of the reference implementations, which predate the
torchvision image processors.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from smpo_cli.rewards.base import (
    hf_from_pretrained,
    l2_normalize,
    pil_backend_kwargs,
    quiet_transformers,
    refuse_missing_weights,
)


def _check_loading_info(model_and_info: Any, what: str, source: str) -> Any:
    return refuse_missing_weights(model_and_info, what, source, ignore=lambda k: k.endswith("position_ids"),
                                  hint="point at a CLIP checkpoint of the expected architecture")  # fmt: skip


def load_clip_model(source: str, *, what: str) -> Any:
    from transformers import CLIPModel

    with quiet_transformers():
        out = hf_from_pretrained(CLIPModel.from_pretrained, source, what=what, output_loading_info=True)
    return _check_loading_info(out, what, source)


def load_clip_vision_model(source: str, *, what: str) -> Any:
    """``CLIPVisionModelWithProjection`` (also from a full ``CLIPModel`` checkpoint)."""
    from transformers import CLIPVisionModelWithProjection

    with quiet_transformers():
        out = hf_from_pretrained(
            CLIPVisionModelWithProjection.from_pretrained, source, what=what, output_loading_info=True
        )
    return _check_loading_info(out, what, source)


def load_processor(source: str, *, what: str) -> Any:
    from transformers import AutoProcessor

    with quiet_transformers():
        return hf_from_pretrained(AutoProcessor.from_pretrained, source, what=what, **pil_backend_kwargs())


def load_image_processor(source: str, *, what: str) -> Any:
    from transformers import AutoImageProcessor

    with quiet_transformers():
        return hf_from_pretrained(
            AutoImageProcessor.from_pretrained, source, what=what, **pil_backend_kwargs()
        )


def has_processor_files(path: Any) -> bool:
    from pathlib import Path

    p = Path(str(path)).expanduser()
    return p.is_dir() and any(
        (p / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
    )


def pixel_values(image_processor: Any, images: list[Image.Image], device: torch.device, dtype: torch.dtype):
    px = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return px.to(device=device, dtype=dtype)


def image_embeddings(model: Any, px: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (float32)."""
    out = model.get_image_features(pixel_values=px)
    return l2_normalize(getattr(out, "pooler_output", out))  # transformers 5: an output object


def text_embeddings(model: Any, tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """L2-normalised projected text embeddings (float32); prompts padded, truncated to 77 tokens."""
    max_len = int(model.config.text_config.max_position_embeddings)
    tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out = model.get_text_features(
        input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
    )
    return l2_normalize(getattr(out, "pooler_output", out))
