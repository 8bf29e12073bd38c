"""The official SmPO inversion loop, reproduced for ablations (``inversion.timestep_mode=official``).

The authors' ``train.py`` inverts each clean latent with diffusers' ``DDIMInverseScheduler`` built from
the model's scheduler config and ``set_timesteps(n)`` (n = 5 for SD1.5, 10 for SDXL)::

    times = inverse_scheduler.timesteps[inverse_scheduler.timesteps < t]
    for tk in times:
        e0 = unet(x, tk);  x1 = step(e0, tk, x)
        e1 = unet(x1, tk); x = step((e0 + e1) / 2, tk, x)
    tau = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)          # abar at t, and the UNet is then told t

What ``timesteps`` and ``step`` mean depends on the diffusers version (method.md section 4). Both are
reproduced here, as two named modes:

* ``official`` -- diffusers 0.20.0, which the authors pin (and 0.21): ``set_timesteps`` rolls the grid
  (leading spacing, steps_offset 1, 5 steps: 1, 201, 401, 601, 801 -> -199, 1, 201, 401, 601) and
  ``step(tk)`` goes from level ``tk`` to ``tk + T // n``, the first one from ``initial_alpha_cumprod``
  (``alphas_cumprod[0]`` = 0.99915 for SD1.5, whose config has ``set_alpha_to_one: false``). Inversion stops
  at the grid level at or above ``t`` (201 for t = 200, 801 for every t > 601); both predictions of a step
  are labelled ``tk`` (-199 on the first).
* ``official_0_22`` -- diffusers >= 0.22 (checked on 0.42): no roll, ``step(tk)`` goes from
  ``tk - T // n`` to ``tk``, so inversion stops at the last grid level *below* ``t``; predictions labelled
  ``tk``, the step's target.

The scheduler settings are read as ``DDIMInverseScheduler.from_pretrained`` reads the model's
``scheduler_config.json``: keys the file does not set take ``DDIMInverseScheduler``'s defaults
(``set_alpha_to_one`` true, ``steps_offset`` 0, ``clip_sample`` true, leading spacing), so a config
without ``clip_sample: false`` clips the predicted x0 to [-1, 1] as the official code would.

Departures kept on purpose: each sample inverts to its own t (the official code uses the first pair's t
for the whole micro-batch), and the arithmetic runs in float32 with float64 coefficients (the official
code casts the alphas to the training dtype). ``renoise_iterations`` / ``average_window`` generalise the
official 1 / 2 the same way :func:`~smpo_cli.inversion.renoise.renoise_invert` does, every prediction of a
step labelled ``tk``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from smpo_cli.errors import UsageError
from smpo_cli.inversion.ddim import InversionResult, NoisePredictor, _as_levels, _check_latents
from smpo_cli.inversion.schedule import CLEAN, NoiseSchedule, _bcast, _f, _wide, as_schedule
from smpo_cli.models.conditioning import Conditioning

OFFICIAL_MODES = {"official": "0.20", "official_0_22": "0.22"}
"""``inversion.timestep_mode`` value -> the diffusers semantics it reproduces."""

INITIAL = -1
"""Source level of a step that starts from ``initial_alpha_cumprod`` (the scheduler's clean level)."""


@dataclass(frozen=True)
class InverseSchedulerConfig:
    """The ``DDIMInverseScheduler`` settings the official code gets from a model's scheduler config."""

    num_train_timesteps: int = 1000
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler_or_config: Any) -> InverseSchedulerConfig:
        """From a loaded diffusers scheduler (any class) or a config dict, as ``from_pretrained`` on its file.

        A key counts as set only when the file set it: current diffusers fills absent keys with the loaded
        class's defaults and lists them in ``_use_default_values``; those get ``DDIMInverseScheduler``'s.
        """
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise UsageError(f"cannot read a scheduler config from {type(scheduler_or_config).__name__}")
        defaulted = set(config.get("_use_default_values") or ())
        given = {k: v for k, v in config.items() if k not in defaulted and v is not None}
        default = cls()
        return cls(
            num_train_timesteps=int(given.get("num_train_timesteps", default.num_train_timesteps)),
            steps_offset=int(given.get("steps_offset", default.steps_offset)),
            set_alpha_to_one=bool(given.get("set_alpha_to_one", default.set_alpha_to_one)),
            timestep_spacing=str(given.get("timestep_spacing", default.timestep_spacing)),
            clip_sample=bool(given.get("clip_sample", default.clip_sample)),
            clip_sample_range=float(given.get("clip_sample_range", default.clip_sample_range)),
            prediction_type=str(given.get("prediction_type", default.prediction_type)),
        )


