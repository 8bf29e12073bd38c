"""CLIP score: text-image agreement of a plain CLIP model (transformers ``CLIPModel``).

Convention (torchmetrics ``CLIPScore``): backbone ``openai/clip-vit-large-patch14`` with its own
processor (shorter side 224, PIL bicubic, centre crop, OpenAI mean/std; prompt truncated to 77
tokens); any transformers CLIP checkpoint can be passed instead, and ``version`` records which.

Outputs (float32, one per image):

``clip_score``
    ``max(100 * cos(text, image), 0)``: the fixed factor 100 (not the checkpoint's logit scale) and
    the clamp at 0 of torchmetrics. torchmetrics clamps the *mean* over images rather than each
    image; the two agree whenever no cosine is negative, which real CLIP models never give on
    real images. Typical SD/SDXL values: 25-35.
``cosine``
    the raw cosine (no x100, no clamp): what Diffusion-DPO's ``clip_utils`` (on ViT-H-14) and
    ImageReward's CLIP baseline report.

Prompts longer than 77 tokens are truncated by the tokenizer (keeping the end-of-text token);
torchmetrics cuts the token ids instead, which only matters for such prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from smpo_cli.rewards import _hf_clip
from smpo_cli.rewards.base import EmbeddingRewardModel

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


class ClipScore(EmbeddingRewardModel):
    name = "clip"
    output_names = ("clip_score", "cosine")
    default_output = "clip_score"

    def __init__(self, source: str, *, processor: str | None = None, **kwargs: Any) -> None:
        super().__init__(version=f"CLIPScore({Path(str(source)).name})", source=str(source), **kwargs)
        self.processor_source = str(processor or source)
        self.model = self._place(_hf_clip.load_clip_model(str(source), what="CLIP model"))
        self.processor = _hf_clip.load_processor(self.processor_source, what="CLIP processor")

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        px = _hf_clip.pixel_values(self.processor.image_processor, images, self.device, self.dtype)
        return _hf_clip.image_embeddings(self.model, px)

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        return _hf_clip.text_embeddings(self.model, self.processor.tokenizer, prompts, self.device)

    def _combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert text_emb is not None
        cosine = (image_emb * text_emb).sum(dim=-1)
        return {"clip_score": (100.0 * cosine).clamp(min=0.0), "cosine": cosine}

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "processor": self.processor_source,
            "outputs_meaning": {
                "clip_score": "max(100 * cosine, 0) per image (torchmetrics CLIPScore scale)",
                "cosine": "raw cosine of normalised embeddings",
            },
        }


load = ClipScore  # the registry calls load(source, device=..., dtype=..., **options)
