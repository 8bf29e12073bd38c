"""GenEval's colour judge: zero-shot CLIP ViT-L/14 on each detected object, masked over #999 grey.

As the official evaluator: the image is composited with the object's binary mask over a flat grey
(153, 153, 153) background and cropped to its box (rounded); 10 colours x 3 templates per object class,
each template embedding L2-normalised, averaged per colour and renormalised; logits = 100 x image . class;
the colour is the argmax. (The official run uses CUDA fp16 autocast; this runs in the model's dtype.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from smpo_cli.benchmark.geneval_rules import COLOURS

TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object")
BACKGROUND = (153, 153, 153)  # "#999"


def masked_crop(image: Image.Image, mask: np.ndarray | None, box) -> Image.Image:
    """The object alone: ``image`` inside ``mask`` over grey, cropped to ``box`` (x1, y1, x2, y2), rounded."""
    image = image.convert("RGB")
    if mask is not None:
        grey = Image.new("RGB", image.size, BACKGROUND)
        image = Image.composite(image, grey, Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L"))
    return image.crop(tuple(int(round(v)) for v in box))


class ColourClassifier:
    """Zero-shot colour of detected objects (default weights: OpenAI CLIP ViT-L/14 via transformers)."""

    def __init__(self, source: str = "openai/clip-vit-large-patch14", *, device: str = "cpu", dtype: str = "float32") -> None:
        from smpo_cli.rewards._hf_clip import load_clip_model, load_processor
        from smpo_cli.utils.devices import resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_clip_model(source, what="GenEval colour classifier").to(self.device, self.dtype).eval()
        self.processor = load_processor(source, what="GenEval colour classifier")
        self._classes: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def class_embeddings(self, object_name: str) -> torch.Tensor:
        """(10, D): per colour, the renormalised mean of its normalised template embeddings."""
        if object_name not in self._classes:
            from smpo_cli.rewards._hf_clip import text_embeddings
            from smpo_cli.rewards.base import l2_normalize

            texts = [t.format(color=c, object=object_name) for c in COLOURS for t in TEMPLATES]
            emb = text_embeddings(self.model, self.processor.tokenizer, texts, self.device).float()
            self._classes[object_name] = l2_normalize(emb.reshape(len(COLOURS), len(TEMPLATES), -1).mean(1))
        return self._classes[object_name]

    @torch.inference_mode()
    def logits(self, crops: list[Image.Image], object_name: str) -> torch.Tensor:
        from smpo_cli.rewards._hf_clip import image_embeddings, pixel_values

        px = pixel_values(self.processor.image_processor, crops, self.device, self.dtype)
        return 100.0 * image_embeddings(self.model, px).float() @ self.class_embeddings(object_name).T

    def classify(self, image: Image.Image, object_name: str, objects: list[Any]) -> list[str]:
        """Colours of ``objects`` (each with ``.box`` and optionally ``.mask``) of class ``object_name``."""
        if not objects:
            return []
        crops = [masked_crop(image, getattr(o, "mask", None), o.box) for o in objects]
        return [COLOURS[i] for i in self.logits(crops, object_name).argmax(1).tolist()]
