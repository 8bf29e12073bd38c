"""Flow-matching (SD3 / SD3.5, FLUX.1) forward process, timestep density and SmPO / Diffusion-DPO / SFT
losses, as pure tensor functions.

Rectified flow, with s in [0, 1] the noise level ("sigma"; s = 0 is the image, s = 1 pure noise):

    x_s = (1 - s) x0 + s eps                 (flow_matching_noisy)
    v   = dx_s/ds = eps - x0                 (flow_matching_target: what the transformer predicts)

An x_s that does not come from the forward process (an inversion) implies the velocity
(x_s - x0) / s (``implied_velocity``), the flow analogue of the implied noise tau of method.md section 3.

Timesteps are drawn as SD3 trains (Esser et al., 2024, section 3.1; diffusers' ``logit_normal``
weighting scheme): u = sigmoid(m + std * z), z ~ N(0, 1), then the scheduler's resolution shift

    s = shift * u / (1 + (shift - 1) * u)    (shift_sigmas; FlowMatchEulerDiscreteScheduler's static shift)

and the transformer is told t = s * num_train_timesteps (``sigmas_to_timesteps``). diffusers' SD3
training script indexes ``scheduler.timesteps`` (descending) with u, which flips the sign of m; the
paper's (and this module's) m > 0 puts more weight on noisier levels.

The preference losses are those of :mod:`smpo_cli.training.losses` with the velocity MSE in place of
the noise MSE (method.md sections 1-2):

    d(x)     = mse(v_model(x_s), v_x) - mse(v_ref(x_s), v_x)
    L_i      = -log sigmoid(-0.5 * coef_i * (d(w_i) - d(l_i)))
    coef_i   = beta (Diffusion-DPO) | beta * gamma * (2 p_i - 1) (SmPO)

They return the same :class:`~smpo_cli.training.losses.PreferenceLossOutput`. The velocity MSE has
a different scale than the noise MSE (E|v|^2 = E|eps|^2 + E|x0|^2), so beta for a flow model is its
own recipe value, not the SD1.5 / SDXL one. All math runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from smpo_cli.errors import UsageError
from smpo_cli.training.losses import (
    PREFERENCE_METHODS,
    PreferenceLossOutput,
    _check_scalar,
    _check_shapes,
    _compute_dtype,
    diffusion_dpo_loss,
    per_sample_mse,
    preference_loss,
    sft_loss,
    smpo_loss,
)

__all__ = [
    "PREFERENCE_METHODS",
    "PreferenceLossOutput",
    "flow_diffusion_dpo_loss",
    "flow_matching_noisy",
    "flow_matching_target",
    "flow_preference_loss",
    "flow_sft_loss",
    "flow_smpo_loss",
    "implied_velocity",
    "logit_normal_quantile",
    "per_sample_mse",
    "sample_flow_sigmas",
    "shift_sigmas",
    "sigmas_to_timesteps",
]


# --------------------------------------------------------------------------------------------
# Forward process and target
# --------------------------------------------------------------------------------------------


def _per_sample(sigmas: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sigmas`` as shape (B, 1, 1, ...) broadcasting against ``like`` (a scalar applies to every sample)."""
    s = torch.as_tensor(sigmas, device=like.device).to(dtype)
    if s.dim() == 0:
        s = s.expand(like.shape[0])
    if s.dim() != 1 or s.shape[0] != like.shape[0]:
        raise UsageError(
            f"sigmas must have shape ({like.shape[0]},) for {like.shape[0]} samples, got {tuple(s.shape)}"
        )
    if bool(((s < 0) | (s > 1) | ~torch.isfinite(s)).any()):
        raise UsageError(f"sigmas must lie in [0, 1], got min {s.min().item():.4g}, max {s.max().item():.4g}")
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def flow_matching_noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor | float) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps per sample (``sigmas`` shape (B,) or a scalar), in the inputs' dtype.

    The mix is computed in float32 (float64 for float64 inputs) and cast back to ``x0.dtype``.
    """
    _check_shapes(x0=x0, noise=noise)
    dtype = _compute_dtype(x0, noise)
    s = _per_sample(sigmas, x0, dtype)
    return ((1 - s) * x0.to(dtype) + s * noise.to(dtype)).to(x0.dtype)


def flow_matching_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity v = eps - x0 that the transformer regresses (float32, or float64 for float64 inputs)."""
    _check_shapes(x0=x0, noise=noise)
    dtype = _compute_dtype(x0, noise)
    return noise.to(dtype) - x0.to(dtype)


