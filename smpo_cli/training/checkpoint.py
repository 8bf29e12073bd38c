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

from smpo_cli.errors import AssetNotFoundError, UsageError
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
        # an optimiser, or its state already gathered (FSDP: the full state, keyed by parameter name)
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


# recipe keys a resumed run may change: they do not alter what the steps already taken computed
# (train.max_steps extends or shortens the run; with a linear/cosine schedule the rest of it stretches).
# batch_size and grad_accum_steps may change as long as the pairs per optimiser step stay the same (checked
# by batching.plan_batches), e.g. to resume on another number of processes.
RESUME_SAFE = ("output_dir", "device", "train.max_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
               "train.resume", "train.max_nonfinite_steps", "train.batch_size", "train.grad_accum_steps", "train.sharding",
               "data.num_workers", "logging.")  # fmt: skip


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_settings(recipe) -> dict[str, Any]:
    """The recipe's keys a checkpoint records and a resume must match (everything but ``RESUME_SAFE``)."""
    return {k: v for k, v in _flat(recipe.model_dump(mode="json")).items() if not _resume_safe(k)}


def _resume_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE)


def check_resume_settings(saved: dict[str, Any] | None, recipe, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint with other settings (method, lr, data, ...): the result would be neither run."""
    if saved is None:  # a checkpoint written before smpo recorded its settings
        return
    now = resume_settings(recipe)
    saved = {k: v for k, v in saved.items() if not _resume_safe(k)}  # keys made resume-safe after it was written
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise UsageError(
            f"train.resume: {checkpoint} was made with other settings: {shown}{more}",
            hint="resume with the settings it was made with (only train.max_steps, checkpointing, logging, "
            "data.num_workers, device, train.sharding and the batch split (same pairs per step) may change), or start afresh: "
            "--overwrite or another output_dir",
        )


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
