"""What the command line asks of the memory plan, handed to ``smpo_cli.config.plan.plan_lines`` through a
context variable: ``smpo train`` sets it around its dry run, ``smpo recipe validate`` sets none."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryRequest:
    """What the command line asks of the plan: a budget in GiB and an accelerate config file."""

    gpu_memory_gib: float | None = None
    accelerate_config: str | None = None


_REQUEST: contextvars.ContextVar[MemoryRequest | None] = contextvars.ContextVar(
    "smpo_memory_request", default=None
)


@contextlib.contextmanager
def requested(request: MemoryRequest) -> Iterator[MemoryRequest]:
    """Within this block ``smpo_cli.config.plan.plan_lines`` adds the memory plan of train recipes."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def current_request() -> MemoryRequest | None:
    return _REQUEST.get()
