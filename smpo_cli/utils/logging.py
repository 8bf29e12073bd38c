"""Library logging: ``get_logger(__name__)`` everywhere, configured once by the command line.

Library code never prints. The CLI installs a stderr handler and sets the level from ``-v``/``-q``
or the ``SMPO_LOG_LEVEL`` environment variable. Non-main ranks log only warnings unless a record
is marked ``extra={"all_ranks": True}``.
"""

from __future__ import annotations

import logging
import os
import warnings

ROOT = "smpo_cli"
_warned: set[str] = set()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def env_log_level(default: int = logging.INFO) -> int:
    value = os.environ.get("SMPO_LOG_LEVEL", "").strip().upper()
    if not value:
        return default
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value)
    return level if isinstance(level, int) else default


def process_rank() -> int:
    """Rank of this process under torchrun / accelerate launch (0 when not distributed)."""
    for var in ("RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if process_rank() == 0 or getattr(record, "all_ranks", False):
            return True
        return record.levelno >= logging.WARNING


def configure(level: int, handler: logging.Handler) -> None:
    """Route smpo's (and the quiet-by-default third-party) loggers to ``handler`` at ``level``."""
    root = logging.getLogger(ROOT)
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(_RankFilter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # Third-party libraries: warnings and errors only, unless -v asked for debug.
    third_party = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(third_party)
    set_library_progress_bars(enabled=level <= logging.DEBUG)


def set_library_progress_bars(enabled: bool) -> None:
    """diffusers/transformers/hub draw their own tqdm bars on load; smpo draws its own instead."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "0" if enabled else "1")


def warning_once(logger: logging.Logger, message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def deprecated(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=3)
