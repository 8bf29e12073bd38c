"""Single-file checkpoints and separate ``unet=`` / ``vae=`` overrides.

``_load_single_file`` loads a ``.safetensors`` (or weights-only ``.ckpt``/``.pt``/``.pth``) checkpoint through the
diffusers ``from_single_file`` loaders, with the architecture from a local diffusers folder that
``_resolve_config_dir`` finds (``config=``, or the family's reference hub repo from the cache). ``_locate_override``
and ``_load_override`` load a replacement UNet / transformer / VAE from a folder, hub id or single file (the latter
with the base model's config).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from smpo_cli.errors import AssetNotFoundError, ModelLoadError
from smpo_cli.models import flow
from smpo_cli.models.components import _check_materialized, _load_model, _model_class
from smpo_cli.models.families import (
    DEFAULT_CONFIG_REPOS,
    FAMILY_COMPONENTS,
    _allowed,
    _check_family,
    _checkpoint_keys,
    _detect,
)
from smpo_cli.models.hub import _hub_download, _hub_errors, _hub_snapshot, _load_error_types, _reason
from smpo_cli.models.sources import _resolve_source, _Source


def _locate_override(
    name: str, spec: str | os.PathLike[str], offline: bool, family: str = "sd15"
) -> tuple[_Source, str | None]:
    """Where a separate ``unet=`` / ``vae=`` lives: (source, subfolder) for folders and hub ids."""
    source = _resolve_source(spec, what=name, revision=None, offline=offline)
    if source.kind == "single_file":
        return source, None
    if source.kind == "folder":
        root = Path(source.ref)
        if (root / "config.json").is_file():
            return source, None
        if (root / name / "config.json").is_file():
            return source, name
        raise ModelLoadError(
            f"{name}: {root} holds neither config.json nor {name}/config.json",
            hint=f"give a folder written by {_allowed(name, family)[0]}.save_pretrained, or its parent",
        )
    err = _hub_errors()
    try:
        _hub_download(
            source.ref, f"{name}/config.json", revision=None, offline=offline, what=f"{name}/config.json"
        )
        return source, name
    except (AssetNotFoundError, ModelLoadError) as exc:
        if not isinstance(exc.__cause__, err.EntryNotFoundError):
            raise
    _hub_download(source.ref, "config.json", revision=None, offline=offline, what=f"{name} config.json")
    return source, None


def _load_override(
    name: str,
    spec: str | os.PathLike[str],
    *,
    base: _Source,
    base_config: str | None,
    variant: str | None,
    dtype: torch.dtype,
    offline: bool,
    family: str = "sd15",
):
    source, subfolder = _locate_override(name, spec, offline, family)
    if source.kind != "single_file":
        return _load_model(
            name,
            source.ref,
            subfolder,
            hub=source.kind == "hub",
            revision=None,
            variant=variant if source.kind == "hub" else None,
            dtype=dtype,
            offline=offline,
            display=source.display,
            family=family,
        ), source.display
    # A single file: the architecture comes from the base model's config.
    cls = _model_class(name, family)
    config_root = base_config or base.ref
    try:
        model = cls.from_single_file(
            source.ref, config=config_root, subfolder=name, torch_dtype=dtype, local_files_only=True
        )
    except Exception as exc:
        if not isinstance(exc, _load_error_types()):
            raise
        raise ModelLoadError(
            f"cannot load {name} from {source.display} with the {name} config of {config_root}: {_reason(exc)}"
        ) from exc
    _check_materialized(model, name, source.display)
    return model, source.display


def _resolve_config_dir(config: str | os.PathLike[str] | None, family: str, offline: bool) -> str:
    """A local diffusers folder that gives the architecture for a single-file checkpoint."""
    spec = os.fspath(config) if config is not None else DEFAULT_CONFIG_REPOS[family]
    source = _resolve_source(spec, what="config", revision=None, offline=offline)
    if source.kind == "single_file":
        raise ModelLoadError(f"config {spec} is a file; give a diffusers folder or hub id")
    if source.kind == "folder":
        if not (Path(source.ref) / "model_index.json").is_file():
            raise ModelLoadError(
                f"config {source.display} is not a diffusers pipeline folder (no model_index.json)"
            )
        return source.ref
    try:
        folder = _hub_snapshot(
            source.ref,
            ["model_index.json", "*/*.json", "*/*.txt", "*/*.model"],
            revision=None,
            offline=offline,
            what="the pipeline configs",
        )
    except AssetNotFoundError as exc:
        raise AssetNotFoundError(
            exc.message,
            hint="pass config= (model.config) a local diffusers folder of the same architecture, "
            f"or download the configs with `hf download {source.ref} --include '*.json' '*.txt'`",
        ) from exc
    if not (folder / "model_index.json").is_file():
        raise AssetNotFoundError(
            f"config {source.ref}: model_index.json is not in the local Hugging Face cache"
        )
    return str(folder)


def _load_single_file(
    source: _Source,
    family: str,
    config_dir: str,
    wanted: list[str],
    overrides: dict[str, Any],
    dtype: torch.dtype,
) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    config_family, why = _detect(_Source("folder", config_dir, config_dir), offline=True)
    _check_family(family, config_family, why, f"config {config_dir}")
    kwargs: dict[str, Any] = {n: None for n in FAMILY_COMPONENTS[family] if n not in wanted}
    kwargs.update(overrides)
    if flow.is_flow_family(family):
        cls = flow.single_file_pipeline_class(family)
        kwargs.update(image_encoder=None, feature_extractor=None)
        # SD3.5 / FLUX.1 files usually hold the transformer (and VAE) only: the other parts come from the
        # config folder, loaded here (see flow.parts_missing_from for why diffusers cannot).
        for name in flow.parts_missing_from(family, _checkpoint_keys(Path(source.ref))):
            if name in wanted and name not in kwargs:
                kwargs[name] = _load_model(name, config_dir, name, hub=False, revision=None, variant=None,
                                           dtype=dtype, offline=True, display=f"config {config_dir}", family=family)  # fmt: skip
    elif family == "sd15":
        cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        cls = StableDiffusionXLPipeline
        kwargs.update(image_encoder=None, feature_extractor=None, add_watermarker=False)
    try:
        pipe = cls.from_single_file(
            source.ref, config=config_dir, torch_dtype=dtype, local_files_only=True, **kwargs
        )
    except Exception as exc:
        if not isinstance(exc, _load_error_types()):
            raise
        raise ModelLoadError(
            f"cannot load {source.display} as a single-file {family} checkpoint with config {config_dir}: {_reason(exc)}"
        ) from exc
    loaded = {name: getattr(pipe, name, None) for name in FAMILY_COMPONENTS[family]}
    for name, module in loaded.items():
        if isinstance(module, torch.nn.Module) and name not in overrides:
            _check_materialized(module, name, source.display)
    return loaded