@dataclass(frozen=True)
class OfficialStep:
    """One ``inverse_scheduler.step(output, label, x)``: level ``src`` (or :data:`INITIAL`) to level ``dst``."""

    label: int  # the timestep the UNet is given for both predictions of the step
    src: int
    dst: int


def official_timesteps(config: InverseSchedulerConfig, num_steps: int, semantics: str = "0.20") -> list[int]:
    """``DDIMInverseScheduler.set_timesteps(num_steps).timesteps`` under diffusers ``semantics``."""
    n, total = int(num_steps), config.num_train_timesteps
    if n < 1 or n > total:
        raise UsageError(f"inversion.num_steps must be in [1, {total}], got {num_steps}")
    if semantics not in ("0.20", "0.22"):
        raise UsageError(f"unknown official semantics {semantics!r}", hint="0.20 or 0.22")
    if config.timestep_spacing == "leading":  # the scheduler's own numpy expressions
        ratio: float = total // n
        steps = (np.arange(0, n) * ratio).round().astype(np.int64) + config.steps_offset
    elif config.timestep_spacing == "trailing":
        ratio = total / n
        steps = np.round(np.arange(total, 0, -ratio)[::-1]).astype(np.int64) - 1
    else:
        raise UsageError(
            f"the official inversion needs leading or trailing timestep spacing; the scheduler config says "
            f"{config.timestep_spacing!r} (DDIMInverseScheduler refuses it)",
        )
    if semantics == "0.20":
        steps = np.roll(steps, 1)
        steps[0] = int(steps[1] - ratio)
    return [int(v) for v in steps]


def official_steps(config: InverseSchedulerConfig, num_steps: int, semantics: str = "0.20") -> list[OfficialStep]:
    """The steps of a full official inversion, in order; an inversion to t runs those with ``label < t``."""
    total, jump = config.num_train_timesteps, config.num_train_timesteps // int(num_steps)
    out = []
    for tk in official_timesteps(config, num_steps, semantics):
        if semantics == "0.20":
            src, dst = tk, tk + jump
        else:
            src, dst = min(tk - jump, total - 1), tk
        if not 0 <= dst < total:
            raise UsageError(f"the official inversion steps to level {dst}, outside [0, {total})")
        out.append(OfficialStep(label=tk, src=src if src >= 0 else INITIAL, dst=dst))
    return out


def _step(
    output: torch.Tensor, x: torch.Tensor, abar_src: torch.Tensor, abar_dst: torch.Tensor, config: InverseSchedulerConfig
) -> torch.Tensor:
    """``DDIMInverseScheduler.step(output, tk, x).prev_sample`` (eta 0) with per-sample abar."""
    a_src, a_dst = _wide(abar_src, x.device), _wide(abar_dst, x.device)
    root_src, root_src_1m = _bcast(a_src.sqrt(), x), _bcast((1 - a_src).sqrt(), x)
    x, output = _f(x), _f(output)
    kind = config.prediction_type
    if kind == "epsilon":
        x0_hat, eps = (x - root_src_1m * output) / root_src, output
    elif kind == "v_prediction":
        x0_hat, eps = root_src * x - root_src_1m * output, root_src * output + root_src_1m * x
    elif kind == "sample":
        x0_hat, eps = output, (x - root_src * output) / root_src_1m
    else:
        raise UsageError(f"unsupported prediction_type {kind!r} for the official inversion")
    if config.clip_sample:
        x0_hat = x0_hat.clamp(-config.clip_sample_range, config.clip_sample_range)
    return _bcast(a_dst.sqrt(), x) * x0_hat + _bcast((1 - a_dst).sqrt(), x) * eps


