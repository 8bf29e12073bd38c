"""Resumable training checkpoints, written atomically (a killed run never leaves half a checkpoint).

``checkpoints/step-000050/``: ``trainable.safetensors`` (the full UNet or the LoRA weights),
``optimizer.pt`` and ``scheduler.pt`` (loaded with ``weights_only=True``), ``state.json`` (step,
micro-batches consumed, skipped counts). Data order and per-step randomness are functions of the
seed and the position, so these are all a resumed run needs to continue exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from smpo_cli.errors import AssetNotFoundError
from smpo_cli.utils.atomic import atomic_path

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def save_checkpoint(output_dir, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict[str, Any], keep: int) -> Path:  # fmt: skip
    from safetensors.torch import save_file

    dest = checkpoint_dir(output_dir, step)
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def resolve_resume(output_dir, resume: str | None) -> Path | None:
    """null: fresh; auto: the newest checkpoint in output_dir (fresh if none); else a checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise AssetNotFoundError(f"train.resume={resume}: not a checkpoint folder (no state.json)",
                                 hint=f"use train.resume=auto or a folder under {Path(output_dir) / CHECKPOINTS}")  # fmt: skip
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
        "state": json.loads((path / "state.json").read_text()),
    }
