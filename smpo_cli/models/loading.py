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
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smpo_cli.errors import AssetNotFoundError, ModelLoadError, SmpoError, UsageError
from smpo_cli.models import flow
from smpo_cli.models.shipped import SHIPPED_MODELS, shipped_model_path
from smpo_cli.models.tiny import ALL_TINY_MODELS, is_tiny_name, materialize_tiny
from smpo_cli.utils.devices import resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from smpo_cli.utils.logging import get_logger, warning_once

logger = get_logger(__name__)

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
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
# Allow-listed classes per component (name in model_index.json → accepted class names).
_ALLOWED_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
_DIFFUSERS_MODELS = ("unet", "vae", "transformer")


def _allowed(name: str, family: str) -> tuple[str, ...]:
    """The class names accepted for component ``name`` of ``family``."""
    if flow.is_flow_family(family):
        return flow.FLOW_ALLOWED_CLASSES[family][name]
    return _ALLOWED_CLASSES[name]


def _denoiser(family: str) -> str:
    """The trained component: ``unet`` (SD1.5 / SDXL) or ``transformer`` (SD3 / FLUX.1)."""
    return "transformer" if flow.is_flow_family(family) else "unet"


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_FILE_URL = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<rev>[^/]+)/(?P<file>.+)$"
)


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


# --------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    kind: str  # "folder" | "hub" | "single_file"
    ref: str  # local path, or hub repo id
    display: str  # for messages and logs
    revision: str | None = None
    index: dict[str, Any] | None = None  # model_index.json, once read


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", text))
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + (".bin",))
    )


def _resolve_source(
    spec: str | os.PathLike[str], *, what: str, revision: str | None, offline: bool
) -> _Source:
    """Classify ``spec`` (tiny name, local folder/file, hub file URL, hub repo id)."""
    text = os.fspath(spec)
    if is_tiny_name(text):
        path = materialize_tiny(text)
        return _Source("folder", str(path), f"{text} ({path})")
    shipped = shipped_model_path(text)
    if shipped is not None:
        if not (shipped / "model_index.json").is_file():
            raise AssetNotFoundError(f"{what} {text}: the shipped weights are missing from {shipped}",
                                     hint="reinstall smpo (the wheel carries them) or make them: smpo shapes pretrain")  # fmt: skip
        return _Source("folder", str(shipped), f"{text} ({shipped})")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _Source("folder", str(path), str(path))
        if path.suffix.lower() in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
            return _Source("single_file", str(path), str(path))
        raise ModelLoadError(
            f"{what} {text} is a {path.suffix or 'suffix-less'} file; expected a diffusers folder or a "
            f"{'/'.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} checkpoint",
            hint="convert .bin or other pickles to .safetensors",
        )
    url = _HUB_FILE_URL.match(text)
    if url:
        filename = url["file"]
        local = _hub_download(
            url["repo"], filename, revision=url["rev"], offline=offline, what=f"{what} {filename}"
        )
        return _Source("single_file", local, text)
    if _REPO_ID.match(text) and not _looks_like_path(text):
        return _Source("hub", text, text + (f"@{revision}" if revision else ""), revision)
    raise AssetNotFoundError(
        f"{what} {text} does not exist",
        hint="give an existing local folder or file, a hub repo id (org/name) or "
        + ", ".join(f"'{n}'" for n in (*ALL_TINY_MODELS, *SHIPPED_MODELS)),
    )


# --------------------------------------------------------------------------------------------
# Hub helpers and error translation
# --------------------------------------------------------------------------------------------


def _hub_errors():
    from huggingface_hub import errors

    return errors