def official_invert(
    unet: Any,
    x0: torch.Tensor,
    cond: Conditioning,
    t: torch.Tensor | int | Sequence[int],
    *,
    schedule: Any,
    config: InverseSchedulerConfig,
    num_steps: int,
    semantics: str = "0.20",
    renoise_iterations: int = 1,
    average_window: int = 2,
) -> InversionResult:
    """The official loop on clean latents ``x0`` ``(B, C, H, W)``, each sample to its own ``t`` (no guidance).

    ``schedule`` gives ``abar`` (:class:`~smpo_cli.inversion.schedule.NoiseSchedule` or a diffusers
    scheduler); ``config`` the inverse scheduler's settings (:meth:`InverseSchedulerConfig.from_scheduler`).
    The result's ``timesteps`` are the levels reached (:data:`~smpo_cli.inversion.schedule.CLEAN` when no
    step ran), *not* ``t``: the regression target of the official code is ``implied_noise`` with ``abar``
    at ``t``. UNet calls per step: ``1 + renoise_iterations``.
    """
    _check_latents(x0, cond)
    k_iters, window = int(renoise_iterations), int(average_window)
    if k_iters < 0 or window < 1:
        raise UsageError("renoise_iterations must be >= 0 and average_window >= 1")
    window = min(window, k_iters + 1)
    sched = as_schedule(schedule)
    if sched.num_train_timesteps != config.num_train_timesteps:
        raise UsageError(
            f"the noise schedule has {sched.num_train_timesteps} levels, the scheduler config "
            f"{config.num_train_timesteps}"
        )
    steps = official_steps(config, num_steps, semantics)
    batch = x0.shape[0]
    targets = _as_levels(t, batch, sched.num_train_timesteps, allow_clean=False)
    counts = [sum(1 for s in steps if s.label < tb) for tb in targets]  # steps are in increasing label order
    initial = 1.0 if config.set_alpha_to_one else float(sched.abar(0))
    # raw model outputs (v, x0 or eps): the scheduler's step converts them, after the average
    predictor = NoisePredictor(unet, cond, NoiseSchedule(sched.alphas_cumprod, "epsilon"), batch)
    x0f = x0.detach().float()
    x = x0f.clone()
    with torch.no_grad():
        for j, st in enumerate(steps):
            rows = [b for b in range(batch) if counts[b] > j]
            if not rows:
                break
            full = len(rows) == batch
            idx = torch.tensor(rows, dtype=torch.long, device=x.device)
            sub = None if full else idx
            x_s = x if full else x.index_select(0, idx)
            labels = torch.full((len(rows),), st.label, dtype=torch.long, device=x.device)
            abar_src = torch.full((len(rows),), initial if st.src == INITIAL else float(sched.abar(st.src)),
                                  dtype=torch.float64)  # fmt: skip
            abar_dst = sched.abar([st.dst] * len(rows))
            outputs = [predictor.predict(x_s, labels, abar_src, sub)]
            x_u = _step(outputs[0], x_s, abar_src, abar_dst, config)
            for _ in range(k_iters):
                outputs.append(predictor.predict(x_u, labels, abar_src, sub))
                x_u = _step(outputs[-1], x_s, abar_src, abar_dst, config)
            if window > 1:
                x_u = _step(torch.stack(outputs[-window:]).mean(dim=0), x_s, abar_src, abar_dst, config)
            x = x_u if full else x.index_copy(0, idx, x_u)
    reached = torch.tensor([steps[c - 1].dst if c else CLEAN for c in counts], dtype=torch.long)
    return InversionResult(
        latents=x,
        timesteps=reached.to(x.device),
        abar=sched.abar(reached),
        unet_calls=predictor.calls,
        unet_rows=predictor.rows,
        nfe=torch.tensor([c * (1 + k_iters) for c in counts], dtype=torch.long),
    )
