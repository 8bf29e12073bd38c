"""Loading one component of a diffusers pipeline folder or hub repo: model, tokenizer or scheduler.

``_load_model`` runs ``from_pretrained`` of an allow-listed diffusers / transformers class after checking that
the subfolder, its ``config.json`` and its weights exist; ``_load_tokenizer`` refuses folders without tokenizer
files (transformers would build an empty tokenizer) and ``_load_scheduler`` builds a diffusers scheduler from
``scheduler_config.json``. ``_check_index_classes`` checks ``model_index.json`` against the allow-list first, and
``_check_materialized`` refuses a model whose weights did not all load. Failures are one-line errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smpo_cli.errors import AssetNotFoundError, ModelLoadError
from smpo_cli.models import flow
from smpo_cli.models.families import _allowed, _read_json
from smpo_cli.models.hub import (
    _download_hint,
    _hub_cache_dir,
    _hub_problem,
    _hub_snapshot,
    _load_error_types,
    _reason,
)
from smpo_cli.models.sources import _Source
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

_DIFFUSERS_MODELS = ("unet", "vae", "transformer")
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
