"""Hugging Face Hub access for the model loader, and the translation of load failures into one-line errors.

Everything that talks to the Hub goes through here: :func:`hub_reachable` (one quick TCP probe, so an
unreachable Hub fails at once instead of after ~30 s of retries), ``_hub_download`` / ``_hub_snapshot``
(one file or a filtered snapshot, through the local HF cache and ``HF_HUB_OFFLINE``), and ``_hub_problem``,
which turns a gated / missing / offline / uncached repo anywhere in an exception chain into an
``AssetNotFoundError``. ``_load_error_types`` and ``_reason`` do the same for what diffusers, transformers
and safetensors raise on a broken folder or file. It imports neither torch nor the other loader modules.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from pathlib import Path

from smpo_cli.errors import AssetNotFoundError, ModelLoadError, SmpoError


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


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
