"""stdout for results, stderr for logs, progress, warnings and errors."""

from __future__ import annotations

import logging
import os
import sys
import traceback

from rich.console import Console
from rich.logging import RichHandler

# results: resolved recipes, tables, JSON; written to a file or pipe, tables get room instead of 80 columns
out = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, highlight=False)  # everything else


def debug_enabled() -> bool:
    return os.environ.get("SMPO_DEBUG", "").strip() not in ("", "0", "false", "False")


def setup_logging(level: int) -> None:
    from smpo_cli.utils.logging import configure

    _keep_library_logs_off_stdout("DeepSpeed")

    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    configure(level, handler)


def _keep_library_logs_off_stdout(name: str) -> None:
    """DeepSpeed's logger writes to stdout (imported by accelerate whenever DeepSpeed is installed): its handler
    is moved to stderr as it is added, so stdout keeps only results (JSON, tables) without importing DeepSpeed."""
    logger = logging.getLogger(name)
    if getattr(logger, "_smpo_stderr", False):
        return
    add = logger.addHandler

    def add_on_stderr(handler: logging.Handler) -> None:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
        add(handler)

    logger.addHandler = add_on_stderr  # type: ignore[method-assign]
    logger._smpo_stderr = True  # type: ignore[attr-defined]
    for handler in logger.handlers:  # already imported
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def print_error(message: str, hint: str | None = None, *, debug_tip: bool = True) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {hint}", markup=True, highlight=False)
    if debug_tip and not debug_enabled():
        err.print("[dim](set SMPO_DEBUG=1 for the full traceback)[/]", markup=True)


def print_traceback() -> None:
    sys.stderr.write(traceback.format_exc())
