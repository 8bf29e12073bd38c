"""Progress bars for core loops: rich on stderr, off under -q, off the main rank, off without a TTY."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from smpo_cli.utils.logging import process_rank

T = TypeVar("T")
_enabled = True


def set_progress_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    if not _enabled or process_rank() != 0 or os.environ.get("SMPO_NO_PROGRESS") == "1":
        return False
    return sys.stderr.isatty()


def make_progress(*extra_columns) -> Progress:
    """A rich Progress on stderr; ``disable``d where bars would only clutter logs."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress_enabled(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    with make_progress() as progress:
        yield from progress.track(items, total=total, description=description)
