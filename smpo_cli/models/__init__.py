"""Model loading (SD1.5 / SDXL from any source) and the embedded tiny models.

``import smpo_cli.models`` stays light: the tiny-model names come from :mod:`.tiny` (no torch at
import time) and the loader (:mod:`.loading`, which imports torch) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smpo_cli.models.tiny import BUILDER_VERSION, TINY_MODELS, is_tiny_name, materialize_tiny

if TYPE_CHECKING:
    from smpo_cli.models.loading import (
        DiffusionComponents,
        detect_family,
        load_components,
        resolve_device,
        resolve_dtype,
    )

_LAZY = {"DiffusionComponents", "detect_family", "load_components", "resolve_device", "resolve_dtype"}

__all__ = [
    "BUILDER_VERSION",
    "TINY_MODELS",
    "DiffusionComponents",
    "detect_family",
    "is_tiny_name",
    "load_components",
    "materialize_tiny",
    "resolve_device",
    "resolve_dtype",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from smpo_cli.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
