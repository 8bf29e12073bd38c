"""The trained model on disk, in formats the stock diffusers pipelines read.

* full fine-tuning: a complete pipeline folder (``DiffusionPipeline.from_pretrained(dest)``);
* LoRA: ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format
  (``pipeline.load_lora_weights(dest)``), plus ``smpo_lora.json`` with rank, alpha and base model.
Everything is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from smpo_cli.errors import UsageError
from smpo_cli.utils.atomic import atomic_path
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)


def _has_adapter(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet, dest: str | Path, family: str, *, base_model: str | None = None) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    if not _has_adapter(unet):
        raise UsageError("save_lora needs a UNet with a LoRA adapter", hint="use save_pipeline for full fine-tuning")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    config = next(iter(unet.peft_config.values()))
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        pipeline_cls.save_lora_weights(str(tmp), unet_lora_layers=layers, safe_serialization=True)
        (tmp / "smpo_lora.json").write_text(json.dumps({
            "family": family, "rank": config.r, "alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules), "base_model": base_model,
        }, indent=2))  # fmt: skip
    logger.info("saved LoRA weights to %s", dest)
    return dest


def save_unet(unet, dest: str | Path) -> Path:
    if _has_adapter(unet):
        raise UsageError("this UNet carries a LoRA adapter", hint="save it with save_lora")
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        unet.save_pretrained(str(tmp), safe_serialization=True)
    return dest


def save_pipeline(components, unet, dest: str | Path) -> Path:
    """A full diffusers pipeline folder with ``unet`` in place of the original one (fp32 weights)."""
    if _has_adapter(unet):
        raise UsageError("this UNet carries a LoRA adapter", hint="save it with save_lora")
    pipe = components.pipeline()
    pipe.unet = unet
    pipe.register_modules(unet=unet)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    logger.info("saved the trained pipeline to %s", dest)
    return dest
