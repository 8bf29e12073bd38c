"""Inversion of flow-matching models (SD3 / SD3.5, FLUX.1): inverse Euler steps of the probability-flow
ODE with ReNoise fixed-point refinement, to an exact per-sample noise level.

The ODE dx/ds = v(x, s) runs from the image (s = 0) to noise (s = 1); sampling integrates it backwards
with Euler steps ``x_s = x_u + (s - u) v(x_u, u)`` (``FlowMatchEulerDiscreteScheduler``). Inverting one
step ``s -> u`` (u > s) needs v at the unknown x_u; ReNoise (Garibi et al., 2024) finds it by fixed-point
iterations, as :mod:`smpo_cli.inversion.renoise` does for noise predictions::

    v_0 = v(x_s, label)                        # label: s ("source", default) or u ("target")
    x_u^(1) = x_s + (u - s) v_0
    v_k = v(x_u^(k), u),  x_u^(k+1) = x_s + (u - s) v_k        for k = 1..K   (K = renoise_iterations)
    x_u = x_s + (u - s) mean(v_{K+1-W}, ..., v_K)                              (W = average_window)

A fixed point x_u = x_s + (u - s) v(x_u, u) is exactly the latent that the sampler's Euler step u -> s
maps back to x_s, so :func:`flow_euler_sample` over the same levels reconstructs x0 up to the
fixed-point residuals. ``K = 0`` is the plain inverse Euler step.

Levels: sample b's target s_b is reached through n_b = max(1, ceil(num_steps * u_b)) equal steps in
the unshifted coordinate u = unshift(s) (``shift`` as the scheduler's: the sampler's spacing), the last
level exactly s_b; a sample at the top level takes ``num_steps`` steps. SmPO's target is the velocity the
inverted latent implies, (x_s - x0) / s (:func:`smpo_cli.training.flow_losses.implied_velocity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smpo_cli.errors import UsageError
from smpo_cli.models.conditioning import (
    FlowConditioning,
    flux_guidance,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)


@dataclass
class FlowInversionResult:
    """``latents`` ``(B, C, H, W)`` at ``sigmas`` ``(B,)``; ``calls``: batched transformer evaluations;
    ``trajectory``: per sample, its latents at its levels (``return_trajectory=True``)."""

    latents: torch.Tensor
    sigmas: torch.Tensor
    calls: int
    levels: list[list[float]]
    trajectory: list[list[torch.Tensor]] | None = None


def check_flow_invert(inv: Any, family: str) -> None:
    """Refuse, in one line, the ``smpo invert`` settings (``InvertMethodSpec``) a flow model has no use for.

    Levels are integers t of the 1000-step training grid, the noise level s = t / 1000 (the SD3 transformer's
    timestep): 1..999, since t = 0 is the image itself."""
    if inv.noise_regularization:
        raise UsageError(f"inversion.noise_regularization is for the UNet families, not {family} models",
                         hint="set inversion.noise_regularization=false")  # fmt: skip
    if inv.guidance_scale is not None:
        raise UsageError(f"inversion.guidance_scale (classifier-free guidance) is not available for {family} models",
                         hint="set inversion.guidance_scale=null")  # fmt: skip
    if min(inv.levels) < 1:
        raise UsageError(f"inversion.levels: level 0 is the image itself; {family} levels are t in 1..999 "
                         "(noise level s = t / 1000)")  # fmt: skip


def is_flux(transformer: Any) -> bool:
    return type(transformer).__name__.startswith("Flux") or "axes_dims_rope" in getattr(
        transformer, "config", {}
    )


def flow_velocity(
    transformer: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: FlowConditioning,
    *,
    guidance_scale: float | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """The transformer's velocity prediction at latents ``x`` ``(B, C, H, W)`` and levels ``sigmas`` ``(B,)``, float32.

    Inputs are cast to the transformer's dtype. SD3 is told t = s * num_train_timesteps (the scheduler's
    timesteps, as ``StableDiffusion3Pipeline``); FLUX.1 gets s itself (``FluxPipeline`` passes
    ``timestep / 1000`` and the transformer scales it back), packed 2x2 latents, ``img_ids`` and, when
    guidance-distilled, ``guidance`` (``guidance_scale``, default :data:`FLUX_TRAIN_GUIDANCE`).
    """
    dtype = next(transformer.parameters()).dtype
    base = getattr(transformer, "module", transformer)  # under DDP: the wrapped transformer's config
    b, _, h, w = x.shape
    cond = cond.expand(b).to(x.device, dtype)
    sig = torch.as_tensor(sigmas, device=x.device).to(torch.float32).reshape(-1).expand(b)
    if is_flux(base):
        kwargs = {} if guidance_scale is None else {"scale": guidance_scale}
        out = transformer(
            hidden_states=pack_latents(x.to(dtype)),
            timestep=sig.to(dtype),
            guidance=flux_guidance(base, b, device=x.device, **kwargs),
            img_ids=latent_image_ids(h, w, device=x.device, dtype=dtype),
            return_dict=False,
            **cond.transformer_kwargs(),
        )[0]
        return unpack_latents(out, h, w).float()
    out = transformer(
        hidden_states=x.to(dtype), timestep=(sig * num_train_timesteps).to(dtype), return_dict=False,
        **cond.transformer_kwargs(),
    )[0]  # fmt: skip
    return out.float()


def unshift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of :func:`smpo_cli.training.flow_losses.shift_sigmas`: u = s / (shift - (shift - 1) s)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    return s / (shift - (shift - 1) * s)


def inversion_levels(
    sigmas: torch.Tensor | Sequence[float], num_steps: int, shift: float = 1.0
) -> list[list[float]]:
    """Per sample, the levels 0 = l_0 < ... < l_n = s_b its inversion visits (see the module docstring)."""
    if int(num_steps) < 1:
        raise UsageError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise UsageError(f"shift must be > 0, got {shift}")
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if bool(((s <= 0) | (s > 1) | ~torch.isfinite(s)).any()):
        raise UsageError("inversion targets must lie in (0, 1]")
    out = []
    for target, u in zip(s.tolist(), unshift(s, shift).tolist(), strict=True):
        n = max(1, math.ceil(num_steps * u - 1e-9))
        us = torch.linspace(0.0, u, n + 1, dtype=torch.float64)
        levels = (shift * us / (1 + (shift - 1) * us)).tolist()
        levels[0], levels[-1] = 0.0, target
        out.append(levels)
    return out


def _steps(levels: list[list[float]], device) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """Per step k: (indices of the samples still stepping, or None for all; their l_k; their l_{k+1})."""
    n_max = max(len(lv) - 1 for lv in levels)
    steps = []
    for k in range(n_max):
        idx = [b for b, lv in enumerate(levels) if len(lv) - 1 > k]
        src = torch.tensor([levels[b][k] for b in idx], dtype=torch.float64, device=device)
        dst = torch.tensor([levels[b][k + 1] for b in idx], dtype=torch.float64, device=device)
        full = len(idx) == len(levels)
        steps.append((None if full else torch.tensor(idx, device=device), src, dst))
    return steps


def _euler(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + h v per sample, computed in float32 (float64 for float64 latents)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(dtype) + h.to(dtype).view(-1, *([1] * (x.dim() - 1))) * v.to(dtype)).to(dtype)


def flow_invert(
    transformer: Any,
    x0: torch.Tensor,
    cond: FlowConditioning,
    sigmas: torch.Tensor | Sequence[float] | float,
    *,
    num_steps: int = 10,
    shift: float = 1.0,
    renoise_iterations: int = 1,
    average_window: int = 2,
    first_prediction: str = "source",
    guidance_scale: float | None = None,
    num_train_timesteps: int = 1000,
    return_trajectory: bool = False,
) -> FlowInversionResult:
    """ReNoise inversion of clean latents ``x0`` to per-sample levels ``sigmas`` in (0, 1] (module docstring).

    ``calls`` counts batched transformer evaluations: ``n_max * (1 + K)``, n_max the most steps any sample takes.
    """
    if first_prediction not in ("source", "target"):
        raise UsageError(f"first_prediction must be source or target, got {first_prediction!r}")
    k_iters = int(renoise_iterations)
    if k_iters < 0 or int(average_window) < 1:
        raise UsageError("renoise_iterations must be >= 0 and average_window >= 1")
    window = min(int(average_window), k_iters + 1)
    b = x0.shape[0]
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    s = s.expand(b) if s.numel() == 1 else s
    if s.numel() != b:
        raise UsageError(f"sigmas must have {b} entries, got {s.numel()}")
    levels = inversion_levels(s, num_steps, shift)
    cond = cond.expand(b)
    x = x0.float() if x0.dtype != torch.float64 else x0
    traj = [[x[i]] for i in range(b)] if return_trajectory else None
    calls = 0

    def velocity(xs, lv, sub):
        return flow_velocity(transformer, xs, lv, cond if sub is None else cond.index(sub),
                             guidance_scale=guidance_scale, num_train_timesteps=num_train_timesteps)  # fmt: skip

    for sub, src, dst in _steps(levels, x.device):
        x_s = x if sub is None else x.index_select(0, sub)
        h = dst - src
        v0 = velocity(x_s, src if first_prediction == "source" else dst, sub)
        preds = [v0]
        x_u = _euler(x_s, v0, h)
        for _ in range(k_iters):
            v_k = velocity(x_u, dst, sub)
            preds.append(v_k)
            x_u = _euler(x_s, v_k, h)
        if window > 1:
            x_u = _euler(x_s, torch.stack(preds[-window:]).mean(dim=0), h)
        calls += 1 + k_iters
        x = x_u if sub is None else x.index_copy(0, sub, x_u.to(x.dtype))
        if traj is not None:
            for j, i in enumerate(range(b) if sub is None else sub.tolist()):
                traj[i].append(x_u[j])
    return FlowInversionResult(
        x.to(x0.dtype) if x0.dtype.is_floating_point else x, s.float(), calls, levels, traj
    )


def flow_euler_sample(
    transformer: Any,
    x: torch.Tensor,
    cond: FlowConditioning,
    levels: list[list[float]],
    *,
    guidance_scale: float | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Euler sampling from each sample's last level down to 0 along ``levels`` (as :func:`flow_invert` returns
    them): ``x_{l_k} = x_{l_{k+1}} + (l_k - l_{k+1}) v(x_{l_{k+1}}, l_{k+1})``, the scheduler's step."""
    b = x.shape[0]
    cond = cond.expand(b)
    x = x.float() if x.dtype != torch.float64 else x
    steps = _steps(levels, x.device)
    for sub, src, dst in reversed(steps):
        x_u = x if sub is None else x.index_select(0, sub)
        c = cond if sub is None else cond.index(sub)
        v = flow_velocity(transformer, x_u, dst, c, guidance_scale=guidance_scale,
                          num_train_timesteps=num_train_timesteps)  # fmt: skip
        x_s = _euler(x_u, v, src - dst)
        x = x_s if sub is None else x.index_copy(0, sub, x_s.to(x.dtype))
    return x
