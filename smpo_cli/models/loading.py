"""One loader for SD1.5-, SDXL-, SD3/SD3.5- and FLUX.1-family models, whatever the source.

``load_components(pretrained, ...)`` accepts:

* a tiny model name (``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``): materialised once,
  then loaded as a folder;
* a local diffusers pipeline folder (with ``model_index.json``);
* a single-file checkpoint (``.safetensors``; ``.ckpt``/``.pt``/``.pth`` only through
  ``torch.load(weights_only=True)``), with ``config=`` naming a diffusers folder or hub id that
  gives the architecture (so it works offline), or a ``https://huggingface.co/.../file`` URL;
* a Hugging Face Hub repo id, through the local HF cache and ``HF_HUB_OFFLINE``.

Components are loaded one by one (``components=`` skips some; the skipped ones are ``None``) from
a fixed allow-list of classes: no ``trust_remote_code``, no custom pipelines, no pickle.
Every failure the user can act on becomes one line: ``AssetNotFoundError`` (missing path, hub id
not cached while offline) or ``ModelLoadError`` (a folder or file that exists but is broken),
naming the component and file.

The work is split by responsibility: :mod:`.hub` (Hub access, error translation), :mod:`.sources`
(classifying a reference), :mod:`.families` (family constants and detection), :mod:`.components` (one
component of a folder or hub repo) and :mod:`.single_file` (single-file checkpoints, ``unet=`` / ``vae=``
overrides); this module keeps :class:`DiffusionComponents` and :func:`load_components`, and re-exports the
public names of the others.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from smpo_cli.errors import ModelLoadError, UsageError
from smpo_cli.models import flow
from smpo_cli.models.components import _check_index_classes, _load_model, _load_scheduler, _load_tokenizer
from smpo_cli.models.families import (  # noqa: F401 (re-exported)
    COMPONENTS,
    DEFAULT_CONFIG_REPOS,
    FAMILIES,
    FAMILY_COMPONENTS,
    UNET_COMPONENTS,
    UNET_FAMILIES,
    _check_family,
    _denoiser,
    _detect,
    _family_from_unet_config,
    _read_model_index,
    detect_family,
)
from smpo_cli.models.hub import _offline, hub_reachable  # noqa: F401 (re-exported)
from smpo_cli.models.single_file import _load_override, _load_single_file, _resolve_config_dir
from smpo_cli.models.sources import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, _resolve_source  # noqa: F401 (re-exported)
from smpo_cli.utils.devices import resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from smpo_cli.utils.logging import get_logger, warning_once

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class DiffusionComponents:
    """The parts of an SD1.5 / SDXL / SD3 / FLUX.1 pipeline, on one device and dtype (skipped parts are None).

    SD1.5 / SDXL fill ``unet``; SD3 and FLUX.1 fill ``transformer`` (and ``unet`` is None). SD3's
    T5 is ``text_encoder_3``; FLUX.1's is ``text_encoder_2`` (as in the diffusers pipelines).
    """

    family: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    source: str = ""
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")  # noqa: B008 - an immutable default
    transformer: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    @property
    def is_flow(self) -> bool:
        """True for the flow-matching families (``sd3``, ``flux``)."""
        return flow.is_flow_family(self.family)

    @property
    def denoiser(self) -> Any:
        """The trained network: the UNet, or the transformer of SD3 / FLUX.1."""
        return self.transformer if self.is_flow else self.unet

    @property
    def prediction_type(self) -> str:
        """``"epsilon"`` or ``"v_prediction"`` (from the scheduler config); ``"flow_prediction"``
        (velocity eps - x0) for the flow-matching families."""
        if self.scheduler is None:
            raise ModelLoadError(
                f"the scheduler of {self.source} was not loaded, so its prediction type is unknown",
                hint="keep 'scheduler' in components=",
            )
        if self.is_flow:
            return "flow_prediction"
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded torch modules by component name."""
        return {
            name: value
            for name in COMPONENTS
            if isinstance(value := getattr(self, name, None), torch.nn.Module)
        }

    def pipeline(self, scheduler: Any = None):
        """The stock diffusers pipeline over these components: ``StableDiffusionPipeline``,
        ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline``.

        No safety checker, no watermarker, progress bar disabled. ``scheduler`` replaces the
        loaded one: a scheduler instance, or a diffusers scheduler class name (for example
        ``"DDIMScheduler"``) built from the loaded scheduler's config.
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        needed = FAMILY_COMPONENTS[self.family]
        missing = [name for name in needed if getattr(self, name) is None and name != "scheduler"]
        if scheduler is None and self.scheduler is None:
            missing.append("scheduler")
        if missing:
            raise ModelLoadError(
                f"cannot build a pipeline from {self.source}: {', '.join(missing)} not loaded",
                hint="load it without restricting components=",
            )
        sched = _make_scheduler(scheduler, self.scheduler)
        if self.is_flow:
            parts = {name: getattr(self, name) for name in needed}
            pipe = flow.build_pipeline(self.family, {**parts, "scheduler": sched})
            pipe.set_progress_bar_config(disable=True)
            return pipe
        kwargs = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "scheduler": sched,
        }
        if self.family == "sd15":
            pipe = StableDiffusionPipeline(
                **kwargs, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        else:
            pipe = StableDiffusionXLPipeline(
                **kwargs,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                add_watermarker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _make_scheduler(spec: Any, loaded: Any) -> Any:
    if spec is None:
        return loaded
    if isinstance(spec, str):
        import diffusers

        cls = getattr(diffusers, spec, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise UsageError(f"unknown scheduler {spec!r}", hint="use a diffusers scheduler class name")
        if loaded is None:
            raise ModelLoadError(f"cannot build {spec}: no scheduler config was loaded")
        return cls.from_config(loaded.config)
    return spec


def _wanted(components: Iterable[str] | None, family: str) -> list[str]:
    names = list(FAMILY_COMPONENTS[family])
    if components is None:
        return names
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    asked = list(components)
    unknown = [c for c in asked if c not in COMPONENTS]
    if unknown:
        raise UsageError(
            f"unknown component(s) {', '.join(unknown)}", hint=f"choose from {', '.join(COMPONENTS)}"
        )
    return [n for n in names if n in asked]


def _count(module: Any) -> str:
    if not isinstance(module, torch.nn.Module):
        return ""
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _consistency_checks(loaded: dict[str, Any], family: str, display: str) -> None:
    if flow.is_flow_family(family):
        flow.check_consistency(loaded, family, display)
        return
    unet, te, te2 = loaded.get("unet"), loaded.get("text_encoder"), loaded.get("text_encoder_2")
    encoders = [loaded.get(n) for n in ("text_encoder", "text_encoder_2") if n in FAMILY_COMPONENTS[family]]
    if unet is not None:
        unet_family, why = _family_from_unet_config(dict(unet.config))
        if unet_family != family:
            raise ModelLoadError(f"the unet is an {unet_family} UNet ({why}) but the model is {family}")
        expected = (
            sum(e.config.hidden_size for e in encoders) if all(e is not None for e in encoders) else None
        )
        if expected is not None and unet.config.cross_attention_dim != expected:
            raise ModelLoadError(
                f"the unet expects text features of size {unet.config.cross_attention_dim} but the text "
                f"encoder(s) of {display} give {expected}",
                hint="the UNet was trained on another base model",
            )
    vae = loaded.get("vae")
    if unet is not None and vae is not None and vae.config.latent_channels != unet.config.in_channels:
        raise ModelLoadError(
            f"the vae has {vae.config.latent_channels} latent channels but the unet takes {unet.config.in_channels}"
        )
    for tok_name, enc in (("tokenizer", te), ("tokenizer_2", te2)):
        tok = loaded.get(tok_name)
        if tok is not None and enc is not None and len(tok) > enc.config.vocab_size:
            raise ModelLoadError(
                f"{tok_name} has {len(tok)} tokens but its text encoder only {enc.config.vocab_size}",
                hint="the tokenizer and text encoder come from different models",
            )


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers draws its own "Loading pipeline components" bar: follow the hub's switch
    (``HF_HUB_DISABLE_PROGRESS_BARS``, set by the CLI); hide a deprecation warning that
    diffusers triggers in huggingface_hub on every download."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    hide = are_progress_bars_disabled() and diffusers_logging.is_progress_bar_enabled()
    if hide:
        diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            yield
    finally:
        if hide:
            diffusers_logging.enable_progress_bar()


def load_components(
    pretrained: str | os.PathLike[str],
    *,
    family: str = "auto",
    vae: str | os.PathLike[str] | None = None,
    unet: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    components: Iterable[str] | None = None,
    local_files_only: bool | None = None,
) -> DiffusionComponents:
    """Load an SD1.5 / SDXL / SD3 / FLUX.1 model's components from any supported source (see module doc).

    Args:
        pretrained: tiny name, local diffusers folder, single-file checkpoint, hub file URL or repo id.
        family: ``"auto"`` (detect), ``"sd15"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` (a mismatch with
            what is on disk is an error).
        vae: a separate VAE (folder, folder with ``vae/``, single file or hub id) replacing the model's.
        unet: a separate UNet (same forms) replacing the model's, e.g. an SFT UNet; for SD3 / FLUX.1 a
            separate transformer (a folder with ``config.json`` or ``transformer/``, a single file, a hub id).
        config: for single-file checkpoints, the diffusers folder / hub id / tiny name giving the
            architecture (default: the family's reference hub repo, which must then be cached).
        revision: hub revision of ``pretrained``.
        variant: weights variant (e.g. ``"fp16"``) for folder and hub loads.
        dtype: ``"auto"`` (float16 on CUDA, else float32), float32|fp32|float16|fp16|bfloat16|bf16.
        device: ``"auto"`` (cuda, else mps, else cpu) or an explicit device.
        components: names to load (default all); the others are ``None``.
        local_files_only: never touch the network (default: ``HF_HUB_OFFLINE``).
    """
    if family not in ("auto", *FAMILIES):
        raise UsageError(f"unknown model family {family!r}", hint="use auto, " + ", ".join(FAMILIES))
    with _quiet_libraries():
        return _load_components(
            pretrained,
            family=family,
            vae=vae,
            unet=unet,
            config=config,
            revision=revision,
            variant=variant,
            dtype=dtype,
            device=device,
            components=components,
            local_files_only=local_files_only,
        )


def _load_components(
    pretrained: str | os.PathLike[str],
    *,
    family: str,
    vae: str | os.PathLike[str] | None,
    unet: str | os.PathLike[str] | None,
    config: str | os.PathLike[str] | None,
    revision: str | None,
    variant: str | None,
    dtype: str | torch.dtype,
    device: str | torch.device,
    components: Iterable[str] | None,
    local_files_only: bool | None,
) -> DiffusionComponents:
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    offline = _offline(local_files_only)
    source = _resolve_source(pretrained, what="model", revision=revision, offline=offline)
    found, why = _detect(source, offline)
    family = _check_family(family, found, why, source.display)
    wanted = _wanted(components, family)
    logger.debug("loading %s as %s (%s): %s", source.display, family, why, ", ".join(wanted))

    config_dir = None
    if source.kind == "single_file":
        config_dir = _resolve_config_dir(config, family, offline)
    elif config is not None:
        logger.debug("config=%s ignored: %s is not a single-file checkpoint", config, source.display)
    origins: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for name, spec in ((_denoiser(family), unet), ("vae", vae)):
        if spec is None:
            continue
        if name not in wanted:
            logger.debug("%s=%s ignored: %s is not among the components to load", name, spec, name)
            continue
        overrides[name], origins[name] = _load_override(
            name,
            spec,
            base=source,
            base_config=config_dir,
            variant=variant,
            dtype=torch_dtype,
            offline=offline,
            family=family,
        )

    if source.kind == "single_file":
        loaded = _load_single_file(source, family, config_dir, wanted, overrides, torch_dtype)
    else:
        index = _read_model_index(source, offline)
        _check_index_classes(index, [n for n in wanted if n not in overrides], source.display, family)
        loaded = {}
        for name in FAMILY_COMPONENTS[family]:
            if name not in wanted:
                loaded[name] = None
            elif name in overrides:
                loaded[name] = overrides[name]
            elif name.startswith("tokenizer"):
                loaded[name] = _load_tokenizer(name, source, offline, family)
            elif name == "scheduler":
                loaded[name] = _load_scheduler(source, offline)
            else:
                loaded[name] = _load_model(
                    name,
                    source.ref,
                    name,
                    hub=source.kind == "hub",
                    revision=source.revision,
                    variant=variant,
                    dtype=torch_dtype,
                    offline=offline,
                    display=source.display,
                    family=family,
                )
    _consistency_checks(loaded, family, source.display)

    for module in loaded.values():
        if isinstance(module, torch.nn.Module):
            # Loaded in torch_dtype already (keeping any fp32-pinned submodules); only move.
            module.to(torch_device)
            module.eval()
    vae_model = loaded.get("vae")
    if (
        vae_model is not None
        and torch_dtype == torch.float16
        and family == "sdxl"
        and vae_model.config.get("force_upcast", False)
    ):
        warning_once(
            logger,
            "this SDXL VAE overflows in float16 (force_upcast); pipelines upcast it to float32 when decoding. "
            "For float16 training/encoding set model.vae=madebyollin/sdxl-vae-fp16-fix",
        )

    sizes = ", ".join(
        f"{name} {_count(module)}" + (f" from {origins[name]}" if name in origins else "")
        for name, module in loaded.items()
        if isinstance(module, torch.nn.Module)
    )
    logger.info(
        "loaded %s model from %s (%s): %s; dtype %s, device %s",
        family,
        source.display,
        why,
        sizes or "no torch modules",
        str(torch_dtype).removeprefix("torch."),
        torch_device,
    )
    return DiffusionComponents(
        family=family,
        unet=loaded.get("unet"),
        vae=loaded.get("vae"),
        text_encoder=loaded.get("text_encoder"),
        tokenizer=loaded.get("tokenizer"),
        scheduler=loaded.get("scheduler"),
        text_encoder_2=loaded.get("text_encoder_2"),
        tokenizer_2=loaded.get("tokenizer_2"),
        source=source.display,
        dtype=torch_dtype,
        device=torch_device,
        transformer=loaded.get("transformer"),
        text_encoder_3=loaded.get("text_encoder_3"),
        tokenizer_3=loaded.get("tokenizer_3"),
    )