def implied_velocity(x_s: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor | float) -> torch.Tensor:
    """The velocity (x_s - x0) / s that a latent x_s at level s implies for image x0.

    For x_s = (1 - s) x0 + s eps this is exactly eps - x0; for an inverted x_s it is the flow-matching
    counterpart of SmPO's implied noise. Levels must be > 0.
    """
    _check_shapes(x_s=x_s, x0=x0)
    dtype = _compute_dtype(x_s, x0)
    s = _per_sample(sigmas, x0, dtype)
    if bool((s <= 0).any()):
        raise UsageError("implied_velocity needs sigmas > 0 (at s = 0 the latent is the image itself)")
    return (x_s.to(dtype) - x0.to(dtype)) / s


# --------------------------------------------------------------------------------------------
# Timestep density
# --------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor | float, shift: float) -> torch.Tensor:
    """The resolution shift of ``FlowMatchEulerDiscreteScheduler``: shift * s / (1 + (shift - 1) * s).

    Monotone on [0, 1] with fixed points 0 and 1; shift > 1 moves mass to noisier levels (SD3 / SD3.5
    and FLUX.1 ship shift = 3.0).
    """
    shift = _check_scalar("shift", shift)
    s = torch.as_tensor(sigmas)
    if not s.is_floating_point():
        s = s.to(torch.float32)
    return shift * s / (1 + (shift - 1) * s)


def logit_normal_quantile(
    q: torch.Tensor | float, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> torch.Tensor:
    """The q-quantile of :func:`sample_flow_sigmas`'s distribution: shift(sigmoid(mean + std * Phi^-1(q))).

    Exact because the sigmoid and the shift are increasing.
    """
    std = _check_scalar("std", std)
    q = torch.as_tensor(q, dtype=torch.float64)
    z = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    return shift_sigmas(torch.sigmoid(mean + std * z), shift)


def sample_flow_sigmas(
    batch_size: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B,) noise levels s = shift(sigmoid(mean + std * z)), z ~ N(0, 1): SD3's logit-normal density.

    ``mean`` / ``std`` are SD3's ``logit_mean`` / ``logit_std`` (0 and 1 in SD3 and the diffusers scripts);
    ``shift`` is the scheduler's (``scheduler.config.shift``). The normal draw uses ``generator`` on the CPU
    (a CPU generator gives the same levels on any device), then the result moves to ``device``.
    """
    if int(batch_size) < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    std = _check_scalar("std", std)
    if not math.isfinite(float(mean)):
        raise UsageError(f"mean must be finite, got {mean}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(int(batch_size), generator=generator, device=gen_device, dtype=torch.float64)
    sigmas = shift_sigmas(torch.sigmoid(float(mean) + std * z), shift)
    return sigmas.to(device=device, dtype=dtype)


def sigmas_to_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timestep the transformer is told for level s: s * num_train_timesteps (as the scheduler's
    ``timesteps = sigmas * num_train_timesteps``; FLUX's pipeline divides it by 1000 again)."""
    return torch.as_tensor(sigmas) * num_train_timesteps


# --------------------------------------------------------------------------------------------
# Losses on the velocity
# --------------------------------------------------------------------------------------------


# The preference losses are the epsilon ones applied to velocity predictions and targets (v = eps - x0, or an
# inverted image's implied velocity): the same functions under the flow names.
flow_diffusion_dpo_loss = diffusion_dpo_loss
flow_smpo_loss = smpo_loss
flow_sft_loss = sft_loss
flow_preference_loss = preference_loss
