"""One micro-batch of SmPO / Diffusion-DPO / SFT for the flow-matching families (SD3 / SD3.5, FLUX.1).

The contract of :func:`smpo_cli.training.step.micro_batch_loss` (which dispatches here for a flow model):
per pair, one noise level s drawn from the pair's own generator (:class:`~smpo_cli.training.step.PairDraws`),
so a pair gets the same draws at the same step however the step is split.

* s: SD3's logit-normal density, s = shift(sigmoid(z)), z ~ N(0, 1) from the pair's generator (the
  ``logit_normal`` scheme of diffusers' SD3 / FLUX.1 scripts, m = 0, std = 1), with the sampler's shift:
  ``scheduler.config.shift`` (SD3: 3.0), or for a scheduler with dynamic shifting (FLUX.1) exp(mu) of the
  training latents' sequence length, the shift ``FluxPipeline`` samples that resolution with.
* Diffusion-DPO (``inversion.source=none``): one noise per pair, shared by winner and loser;
  x_s = (1 - s) x0 + s eps, target v = eps - x0. SFT: the winner only.
* SmPO with ``inversion.source=online``: each image's ReNoise inversion to exactly s
  (:func:`smpo_cli.inversion.flow.flow_invert`, by the reference or the policy), target the velocity the
  inverted latent implies, (x_s - x0) / s. SmPO with ``inversion.source=none``: the DPO noising with the
  SmPO coefficient.
* ``inversion.source=cache`` (``smpo invert`` on the scored pairs, :mod:`smpo_cli.inversion.runner`): x0 and
  x_s from the cache; per pair one cached level t drawn uniformly from its generator (as the UNet families),
  s = t / 1000, target (x_s - x0) / s. The cache inverts each image to each level along the path online
  inversion takes, so a step equals the online step at the same s (with the same prompt: a prompt dropped by
  ``data.empty_prompt_prob`` was still inverted with its text).
* Policy and reference (LoRA adapters off, or a frozen copy) predict at the same x_s; the transformer is
  told SD3: t = 1000 s, FLUX.1: s (with guidance 3.5 when guidance-distilled), see
  :func:`~smpo_cli.inversion.flow.flow_velocity`.

``mean_t`` in the metrics is the mean transformer timestep 1000 s, on the UNet families' 0..1000 scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from smpo_cli.errors import UsageError

FLOW_INVERSION_SOURCES = ("online", "cache", "none")


def check_flow_recipe(recipe: Any, family: str) -> None:
    """Refuse, before any step, the settings the flow families do not support (yet)."""
    inv = recipe.inversion
    if inv.source not in FLOW_INVERSION_SOURCES:
        raise UsageError(f"inversion.source={inv.source} is not available for {family} models",
                         hint="use inversion.source=online or cache (SmPO) or none (Diffusion-DPO / SFT)")  # fmt: skip
    if inv.source in ("online", "cache") and inv.timestep_mode != "exact":
        raise UsageError(f"inversion.timestep_mode={inv.timestep_mode} is for the UNet families",
                         hint=f"{family} models invert to exactly the drawn level: set inversion.timestep_mode=exact")  # fmt: skip


def train_shift(scheduler: Any, height: int, width: int) -> float:
    """The timestep shift of training latents of ``height`` x ``width``: the static ``shift`` (SD3), or
    exp(mu) of ``FluxPipeline``'s ``calculate_shift`` for a dynamically shifting scheduler (FLUX.1)."""
    cfg = scheduler.config
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    seq_len = (height // 2) * (width // 2)  # FLUX.1 packs 2x2 latent patches
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return math.exp(seq_len * m + base - m * base_len)


def sample_pair_sigmas(draws: Any, shift: float) -> torch.Tensor:
    """(P,) levels s = shift(sigmoid(z)), z ~ N(0, 1) from each pair's generator, float64 on the CPU."""
    from smpo_cli.training.flow_losses import shift_sigmas

    z = draws.randn((1,)).reshape(-1).double()
    return shift_sigmas(torch.sigmoid(z), shift)


def flow_micro_batch_loss(
    models: Any, batch: dict[str, Any], draws: Any, device
) -> tuple[torch.Tensor, dict]:
    """Loss of one flow-model micro-batch and its metrics (floats), as ``micro_batch_loss``."""
    from smpo_cli.inversion.flow import flow_velocity
    from smpo_cli.models import vae as vae_ops
    from smpo_cli.models.conditioning import encode_prompts
    from smpo_cli.training import flow_losses as fl
    from smpo_cli.training import losses

    r = models.recipe
    method, inv = r.method.name, r.inversion
    check_flow_recipe(r, models.comps.family)
    P = batch["size"]
    n_train = int(models.comps.scheduler.config.get("num_train_timesteps", 1000))

    def both(key: str) -> torch.Tensor:  # (P, 2, ...) winner/loser per pair -> (2P, ...) winners first
        value = batch[key]
        return value.transpose(0, 1).reshape(2 * P, *value.shape[2:])

    if "latents" in batch:  # from the inversion cache
        x0 = both("latents").to(device).float()
        channels = int(models.comps.vae.config.latent_channels)
        if x0.shape[1] != channels:
            raise UsageError(f"the inversion cache holds {x0.shape[1]}-channel latents, the {models.comps.family} "
                             f"VAE makes {channels}: it was made with another model",
                             hint="rebuild it with smpo invert and this model")  # fmt: skip
    else:
        sample = r.data.latents == "sample"
        x0 = vae_ops.encode(models.comps.vae, both("pixels").to(device), sample=sample,
                            seeds=draws.image_seeds() if sample else None).float()  # fmt: skip
    cond = encode_prompts(models.comps, list(batch["prompt"]) * 2, device=device)
    shift = train_shift(models.comps.scheduler, x0.shape[-2], x0.shape[-1])

    def forward(module, x, s, c):
        return flow_velocity(module, x, s.to(device), c, num_train_timesteps=n_train)

    if inv.source == "cache":  # a cached level per pair, the same for both images
        which = draws.randint(len(models.cache_levels))
        s_pair = torch.tensor(models.cache_levels, dtype=torch.float64)[which] / n_train
    else:
        s_pair = sample_pair_sigmas(draws, shift)
    if method == "sft":  # winners only, random noise
        x0_w = x0[:P]
        eps = draws.randn(tuple(x0_w.shape[1:])).to(device)
        s = s_pair.float().to(device)
        x_s = fl.flow_matching_noisy(x0_w, eps, s)
        with models.autocast():
            pred = forward(models.unet, x_s, s, cond.index(slice(0, P)))
        loss = losses.sft_loss(pred, fl.flow_matching_target(x0_w, eps))
        return loss, {"loss": float(loss.detach()), "model_mse_w": float(loss.detach()),
                      "mean_t": float(s_pair.mean()) * n_train, "unet_calls": 1}  # fmt: skip
    s = s_pair.float().repeat(2).to(device)
    calls = 0
    if inv.source == "online":
        x_s, target, calls = _invert(models, x0, cond, s, shift, n_train)
    elif inv.source == "cache":
        x_s = both("inverted")[torch.arange(2 * P), which.repeat(2)].to(device).float()
        target = fl.implied_velocity(x_s, x0, s)
    else:  # one noise per pair, shared by winner and loser
        eps = draws.randn(tuple(x0.shape[1:])).to(device).repeat(2, 1, 1, 1)
        x_s = fl.flow_matching_noisy(x0, eps, s)
        target = fl.flow_matching_target(x0, eps)
    with models.autocast():
        pred = forward(models.unet, x_s, s, cond)
        ctx, ref = models.reference()
        with torch.no_grad(), ctx:
            ref_pred = forward(ref, x_s, s, cond)
    calls += 2
    p = batch["p"].to(device)
    args = (pred[:P], pred[P:], ref_pred[:P], ref_pred[P:], target[:P], target[P:])
    if method == "smpo":
        out = losses.smpo_loss(*args, beta=r.method.beta, gamma=r.method.gamma, p=p)
    else:
        out = losses.diffusion_dpo_loss(*args, beta=r.method.beta)
    metrics = {
        "loss": float(out.loss.detach()),
        "model_mse_w": float(out.model_mse_w.mean()), "model_mse_l": float(out.model_mse_l.mean()),
        "ref_mse_w": float(out.ref_mse_w.mean()), "ref_mse_l": float(out.ref_mse_l.mean()),
        "implicit_acc": float(out.implicit_acc), "reward_margin": float(out.reward_margin.mean()),
        "mean_p": float(p.mean()), "mean_t": float(s_pair.mean()) * n_train, "unet_calls": calls,
    }  # fmt: skip
    return out.loss, metrics


def _invert(models: Any, x0: torch.Tensor, cond, s: torch.Tensor, shift: float, n_train: int):
    """ReNoise inversion of every image to exactly its pair's level, by the reference or the policy;
    the target is the velocity the inverted latent implies."""
    import contextlib

    from smpo_cli.inversion.flow import flow_invert
    from smpo_cli.training.flow_losses import implied_velocity

    inv = models.recipe.inversion
    if inv.model == "policy":
        ctx, module = contextlib.nullcontext(), models.raw_unet
    else:
        ctx, module = models.reference()
    with torch.no_grad(), ctx, models.autocast():
        out = flow_invert(module, x0, cond, s, num_steps=inv.num_steps, shift=shift,
                          renoise_iterations=inv.renoise_iterations, average_window=inv.average_window,
                          first_prediction=inv.first_prediction, num_train_timesteps=n_train)  # fmt: skip
    x_s = out.latents.float()
    return x_s, implied_velocity(x_s, x0, s), out.calls
