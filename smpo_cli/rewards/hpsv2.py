"""HPSv2 / HPSv2.1 (Wu et al., 2023): OpenCLIP ViT-H-14 fine-tuned on human preference pairs.

Reimplemented on maintained open-clip-torch (no dependency on the ``hpsv2`` wheel, which lacks its
BPE vocabulary and imports ``turtle``). The checkpoint (``{"state_dict": ...}``) is loaded strictly
into ``open_clip.create_model("ViT-H-14")``; ``HPS_v2_compressed.pt`` is v2.0 and
``HPS_v2.1_compressed.pt`` v2.1 (hub repo ``xswu/HPSv2``). v2.0 and v2.1 scores are not comparable.

Preprocessing (``hpsv2``'s evaluation transform, reproduced exactly): RGB -> ToTensor (float in
[0, 1]) -> resize so the longer side is 224, new size ``round(side * 224 / longer)``, bicubic **on
the float tensor** with ``antialias`` given explicitly (default False: torchvision < 0.17 behaviour,
under which the published tables were computed; True changes scores) -> zero-pad to 224 x 224,
centred, left/top getting ``floor(pad / 2)`` -> OpenAI mean/std. (The reference skips the pad when
the longer side is already 224, then fails on non-square input; here the pad always happens.)
``antialias`` is recorded in ``version`` (``+aa`` suffix when True) and in :attr:`metadata`.

Score: cosine of the L2-normalised image and text features. On CUDA the reference runs fp32 weights
under ``torch.autocast`` (fp16); that is the default here on CUDA (``amp=None``).

Outputs (float32, one per image): ``score`` = the cosine, what ``hpsv2.score()`` returns (about
0.2-0.35); ``score_x100`` = 100 x cosine, the convention of the HPSv2 benchmark tables (e.g. 25-33).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from smpo_cli.errors import ModelLoadError, UsageError
from smpo_cli.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EmbeddingRewardModel,
    l2_normalize,
    load_state_dict_file,
    read_json,
    resolve_file,
)
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_REPO = "xswu/HPSv2"
ARCH = "ViT-H-14"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_VARIANT = "v2.1"
# Optional sidecar next to the checkpoint: open_clip's own {"model_cfg": {...}} format. Only tiny or
# custom-size models need it; the real checkpoints use the built-in ViT-H-14 config.
CONFIG_NAME = "open_clip_config.json"


def letterbox(image: Image.Image, size: int, *, antialias: bool = False) -> torch.Tensor:
    """HPS preprocessing of one RGB image -> normalised ``(3, size, size)`` float32 tensor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)  # = ToTensor
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = TF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=antialias)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        x = torch.nn.functional.pad(
            x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0
        )
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


class HPSv2(EmbeddingRewardModel):
    name = "hpsv2"
    output_names = ("score", "score_x100")
    default_output = "score"

    def __init__(
        self,
        source: str,
        *,
        variant: str | None = None,
        antialias: bool = False,
        amp: bool | None = None,
        arch: str = ARCH,
        **kwargs: Any,
    ) -> None:
        variant = _resolve_variant(source, variant)
        ckpt = resolve_file(source, [HPS_FILES[variant]], what=f"HPSv2 checkpoint ({variant})")
        self.antialias = bool(antialias)
        version = f"HPS{variant}" + ("+aa" if self.antialias else "")
        super().__init__(version=version, source=str(source), **kwargs)
        self.variant = variant
        self.checkpoint = ckpt
        self.arch = arch

        import open_clip

        # Read the checkpoint before building ViT-H-14 (a few seconds of random init on CPU).
        state = load_state_dict_file(ckpt, what="HPSv2 checkpoint")
        state = state.get("state_dict", state)
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        model_cfg = _sidecar_model_cfg(ckpt)
        try:
            with quiet_open_clip():
                model = open_clip.create_model(arch, pretrained=None, load_weights=False, **model_cfg)
        except Exception as e:
            raise ModelLoadError(f"cannot build open_clip {arch}: {e}") from e
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(
                f"{ckpt} does not match open_clip {arch}: {str(e).splitlines()[0]}",
                hint="HPSv2 checkpoints are HPS_v2_compressed.pt / HPS_v2.1_compressed.pt from xswu/HPSv2",
            ) from e

        # Precision: the reference keeps fp32 weights and runs under CUDA autocast.
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        if self.amp and self.device.type != "cuda":
            raise UsageError(
                "HPSv2 amp (autocast) is only used on CUDA", hint="drop amp=true or use a CUDA device"
            )
        self.amp_dtype = torch.float16 if self.dtype == torch.float32 else self.dtype
        self.model = self._place(model, dtype=torch.float32 if self.amp else None)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        px = torch.stack([letterbox(im, self.image_size, antialias=self.antialias) for im in images])
        px = px.to(device=self.device, dtype=torch.float32 if self.amp else self.dtype)
        with self._autocast():
            return l2_normalize(self.model.encode_image(px))

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts).to(self.device)
        with self._autocast():
            return l2_normalize(self.model.encode_text(ids))

    def _combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert text_emb is not None
        cosine = (image_emb * text_emb).sum(dim=-1)
        return {"score": cosine, "score_x100": 100.0 * cosine}

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "checkpoint": str(self.checkpoint),
            "arch": self.arch,
            "antialias": self.antialias,
            "precision": f"amp-{str(self.amp_dtype).removeprefix('torch.')}" if self.amp else "weights",
            "preprocess": f"ToTensor, longest side {self.image_size} bicubic on tensor "
            f"(antialias={self.antialias}), zero-pad centred, OpenAI mean/std",
            "outputs_meaning": {
                "score": "cosine of normalised features (hpsv2.score)",
                "score_x100": "100 * cosine (HPSv2 benchmark tables)",
            },
        }


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's root-logger warning about random init (the HPS weights come next)."""

    def _filter(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(_filter)
    try:
        yield
    finally:
        root.removeFilter(_filter)


def _resolve_variant(source: str, variant: str | None) -> str:
    by_file = {v: k for k, v in HPS_FILES.items()}
    from_name = by_file.get(Path(str(source)).name)
    if variant is None:
        return from_name or DEFAULT_VARIANT
    v = str(variant).lower()
    v = {"2.0": "v2.0", "2.1": "v2.1", "v2": "v2.0", "2": "v2.0"}.get(
        v.removeprefix("hps"), v.removeprefix("hps")
    )
    if v not in HPS_FILES:
        raise UsageError(f"unknown HPSv2 variant {variant!r}", hint="use v2.0 or v2.1")
    if from_name and from_name != v:
        raise UsageError(f"HPSv2 variant {v} asked for, but {source} is the {from_name} checkpoint")
    return v


def _sidecar_model_cfg(ckpt: Path) -> dict[str, Any]:
    cfg_path = ckpt.parent / CONFIG_NAME
    if not cfg_path.is_file():
        return {}
    cfg = read_json(cfg_path, what="open_clip config")
    model_cfg = cfg.get("model_cfg", {})
    logger.debug("HPSv2: model config overridden by %s", cfg_path)
    return {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}


load = HPSv2  # the registry calls load(source, device=..., dtype=..., **options)
