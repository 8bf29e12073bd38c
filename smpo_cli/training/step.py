"""One micro-batch of SmPO / Diffusion-DPO / SFT: x_t, targets, policy and reference predictions, loss.

Per pair: one timestep t (and, without inversion, one noise shared by winner and loser, as
Diffusion-DPO). With inversion (SmPO) x_t is each image's own ReNoise inversion to exactly t and the
target is the noise it implies, tau = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t); with
``timestep_mode=official`` (or ``official_0_22``) x_t is the official loop's latent, at a grid level
near t (:mod:`smpo_cli.inversion.official`), while tau and the UNet use t (the official code's
behaviour, for ablations). v-prediction models regress v = sqrt(abar) tau - sqrt(1 - abar) x0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from smpo_cli.config.schema import TrainRecipe
from smpo_cli.inversion.schedule import NoiseSchedule, forward_noise, implied_noise, inversion_grid


@dataclass
class StepModels:
    recipe: TrainRecipe
    comps: Any  # DiffusionComponents (text encoders, VAE, scheduler)
    unet: Any  # the trained UNet, or SD3 / FLUX.1 transformer (possibly wrapped by accelerate/DDP)
    raw_unet: Any  # the same module unwrapped
    ref_unet: Any | None  # frozen copy for full fine-tuning; None with LoRA (adapters disabled instead)
    schedule: NoiseSchedule | None  # None for the flow families (their levels come from the scheduler config)
    grid: list[int] = field(default_factory=list)
    cache_levels: list[int] = field(default_factory=list)
    autocast: Any = contextlib.nullcontext

    @property
    def lora(self) -> bool:
        return self.ref_unet is None

    def reference(self):
        """Context + module that computes the reference model's predictions."""
        if self.ref_unet is not None:
            return contextlib.nullcontext(), self.ref_unet
        from smpo_cli.training.lora import reference_outputs

        return reference_outputs(self.raw_unet), self.raw_unet


def _forward(unet, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """UNet prediction in float32; inputs cast to the UNet's own dtype (a frozen fp16 reference too)."""
    dtype = next(unet.parameters()).dtype
    return unet(x.to(dtype), t, **cond.to(x.device, dtype).unet_kwargs()).sample.float()


def _cond(models: StepModels, prompts: list[str], sizes: torch.Tensor, crops: torch.Tensor, device):
    from smpo_cli.models.conditioning import encode_prompts

    kwargs = {}
    if models.comps.family == "sdxl":
        res = models.recipe.data.resolution
        kwargs = {"original_sizes": sizes.tolist(), "crop_coords": crops.tolist(), "target_size": (res, res)}
    return encode_prompts(models.comps, prompts, device=device, **kwargs)


# the per-pair metrics micro_batch_loss returns (besides unet_calls), in a fixed order for the all-reduce
STEP_METRICS = ("loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l", "implicit_acc", "reward_margin",
                "mean_p", "mean_t")  # fmt: skip


class PairDraws:
    """The randomness of a micro-batch (t, noise, VAE posterior samples), drawn pair by pair, each pair from a
    generator seeded by (seed, step, the pair's global position in the data order).

    A pair therefore gets the same draws at the same step however the step's pairs are split into processes
    and micro-batches: a run resumed on another number of processes continues the same optimiser steps.
    Draws are made in the same order for every pair (each call draws once from every pair's generator).
    """

    def __init__(self, seed: int, step: int, positions: list[int]) -> None:
        import numpy as np

        self.gens = []
        for pos in positions:
            state = np.random.SeedSequence([seed, 2, step, int(pos)]).generate_state(1, dtype=np.uint64)[0]
            self.gens.append(torch.Generator().manual_seed(int(state % 2**63)))

    def __len__(self) -> int:
        return len(self.gens)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per pair, shape (P,)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.gens])

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal tensor of ``shape`` per pair, shape (P, *shape)."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens])

    def image_seeds(self) -> list[int]:
        """Seeds of the 2P images in the micro-batch's order (winners, then losers)."""
        pairs = [torch.randint(0, 2**62, (2,), generator=g).tolist() for g in self.gens]
        return [w for w, _ in pairs] + [lo for _, lo in pairs]


def _sample_t(models: StepModels, draws: PairDraws) -> torch.Tensor:
    inv = models.recipe.inversion
    T = models.schedule.num_train_timesteps
    if inv.source == "online" and inv.timestep_mode == "grid":
        grid = torch.tensor(models.grid)
        return grid[draws.randint(len(grid))]
    return draws.randint(T)


