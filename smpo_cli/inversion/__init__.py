"""Batched DDIM and ReNoise inversion of clean latents to per-sample timesteps (method.md section 3).

Public API (imported lazily, so ``import smpo_cli.inversion`` does not import torch)::

    from smpo_cli.inversion import NoiseSchedule, ddim_invert, renoise_invert, ddim_sample
    from smpo_cli.models.conditioning import encode_prompts

    schedule = NoiseSchedule.from_scheduler(components.scheduler)
    cond = encode_prompts(components, prompts)
    res = renoise_invert(components.unet, x0, cond, t, schedule=schedule, num_steps=5)
    tau = res.implied_noise(x0)            # the SmPO regression target at res.timesteps (== t)

Modules: ``schedule`` (all abar / grid / step arithmetic), ``ddim`` (plain DDIM inversion, the
shared batched engine, ``ddim_sample``), ``renoise`` (ReNoise with optional noise regularisation),
``official`` (the official SmPO loop under diffusers 0.20.0 or >= 0.22 semantics, for ablations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smpo_cli.inversion.ddim import InversionResult, SampleResult, Trajectory, ddim_invert, ddim_sample
    from smpo_cli.inversion.official import InverseSchedulerConfig, official_invert
    from smpo_cli.inversion.renoise import NoiseRegularization, regularize_noise, renoise_invert
    from smpo_cli.inversion.schedule import (
        CLEAN,
        NoiseSchedule,
        alphas_cumprod,
        ddim_step,
        eps_from_model_output,
        forward_noise,
        implied_noise,
        inverse_ddim_step,
        inversion_grid,
        inversion_path,
    )

_LAZY = {
    "ddim": ("InversionResult", "SampleResult", "Trajectory", "ddim_invert", "ddim_sample"),
    "renoise": ("NoiseRegularization", "regularize_noise", "renoise_invert"),
    "official": ("InverseSchedulerConfig", "official_invert"),
    "schedule": (
        "CLEAN",
        "NoiseSchedule",
        "alphas_cumprod",
        "ddim_step",
        "eps_from_model_output",
        "forward_noise",
        "implied_noise",
        "inverse_ddim_step",
        "inversion_grid",
        "inversion_path",
    ),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "CLEAN",
    "InverseSchedulerConfig",
    "InversionResult",
    "NoiseRegularization",
    "NoiseSchedule",
    "SampleResult",
    "Trajectory",
    "alphas_cumprod",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "eps_from_model_output",
    "forward_noise",
    "implied_noise",
    "inverse_ddim_step",
    "inversion_grid",
    "inversion_path",
    "official_invert",
    "regularize_noise",
    "renoise_invert",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
