"""Where a model reference points: the ``_Source`` of a tiny name, shipped model, local folder or file, hub file URL or hub repo id.

``_resolve_source`` classifies a ``pretrained`` / ``config`` / ``unet`` / ``vae`` reference without reading any
weights (a tiny model is materialised, a hub file URL downloaded through :mod:`.hub`); a missing path is an
``AssetNotFoundError`` and a file of the wrong kind a ``ModelLoadError``. The single-file suffixes accepted
(``SAFETENSORS_SUFFIXES``, ``TORCH_SUFFIXES``) live here as well.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smpo_cli.errors import AssetNotFoundError, ModelLoadError
from smpo_cli.models.hub import _hub_download
from smpo_cli.models.shipped import SHIPPED_MODELS, shipped_model_path
from smpo_cli.models.tiny import ALL_TINY_MODELS, is_tiny_name, materialize_tiny

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_FILE_URL = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<rev>[^/]+)/(?P<file>.+)$"
)


@dataclass
class _Source:
    kind: str  # "folder" | "hub" | "single_file"
    ref: str  # local path, or hub repo id
    display: str  # for messages and logs
    revision: str | None = None
    index: dict[str, Any] | None = None  # model_index.json, once read


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
