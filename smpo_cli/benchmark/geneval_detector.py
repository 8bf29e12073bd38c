"""GenEval's object detector: Mask2Former instance segmentation, COCO's 80 thing classes.

The official evaluator runs the OpenMMLab Swin-S Mask2Former through mmdet 2.x, one image at a time
(evaluation.md section 1.1). Two backends give the same ``{class name: [Detection]}`` output:

* ``mmdet`` (:class:`MmdetMask2Former`) wraps ``init_detector``/``inference_detector`` on the official
  checkpoint and config: the official numbers, where mmdet 2.x and mmcv-full 1.7 install.
* ``transformers`` (:class:`TransformersMask2Former`, the default) reimplements mmdet's test pipeline
  around ``Mask2FormerForUniversalSegmentation``: keep-ratio bilinear resize to fit (1333, 800), ImageNet
  normalisation, zero padding to a multiple of 32, then MaskFormerFusionHead's instance post-processing
  (top 100 (query, class) pairs, mask logit > 0, score = class prob x mean sigmoid in the mask, mask box
  with x2/y2 = last column/row + 1). Where it differs: the weights (``facebook/mask2former-swin-small-
  coco-instance`` is the Detectron2-trained model, not the OpenMMLab one, so scores differ), the resize
  (float bilinear rounded to uint8, within one grey level of cv2's fixed-point INTER_LINEAR) and the
  deformable attention (pure PyTorch instead of mmcv's kernel). Report its numbers as "GenEval with the
  transformers detector", not as the official metric.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from smpo_cli.benchmark.geneval_rules import Detection
from smpo_cli.errors import DataError, ModelLoadError, UsageError
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

# GenEval's object_names.txt: COCO's 80 thing classes in mmdet label order (label i = name i), with
# GenEval's renames of "mouse", "remote" and "keyboard".
GENEVAL_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# other spellings of the same classes in checkpoint label maps (COCO, Detectron2, VOC-style)
_ALIASES = {"computer mouse": {"mouse"}, "tv remote": {"remote"}, "computer keyboard": {"keyboard"},
            "tv": {"tvmonitor"}, "motorcycle": {"motorbike"}, "airplane": {"aeroplane"}, "couch": {"sofa"}}  # fmt: skip

DEFAULT_SOURCE = "facebook/mask2former-swin-small-coco-instance"
MMDET_CONFIG_NAME = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
TEST_SCALE = (1333, 800)  # mmdet Resize(img_scale=(1333, 800), keep_ratio=True)
SIZE_DIVISOR = 32  # mmdet Pad(size_divisor=32), after Normalize: the padding is 0 in normalised units
MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 units
STD = (58.395, 57.12, 57.375)
MAX_PER_IMAGE = 100  # test_cfg.max_per_image
_WHAT = "GenEval detector"

Detections = dict[str, list[Detection]]


@runtime_checkable
class Detector(Protocol):
    """Per image, per GenEval class name: detections in the detector's order (as mmdet's per-class arrays,
    which GenEval's rules rank themselves), ``index`` = place in that order, ``mask`` set."""

    backend: str  # "transformers" | "mmdet"
    name: str  # what ran, for reports, e.g. "transformers Mask2Former facebook/mask2former-swin-small-coco-instance"

    def detect(self, images: Sequence[Image.Image]) -> list[Detections]: ...


# ------------------------------------------------------------------------------- preprocessing


