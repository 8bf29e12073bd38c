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

from smpo_cli.errors import DataError
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
        # a model trained by smpo (shapes-pickscore) carries the cosine range its p is normalised with
        self.cosine_range = _cosine_range(source)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        px = _hf_clip.pixel_values(self.processor.image_processor, images, self.device, self.dtype)
        return _hf_clip.image_embeddings(self.model, px)

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        return _hf_clip.text_embeddings(self.model, self.processor.tokenizer, prompts, self.device)

    def _combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert text_emb is not None
        cosine = (image_emb * text_emb).sum(dim=-1)
        return {"score": self.logit_scale * cosine, "cosine": cosine}

    def known_range(self, output: str) -> tuple[float, float] | None:
        return self.cosine_range if output == "cosine" else None

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "processor": self.processor_source,
            "logit_scale": self.logit_scale,
            "cosine_range": list(self.cosine_range) if self.cosine_range else None,
            "outputs_meaning": {
                "score": "logit_scale.exp() * cosine (PickScore paper and literature tables)",
                "cosine": "raw cosine of normalised embeddings (SmPO smoothing constants, Diffusion-DPO)",
            },
        }


def _cosine_range(source: str) -> tuple[float, float] | None:
    """``cosine_range`` of ``smpo_reward.json`` in a local model folder (None for the official checkpoint)."""
    import json

    path = Path(str(source)).expanduser() / "smpo_reward.json"
    if not path.is_file():
        return None
    try:
        low, high = json.loads(path.read_text(encoding="utf-8"))["cosine_range"]
        assert float(high) > float(low)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise DataError(f"{path}: cosine_range must be [min, max] with max > min ({exc})",
                        hint="rewrite the file or delete it to use the official PickScore constants") from None  # fmt: skip
    return float(low), float(high)


load = PickScore  # the registry calls load(source, device=..., dtype=..., **options)
