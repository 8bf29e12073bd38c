"""ReNoise inversion (Garibi et al., ECCV 2024), batched, to per-sample timesteps: SmPO's trajectory estimate.

Each inverse DDIM step ``s -> u`` is refined by fixed-point iterations (method.md section 3)::

    e_0 = eps(x_s, label)                     # label: s ("source", default) or u ("target")
    x_u^(1) = step(x_s, e_0)
    e_k = eps(x_u^(k), u),  x_u^(k+1) = step(x_s, e_k)     for k = 1..K    (K = renoise_iterations)
    x_u = step(x_s, mean(e_{K+1-W}, ..., e_K))                              (W = average_window)

``step`` is :func:`~smpo_cli.inversion.schedule.inverse_ddim_step`. The re-noise predictions are
made at the **target** timestep ``u`` (the official SmPO code, under the diffusers 0.20.0 it pins, labels
every prediction of a step with its source; :mod:`smpo_cli.inversion.official` reproduces that loop).
A fixed point of the iteration is exactly the latent that a DDIM sampling step ``u -> s`` maps
back to ``x_s``, which is why more iterations reconstruct better. ``K = 0`` is plain DDIM.
Official SmPO: ``K = 1``, ``W = 2`` (the mean of ``e_0`` and ``e_1``), no guidance,
5 grid steps (SD1.5) or 10 (SDXL).

Optional noise regularisation (:class:`NoiseRegularization`, from the ReNoise paper and its code,
itself from pix2pix-zero): each estimate inside the averaging window, and the average, take
``num_reg_steps`` gradient steps on

* a KL term between per-patch, per-channel Gaussian statistics of the estimate and of
  ``eps(x_u^fwd, u)`` at the forward-noised ``x_u^fwd = sqrt(abar_u) x0 + sqrt(1-abar_u) n``
  (``n`` fixed per sample: ``reg_noise`` or drawn from ``generator``; it is evaluated in the
  same UNet call as ``e_0``, adding rows, not calls), gradient clipped to [-100, 100];
* an auto-correlation term (squared mean of the estimate times its rolled copy, both axes,
  over a pyramid of 2x average-pooled copies down to 8 pixels), ``num_ac_rolls`` random rolls.

The reference code asserts batch size 1 for the auto-correlation; here every term is a sum of
per-sample losses (gradients do not mix samples) and the random roll amounts are shared by the
batch, so a batch gives the same result as its samples one at a time with the same generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from smpo_cli.errors import UsageError
from smpo_cli.inversion.ddim import (
    InversionResult,
    NoisePredictor,
    _check_first_prediction,
    _run_inversion,
    _Step,
)
from smpo_cli.inversion.schedule import forward_noise, inverse_ddim_step
from smpo_cli.models.conditioning import Conditioning


@dataclass(frozen=True)
class NoiseRegularization:
    """ReNoise's noise regularisation settings (defaults: the ReNoise code's ``RunConfig``)."""

    lambda_ac: float = 20.0  # weight of the auto-correlation gradient step
    lambda_kl: float = 0.065  # weight of the patch-KL gradient step (0 disables it and its extra UNet rows)
    num_reg_steps: int = 4  # outer gradient steps per regularised estimate
    num_ac_rolls: int = 5  # random rolls averaged per auto-correlation step
    patch_size: int = 4  # patch side of the KL statistics

    def __post_init__(self) -> None:
        if self.num_reg_steps < 0 or self.num_ac_rolls < 1 or self.patch_size < 2:
            raise UsageError(
                "NoiseRegularization needs num_reg_steps >= 0, num_ac_rolls >= 1, patch_size >= 2"
            )
        if self.lambda_ac < 0 or self.lambda_kl < 0:
            raise UsageError("NoiseRegularization weights must be >= 0")

    @property
    def uses_kl(self) -> bool:
        return self.num_reg_steps > 0 and self.lambda_kl > 0


# --------------------------------------------------------------------------------------------
# Regularisation terms (batched; each a sum of per-sample losses)
# --------------------------------------------------------------------------------------------


def auto_corr_loss(
    eps: torch.Tensor, rolls: Sequence[Sequence[int]] | None = None, generator=None
) -> torch.Tensor:
    """Sum over samples of the ReNoise / pix2pix-zero auto-correlation loss of ``eps`` ``(B, C, H, W)``.

    For each channel and pyramid level (halving by 2x2 average pooling until the side is <= 8):
    ``mean(n * roll(n, r, H))**2 + mean(n * roll(n, r, W))**2`` per sample (means over pixels).
    ``rolls[c][level]`` gives the roll amounts; by default they are drawn, one per channel and
    level, uniformly in ``[0, side // 2)`` from ``generator`` (CPU), shared by the batch.
    """
    loss = eps.new_zeros(())
    for ch in range(eps.shape[1]):
        noise = eps[:, ch : ch + 1]
        level = 0
        while True:
            if rolls is not None:
                r = int(rolls[ch][level])
            else:
                r = int(torch.randint(0, max(1, noise.shape[2] // 2), (1,), generator=generator).item())
            loss = loss + ((noise * torch.roll(noise, shifts=r, dims=2)).mean(dim=(1, 2, 3)) ** 2).sum()
            loss = loss + ((noise * torch.roll(noise, shifts=r, dims=3)).mean(dim=(1, 2, 3)) ** 2).sum()
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
            level += 1
    return loss


def patch_kl_loss(eps: torch.Tensor, reference: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    """Sum over samples, patches and channels of ``|KL|`` between Gaussian fits of ``eps`` and ``reference``.

    Per ``patch_size`` x ``patch_size`` patch and channel (mean ``mu``, unbiased variance ``var``):
    ``|log((var_r + 1e-6) / (var_e + 1e-6)) + (var_e + (mu_e - mu_r)**2) / (var_r + 1e-6) - 1|``
    (the ReNoise code's ``patchify_latents_kl_divergence``; trailing pixels that do not fill a
    patch are ignored, as ``unfold`` does).
    """

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        p = patch_size
        x = x[:, :, : h - h % p, : w - w % p].reshape(b, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c, p * p)
        return x.mean(dim=-1), x.var(dim=-1)

    mu0, var0 = stats(eps)
    mu1, var1 = stats(reference)
    tiny = 1e-6
    kl = torch.log((var1 + tiny) / (var0 + tiny)) + (var0 + (mu0 - mu1) ** 2) / (var1 + tiny) - 1
    return kl.abs().sum()


def regularize_noise(
    eps: torch.Tensor,
    reference: torch.Tensor | None = None,
    settings: NoiseRegularization | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ReNoise's noise regularisation of a batch of noise estimates (float32 result).

    ``num_reg_steps`` times: a KL gradient step towards ``reference`` (skipped when it is None or
    ``lambda_kl`` is 0; gradient clipped to [-100, 100]) and ``num_ac_rolls`` auto-correlation
    steps of ``lambda_ac * grad / num_ac_rolls``. Runs with autograd enabled on detached copies.
    """
    cfg = settings or NoiseRegularization()
    e = eps.detach().float()
    ref = None if reference is None else reference.detach().float()
    with torch.enable_grad():
        for _ in range(cfg.num_reg_steps):
            if cfg.lambda_kl > 0 and ref is not None:
                var = e.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(patch_kl_loss(var, ref, cfg.patch_size), var)
                e = e - cfg.lambda_kl * grad.clamp(-100, 100)
            if cfg.lambda_ac > 0:
                for _ in range(cfg.num_ac_rolls):
                    var = e.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(auto_corr_loss(var, generator=generator), var)
                    e = e - cfg.lambda_ac * grad / cfg.num_ac_rolls
            e = e.detach()
    return e


# --------------------------------------------------------------------------------------------
# Inversion
# --------------------------------------------------------------------------------------------


def renoise_invert(
    unet: Any,
    x0: torch.Tensor,
    cond: Conditioning,
    t: torch.Tensor | int | Sequence[int],
    *,
    schedule: Any,
    num_steps: int = 5,
    grid: Sequence[int] | None = None,
    mode: str = "exact",
    renoise_iterations: int = 1,
    average_window: int = 2,
    first_prediction: str = "source",
    regularization: NoiseRegularization | None = None,
    reg_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
    uncond: Conditioning | None = None,
    return_trajectory: bool = False,
) -> InversionResult:
    """ReNoise inversion of clean latents ``x0`` ``(B, C, H, W)`` to per-sample timesteps ``t``.

    Arguments shared with :func:`~smpo_cli.inversion.ddim.ddim_invert` mean the same (schedule,
    grid, ``mode``, ``first_prediction``, guidance). ``renoise_iterations`` (``K >= 0``) re-noise
    predictions per step at the target timestep; the step's result uses the mean of the last
    ``average_window`` of ``e_0..e_K`` (clipped to ``K + 1``). ``regularization`` enables ReNoise's
    noise regularisation; ``reg_noise`` ``(B, C, H, W)`` is the fixed noise of its KL reference
    (drawn from ``generator`` when None), and ``generator`` (CPU) also draws the rolls.

    UNet calls per step: ``1 + K``; sample ``b`` needs ``steps_b * (1 + K)`` estimates, plus
    ``steps_b`` reference rows when the KL term is on.
    """
    _check_first_prediction(first_prediction)
    k_iters = int(renoise_iterations)
    if k_iters < 0:
        raise UsageError(f"renoise_iterations must be >= 0, got {renoise_iterations}")
    if int(average_window) < 1:
        raise UsageError(f"average_window must be >= 1, got {average_window}")
    window = min(int(average_window), k_iters + 1)
    reg = regularization if regularization is not None and regularization.num_reg_steps > 0 else None
    noise = None
    if reg is not None and reg.uses_kl:
        if reg_noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        else:
            if reg_noise.shape != x0.shape:
                raise UsageError(
                    f"reg_noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(reg_noise.shape)}"
                )
            noise = reg_noise.detach().float().to(x0.device)

    def regularize(e: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return e if reg is None else regularize_noise(e, reference, reg, generator=generator)

    def step_fn(
        predictor: NoisePredictor, step: _Step, x_s: torch.Tensor, x0_sub: torch.Tensor
    ) -> torch.Tensor:
        sub = None if step.full else step.idx
        device = x_s.device
        first_labels = step.labels(first_prediction, device)
        reference = None
        if noise is not None:
            n_sub = noise if step.full else noise.index_select(0, step.idx)
            x_fwd = forward_noise(x0_sub, n_sub, step.abar_dst)
            dst_labels = step.labels("target", device)
            e0, reference = predictor.predict_many(
                [(x_s, first_labels, step.abar_src, sub), (x_fwd, dst_labels, step.abar_dst, sub)]
            )
        else:
            e0 = predictor.predict(x_s, first_labels, step.abar_src, sub)
        preds = [e0]
        first_in_window = k_iters + 1 - window  # index of the first averaged estimate
        e_used = regularize(e0, reference) if first_in_window == 0 else e0
        x_u = inverse_ddim_step(x_s, e_used, step.abar_src, step.abar_dst)
        if k_iters == 0 and reg is None:
            return x_u
        dst_labels = step.labels("target", device)
        for k in range(1, k_iters + 1):
            e_k = predictor.predict(x_u, dst_labels, step.abar_dst, sub)
            preds.append(e_k)
            e_used = regularize(e_k, reference) if k >= first_in_window else e_k
            x_u = inverse_ddim_step(x_s, e_used, step.abar_src, step.abar_dst)
        if window == 1 and reg is None:
            return x_u  # the mean of one estimate is the last step already taken
        mean = torch.stack(preds[-window:]).mean(dim=0)
        return inverse_ddim_step(x_s, regularize(mean, reference), step.abar_src, step.abar_dst)

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
        estimates_per_step=1 + k_iters,
    )
