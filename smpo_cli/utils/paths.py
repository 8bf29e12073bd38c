"""Where smpo keeps its own files (materialised tiny models, downloads it makes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SMPO_CACHE``, else ``$XDG_CACHE_HOME/smpo``, else ``~/.cache/smpo``."""
    if os.environ.get("SMPO_CACHE"):
        return Path(os.environ["SMPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "smpo"
