"""Process-group facts for runs under ``accelerate launch`` / ``torchrun`` (one process: no-ops)."""

from __future__ import annotations

import os

from smpo_cli.utils.logging import process_rank


def world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else 1


def is_main_process() -> bool:
    return process_rank() == 0


def barrier() -> None:
    """Wait for every process (initialises accelerate's process group on first use)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def stage_device(state, requested: str) -> str:
    """The device of this process: accelerate's under a launcher or for ``auto``, else the one asked for."""
    if state.distributed_type.value != "NO" or requested == "auto":
        return str(state.device)
    return requested
