"""Memoisation of the memory plan's meta-device builds and measurements, in this process and on disk.

Values are JSON-able and keyed by what they were computed from plus the torch / diffusers / transformers /
peft versions, in ``cache_dir()/memory_plan``; a bump of :data:`MEASURE_VERSION` starts a new file. Also the
small helpers every meta-device build shares: config keys and a quiet context for the libraries' warnings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MEASURE_VERSION = 1  # bump when the measured step changes: invalidates the on-disk cache

_MEMO: dict[str, Any] = {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _clean(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _config_key(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_clean(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    from smpo_cli.utils.paths import cache_dir

    return cache_dir() / "memory_plan" / f"cache-v{MEASURE_VERSION}.json"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "diffusers", "transformers", "peft"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def _cached(kind: str, parts: Any, compute: Any, *, use_cache: bool = True) -> tuple[Any, bool]:
    """``compute()`` (JSON-able) memoised in this process and in ``cache_dir()/memory_plan``: (value, was cached).

    Keys include the torch / diffusers / transformers / peft versions, so an upgrade measures again."""
    digest = hashlib.sha256(
        json.dumps([parts, _versions()], sort_keys=True, default=str).encode()
    ).hexdigest()[:24]
    key = f"{kind}:{digest}"
    if use_cache:
        if key in _MEMO:
            return _MEMO[key], True
        stored = (_read_json(_cache_file()) or {}).get(key)
        if stored is not None:
            _MEMO[key] = stored
            return stored, True
    value = compute()
    if use_cache:
        _MEMO[key] = value
        _store(_cache_file(), key, value)
    return value, False


def _store(file: Path, key: str, value: Any) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        data = _read_json(file) or {}
        data[key] = value
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, file)
    except OSError:  # a read-only cache only costs the next dry run the measurement again
        pass


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers / transformers / peft logging and warnings while building models from configs."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
