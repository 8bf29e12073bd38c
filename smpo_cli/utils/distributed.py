"""Process-group facts for runs under ``accelerate launch`` / ``torchrun`` (one process: no-ops)."""

from __future__ import annotations

import os

from smpo_cli.utils.logging import process_rank


def world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else 1


def is_main_process() -> bool:
    return process_rank() == 0


def partial_state():
    """accelerate's ``PartialState``; on a machine without CUDA under torchrun, its multi-CPU (gloo) group.

    Without ``cpu=True`` accelerate leaves CPU-only torchrun processes unaware of each other (distributed type NO,
    one process each), so every rank would do all the work and barriers would not wait.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=world_size() > 1 and not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every process (initialises accelerate's process group on first use)."""
    if world_size() > 1:
        partial_state().wait_for_everyone()


def stage_device(state, requested: str) -> str:
    """The device of this process: accelerate's under a launcher or for ``auto``, else the one asked for."""
    if state.distributed_type.value != "NO" or requested == "auto":
        return str(state.device)
    return requested
