"""Model families (SD1.5, SDXL, SD3 / SD3.5, FLUX.1): their components, allowed classes and detection.

The family constants (``FAMILIES``, ``COMPONENTS``, ``FAMILY_COMPONENTS``, ``DEFAULT_CONFIG_REPOS``) and the
allow-list of component classes live here, with :func:`detect_family` and the helpers behind it: a pipeline
folder or hub repo is recognised from its ``model_index.json`` (then its ``unet/config.json``), a single-file
checkpoint from its tensor names (read without loading the tensors). ``_check_family`` turns a mismatch with
an explicit ``family=`` into a one-line ``ModelLoadError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from smpo_cli.errors import ModelLoadError
from smpo_cli.models import flow
from smpo_cli.models.hub import _first_line, _hub_download, _load_error_types, _offline, _reason
from smpo_cli.models.sources import SAFETENSORS_SUFFIXES, _resolve_source, _Source

# "sd15": one CLIP text encoder (SD 1.x, and SD 2.x with its v-prediction scheduler);
# "sdxl": two text encoders and text_time conditioning (SDXL base);
# "sd3": SD3 / SD3.5 (MMDiT transformer, two CLIP encoders + T5, flow matching);
# "flux": FLUX.1 (transformer, CLIP + T5, flow matching, guidance-distilled).
UNET_FAMILIES = ("sd15", "sdxl")
FAMILIES = UNET_FAMILIES + flow.FLOW_FAMILIES
UNET_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
COMPONENTS = (*UNET_COMPONENTS, "transformer", "text_encoder_3", "tokenizer_3")
FAMILY_COMPONENTS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": UNET_COMPONENTS,
    **flow.FLOW_COMPONENTS,
}
# Where a single-file checkpoint takes its architecture from when no ``config=`` is given.
DEFAULT_CONFIG_REPOS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    **flow.DEFAULT_CONFIG_REPOS,
}
# Allow-listed classes per component (name in model_index.json → accepted class names).
_ALLOWED_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}


def _allowed(name: str, family: str) -> tuple[str, ...]:
    """The class names accepted for component ``name`` of ``family``."""
    if flow.is_flow_family(family):
        return flow.FLOW_ALLOWED_CLASSES[family][name]
    return _ALLOWED_CLASSES[name]


def _denoiser(family: str) -> str:
    """The trained component: ``unet`` (SD1.5 / SDXL) or ``transformer`` (SD3 / FLUX.1)."""
    return "transformer" if flow.is_flow_family(family) else "unet"


def _family_from_model_index(index: dict[str, Any]) -> tuple[str | None, str]:
    name = str(index.get("_class_name", ""))
    if name.startswith("StableDiffusionXL"):
        return "sdxl", f"model_index.json _class_name {name}"
    if name.startswith("StableDiffusion") and not name.startswith(("StableDiffusion3", "StableDiffusionXL")):
        return "sd15", f"model_index.json _class_name {name}"
    family, why = flow.family_from_pipeline_class(name)
    if family is not None:
        return family, why
    if name.startswith(("Flux", "PixArt", "Sana", "Kandinsky", "Wuerstchen", "StableCascade")):
        raise ModelLoadError(
            f"model_index.json declares a {name}; smpo supports SD1.5, SDXL, SD3 / SD3.5 and FLUX.1 pipelines only"
        )
    family, why = flow.family_from_index_entries(index)
    if family is not None:
        return family, why
    te2 = index.get("text_encoder_2")
    if isinstance(te2, list | tuple) and te2 and te2[0] is not None:
        return "sdxl", "model_index.json lists text_encoder_2"
    return None, ""


def _family_from_unet_config(config: dict[str, Any]) -> tuple[str, str]:
    if config.get("addition_embed_type") == "text_time":
        return "sdxl", "unet config addition_embed_type=text_time"
    return "sd15", "unet config has no text_time conditioning"


def _family_from_keys(keys: Iterable[str]) -> tuple[str | None, str]:
    keys = set(keys)
    family, why = flow.family_from_keys(keys)
    if family is not None:  # before the SD1.x test: SD3 checkpoints also use model.diffusion_model.
        return family, why
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl", "checkpoint has two text encoders (conditioner.embedders.1)"
    if "conditioner.embedders.0.model.text_projection" in keys:
        raise ModelLoadError("this checkpoint is an SDXL refiner; smpo trains SD1.5 and SDXL base models")
    if "model.diffusion_model.label_emb.0.0.weight" in keys or "add_embedding.linear_1.weight" in keys:
        return "sdxl", "checkpoint UNet has text_time conditioning (label_emb / add_embedding)"
    if any(k.startswith(("cond_stage_model.", "model.diffusion_model.")) for k in keys):
        return "sd15", "checkpoint has the SD1.x layout (cond_stage_model / model.diffusion_model)"
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys:
        return "sd15", "checkpoint is a diffusers UNet without text_time conditioning"
    return None, ""


def _read_json(path: Path, *, component: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{component}: {path} is not valid JSON ({_first_line(exc)})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{component}: cannot read {path} ({_first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{component}: {path} does not hold a JSON object")
    return data


def _checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint, reading as little as possible."""
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, _load_error_types()):
            raise ModelLoadError(f"cannot read checkpoint {path}: {_reason(exc)}") from exc
        raise
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict")
    return [str(k) for k in state]


