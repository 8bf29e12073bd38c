"""How a global batch (pairs per optimiser step) is split into processes, micro-batches and accumulation.

The global batch, the data order and each pair's randomness do not depend on the split, so a run
checkpointed on W processes continues the same optimiser steps on W' processes: gradient accumulation
takes up the difference (``pairs = batch_size x grad_accum_steps x processes``).
"""

from __future__ import annotations

from dataclasses import dataclass

from smpo_cli.errors import UsageError


@dataclass(frozen=True)
class BatchSplit:
    pairs_per_step: int  # the global batch
    batch_size: int  # pairs per process per micro-batch
    grad_accum_steps: int
    processes: int


def split_global_batch(pairs_per_step: int, batch_size: int, processes: int, why: str) -> BatchSplit:
    """The accumulation that makes ``pairs_per_step`` from ``batch_size`` on ``processes``, or a usage error
    that names the nearest settings that work. ``why`` says where ``pairs_per_step`` comes from."""
    per_micro = batch_size * processes
    if pairs_per_step % per_micro == 0:
        return BatchSplit(pairs_per_step, batch_size, pairs_per_step // per_micro, processes)
    if pairs_per_step % processes == 0:
        per_process = pairs_per_step // processes
        sizes = [b for b in range(1, per_process + 1) if per_process % b == 0]
        near = sorted(sizes, key=lambda b: (abs(b - batch_size), -b))[:2]
        options = " or ".join(f"train.batch_size={b} (grad_accum {per_process // b})" for b in sorted(near))
        hint = f"on {processes} processes use {options}"
    else:
        counts = [n for n in range(1, pairs_per_step + 1) if pairs_per_step % (n * batch_size) == 0]
        near = sorted(counts, key=lambda n: (abs(n - processes), -n))[:2]
        hint = (f"{pairs_per_step} pairs do not divide into {processes} processes; with train.batch_size="
                f"{batch_size} use {' or '.join(str(n) for n in sorted(near))} processes" if near else
                f"choose a number of processes that divides {pairs_per_step}")  # fmt: skip
    raise UsageError(
        f"{why}: {pairs_per_step} pairs per optimiser step cannot be split into {processes} processes x "
        f"train.batch_size={batch_size} x an integer number of accumulation steps",
        hint=hint,
    )


def plan_batches(recipe, processes: int, saved: dict | None) -> BatchSplit:
    """The split this run uses: ``train.global_batch_size`` if set; on a resume, the checkpoint's pairs per step
    (accumulation adjusts when the number of processes changed); else batch_size x grad_accum_steps x processes."""
    t = recipe.train
    if t.global_batch_size is not None:
        split = split_global_batch(t.global_batch_size, t.batch_size, processes, "train.global_batch_size")
    elif saved and saved.get("pairs_per_step") and saved.get("processes") not in (None, processes):
        split = split_global_batch(int(saved["pairs_per_step"]), t.batch_size, processes,
                                   f"resuming a checkpoint made on {saved['processes']} processes")  # fmt: skip
    else:
        split = BatchSplit(t.batch_size * t.grad_accum_steps * processes, t.batch_size, t.grad_accum_steps, processes)
    if saved and saved.get("pairs_per_step") not in (None, split.pairs_per_step):
        raise UsageError(
            f"train.resume: the checkpoint took {saved['pairs_per_step']} pairs per optimiser step, these settings "
            f"take {split.pairs_per_step} (batch_size {split.batch_size} x grad_accum {split.grad_accum_steps} x "
            f"{processes} processes)",
            hint=f"resume with settings that make {saved['pairs_per_step']} pairs per step, or start afresh",
        )
    return split