def micro_batch_loss(models: StepModels, batch: dict[str, Any], draws: PairDraws, device) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch and its metrics (floats). ``draws`` gives each pair's t and noise."""
    from smpo_cli.models import vae as vae_ops
    from smpo_cli.training import losses

    if getattr(models.comps, "is_flow", False):  # SD3 / FLUX.1: velocity targets, sigma levels
        from smpo_cli.training.flow_step import flow_micro_batch_loss

        return flow_micro_batch_loss(models, batch, draws, device)
    r = models.recipe
    method, inv = r.method.name, r.inversion
    P = batch["size"]

    def both(key: str) -> torch.Tensor:  # (P, 2, ...) winner/loser per pair -> (2P, ...) winners first
        value = batch[key]
        return value.transpose(0, 1).reshape(2 * P, *value.shape[2:])

    if "latents" in batch:  # from the inversion cache
        x0 = both("latents").to(device)
    else:
        sample = r.data.latents == "sample"
        x0 = vae_ops.encode(models.comps.vae, both("pixels").to(device), sample=sample,
                            seeds=draws.image_seeds() if sample else None)  # fmt: skip
    sizes, crops = both("original_size"), both("crop_top_left")
    prompts = list(batch["prompt"]) * 2
    cond = _cond(models, prompts, sizes, crops, device)
    calls = 0
    if method == "sft":  # winners only, random noise
        x0_w, cond_w = x0[:P], cond.index(slice(0, P))
        t = _sample_t(models, draws)
        eps = draws.randn(tuple(x0_w.shape[1:])).to(device)
        abar = models.schedule.abar(t).to(device)
        x_t = forward_noise(x0_w, eps, abar)
        target = _target(models, eps, x0_w, abar)
        with models.autocast():
            pred = _forward(models.unet, x_t, t.to(device), cond_w)
        loss = losses.sft_loss(pred, target)
        return loss, {"loss": float(loss.detach()), "model_mse_w": float(loss.detach()), "unet_calls": 1}
    if inv.source == "cache":  # t among the cached levels, the same for both images of a pair
        which = draws.randint(len(models.cache_levels))
        t_pair = torch.tensor(models.cache_levels)[which]
        x_t = both("inverted")[torch.arange(2 * P), which.repeat(2)].to(device)
        t = t_pair.repeat(2)
        abar = models.schedule.abar(t).to(device)
        tau = implied_noise(x_t, x0, abar)
    elif inv.source == "plan":  # inverted to exactly the planned t before training (smpo_cli.inversion.plan_cache)
        t_pair = batch["plan_t"].long()
        t = t_pair.repeat(2)
        x_t = both("inverted").to(device)
        abar = models.schedule.abar(t).to(device)
        tau = implied_noise(x_t, x0, abar)
    elif inv.source == "online":
        t_pair = _sample_t(models, draws)
        t = t_pair.repeat(2)
        x_t, tau, calls = _invert(models, x0, cond, t, device)
        abar = models.schedule.abar(t).to(device)
    else:  # Diffusion-DPO: one noise per pair, shared by winner and loser
        t_pair = _sample_t(models, draws)
        t = t_pair.repeat(2)
        eps = draws.randn(tuple(x0.shape[1:])).to(device).repeat(2, 1, 1, 1)
        abar = models.schedule.abar(t).to(device)
        x_t = forward_noise(x0, eps, abar)
        tau = eps
    target = _target(models, tau, x0, abar)
    with models.autocast():
        pred = _forward(models.unet, x_t, t.to(device), cond)
        ctx, ref = models.reference()
        with torch.no_grad(), ctx:
            ref_pred = _forward(ref, x_t, t.to(device), cond)
    calls += 2
    p = batch["p"].to(device)
    if method == "smpo":
        out = losses.smpo_loss(pred[:P], pred[P:], ref_pred[:P], ref_pred[P:], target[:P], target[P:],
                               beta=r.method.beta, gamma=r.method.gamma, p=p)  # fmt: skip
    else:
        out = losses.diffusion_dpo_loss(pred[:P], pred[P:], ref_pred[:P], ref_pred[P:], target[:P], target[P:],
                                        beta=r.method.beta)  # fmt: skip
    metrics = {
        "loss": float(out.loss.detach()),
        "model_mse_w": float(out.model_mse_w.mean()), "model_mse_l": float(out.model_mse_l.mean()),
        "ref_mse_w": float(out.ref_mse_w.mean()), "ref_mse_l": float(out.ref_mse_l.mean()),
        "implicit_acc": float(out.implicit_acc), "reward_margin": float(out.reward_margin.mean()),
        "mean_p": float(p.mean()), "mean_t": float(t_pair.float().mean()), "unet_calls": calls,
    }  # fmt: skip
    return out.loss, metrics


def _target(models: StepModels, tau: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    if models.schedule.prediction_type == "v_prediction":
        a = abar.view(-1, *([1] * (x0.dim() - 1))).to(torch.float64)
        return (a.sqrt() * tau.double() - (1 - a).sqrt() * x0.double()).float()
    return tau.float()


def _invert(models: StepModels, x0, cond, t, device):
    """ReNoise inversion to exactly t, or the official loop (which stops at a grid level, not at t), by the
    reference or the policy."""
    from smpo_cli.inversion.official import OFFICIAL_MODES, InverseSchedulerConfig, official_invert
    from smpo_cli.inversion.renoise import renoise_invert

    inv = models.recipe.inversion
    if inv.model == "policy":
        ctx, unet = contextlib.nullcontext(), models.raw_unet
    else:
        ctx, unet = models.reference()
    with ctx, models.autocast():
        if inv.timestep_mode in OFFICIAL_MODES:
            out = official_invert(unet, x0, cond, t.to(x0.device), schedule=models.schedule,
                                  config=InverseSchedulerConfig.from_scheduler(models.comps.scheduler),
                                  num_steps=inv.num_steps, semantics=OFFICIAL_MODES[inv.timestep_mode],
                                  renoise_iterations=inv.renoise_iterations, average_window=inv.average_window)  # fmt: skip
        else:
            out = renoise_invert(unet, x0, cond, t.to(x0.device), schedule=models.schedule, grid=models.grid,
                                 mode=inv.timestep_mode, renoise_iterations=inv.renoise_iterations,
                                 average_window=inv.average_window, first_prediction=inv.first_prediction)  # fmt: skip
    abar_t = models.schedule.abar(t).to(device)
    tau = implied_noise(out.latents, x0, abar_t)  # official modes: x at a grid level, abar at t (the bug)
    return out.latents, tau, out.unet_calls


def make_grid(recipe: TrainRecipe, schedule: NoiseSchedule) -> list[int]:
    return inversion_grid(recipe.inversion.num_steps, schedule.num_train_timesteps)
