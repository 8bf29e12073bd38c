"""Progress of core loops on stderr: rich bars on a terminal, a plain line every few seconds otherwise (a log
file, CI, ``2>run.log``); off under -q, ``SMPO_NO_PROGRESS=1`` and on every rank but the main one.
``SMPO_PROGRESS_EVERY`` sets the seconds between lines (default 10)."""

from __future__ import annotations

import os
import sys
import time
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
    return _enabled and process_rank() == 0 and os.environ.get("SMPO_NO_PROGRESS") != "1"


class LineProgress(Progress):
    """A Progress that draws nothing live and writes ``description: done/total (pct), elapsed, eta`` lines."""

    def __init__(self, *columns, every: float, **kwargs) -> None:
        super().__init__(*columns, disable=True, **kwargs)
        self._every = every
        self._printed: dict = {}

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def _maybe_print(self, task_id) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        last = self._printed.get(task_id)
        if last is None:
            self._printed[task_id] = last = task.start_time or now  # the first line after `every` seconds
        if (finished and last != float("inf")) or now - last >= self._every:
            self._printed[task_id] = float("inf") if finished else now
            done = f"{task.completed:g}/{task.total:g}" if task.total else f"{task.completed:g}"
            pct = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
            eta = task.time_remaining
            tail = f", eta {eta:.0f} s" if eta is not None and not finished else ""
            sys.stderr.write(f"{task.description}: {done}{pct}, {task.elapsed or 0:.0f} s{tail}\n")
            sys.stderr.flush()


def make_progress(*extra_columns) -> Progress:
    """Rich bars on a terminal; plain lines every ``SMPO_PROGRESS_EVERY`` seconds otherwise; nothing when disabled."""
    if progress_enabled() and not sys.stderr.isatty():
        return LineProgress(TextColumn("{task.description}"), every=float(os.environ.get("SMPO_PROGRESS_EVERY", "10")))
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