def _in_chain(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _download_hint(repo_id: str) -> str:
    return (
        f"point model.pretrained at a local diffusers folder, or on a connected machine run "
        f"`hf download {repo_id}` (`huggingface-cli download {repo_id}` on older huggingface_hub) "
        "and copy its Hugging Face cache here or set HF_HOME to it"
    )


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_problem(
    exc: BaseException, repo_id: str, revision: str | None, what: str, offline: bool
) -> SmpoError | None:
    """The one-line error for a hub failure anywhere in ``exc``'s chain, or None if not a hub failure."""
    err = _hub_errors()
    ref = repo_id + (f"@{revision}" if revision else "")
    if _in_chain(exc, (err.GatedRepoError,)):
        return AssetNotFoundError(
            f"{ref} is gated on the Hugging Face Hub and this machine has no access to it",
            hint="accept its license on huggingface.co, then run `hf auth login`",
        )
    if _in_chain(exc, (err.RepositoryNotFoundError,)):
        return AssetNotFoundError(
            f"{ref} was not found on the Hugging Face Hub",
            hint="check the repo id; private repos need `hf auth login`",
        )
    if _in_chain(exc, (err.RevisionNotFoundError,)):
        return AssetNotFoundError(f"revision {revision!r} of {repo_id} was not found on the Hugging Face Hub")
    if _in_chain(exc, (err.LocalEntryNotFoundError, err.OfflineModeIsEnabled)):
        why = (
            "downloads are off (HF_HUB_OFFLINE=1 or local_files_only)"
            if offline
            else "the Hub cannot be reached"
        )
        return AssetNotFoundError(
            f"{ref}: {what} not found in the local Hugging Face cache ({_hub_cache_dir()}) and {why}",
            hint=_download_hint(repo_id),
        )
    if _in_chain(exc, (err.EntryNotFoundError,)):
        return ModelLoadError(
            f"{ref} has no {what}", hint="check that it is an SD1.5 / SDXL / SD3 / FLUX.1 diffusers repo"
        )
    if found := _in_chain(exc, (err.HfHubHTTPError,)):
        return AssetNotFoundError(f"cannot download {what} of {ref}: {_first_line(found)}")
    return None


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One TCP connection to the Hub's host (3 s timeout): without it huggingface_hub retries for ~30 s per file
    before saying the Hub cannot be reached; unreachable, loads go straight to the local cache."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing: let huggingface_hub try
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def _hub_download(repo_id: str, filename: str, *, revision: str | None, offline: bool, what: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline or not hub_reachable())
    except Exception as exc:  # translated precisely below; anything else re-raised as is
        problem = _hub_problem(exc, repo_id, revision, what, offline)
        if problem is None:
            raise
        raise problem from exc


def _hub_snapshot(
    repo_id: str, patterns: list[str], *, revision: str | None, offline: bool, what: str
) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                              local_files_only=offline or not hub_reachable())  # fmt: skip
        )
    except Exception as exc:
        problem = _hub_problem(exc, repo_id, revision, what, offline)
        if problem is None:
            raise
        raise problem from exc


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_error_types() -> tuple[type[BaseException], ...]:
    """What diffusers / transformers / safetensors raise for a broken folder or file (tested)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import SafetensorError

    return (
        OSError,  # missing files, bad JSON config, unreadable weights (diffusers wraps most errors so)
        ValueError,  # invalid config values, JSONDecodeError
        RuntimeError,  # weight shapes that do not match the config (transformers, torch)
        TypeError,  # config values of the wrong type
        KeyError,  # single-file converters missing expected keys
        SafetensorError,  # corrupt or truncated safetensors (transformers does not wrap it)
        pickle.UnpicklingError,  # torch.load(weights_only=True) refusing a pickle
        SingleFileComponentError,
        _hub_errors().EntryNotFoundError,
    )


def _reason(exc: BaseException) -> str:
    from safetensors import SafetensorError

    if found := _in_chain(exc, (SafetensorError,)):
        return f"not a valid safetensors file ({_first_line(found)})"
    if found := _in_chain(exc, (json.JSONDecodeError,)):
        return f"invalid JSON ({_first_line(found)})"
    if found := _in_chain(exc, (pickle.UnpicklingError,)):
        return "refused to unpickle: only tensors are loaded (torch.load weights_only=True); convert it to safetensors"
    text = _first_line(exc)
    if "mismatch" in text.lower():
        return f"weight shapes do not match the config ({text})"
    return text


# --------------------------------------------------------------------------------------------
# Family detection
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Component loading
# --------------------------------------------------------------------------------------------


_WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def _weights_file(folder: Path, library: str, variant: str | None) -> Path | None:
    stems = [_WEIGHT_STEMS[library]] + (["pytorch_model"] if library == "transformers" else [])
    infix = f".{variant}" if variant else ""
    for stem in stems:
        for name in (
            f"{stem}{infix}.safetensors",
            f"{stem}{infix}.safetensors.index.json",
            f"{stem}.safetensors.index{infix}.json",
            f"{stem}{infix}.bin",
            f"{stem}{infix}.bin.index.json",
        ):
            if (folder / name).is_file():
                return folder / name
    return None


def _model_class(name: str, family: str = "sd15"):
    if name in _DIFFUSERS_MODELS:
        import diffusers

        return getattr(diffusers, _allowed(name, family)[0])
    import transformers

    return getattr(transformers, _allowed(name, family)[0])


def _load_model(
    name: str,
    root: str,
    subfolder: str | None,
    *,
    hub: bool,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype,
    offline: bool,
    display: str,
    family: str = "sd15",
):
    """``from_pretrained`` of one model component, with checks first and one-line errors."""
    cls = _model_class(name, family)
    library = "diffusers" if name in _DIFFUSERS_MODELS else "transformers"
    where = f"{root}/{subfolder}" if subfolder else root
    files = ""
    if not hub:
        folder = Path(root) / subfolder if subfolder else Path(root)
        if not folder.is_dir():
            raise ModelLoadError(f"{name}: missing subfolder {folder}", hint=f"{display} is incomplete")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{name}: missing {folder / 'config.json'}", hint=f"{display} is incomplete")
        weights = _weights_file(folder, library, variant)
        if weights is None:
            expected = f"{_WEIGHT_STEMS[library]}{'.' + variant if variant else ''}.safetensors"
            raise ModelLoadError(
                f"{name}: no weights in {folder} (expected {expected})", hint=f"{display} is incomplete"
            )
        where, files = str(folder), f" ({weights.name}, config.json)"
    kwargs: dict[str, Any] = {"local_files_only": offline or not hub, "variant": variant}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if hub and revision:
        kwargs["revision"] = revision
    kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
    try:
        model = cls.from_pretrained(root, **kwargs)
    except Exception as exc:
        if not isinstance(exc, _load_error_types()):
            raise
        if hub and (
            problem := _hub_problem(exc, root, revision, f"the {subfolder or name} weights", offline)
        ):
            raise problem from exc
        raise ModelLoadError(f"cannot load {name} from {where}{files}: {_reason(exc)}") from exc
    _check_materialized(model, name, where)
    logger.debug("loaded %s (%s) from %s", name, cls.__name__, where)
    return model


def _check_materialized(model: torch.nn.Module, name: str, where: str) -> None:
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"{name} from {where} lacks {len(missing)} weight tensor(s), e.g. {missing[0]}",
            hint="the checkpoint does not match the architecture in its config",
        )


def _component_dir(name: str, source: _Source, offline: bool, patterns: list[str]) -> Path:
    if source.kind == "folder":
        folder = Path(source.ref) / name
    else:
        folder = (
            _hub_snapshot(source.ref, patterns, revision=source.revision, offline=offline, what=f"{name}/")
            / name
        )
    if not folder.is_dir():
        if source.kind == "hub":
            raise AssetNotFoundError(
                f"{source.display}: {name}/ not found in the local Hugging Face cache ({_hub_cache_dir()})",
                hint=_download_hint(source.ref),
            )
        raise ModelLoadError(f"{name}: missing subfolder {folder}", hint=f"{source.display} is incomplete")
    return folder


def _load_tokenizer(name: str, source: _Source, offline: bool, family: str = "sd15"):
    from transformers import CLIPTokenizer, T5Tokenizer

    t5 = flow.tokenizer_kind(family, name) == "t5"
    tok_cls = T5Tokenizer if t5 else CLIPTokenizer
    folder = _component_dir(name, source, offline, [f"{name}/*"])
    has_json = (folder / "tokenizer.json").is_file()
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    has_spm = (folder / "spiece.model").is_file()
    if not (has_json or (has_spm if t5 else has_bpe)):
        # transformers silently builds an empty tokenizer here: refuse instead.
        cls_ = AssetNotFoundError if source.kind == "hub" else ModelLoadError
        expected = "tokenizer.json or spiece.model" if t5 else "vocab.json + merges.txt, or tokenizer.json"
        raise cls_(f"{name}: no tokenizer files in {folder} (expected {expected})")
    try:
        tokenizer = tok_cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        if not isinstance(exc, _load_error_types()):
            raise
        raise ModelLoadError(f"cannot load {name} from {folder}: {_reason(exc)}") from exc
    if len(tokenizer) <= 3:
        raise ModelLoadError(f"{name}: the tokenizer in {folder} has an empty vocabulary")
    logger.debug("loaded %s (%s, %d tokens) from %s", name, tok_cls.__name__, len(tokenizer), folder)
    return tokenizer


def _load_scheduler(source: _Source, offline: bool):
    import diffusers

    folder = _component_dir("scheduler", source, offline, ["scheduler/*.json"])
    path = folder / "scheduler_config.json"
    if not path.is_file():
        cls_ = AssetNotFoundError if source.kind == "hub" else ModelLoadError
        raise cls_(f"scheduler: missing {path}")
    config = _read_json(path, component="scheduler")
    class_name = str(config.get("_class_name", ""))
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelLoadError(f"scheduler: {path} names {class_name or 'no class'}, not a diffusers scheduler")
    try:
        scheduler = cls.from_config(config)
    except Exception as exc:
        if not isinstance(exc, _load_error_types()):
            raise
        raise ModelLoadError(f"cannot build scheduler from {path}: {_reason(exc)}") from exc
    logger.debug("loaded scheduler (%s) from %s", class_name, path)
    return scheduler


def _check_index_classes(
    index: dict[str, Any], wanted: list[str], display: str, family: str = "sd15"
) -> None:
    for name in wanted:
        if name == "scheduler":
            continue
        entry = index.get(name)
        if not isinstance(entry, list | tuple) or len(entry) != 2 or entry[1] is None:
            raise ModelLoadError(
                f"{display}: model_index.json lists no {name}",
                hint="is it an SDXL refiner or an image-variation pipeline? smpo needs a text-to-image base model",
            )
        if entry[1] not in _allowed(name, family):
            raise ModelLoadError(
                f"{display}: {name} is a {entry[1]}; expected {' or '.join(_allowed(name, family))}"
            )


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
