"""PickScore (Kirstain et al., 2023): a CLIP-H model fine-tuned on Pick-a-Pic preferences.

Model ``yuvalkirstain/PickScore_v1`` (transformers ``CLIPModel``), processor
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shorter side to 224 with PIL bicubic, centre crop 224,
OpenAI mean/std; prompt padded and truncated to 77 tokens), as in the PickScore repository.

Outputs (float32, one per image):

``score``
    ``logit_scale.exp() * cos(text, image)`` with the checkpoint's logit scale (about 100). This is
    the PickScore of the paper and of the literature tables (about 20-23 for SD/SDXL images); a
    softmax over the scores of several images of one prompt gives preference probabilities.
``cosine``
    the raw cosine of the L2-normalised embeddings (about 0.2). SmPO's smoothing constants
    (``r_min = 0.1154``, ``r_max = 0.2820``) and Diffusion-DPO's ``pickscore_utils`` use this one,
    so recipes that min-max normalise with those constants must select ``cosine``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from smpo_cli.rewards import _hf_clip
from smpo_cli.rewards.base import EmbeddingRewardModel

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(EmbeddingRewardModel):
    name = "pickscore"
    output_names = ("score", "cosine")
    default_output = "score"

    def __init__(self, source: str, *, processor: str | None = None, **kwargs: Any) -> None:
        # The PickScore_v1 repository ships no processor; a local folder written by
        # save_pretrained (tiny models, converted checkpoints) may carry its own.
        if processor is None:
            processor = str(source) if _hf_clip.has_processor_files(source) else DEFAULT_PROCESSOR
        super().__init__(version=Path(str(source)).name, source=str(source), **kwargs)
        self.processor_source = str(processor)
        self.model = self._place(_hf_clip.load_clip_model(str(source), what="PickScore model"))
        self.processor = _hf_clip.load_processor(self.processor_source, what="PickScore processor")
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        px = _hf_clip.pixel_values(self.processor.image_processor, images, self.device, self.dtype)
        return _hf_clip.image_embeddings(self.model, px)

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        return _hf_clip.text_embeddings(self.model, self.processor.tokenizer, prompts, self.device)

    def _combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert text_emb is not None
        cosine = (image_emb * text_emb).sum(dim=-1)
        return {"score": self.logit_scale * cosine, "cosine": cosine}

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "processor": self.processor_source,
            "logit_scale": self.logit_scale,
            "outputs_meaning": {
                "score": "logit_scale.exp() * cosine (PickScore paper and literature tables)",
                "cosine": "raw cosine of normalised embeddings (SmPO smoothing constants, Diffusion-DPO)",
            },
        }


load = PickScore  # the registry calls load(source, device=..., dtype=..., **options)
