"""A model reference resolved offline: its UNet config, and the parameter counts of the UNet and frozen parts.

:func:`resolve_model` reads a recipe's ``model`` block without loading a weight or touching the network (a
``model.unet`` folder, a tiny or shipped model, a local diffusers folder, the local Hugging Face cache, or a
known SD1.5 / SDXL hub id mapped to the UNet configs shipped in ``smpo_cli/models/assets/unet_configs``);
:func:`unet_shapes` builds a UNet config on the meta device for its parameter count and shapes (cached).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smpo_cli.training.memory.cache import _cached, _clean, _config_key, _quiet, _read_json

UNET_CONFIG_DIR = Path(__file__).resolve().parents[2] / "models" / "assets" / "unet_configs"
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


# Hub ids whose UNet is the shipped config of their family (all SD1.5 v1.x checkpoints share one UNet
# architecture; SDXL base 0.9 and 1.0 share theirs).
KNOWN_HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "sd-legacy/stable-diffusion-v1-5": "sd15",
    "benjamin-paine/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-1": "sd15",
    "CompVis/stable-diffusion-v1-2": "sd15",
    "CompVis/stable-diffusion-v1-3": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-xl-base-0.9": "sdxl",
}
# Frozen parameter counts of the hub families (verified by building their configs on the meta device):
# AutoencoderKL (SD and SDXL VAEs, including madebyollin/sdxl-vae-fp16-fix), CLIP ViT-L/14 text model,
# OpenCLIP bigG/14 text model with projection.
FAMILY_FROZEN = {
    "sd15": {"vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
# The SD / SDXL VAE architecture (stable-diffusion-v1-5 vae/config.json; SDXL's differs only in
# scaling_factor, sample_size and force_upcast, none of which changes memory).
SD_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@dataclass(frozen=True)
class ModelInfo:
    """What the plan knows of the model without loading it."""

    unet_config: dict[str, Any] | None
    family: str | None
    source: str  # where the UNet config came from, or why there is none
    vae_config: dict[str, Any] | None = None
    frozen_counts: dict[str, int] = field(default_factory=dict)  # vae / text_encoder(_2) -> parameters


def shipped_unet_config(family: str) -> dict[str, Any]:
    """The SD1.5 / SDXL UNet config shipped with smpo (``unet/config.json`` of the reference hub repo)."""
    return json.loads((UNET_CONFIG_DIR / f"{family}.json").read_text())


def _family_of_config(config: Mapping[str, Any]) -> str:
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"


def _folder_frozen(folder: Path) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """VAE config and frozen counts of a diffusers pipeline folder (None / missing keys when absent)."""
    counts: dict[str, int] = {}
    vae = _read_json(folder / "vae" / "config.json")
    for name in ("text_encoder", "text_encoder_2"):
        cfg = _read_json(folder / name / "config.json")
        if cfg and "hidden_size" in cfg:
            projection = "WithProjection" in " ".join(cfg.get("architectures") or [])
            counts[name] = clip_text_params(cfg, projection)
    return vae, counts


def _hub_cached(repo: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # noqa: BLE001 - a cache probe never breaks a plan
        return None
    return _read_json(Path(found)) if isinstance(found, str) else None


def _unet_folder_config(ref: str) -> dict[str, Any] | None:
    path = Path(ref).expanduser()
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        cfg = _read_json(candidate)
        if (
            cfg
            and cfg.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"
            and "block_out_channels" in cfg
        ):
            return cfg
    return None


def _tiny_info(name: str) -> ModelInfo:
    from smpo_cli.models.tiny import TINY_FAMILIES, is_materialized, tiny_model_dir

    family = TINY_FAMILIES[name]
    if family not in FAMILY_NAMES:  # the flow-matching models train a transformer, not a UNet
        return ModelInfo(
            None, family, f"{name} is a {family} transformer model; the memory plan covers UNets"
        )
    folder = tiny_model_dir(name)
    if is_materialized(folder):
        unet = _read_json(folder / "unet" / "config.json")
        vae, counts = _folder_frozen(folder)
        vae_module = None
    else:  # built in memory (tiny: well under a second), nothing written
        from smpo_cli.models.tiny import build_tiny_components

        comps = build_tiny_components(name)
        unet, vae_module = dict(comps["unet"].config), comps["vae"]
        vae = dict(vae_module.config)
        counts = {n: sum(p.numel() for p in comps[n].parameters()) for n in ("text_encoder", "text_encoder_2")
                  if comps.get(n) is not None}  # fmt: skip
    if vae is not None:
        counts["vae"] = (
            _count_vae(vae) if vae_module is None else sum(p.numel() for p in vae_module.parameters())
        )
    return ModelInfo(unet, family, f"embedded tiny model {name}", vae, counts)


def resolve_model(model: Any) -> ModelInfo:
    """The UNet config (and frozen parts) of a recipe's ``model`` block, offline.

    Order: a ``model.unet`` folder's config; a tiny or shipped model's own config; a local diffusers
    folder's ``unet/config.json``; a hub id's config in the local Hugging Face cache; a known SD1.5 /
    SDXL hub id (or an explicit ``model.family``) -> the shipped config of that family. Otherwise the
    config is None and ``source`` says why.
    """
    from smpo_cli.models.shipped import shipped_model_path
    from smpo_cli.models.tiny import is_tiny_name

    pretrained = str(model.pretrained)
    asked = model.family if model.family in FAMILY_NAMES else None
    unet_override = _unet_folder_config(model.unet) if model.unet else None
    override_note = f"model.unet = {model.unet}" if unet_override else None
    if is_tiny_name(pretrained):
        info = _tiny_info(pretrained)
    elif shipped_model_path(pretrained) is not None:
        folder = shipped_model_path(pretrained)
        vae, counts = _folder_frozen(folder)
        if vae is not None:
            counts["vae"] = _count_vae(vae)
        unet = _read_json(folder / "unet" / "config.json")
        info = ModelInfo(unet, _family_of_config(unet or {}), f"shipped model {pretrained}", vae, counts)
    elif Path(pretrained).expanduser().is_dir():
        folder = Path(pretrained).expanduser()
        unet = _unet_folder_config(str(folder))
        vae, counts = _folder_frozen(folder)
        if vae is not None:
            counts["vae"] = _count_vae(vae)
        family = _family_of_config(unet) if unet else asked
        info = ModelInfo(unet, family, f"{folder / 'unet' / 'config.json'}" if unet else f"{folder}: no unet/config.json",
                         vae, counts)  # fmt: skip
    else:
        cached = (
            None
            if Path(pretrained).expanduser().is_file()
            else _hub_cached(pretrained, "unet/config.json", model.revision)
        )
        family = KNOWN_HUB_IDS.get(pretrained) or asked
        if cached is not None:
            fam = _family_of_config(cached)
            info = ModelInfo(cached, fam, f"{pretrained} unet/config.json (local Hugging Face cache)", SD_VAE_CONFIG,
                             dict(FAMILY_FROZEN[fam]))  # fmt: skip
        elif family is None and Path(pretrained).expanduser().is_file() and model.config:
            config_unet = _unet_folder_config(model.config)
            family = _family_of_config(config_unet) if config_unet else KNOWN_HUB_IDS.get(model.config)
            info = ModelInfo(config_unet, family, f"model.config = {model.config}", SD_VAE_CONFIG,
                             dict(FAMILY_FROZEN.get(family or "", {})))  # fmt: skip
        elif family is None and Path(pretrained).expanduser().is_file():
            family = _single_file_family(Path(pretrained).expanduser())
            info = ModelInfo(None, family, f"{pretrained}: single-file checkpoint", SD_VAE_CONFIG,
                             dict(FAMILY_FROZEN.get(family or "", {})))  # fmt: skip
        else:
            why = (
                f"known {FAMILY_NAMES[family]} hub id"
                if pretrained in KNOWN_HUB_IDS
                else f"model.family={family}"
            )
            info = ModelInfo(None, family, f"{pretrained}: {why}" if family else
                             f"{pretrained} is not a known SD1.5/SDXL hub id and not in the local cache",
                             SD_VAE_CONFIG, dict(FAMILY_FROZEN.get(family or "", {})))  # fmt: skip
        if info.unet_config is None and info.family in FAMILY_NAMES:
            info = replace(info, unet_config=shipped_unet_config(info.family),
                           source=f"shipped {FAMILY_NAMES[info.family]} UNet config ({info.source})")  # fmt: skip
    if unet_override is not None:
        info = replace(
            info, unet_config=unet_override, family=_family_of_config(unet_override), source=override_note
        )
    return info


def _single_file_family(path: Path) -> str | None:
    try:
        from smpo_cli.models.loading import detect_family

        return detect_family(str(path))
    except Exception:  # noqa: BLE001
        return None


def _count_vae(config: Mapping[str, Any]) -> int:
    def build() -> int:
        import torch
        from diffusers import AutoencoderKL

        with torch.device("meta"), _quiet():
            vae = AutoencoderKL.from_config(_clean(config))
        return sum(p.numel() for p in vae.parameters())

    return int(_cached("vae-params", _config_key(config), build)[0])


def clip_text_params(config: Mapping[str, Any], projection: bool = False) -> int:
    """Parameters of a transformers CLIP text model (with ``projection``: CLIPTextModelWithProjection)."""
    h, i, layers = (
        int(config["hidden_size"]),
        int(config["intermediate_size"]),
        int(config["num_hidden_layers"]),
    )
    embeddings = int(config.get("vocab_size", 49408)) * h + int(config.get("max_position_embeddings", 77)) * h
    per_layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)
    proj = h * int(config.get("projection_dim", h)) if projection else 0
    return embeddings + layers * per_layer + 2 * h + proj


@dataclass(frozen=True)
class UNetShapes:
    """Parameter count and trainable shapes of a UNet config, from a meta-device build."""

    params: int
    shapes: list[tuple[int, ...]]
    linears: list[tuple[str, int, int]]  # (module name, in_features, out_features) of every nn.Linear
    largest_block: int  # parameters of the largest down/mid/up block
    units: dict[str, tuple[int, int]] = field(default_factory=dict)  # class name -> (largest, all) parameters


def unet_shapes(config: Mapping[str, Any]) -> UNetShapes:
    """Build ``UNet2DConditionModel.from_config(config)`` on the meta device and read its shapes (cached)."""

    def build() -> dict[str, Any]:
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"), _quiet():
            unet = UNet2DConditionModel.from_config(_clean(config))
        shapes = [list(p.shape) for p in unet.parameters()]
        linears = [
            [n, m.in_features, m.out_features]
            for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
        blocks = [
            *unet.down_blocks,
            *([unet.mid_block] if unet.mid_block is not None else []),
            *unet.up_blocks,
        ]
        largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        units: dict[str, list[int]] = {}
        for module in unet.modules():
            n = sum(p.numel() for p in module.parameters())
            big, total = units.get(type(module).__name__, [0, 0])
            units[type(module).__name__] = [max(big, n), total + n]
        return {"params": sum(math.prod(s) for s in shapes), "shapes": shapes, "linears": linears, "largest": largest,
                "units": units}  # fmt: skip

    d, _ = _cached("unet", _config_key(config), build)
    return UNetShapes(int(d["params"]), [tuple(s) for s in d["shapes"]], [tuple(x) for x in d["linears"]],
                      int(d["largest"]), {k: (int(v[0]), int(v[1])) for k, v in d["units"].items()})  # fmt: skip


def count_unet_params(config: Mapping[str, Any]) -> int:
    """Parameters of ``UNet2DConditionModel.from_config(config)``, built on the meta device."""
    return unet_shapes(config).params
