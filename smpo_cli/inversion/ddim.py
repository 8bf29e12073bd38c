"""Batched DDIM inversion to per-sample timesteps, and DDIM sampling back along the same levels.

Each sample ``b`` of a batch of clean latents ``x0`` is inverted to its own timestep ``t[b]``
along :func:`~smpo_cli.inversion.schedule.inversion_path`: the grid levels below ``t[b]``, then
a final partial step that lands exactly on ``t[b]`` (``mode="exact"``). At step ``j`` every
sample whose path has a ``j``-th step goes through the UNet in one call (its own source level,
target level and timestep label); samples whose path is finished cost nothing.

The noise estimate of the step ``s -> u`` is the UNet at the source latent ``x_s`` with the
timestep label of ``first_prediction``: ``"source"`` (``s``; method.md's ``e_0 = eps(x_s, s)``;
the clean level is labelled 0) or ``"target"`` (``u``; what diffusers' ``DDIMInverseScheduler``
loops and null-text inversion do). v-prediction outputs are turned into noise estimates with the
``abar`` of the level the latent is at.

Everything runs under ``torch.no_grad()``; the latents and the update are float32 whatever the
UNet dtype (the UNet input is cast to the UNet dtype, its output back to float32).
ReNoise (``renoise.py``) builds on the same engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from smpo_cli.errors import UsageError
from smpo_cli.inversion.schedule import (
    CLEAN,
    NoiseSchedule,
    as_schedule,
    check_grid,
    ddim_step,
    eps_from_model_output,
    implied_noise,
    inverse_ddim_step,
    inversion_grid,
    inversion_path,
)
from smpo_cli.models.conditioning import Conditioning

FIRST_PREDICTIONS = ("source", "target")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """The levels one sample visited (``levels[0]`` is :data:`CLEAN` for an inversion) and its
    latent at each of them (``latents[i]`` at ``levels[i]``; float32)."""

    levels: list[int]
    latents: torch.Tensor


@dataclass
class InversionResult:
    """Inverted latents of a batch.

    ``latents`` (float32, ``(B, C, H, W)``) lie at ``timesteps`` (``(B,)``, long; equal to the
    asked ``t`` except in ``mode="below"``, where it is the last grid level below ``t``, or
    :data:`CLEAN` = -1, and in the official loop, :mod:`smpo_cli.inversion.official`).
    ``abar`` (float64, CPU) is ``abar`` at ``timesteps``.
    ``unet_calls`` counts UNet forward calls, ``unet_rows`` the latents they processed in all
    (classifier-free guidance and ReNoise's regularisation reference add rows, not calls), and
    ``nfe[b]`` the noise estimates sample ``b`` needed. ``trajectory`` holds one
    :class:`Trajectory` per sample when asked for.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    abar: torch.Tensor
    unet_calls: int = 0
    unet_rows: int = 0
    nfe: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    trajectory: list[Trajectory] | None = None

    def implied_noise(self, x0: torch.Tensor) -> torch.Tensor:
        """``tau = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` per sample (method.md 3)."""
        return implied_noise(self.latents, x0.to(self.latents.device), self.abar)


@dataclass
class SampleResult:
    """Latents denoised to the clean level by :func:`ddim_sample` (float32)."""

    latents: torch.Tensor
    unet_calls: int = 0
    unet_rows: int = 0
    nfe: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    trajectory: list[Trajectory] | None = None


# --------------------------------------------------------------------------------------------
# UNet evaluation
# --------------------------------------------------------------------------------------------


def _dtype_device(unet: Any) -> tuple[torch.dtype, torch.device | None]:
    """The UNet's dtype and device (from its first parameter when it is wrapped, e.g. by DDP)."""
    dtype, device = getattr(unet, "dtype", None), getattr(unet, "device", None)
    if isinstance(dtype, torch.dtype) and isinstance(device, torch.device):
        return dtype, device
    try:
        param = next(unet.parameters())
    except (AttributeError, StopIteration):
        return torch.float32, None
    return param.dtype, param.device


class NoisePredictor:
    """Noise estimates of a UNet for a sub-batch, with optional classifier-free guidance.

    ``predict(x, labels, abar, idx)``: ``x`` float32 latents of the samples ``idx`` of the
    batch, UNet timestep ``labels`` (long, per sample) and ``abar`` of the level each latent is
    at (for v-prediction). Extra rows (``extra``) go through the same UNet call.
    """

    def __init__(
        self,
        unet: Any,
        cond: Conditioning,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        guidance_scale: float | None = None,
        uncond: Conditioning | None = None,
    ) -> None:
        self.unet = unet
        self.dtype, self.device = _dtype_device(unet)
        self.schedule = schedule
        self.cond = cond.expand(batch_size).to(device=self.device, dtype=self.dtype)
        if guidance_scale is not None and uncond is None:
            raise UsageError(
                "guidance_scale needs an unconditional Conditioning (uncond=)",
                hint="encode_prompts(components, [''] * B), or leave guidance_scale=None (SmPO's default)",
            )
        self.guidance_scale = guidance_scale
        self.uncond = (
            None
            if guidance_scale is None
            else uncond.expand(batch_size).to(device=self.device, dtype=self.dtype)
        )
        self.calls = 0
        self.rows = 0

    def predict(
        self, x: torch.Tensor, labels: torch.Tensor, abar: torch.Tensor, idx: torch.Tensor | None
    ) -> torch.Tensor:
        return self.predict_many([(x, labels, abar, idx)])[0]

    def predict_many(
        self, groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    ) -> list[torch.Tensor]:
        """Several ``(x, labels, abar, idx)`` groups in one UNet call; one noise estimate per group."""
        xs, ts, conds, sizes = [], [], [], []
        for x, labels, _, idx in groups:
            cond = self.cond if idx is None else self.cond.index(idx)
            xs.append(x)
            ts.append(labels)
            conds.append(cond)
            sizes.append(x.shape[0])
        x_all = torch.cat(xs)
        t_all = torch.cat(ts)
        cond_all = conds[0]
        for c in conds[1:]:
            cond_all = cond_all.cat(c)
        if self.uncond is not None:
            uncond_all = None
            for _, _, _, idx in groups:
                u = self.uncond if idx is None else self.uncond.index(idx)
                uncond_all = u if uncond_all is None else uncond_all.cat(u)
            x_all = torch.cat([x_all, x_all])
            t_all = torch.cat([t_all, t_all])
            cond_all = uncond_all.cat(cond_all)
        out = self.unet(
            x_all.to(self.dtype), t_all.to(x_all.device), **cond_all.unet_kwargs(), return_dict=False
        )[0].float()
        self.calls += 1
        self.rows += int(x_all.shape[0])
        if self.uncond is not None:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        results = []
        for (x, _, abar, _), part in zip(groups, out.split(sizes), strict=True):
            results.append(eps_from_model_output(part, x, abar, self.schedule.prediction_type))
        return results


# --------------------------------------------------------------------------------------------
# Shared validation and path bookkeeping
# --------------------------------------------------------------------------------------------


def _resolve_grid(schedule: NoiseSchedule, num_steps: int, grid: Sequence[int] | None) -> list[int]:
    if grid is not None:
        return check_grid(grid, schedule.num_train_timesteps)
    return inversion_grid(num_steps, schedule.num_train_timesteps)


def _as_levels(
    t: torch.Tensor | int | Sequence[int], batch: int, total: int, *, allow_clean: bool
) -> list[int]:
    levels = torch.as_tensor(t).detach().to("cpu", torch.long).reshape(-1)
    if levels.numel() == 1 and batch > 1:
        levels = levels.expand(batch)
    if levels.numel() != batch:
        raise UsageError(
            f"t has {levels.numel()} values for a batch of {batch}", hint="give one t per sample"
        )
    low = CLEAN if allow_clean else 0
    if bool(((levels < low) | (levels >= total)).any()):
        raise UsageError(f"timesteps must lie in [{low}, {total}); got {levels.tolist()}")
    return levels.tolist()


def _check_latents(x: torch.Tensor, cond: Conditioning) -> None:
    if x.ndim != 4 or x.shape[0] == 0:
        raise UsageError(f"latents must be (B, C, H, W) with B >= 1, got shape {tuple(x.shape)}")
    if len(cond) not in (1, x.shape[0]):
        raise UsageError(f"conditioning has batch {len(cond)} for {x.shape[0]} latents")


@dataclass
class _Step:
    """The samples that take step ``j`` and their source / target levels."""

    idx: torch.Tensor  # on the latents' device
    rows: list[int]  # same, as Python ints
    src: list[int]
    dst: list[int]
    abar_src: torch.Tensor  # float64 CPU
    abar_dst: torch.Tensor
    full: bool  # idx covers the whole batch, in order

    def labels(self, which: str, device) -> torch.Tensor:
        levels = self.src if which == "source" else self.dst
        return torch.tensor([max(v, 0) for v in levels], dtype=torch.long, device=device)


def _steps(paths: list[list[int]], schedule: NoiseSchedule, device) -> list[_Step]:
    """Step ``j`` (0-based) of every path that has one: sub-batches of the active samples."""
    out = []
    batch = len(paths)
    for j in range(max(len(p) for p in paths) - 1):
        rows = [b for b, p in enumerate(paths) if len(p) > j + 1]
        src = [paths[b][j] for b in rows]
        dst = [paths[b][j + 1] for b in rows]
        out.append(
            _Step(
                idx=torch.tensor(rows, dtype=torch.long, device=device),
                rows=rows,
                src=src,
                dst=dst,
                abar_src=schedule.abar(src),
                abar_dst=schedule.abar(dst),
                full=len(rows) == batch,
            )
        )
    return out


class _Recorder:
    def __init__(self, x: torch.Tensor, paths: list[list[int]], enabled: bool) -> None:
        self.enabled = enabled
        self.paths = paths
        self.frames: list[list[torch.Tensor]] = (
            [[x[b].detach().clone()] for b in range(len(paths))] if enabled else []
        )

    def record(self, step: _Step, x_sub: torch.Tensor) -> None:
        if self.enabled:
            for k, b in enumerate(step.rows):
                self.frames[b].append(x_sub[k].detach().clone())

    def result(self) -> list[Trajectory] | None:
        if not self.enabled:
            return None
        return [Trajectory(list(p), torch.stack(f)) for p, f in zip(self.paths, self.frames, strict=True)]


StepFn = Callable[[NoisePredictor, _Step, torch.Tensor, torch.Tensor], torch.Tensor]


def _run_inversion(
    unet: Any,
    x0: torch.Tensor,
    cond: Conditioning,
    t: Any,
    *,
    schedule: Any,
    num_steps: int,
    grid: Sequence[int] | None,
    mode: str,
    guidance_scale: float | None,
    uncond: Conditioning | None,
    return_trajectory: bool,
    step_fn: StepFn,
    estimates_per_step: int,
) -> InversionResult:
    """The loop both inversions share; ``step_fn(predictor, step, x_s, x0_sub) -> x_u``."""
    _check_latents(x0, cond)
    sched = as_schedule(schedule)
    levels = _resolve_grid(sched, num_steps, grid)
    batch = x0.shape[0]
    targets = _as_levels(t, batch, sched.num_train_timesteps, allow_clean=False)
    paths = [inversion_path(tb, levels, mode) for tb in targets]
    x0f = x0.detach().float()
    with torch.no_grad():
        predictor = NoisePredictor(unet, cond, sched, batch, guidance_scale=guidance_scale, uncond=uncond)
        x = x0f.clone()
        recorder = _Recorder(x, paths, return_trajectory)
        for step in _steps(paths, sched, x.device):
            x_s = x if step.full else x.index_select(0, step.idx)
            x0_sub = x0f if step.full else x0f.index_select(0, step.idx)
            x_u = step_fn(predictor, step, x_s, x0_sub)
            recorder.record(step, x_u)
            if step.full:
                x = x_u
            else:
                x = x.index_copy(0, step.idx, x_u)
    reached = torch.tensor([p[-1] for p in paths], dtype=torch.long)
    nfe = torch.tensor([(len(p) - 1) * estimates_per_step for p in paths], dtype=torch.long)
    return InversionResult(
        latents=x,
        timesteps=reached.to(x.device),
        abar=sched.abar(reached),
        unet_calls=predictor.calls,
        unet_rows=predictor.rows,
        nfe=nfe,
        trajectory=recorder.result(),
    )


def _check_first_prediction(first_prediction: str) -> None:
    if first_prediction not in FIRST_PREDICTIONS:
        raise UsageError(
            f"unknown first_prediction {first_prediction!r}",
            hint=f"use one of {', '.join(FIRST_PREDICTIONS)}",
        )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def ddim_invert(
    unet: Any,
    x0: torch.Tensor,
    cond: Conditioning,
    t: torch.Tensor | int | Sequence[int],
    *,
    schedule: Any,
    num_steps: int = 5,
    grid: Sequence[int] | None = None,
    mode: str = "exact",
    first_prediction: str = "source",
    guidance_scale: float | None = None,
    uncond: Conditioning | None = None,
    return_trajectory: bool = False,
) -> InversionResult:
    """Plain DDIM inversion of clean latents ``x0`` ``(B, C, H, W)`` to per-sample timesteps ``t``.

    ``schedule``: a :class:`~smpo_cli.inversion.schedule.NoiseSchedule`, a diffusers scheduler or
    its config (gives ``abar`` and the prediction type: ``epsilon`` or ``v_prediction``).
    ``num_steps``: grid size (:func:`~smpo_cli.inversion.schedule.inversion_grid`, trailing
    spacing); ``grid`` replaces the grid by explicit increasing levels. ``mode``: ``"exact"``
    (land exactly on ``t``), ``"grid"`` (``t`` must be a grid level) or ``"below"`` (stop at
    the last grid level below ``t``). ``first_prediction``: UNet
    timestep label of the noise estimate, ``"source"`` or ``"target"``. ``guidance_scale``
    with ``uncond``: classifier-free guidance (default: none, as SmPO).

    One UNet call per step; sample ``b`` needs ``len(path_b) - 1`` estimates, i.e. the number of
    grid levels below ``t[b]`` plus one (exact mode). Calls: the longest path's step count.
    """
    _check_first_prediction(first_prediction)

    def step_fn(
        predictor: NoisePredictor, step: _Step, x_s: torch.Tensor, x0_sub: torch.Tensor
    ) -> torch.Tensor:
        labels = step.labels(first_prediction, x_s.device)
        eps = predictor.predict(x_s, labels, step.abar_src, None if step.full else step.idx)
        return inverse_ddim_step(x_s, eps, step.abar_src, step.abar_dst)

    return _run_inversion(
        unet,
        x0,
        cond,
        t,
        schedule=schedule,
        num_steps=num_steps,
        grid=grid,
        mode=mode,
        guidance_scale=guidance_scale,
        uncond=uncond,
        return_trajectory=return_trajectory,
        step_fn=step_fn,
        estimates_per_step=1,
    )


def ddim_sample(
    unet: Any,
    x_t: torch.Tensor,
    cond: Conditioning,
    t: torch.Tensor | int | Sequence[int],
    *,
    schedule: Any,
    num_steps: int = 5,
    grid: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    uncond: Conditioning | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Deterministic DDIM sampling (eta = 0) of latents ``x_t`` at per-sample levels ``t`` back to
    the clean level, along the levels an inversion to ``t`` visits, in reverse: ``t``, the grid
    levels below it, clean. ``t`` may be an :class:`InversionResult`'s ``timesteps`` (-1 = already
    clean: no step). Each step ``u -> s`` uses the UNet at ``(x_u, u)``.
    """
    _check_latents(x_t, cond)
    sched = as_schedule(schedule)
    levels = _resolve_grid(sched, num_steps, grid)
    batch = x_t.shape[0]
    starts = _as_levels(t, batch, sched.num_train_timesteps, allow_clean=True)
    paths = [
        list(reversed(inversion_path(tb, levels, "below" if tb == CLEAN else "exact"))) for tb in starts
    ]
    with torch.no_grad():
        predictor = NoisePredictor(unet, cond, sched, batch, guidance_scale=guidance_scale, uncond=uncond)
        x = x_t.detach().float().clone()
        recorder = _Recorder(x, paths, return_trajectory)
        for step in _steps(paths, sched, x.device):
            x_u = x if step.full else x.index_select(0, step.idx)
            labels = step.labels("source", x.device)
            eps = predictor.predict(x_u, labels, step.abar_src, None if step.full else step.idx)
            x_s = ddim_step(x_u, eps, step.abar_src, step.abar_dst)
            recorder.record(step, x_s)
            x = x_s if step.full else x.index_copy(0, step.idx, x_s)
    nfe = torch.tensor([len(p) - 1 for p in paths], dtype=torch.long)
    return SampleResult(
        latents=x, unet_calls=predictor.calls, unet_rows=predictor.rows, nfe=nfe, trajectory=recorder.result()
    )
