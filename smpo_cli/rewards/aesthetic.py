"""LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

A 5-Linear head without activations (``sac+logos+ava1-l14-linearMSE.pth``, keys
``layers.0/2/4/6/7``) on the **L2-normalised** OpenAI CLIP ViT-L/14 image embedding (a zero
embedding is left as is). Output on the 1-10 rating scale (SD images score about 5-6). Prompts are
ignored.

Backbone: transformers ``CLIPVisionModelWithProjection`` from ``openai/clip-vit-large-patch14``
(the vision tower of the full CLIP checkpoint) with its ``CLIPImageProcessor`` (shorter side 224,
PIL bicubic, centre crop, OpenAI mean/std), as in Diffusion-DPO's ``aes_utils``; the original uses
the ``clip`` package (the same weights; fp16 on CUDA there).

Default head source: the hub repo ``trl-lib/ddpo-aesthetic-predictor`` (file ``aesthetic-model.pth``).
Its history shows ``sac+logos+ava1-l14-linearMSE.pth`` uploaded and then renamed, it is maintained by
Hugging Face's TRL team, and TRL's DDPO example loads it the same way (``weights_only=True``); the
GitHub original is not on the hub. A local file, or a folder holding either file name, also works.
A local folder that also holds a saved CLIP model (``config.json``) is used as the backbone too.

Output: ``score`` (the predicted rating).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from smpo_cli.rewards import _hf_clip
from smpo_cli.rewards.base import (
    EmbeddingRewardModel,
    l2_normalize,
    linear_head_from_state_dict,
    load_state_dict_file,
    resolve_file,
)
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_REPO = "trl-lib/ddpo-aesthetic-predictor"
HEAD_FILES = ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")
DEFAULT_BACKBONE = "openai/clip-vit-large-patch14"
# Published sha256 prefix of sac+logos+ava1-l14-linearMSE.pth (3,714,759 bytes).
SAC_LOGOS_AVA1_SHA256_PREFIX = "21dd590f3ccdc646"


class AestheticPredictor(EmbeddingRewardModel):
    name = "aesthetic"
    output_names = ("score",)
    default_output = "score"
    uses_prompt = False

    def __init__(self, source: str, *, backbone: str | None = None, **kwargs: Any) -> None:
        head_path = resolve_file(source, list(HEAD_FILES), what="aesthetic predictor head")
        if backbone is None:
            folder = Path(str(source)).expanduser()
            backbone = str(folder) if (folder / "config.json").is_file() else DEFAULT_BACKBONE
        self.sha256 = hashlib.sha256(head_path.read_bytes()).hexdigest()
        standard = self.sha256.startswith(SAC_LOGOS_AVA1_SHA256_PREFIX)
        version = "sac+logos+ava1-l14-linearMSE" if standard else f"aesthetic({head_path.name})"
        super().__init__(version=version, source=str(source), **kwargs)
        if not standard:
            logger.info(
                "aesthetic head %s is not the published sac+logos+ava1 file (sha256 %s)",
                head_path,
                self.sha256[:16],
            )
        self.head_path = head_path
        self.backbone_source = str(backbone)
        self.model = self._place(
            _hf_clip.load_clip_vision_model(self.backbone_source, what="aesthetic CLIP backbone")
        )
        self.image_processor = _hf_clip.load_image_processor(
            self.backbone_source, what="aesthetic CLIP processor"
        )
        state = load_state_dict_file(head_path, what="aesthetic predictor head")
        self.head = self._place(linear_head_from_state_dict(state, "layers."), dtype=torch.float32)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        px = _hf_clip.pixel_values(self.image_processor, images, self.device, self.dtype)
        return l2_normalize(self.model(pixel_values=px).image_embeds)

    def _encode_texts(self, prompts: list[str]) -> None:
        return None

    def _combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"score": self.head(image_emb).squeeze(-1)}

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "head": str(self.head_path),
            "head_sha256": self.sha256,
            "backbone": self.backbone_source,
            "outputs_meaning": {"score": "predicted aesthetic rating (1-10 scale)"},
        }


load = AestheticPredictor  # the registry calls load(source, device=..., dtype=..., **options)