def _read_model_index(source: _Source, offline: bool) -> dict[str, Any]:
    if source.index is None:
        source.index = _fetch_model_index(source, offline)
    return source.index


def _fetch_model_index(source: _Source, offline: bool) -> dict[str, Any]:
    if source.kind == "folder":
        path = Path(source.ref) / "model_index.json"
        if not path.is_file():
            unet_only = (Path(source.ref) / "config.json").is_file() or (Path(source.ref) / "unet").is_dir()
            raise ModelLoadError(
                f"{source.display} is not a diffusers pipeline folder (no model_index.json)",
                hint="give a UNet-only folder as model.unet= on top of a base pipeline"
                if unet_only
                else "give a folder written by DiffusionPipeline.save_pretrained, or a single .safetensors file",
            )
        return _read_json(path, component="pipeline")
    local = _hub_download(
        source.ref, "model_index.json", revision=source.revision, offline=offline, what="model_index.json"
    )
    return _read_json(Path(local), component="pipeline")


def _read_unet_config(source: _Source, offline: bool) -> dict[str, Any]:
    if source.kind == "folder":
        path = Path(source.ref) / "unet" / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"unet: missing {path}")
        return _read_json(path, component="unet")
    local = _hub_download(
        source.ref, "unet/config.json", revision=source.revision, offline=offline, what="unet/config.json"
    )
    return _read_json(Path(local), component="unet")


def detect_family(
    pretrained: str | os.PathLike[str], *, revision: str | None = None, local_files_only: bool | None = None
) -> str:
    """``"sd15"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` for a tiny name, folder, single file or hub id,
    without loading weights."""
    offline = _offline(local_files_only)
    source = _resolve_source(pretrained, what="model", revision=revision, offline=offline)
    family, _ = _detect(source, offline)
    return family


def _detect(source: _Source, offline: bool) -> tuple[str, str]:
    if source.kind == "single_file":
        family, why = _family_from_keys(_checkpoint_keys(Path(source.ref)))
        if family is None:
            raise ModelLoadError(
                f"{source.display} does not look like an SD1.5, SDXL, SD3 or FLUX.1 checkpoint "
                "(no UNet / transformer / text encoder keys)"
            )
        return family, why
    family, why = _family_from_model_index(_read_model_index(source, offline))
    if family is None:
        family, why = _family_from_unet_config(_read_unet_config(source, offline))
    return family, why


def _check_family(asked: str, found: str, why: str, display: str) -> str:
    if asked == "auto":
        return found
    if asked != found:
        raise ModelLoadError(
            f"{display} is an {found} model ({why}) but family={asked} was asked",
            hint=f"set model.family to {found} or auto",
        )
    return asked
