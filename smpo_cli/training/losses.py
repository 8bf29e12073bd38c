"""SmPO, Diffusion-DPO and SFT losses as pure tensor functions (method.md sections 1-2).

For a pair (winner w, loser l) with predictions of the trained model and the frozen reference:

    d(x)  = ||target - model(x_t)||^2 - ||target - ref(x_t)||^2          (mean over pixels)
    DPO   : L = -log sigmoid( -0.5 * beta * (d(w) - d(l)) )
    SmPO  : L = -log sigmoid( -0.5 * beta * gamma * (2p - 1) * (d(w) - d(l)) )
    SFT   : L = ||target - model(x_t)||^2 on the winners

p is per pair (the official code used the first pair's p for the whole batch); with p = 0.5 the
coefficient is 0, the loss is log 2 and the gradient is exactly zero. All math runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smpo_cli.errors import UsageError


@dataclass
class PreferenceLossOutput:
    loss: torch.Tensor  # scalar: mean over pairs
    per_pair_loss: torch.Tensor  # (P,)
    inside: torch.Tensor  # (P,) the argument of -log sigmoid
    model_mse_w: torch.Tensor
    model_mse_l: torch.Tensor
    ref_mse_w: torch.Tensor
    ref_mse_l: torch.Tensor
    implicit_acc: torch.Tensor  # scalar: fraction of pairs with d(w) - d(l) < 0 (ties count 0.5)
    reward_margin: torch.Tensor  # (P,) -(d(w) - d(l))
    coef: torch.Tensor  # (P,) the scale multiplying -(d(w) - d(l)) / 2 ... i.e. beta or beta*gamma*(2p-1)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the first, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _check(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise UsageError("loss inputs must share one shape: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))


def _preference(model_w, model_l, ref_w, ref_l, target_w, target_l, coef: torch.Tensor) -> PreferenceLossOutput:
    _check(model_pred_w=model_w, model_pred_l=model_l, ref_pred_w=ref_w, ref_pred_l=ref_l,
           target_w=target_w, target_l=target_l)  # fmt: skip
    m_w, m_l = per_sample_mse(model_w, target_w), per_sample_mse(model_l, target_l)
    r_w, r_l = per_sample_mse(ref_w, target_w), per_sample_mse(ref_l, target_l)
    diff = (m_w - r_w) - (m_l - r_l)  # d(w) - d(l)
    inside = -0.5 * coef * diff
    per_pair = -F.logsigmoid(inside)
    acc = (diff < 0).float() + 0.5 * (diff == 0).float()
    return PreferenceLossOutput(
        loss=per_pair.mean(), per_pair_loss=per_pair, inside=inside.detach(),
        model_mse_w=m_w.detach(), model_mse_l=m_l.detach(), ref_mse_w=r_w.detach(), ref_mse_l=r_l.detach(),
        implicit_acc=acc.mean().detach(), reward_margin=(-diff).detach(), coef=coef.detach(),
    )  # fmt: skip


def diffusion_dpo_loss(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta: float):
    """Diffusion-DPO (Wallace et al. 2023): coefficient beta for every pair."""
    coef = torch.full((model_pred_w.shape[0],), float(beta), dtype=torch.float32, device=model_pred_w.device)
    return _preference(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, coef)


def smpo_loss(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta: float, gamma: float,
              p: torch.Tensor) -> PreferenceLossOutput:  # fmt: skip
    """SmPO: coefficient beta * gamma * (2p - 1) per pair, p the probability that the winner is preferred."""
    p = torch.as_tensor(p, dtype=torch.float32, device=model_pred_w.device).reshape(-1)
    if p.numel() != model_pred_w.shape[0]:
        raise UsageError(f"p has {p.numel()} values for {model_pred_w.shape[0]} pairs; give one p per pair")
    if bool(((p < 0) | (p > 1) | ~torch.isfinite(p)).any()):
        raise UsageError("p must lie in [0, 1]")
    coef = float(beta) * float(gamma) * (2.0 * p - 1.0)
    return _preference(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, coef)


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning on the preferred images: the plain diffusion loss."""
    _check(model_pred=model_pred, target=target)
    return per_sample_mse(model_pred, target).mean()


def preference_loss(method: str, *args, **kwargs) -> PreferenceLossOutput:
    if method == "smpo":
        return smpo_loss(*args, **kwargs)
    if method == "dpo":
        kwargs.pop("gamma", None)
        kwargs.pop("p", None)
        return diffusion_dpo_loss(*args, **kwargs)
    raise UsageError(f"unknown preference loss {method!r}", hint="use smpo or dpo")