def resized_shape(height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """(height, width) after mmcv's keep-ratio rescale: factor min(long/long_edge, short/short_edge)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _padded(n: int) -> int:
    return -(-n // SIZE_DIVISOR) * SIZE_DIVISOR


def preprocess(
    images: Sequence[Image.Image], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """mmdet's test pipeline: ``(pixel values (B, 3, H, W) float32, resized (h, w) per image)``.

    Each image is resized to fit (1333, 800) keeping its ratio, normalised (RGB, ImageNet mean/std in 0-255
    units) and zero-padded bottom/right to a multiple of 32; the batch is padded to its largest image.
    """
    from smpo_cli.rewards.base import to_rgb

    resized, tensors = [], []
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(STD, device=device).view(3, 1, 1)
    for image in images:
        pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).to(device)
        h, w = resized_shape(pixels.shape[0], pixels.shape[1])
        x = pixels.permute(2, 0, 1).float()[None]
        if (h, w) != tuple(x.shape[-2:]):
            # mmcv resizes with cv2 INTER_LINEAR: half-pixel centres, no antialiasing when shrinking, uint8
            # output. torch's bilinear (align_corners=False, antialias=False) is that filter; PIL's BILINEAR
            # antialiases when shrinking (1024 -> 800), so it is not. Rounding back to uint8 as cv2 does
            # leaves at most one grey level of difference (cv2 uses 11-bit fixed-point weights).
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        resized.append((h, w))
        tensors.append((x[0] - mean) / std)
    if not tensors:
        return torch.zeros(0, 3, 0, 0), []
    height = _padded(max(h for h, _ in resized))
    width = _padded(max(w for _, w in resized))
    batch = torch.zeros(len(tensors), 3, height, width, device=device)
    for i, x in enumerate(tensors):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch, resized


# ------------------------------------------------------------------------------ post-processing


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) tight boxes of (N, H, W) bool masks: x2/y2 = last column/row + 1; zeros for an empty mask."""
    n, height, width = masks.shape
    cols, rows = masks.any(1), masks.any(2)
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    x1 = torch.where(cols, xs, width).amin(1)
    x2 = torch.where(cols, xs + 1, 0).amax(1)
    y1 = torch.where(rows, ys, height).amin(1)
    y2 = torch.where(rows, ys + 1, 0).amax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where((cols.any(1))[:, None], boxes, torch.zeros_like(boxes))


def postprocess_instances(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    padded_size: tuple[int, int],
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    class_names: Sequence[str] = GENEVAL_CLASS_NAMES,
    max_per_image: int = MAX_PER_IMAGE,
    chunk: int = 20,
) -> Detections:
    """One image's detections from Mask2Former outputs, as mmdet's MaskFormerFusionHead instance path.

    ``class_logits`` (Q, C + 1) with the no-object class last; ``mask_logits`` (Q, h, w) at any resolution
    (the model's is 1/4 of the padded input). Masks are upsampled to ``padded_size``, cropped to
    ``resized_size`` and resized to ``original_size`` (all (height, width)), bilinear throughout.
    Returns every class name, each with its detections in top-k order (the order mmdet's per-class arrays keep;
    :func:`~smpo_cli.benchmark.geneval_rules.keep_detections` ranks them by score as the official evaluator).
    """
    num_classes = len(class_names)
    if class_logits.ndim != 2 or class_logits.shape[1] != num_classes + 1:
        raise DataError(
            f"class logits of shape {tuple(class_logits.shape)}; expected (queries, {num_classes + 1})"
        )
    if mask_logits.ndim != 3 or mask_logits.shape[0] != class_logits.shape[0]:
        raise DataError(
            f"mask logits of shape {tuple(mask_logits.shape)}; expected ({class_logits.shape[0]}, h, w)"
        )
    scores = class_logits.float().softmax(-1)[:, :-1]
    k = min(max_per_image, scores.numel())
    top_scores, top = scores.flatten().topk(k)  # sorted, best class prob first
    labels, queries = top % num_classes, top // num_classes
    # Interpolation is per query, so only the queries that made the top k need their masks.
    unique, inverse = torch.unique(queries, return_inverse=True)
    (h, w), height_width = resized_size, tuple(original_size)
    binary, mask_scores = [], []
    for start in range(0, len(unique), chunk):
        m = mask_logits[unique[start : start + chunk]].float()[None]
        m = F.interpolate(m, size=tuple(padded_size), mode="bilinear", align_corners=False)[..., :h, :w]
        m = F.interpolate(m, size=height_width, mode="bilinear", align_corners=False)[0]
        on = m > 0
        mask_scores.append((m.sigmoid() * on).flatten(1).sum(1) / (on.flatten(1).sum(1) + 1e-6))
        binary.append(on)
    masks = torch.cat(binary) if binary else torch.zeros(0, *height_width, dtype=torch.bool)
    det_scores = (top_scores * torch.cat(mask_scores)[inverse]).tolist() if binary else []
    boxes = _mask_boxes(masks).tolist()
    masks_np = masks.cpu().numpy()
    per_class: dict[str, list[tuple[float, int]]] = {name: [] for name in class_names}
    for j, (label, query) in enumerate(zip(labels.tolist(), inverse.tolist(), strict=True)):
        per_class[class_names[label]].append((det_scores[j], query))
    out: Detections = {}
    for name, found in per_class.items():
        out[name] = [
            Detection(box=tuple(boxes[q]), score=s, index=rank, mask=masks_np[q])
            for rank, (s, q) in enumerate(found)
        ]
    return out


# ------------------------------------------------------------------------------ transformers


def _norm(label: str) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


def _label_mismatches(id2label: dict[Any, str]) -> list[str]:
    bad = []
    for i, name in enumerate(GENEVAL_CLASS_NAMES):
        got = str(id2label.get(i, id2label.get(str(i), "")))
        if got.upper().startswith("LABEL_"):
            continue
        if _norm(got) not in {_norm(name), *(_norm(a) for a in _ALIASES.get(name, ()))}:
            bad.append(f"{i}: {got!r} (GenEval: {name!r})")
    return bad


def load_mask2former(source: str) -> Any:
    """``Mask2FormerForUniversalSegmentation`` from a folder or hub id, checked to be a COCO-80 instance model."""
    from transformers import AutoConfig, Mask2FormerForUniversalSegmentation

    from smpo_cli.rewards.base import hf_from_pretrained, quiet_transformers, refuse_missing_weights

    with quiet_transformers():
        config = hf_from_pretrained(AutoConfig.from_pretrained, source, what=_WHAT)
    if getattr(config, "model_type", None) != "mask2former":
        raise ModelLoadError(
            f"{_WHAT} at {source} is a {getattr(config, 'model_type', '?')} model, not Mask2Former",
            hint=f"use a Mask2Former COCO instance checkpoint such as {DEFAULT_SOURCE}",
        )
    if config.num_labels != len(GENEVAL_CLASS_NAMES):
        raise ModelLoadError(
            f"{_WHAT} at {source} has {config.num_labels} classes; GenEval needs COCO's 80 thing classes",
            hint=f"use a COCO *instance* checkpoint such as {DEFAULT_SOURCE} (not panoptic, ADE20K or Cityscapes)",
        )
    bad = _label_mismatches(config.id2label)
    if bad:
        logger.warning(
            "%s at %s: %d labels differ from GenEval's class order, e.g. %s", _WHAT, source, len(bad), bad[0]
        )
    with quiet_transformers():
        loaded = hf_from_pretrained(
            Mask2FormerForUniversalSegmentation.from_pretrained,
            source,
            what=_WHAT,
            config=config,
            output_loading_info=True,
        )
    # the training loss's buffers (criterion.*) are not in inference checkpoints
    return refuse_missing_weights(loaded, _WHAT, source, ignore=lambda k: k.startswith("criterion."),
                                  hint="point at a full Mask2FormerForUniversalSegmentation checkpoint")  # fmt: skip


def _as_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    from smpo_cli.rewards.base import to_rgb

    if isinstance(images, Image.Image):
        raise DataError("detect() takes a list of images, got one image", hint="wrap it: detect([image])")
    return [to_rgb(image) for image in images]


class TransformersMask2Former:
    """Mask2Former through transformers, with mmdet's GenEval preprocessing and post-processing.

    ``batch_size`` = images per forward pass (None: all of one call); images are only batched with others of
    the same padded size, so every image sees exactly the padding it would get alone, as in the official
    one-image-at-a-time run, and batching changes no result.
    """

    backend = "transformers"

    def __init__(
        self,
        source: str | os.PathLike[str] = DEFAULT_SOURCE,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int | None = None,
    ) -> None:
        from smpo_cli.utils.devices import resolve_device, resolve_dtype

        if batch_size is not None and int(batch_size) < 1:
            raise UsageError(f"detector batch size must be >= 1, got {batch_size}")
        self.source = str(source)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu" and self.dtype != torch.float32:
            # torch's CPU grid_sample returns NaN for half inputs that are not contiguous, which is what the
            # deformable attention of transformers' pixel decoder passes it (seen with torch 2.14)
            logger.warning(
                "GenEval detector: %s Mask2Former gives NaN on CPU; running in float32", self.dtype
            )
            self.dtype = torch.float32
        self.batch_size = batch_size
        self.model = load_mask2former(self.source).to(self.device, self.dtype).eval()
        precision = "" if self.dtype == torch.float32 else f" ({str(self.dtype).removeprefix('torch.')})"
        self.name = f"transformers Mask2Former {self.source}{precision}"

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        images = _as_images(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            h, w = resized_shape(image.height, image.width)
            groups.setdefault((_padded(h), _padded(w)), []).append(i)
        out: list[Detections | None] = [None] * len(images)
        for indices in groups.values():
            step = self.batch_size or len(indices)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                pixels, resized = preprocess([images[i] for i in chunk], self.device)
                result = self.model(pixel_values=pixels.to(self.dtype))
                for j, i in enumerate(chunk):
                    out[i] = postprocess_instances(
                        result.class_queries_logits[j],
                        result.masks_queries_logits[j],
                        padded_size=tuple(pixels.shape[-2:]),
                        resized_size=resized[j],
                        original_size=(images[i].height, images[i].width),
                    )
        return out  # type: ignore[return-value]


def tiny_mask2former(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random Mask2Former (Swin backbone, 10 queries, GenEval's 80 labels) to folder ``path``.

    For plumbing runs and tests: detections are meaningless. The class and mask heads are scaled up so that
    some detections pass GenEval's thresholds and masks cover part of an image, which exercises the colour
    and position rules. Builds with one ``seed`` are identical; the global RNG is left untouched and the
    folder is replaced atomically. Returns the folder.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from smpo_cli.rewards.base import quiet_transformers
    from smpo_cli.utils.atomic import atomic_path

    backbone = SwinConfig(
        image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
        drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=10,
        id2label=dict(enumerate(GENEVAL_CLASS_NAMES)), label2id={n: i for i, n in enumerate(GENEVAL_CLASS_NAMES)},
    )  # fmt: skip
    dest = Path(path)
    with (
        atomic_path(dest) as tmp,
        torch.random.fork_rng(devices=[]),
        quiet_transformers(),
    ):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
        with torch.no_grad():
            model.class_predictor.weight.mul_(60.0)  # confident classes instead of ~1/81 each
            embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
            last = [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(40.0)  # mask logits of both signs instead of ~0.05 everywhere
            last.bias.zero_()
        model.save_pretrained(str(tmp))
    return dest


# ------------------------------------------------------------------------------------ mmdet


def _require_mmdet() -> None:
    if importlib.util.find_spec("mmdet") is None:
        raise UsageError(
            "detector backend mmdet needs mmdet 2.x, which is not installed",
            hint="install GenEval's stack (mmcv-full 1.7.1, mmdet 2.27 from the 2.x branch with pip install -e .), "
            "or use detector.backend=transformers",
        )


def default_mmdet_config() -> Path:
    """The official config inside the installed mmdet (source checkout ``configs/`` or a wheel's ``.mim/``)."""
    _require_mmdet()
    import mmdet

    root = Path(mmdet.__file__).resolve().parent
    for base in (root.parent / "configs", root / ".mim" / "configs"):
        if (base / "mask2former" / MMDET_CONFIG_NAME).is_file():
            return base / "mask2former" / MMDET_CONFIG_NAME
    raise UsageError(
        f"the installed mmdet has no configs/mask2former/{MMDET_CONFIG_NAME}",
        hint="install mmdet 2.x from source (git checkout 2.x; pip install -e .) or set detector.mmdet_config",
    )


def detections_from_mmdet_result(
    bbox_results: Sequence[Any],
    segm_results: Sequence[Any] | None,
    class_names: Sequence[str] = GENEVAL_CLASS_NAMES,
) -> Detections:
    """mmdet 2.x per-class results -> per class name, detections in the arrays' order (ranked by the rules).

    ``bbox_results[i]``: (n, 5) array of x1, y1, x2, y2, score for label i; ``segm_results[i]``: its n masks
    (H, W) (or None). Boxes are taken as they are: mmdet's +1 convention already.
    """
    if len(bbox_results) != len(class_names):
        raise DataError(f"mmdet returned {len(bbox_results)} classes; expected {len(class_names)}")
    if segm_results is not None and len(segm_results) != len(class_names):
        raise DataError(f"mmdet returned masks for {len(segm_results)} classes; expected {len(class_names)}")
    out: Detections = {}
    for i, name in enumerate(class_names):
        boxes = np.asarray(bbox_results[i], dtype=np.float64).reshape(-1, 5)
        masks = None if segm_results is None else segm_results[i]
        if masks is not None and len(masks) != len(boxes):
            raise DataError(f"mmdet returned {len(boxes)} boxes but {len(masks)} masks for {name!r}")
        out[name] = [
            Detection(
                box=tuple(float(v) for v in boxes[j, :4]),
                score=float(boxes[j, 4]),
                index=j,
                mask=None if masks is None else np.asarray(masks[j], dtype=bool),
            )
            for j in range(len(boxes))
        ]
    return out


def _split_mmdet3(result: Any, num_classes: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """mmdet 3.x ``DetDataSample`` -> the 2.x per-class lists (as GenEval's evaluator does)."""
    inst = result.pred_instances.cpu()
    labels = inst.labels.numpy()
    boxes = np.concatenate([inst.bboxes.numpy(), inst.scores.numpy()[:, None]], axis=1)
    masks = inst.masks.numpy() if "masks" in inst else None
    bbox = [boxes[labels == i] for i in range(num_classes)]
    segm = None if masks is None else [masks[labels == i] for i in range(num_classes)]
    return bbox, segm


class MmdetMask2Former:
    """The official detector: mmdet's ``init_detector``/``inference_detector``, one image per call.

    Images go in as BGR arrays, as the official evaluator's file path would after cv2 loading; mmdet runs in
    float32 whatever the recipe's dtype.
    """

    backend = "mmdet"

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        config: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cuda",
    ) -> None:
        _require_mmdet()
        from mmdet.apis import init_detector

        from smpo_cli.errors import AssetNotFoundError
        from smpo_cli.utils.devices import resolve_device

        self.checkpoint = Path(checkpoint).expanduser()
        self.config = Path(config).expanduser() if config is not None else default_mmdet_config()
        for what, p in (("checkpoint", self.checkpoint), ("config", self.config)):
            if not p.is_file():
                raise AssetNotFoundError(
                    f"mmdet {what} not found: {p}",
                    hint="GenEval's evaluation/download_models.sh fetches the v2.0 checkpoint",
                )
        self.device = resolve_device(device)
        try:
            self.model = init_detector(str(self.config), str(self.checkpoint), device=str(self.device))
        except Exception as e:  # mmcv raises many kinds; the message is what the user needs
            raise ModelLoadError(
                f"mmdet could not load {self.checkpoint} with {self.config}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
        self.name = f"mmdet Mask2Former {self.checkpoint.name}"

    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        from mmdet.apis import inference_detector

        out = []
        for image in _as_images(images):
            result = inference_detector(self.model, np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))
            if hasattr(result, "pred_instances"):
                bbox, segm = _split_mmdet3(result, len(GENEVAL_CLASS_NAMES))
            elif isinstance(result, tuple):
                bbox, segm = result[0], result[1] if len(result) > 1 else None
            else:
                bbox, segm = result, None
            out.append(detections_from_mmdet_result(bbox, segm))
        return out


# ------------------------------------------------------------------------------------ factory


def load_detector(
    backend: str = "auto",
    source: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    mmdet_config: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
) -> Detector:
    """The GenEval detector for ``backend`` (auto | transformers | mmdet).

    ``source``: transformers: a folder or hub id (None: :data:`DEFAULT_SOURCE`); mmdet: the official .pth
    checkpoint. ``auto`` picks mmdet for a .pth checkpoint (and says how to install mmdet when it is
    missing), transformers otherwise.
    """
    if backend not in ("auto", "transformers", "mmdet"):
        raise UsageError(f"unknown detector backend {backend!r}", hint="use auto, transformers or mmdet")
    is_checkpoint = source is not None and str(source).endswith(".pth")
    if backend == "auto":
        backend = "mmdet" if is_checkpoint else "transformers"
    if backend == "mmdet":
        _require_mmdet()
        if source is None:
            raise UsageError(
                "detector backend mmdet needs the checkpoint path", hint="set detector.path to the .pth file"
            )
        return MmdetMask2Former(source, mmdet_config, device=device)
    if is_checkpoint:
        raise UsageError(
            f"{source} is an mmdet checkpoint; the transformers backend reads save_pretrained folders or hub ids",
            hint="use detector.backend=mmdet (needs mmdet 2.x) or a transformers Mask2Former",
        )
    return TransformersMask2Former(
        source or DEFAULT_SOURCE, device=device, dtype=dtype, batch_size=batch_size
    )
