"""The trained model on disk, in formats the stock diffusers pipelines read. Every write is atomic.

* ``save_lora``: a folder with ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format
  (``load_lora_weights(dest)`` of the family's stock pipeline: SD, SDXL, SD3, FLUX.1) and
  ``smpo_lora.json`` (family, rank, alpha, target modules, base model).
* ``save_pipeline``: a complete diffusers pipeline folder (safetensors) with the trained UNet in
  place of the original one (``DiffusionPipeline.from_pretrained(dest)``).
* ``save_unet``: the UNet folder alone (``UNet2DConditionModel.from_pretrained(dest)``).

A UNet that carries a LoRA adapter is refused by ``save_pipeline`` / ``save_unet`` unless
``merge_lora=True``: then the adapter is fused into a *copy* of the UNet (the trained one keeps its
adapter; the copy costs one more UNet in memory for the duration of the save).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from smpo_cli.errors import OutputDirError, UsageError
from smpo_cli.training.lora import adapter_name, has_lora
from smpo_cli.utils.atomic import atomic_path
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_INFO_NAME = "smpo_lora.json"
# The pipeline whose save_lora_weights writes each family's LoRA; the flow families' adapters sit on the
# transformer (keys "transformer.<module>.lora_A.weight", as diffusers' SD3 / FLUX.1 LoRA scripts save them).
LORA_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                  "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}  # fmt: skip
FLOW_LORA_FAMILIES = ("sd3", "flux")
_DENOISER_CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def save_lora(unet: Any, dest: str | Path, family: str, *, base_model: str | None = None) -> Path:
    """Write the LoRA of ``unet`` as a diffusers LoRA folder at ``dest``; return ``dest``.

    The LoRA scale ``alpha / rank`` is folded into the ``lora.up`` weights and the stored adapter
    config says ``lora_alpha = rank``, so every loader gives the trained model: diffusers with or
    without reading the adapter metadata (older releases assume ``alpha = rank``), and tools that
    read diffusers-format LoRAs without an alpha. The training alpha is kept in ``smpo_lora.json``.
    """
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    pipeline_name = LORA_PIPELINES.get(family)
    if pipeline_name is None:
        raise UsageError(
            f"unknown model family {family!r}",
            hint=f"use one of {', '.join(LORA_PIPELINES)} (DiffusionComponents.family)",
        )
    pipeline_cls = getattr(diffusers, pipeline_name)
    expected = _DENOISER_CLASSES.get(family, "UNet2DConditionModel")
    if not any(c.__name__ == expected for c in type(unet).__mro__):
        raise UsageError(
            f"save_lora: a {type(unet).__name__} is not the trained network of model family {family!r} ({expected})",
            hint="pass the family of the model the adapter was trained on (DiffusionComponents.family)",
        )
    if not has_lora(unet):
        raise UsageError(
            "save_lora needs a UNet with a LoRA adapter", hint="use save_pipeline for full fine-tuning"
        )
    name = adapter_name(unet)
    config = unet.peft_config[name]
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()
    }
    metadata = config.to_dict()
    scale = _lora_scale(config)
    if scale is not None and scale != 1.0:
        state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        metadata.update(lora_alpha=config.r, use_rslora=False)
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    flow = family in FLOW_LORA_FAMILIES
    layers = state if flow else convert_state_dict_to_diffusers(state)
    targets = config.target_modules
    info = {
        "format": "diffusers-lora",
        "weight_name": LORA_WEIGHT_NAME,
        "family": family,
        "rank": config.r,
        "alpha": config.lora_alpha,
        "scale_folded_into_weights": scale if scale is not None and scale != 1.0 else None,
        "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
        "base_model": base_model if base_model is not None else _base_model(unet),
    }
    dest = _check_dest(dest)
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        which = "transformer" if flow else "unet"
        pipeline_cls.save_lora_weights(
            str(tmp),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
            **{f"{which}_lora_layers": layers, f"{which}_lora_adapter_metadata": metadata},
        )
        (tmp / LORA_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    logger.info("saved LoRA weights (rank %d, %d tensors) to %s", config.r, len(layers), dest)
    return dest


def save_unet(unet: Any, dest: str | Path, *, merge_lora: bool = False) -> Path:
    """Write ``unet`` as a diffusers model folder (``config.json`` + safetensors); return ``dest``."""
    unet = _plain_unet(unet, merge_lora, "save_unet")
    dest = _check_dest(dest)
    with atomic_path(dest) as tmp:
        unet.save_pretrained(str(tmp), safe_serialization=True)
    logger.info("saved the UNet to %s", dest)
    return dest


def save_pipeline(components: Any, unet: Any, dest: str | Path, *, merge_lora: bool = False) -> Path:
    """Write the pipeline of ``components`` with ``unet`` in place of its UNet; return ``dest``.

    Weights are saved in the dtype they are in memory (a trained fp32 UNet next to an fp16 VAE
    stays so). No safety checker / watermarker is saved, as ``DiffusionComponents.pipeline`` builds.
    """
    unet = _plain_unet(unet, merge_lora, "save_pipeline")
    which = "transformer" if getattr(components, "is_flow", False) else "unet"  # the trained network
    pipe = dataclasses.replace(components, **{which: unet}).pipeline()
    dest = _check_dest(dest)
    with atomic_path(dest) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    logger.info("saved the trained pipeline to %s", dest)
    return dest


def merged_copy(unet: Any) -> Any:
    """A copy of ``unet`` with its LoRA fused into the base weights and the adapter removed."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora(lora_scale=1.0)
    merged.unload_lora()
    return merged


def _plain_unet(unet: Any, merge_lora: bool, what: str) -> Any:
    if not has_lora(unet):
        return unet
    if not merge_lora:
        raise UsageError(
            f"{what}: this UNet carries a LoRA adapter, which a plain UNet folder cannot hold",
            hint="save the adapter with save_lora, or pass merge_lora=True to fuse it into a copy",
        )
    adapter_name(unet)  # exactly one adapter
    return merged_copy(unet)


def _lora_scale(config: Any) -> float | None:
    """``alpha / r`` (``/ sqrt(r)`` with rsLoRA), or None when per-module patterns make it vary."""
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        return None
    root = math.sqrt(config.r) if getattr(config, "use_rslora", False) else config.r
    return float(config.lora_alpha) / root


def _base_model(unet: Any) -> str | None:
    name = getattr(getattr(unet, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _check_dest(dest: str | Path) -> Path:
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputDirError(f"{dest} exists and is not a folder", hint="choose another destination")
    return dest


def fuse_lora_pipeline(pretrained: str, lora: str | Path, dest: str | Path, **model: Any) -> Path:
    """Write ``pretrained`` with the LoRA folder ``lora`` fused into its UNet as a full pipeline at ``dest``.

    What ``smpo rounds`` hands the next round after a LoRA round: a plain checkpoint that every stage loads,
    on which the next round trains a fresh adapter. ``model`` passes loader keys (vae, unet, config, ...).
    Saved in float32, as a full fine-tune's trained UNet is: fusing in half precision would round the update away.
    """
    from smpo_cli.models.loading import load_components

    comps = load_components(pretrained, dtype="float32", device="cpu", **model)
    pipe = comps.pipeline()
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    dest = _check_dest(dest)
    with atomic_path(dest) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    logger.info("fused %s into %s at %s", lora, pretrained, dest)
    return dest
