"""SmPO, Diffusion-DPO and SFT losses as pure tensor functions (method.md sections 1-3).

For pair i (winner w, loser l), with predictions of the trained model and of the frozen reference and a
regression target per image (the shared noise eps for Diffusion-DPO, the implied noise tau_t of each
image's inversion for SmPO):

    mse(a, b)  = mean over all non-batch dims of (a - b)^2
    d(x)       = mse(model(x_t), target_x) - mse(ref(x_t), target_x)
    inside_i   = -0.5 * coef_i * (d(w) - d(l))
    L_i        = -log sigmoid(inside_i)                 (F.logsigmoid, stable for any magnitude)
    L          = mean_i L_i
    acc        = mean_i [inside_i > 0]                  (implicit accuracy, as the official code)

    Diffusion-DPO : coef_i = beta
    SmPO          : coef_i = beta * gamma * (2 p_i - 1)  (p_i = reward-model probability that w is preferred)
    SFT           : L = mean_i mse(model(x_t), target) on the winners

p is per pair (the official code used the first pair's p for the whole micro-batch). With p_i = 0.5 the
coefficient is exactly 0, so L_i = log 2 and its gradient is exactly zero. All math runs in float32 (or
float64 for float64 inputs), whatever the input dtype (fp16, bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smpo_cli.errors import UsageError

__all__ = [
    "PreferenceLossOutput",
    "diffusion_dpo_loss",
    "per_sample_mse",
    "preference_loss",
    "sft_loss",
    "smpo_loss",
]

PREFERENCE_METHODS = ("smpo", "dpo")


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Loss and diagnostics of one batch of P preference pairs.

    Only ``loss`` and ``per_pair_loss`` carry gradients; the other fields are detached.
    """

    loss: torch.Tensor
    """Scalar: mean of ``per_pair_loss`` over the pairs."""
    per_pair_loss: torch.Tensor
    """(P,): -log sigmoid(inside)."""
    inside: torch.Tensor
    """(P,): the logit inside -log sigmoid, -0.5 * coef * (d_w - d_l)."""
    model_mse_w: torch.Tensor
    """(P,): mse(model prediction, target) on the winners."""
    model_mse_l: torch.Tensor
    """(P,): mse(model prediction, target) on the losers."""
    ref_mse_w: torch.Tensor
    """(P,): mse(reference prediction, target) on the winners."""
    ref_mse_l: torch.Tensor
    """(P,): mse(reference prediction, target) on the losers."""
    implicit_acc: torch.Tensor
    """Scalar: fraction of pairs with inside > 0, as the official code's ``(inside_term > 0)``. For DPO
    (and SmPO with p > 0.5) that is d_w - d_l < 0, the model preferring the winner more than the reference
    does; a pair with inside = 0 (an exact tie, or SmPO's p = 0.5) counts 0; with p < 0.5 a pair counts
    when the model moved towards the loser, the image the reward prefers."""
    reward_margin: torch.Tensor
    """(P,): the implicit reward margin -(d_w - d_l)."""
    coef: torch.Tensor
    """(P,): the effective scale, beta (DPO) or beta * gamma * (2p - 1) (SmPO)."""


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (never fp16/bf16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: mean over every dimension but the first, in float32.

    mse_b = mean_{c,h,w} (pred[b] - target[b])^2        -> shape (B,)
    """
    _check_shapes(pred=pred, target=target)
    dtype = _compute_dtype(pred, target)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


def _check_shapes(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"loss input {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[0] < 1:
            raise UsageError(
                f"loss input {name} needs a non-empty batch dimension, got shape {tuple(t.shape)}"
            )
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise UsageError(f"loss inputs must share one shape, got {listed}")


def _check_scalar(name: str, value: float, *, positive: bool = True) -> float:
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise UsageError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_p(p: torch.Tensor | float, pairs: int, device: torch.device) -> torch.Tensor:
    p = torch.as_tensor(p, device=device).detach().to(torch.float32)
    if p.numel() != pairs or (p.dim() > 1 and p.numel() != p.shape[0]):
        raise UsageError(
            f"p has shape {tuple(p.shape)} for {pairs} pairs; give one p per pair, shape ({pairs},)"
        )
    p = p.reshape(pairs)
    bad = ~torch.isfinite(p) | (p < 0) | (p > 1)
    if bool(bad.any()):
        raise UsageError(
            f"p must lie in [0, 1], got {p[bad].tolist()} (pair indices {bad.nonzero().flatten().tolist()})"
        )
    return p


def _preference(
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    coef: torch.Tensor,
) -> PreferenceLossOutput:
    m_w, m_l = per_sample_mse(model_pred_w, target_w), per_sample_mse(model_pred_l, target_l)
    r_w, r_l = per_sample_mse(ref_pred_w, target_w), per_sample_mse(ref_pred_l, target_l)
    diff = (m_w - r_w) - (m_l - r_l)  # d_w - d_l
    coef = coef.to(diff.dtype)
    inside = -0.5 * coef * diff
    per_pair = -F.logsigmoid(inside)
    diff_d = diff.detach()
    acc = (inside.detach() > 0).to(diff.dtype)  # the official per-pair accuracy: p = 0.5 and ties count 0
    return PreferenceLossOutput(
        loss=per_pair.mean(),
        per_pair_loss=per_pair,
        inside=inside.detach(),
        model_mse_w=m_w.detach(),
        model_mse_l=m_l.detach(),
        ref_mse_w=r_w.detach(),
        ref_mse_l=r_l.detach(),
        implicit_acc=acc.mean(),
        reward_margin=-diff_d,
        coef=coef.detach(),
    )


def diffusion_dpo_loss(
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLossOutput:
    """Diffusion-DPO (Wallace et al., 2023), method.md section 1.

        d(x) = mse(model(x_t), target_x) - mse(ref(x_t), target_x)
        L    = mean_i -log sigmoid( -0.5 * beta * (d(w_i) - d(l_i)) )

    All six tensors have shape (P, ...): row i of each ``*_w`` / ``*_l`` belongs to pair i. ``target_w`` and
    ``target_l`` are the shared noise eps for Diffusion-DPO, or each image's implied noise tau with inversion.
    """
    _check_shapes(
        model_pred_w=model_pred_w,
        model_pred_l=model_pred_l,
        ref_pred_w=ref_pred_w,
        ref_pred_l=ref_pred_l,
        target_w=target_w,
        target_l=target_l,
    )
    beta = _check_scalar("beta", beta)
    coef = torch.full((model_pred_w.shape[0],), beta, dtype=torch.float32, device=model_pred_w.device)
    return _preference(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, coef)


def smpo_loss(
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    p: torch.Tensor,
) -> PreferenceLossOutput:
    """SmPO (smoothed preference), method.md sections 2-3.

        coef_i = beta * gamma * (2 p_i - 1)
        L      = mean_i -log sigmoid( -0.5 * coef_i * (d(w_i) - d(l_i)) )

    ``p`` has shape (P,): p_i = exp(r'_w) / (exp(r'_w) + exp(r'_l)), the reward model's probability that
    the winner of pair i is preferred, in [0, 1]. Each pair uses its own p_i. p_i = 0.5 gives coef_i = 0,
    L_i = log 2 and an exactly zero gradient; p = 1 with gamma = 1 is Diffusion-DPO. ``p`` carries no
    gradient. Targets as in :func:`diffusion_dpo_loss` (the implied noise tau of each image's inversion).
    """
    _check_shapes(
        model_pred_w=model_pred_w,
        model_pred_l=model_pred_l,
        ref_pred_w=ref_pred_w,
        ref_pred_l=ref_pred_l,
        target_w=target_w,
        target_l=target_l,
    )
    beta = _check_scalar("beta", beta)
    gamma = _check_scalar("gamma", gamma)
    p = _check_p(p, model_pred_w.shape[0], model_pred_w.device)
    coef = (beta * gamma) * (2.0 * p - 1.0)
    return _preference(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, coef)


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning on the preferred images: the plain diffusion loss, a float32 scalar.

    L = mean_b mse(model(x_t)[b], target[b])
    """
    _check_shapes(model_pred=model_pred, target=target)
    return per_sample_mse(model_pred, target).mean()


def preference_loss(
    method: str,
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
    gamma: float | None = None,
    p: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Dispatch to :func:`smpo_loss` ("smpo", needs ``gamma`` and ``p``) or :func:`diffusion_dpo_loss` ("dpo").

    "dpo" ignores ``gamma``; a ``p`` given to it is still checked to lie in [0, 1] (a bad p means bad data)
    but does not enter the loss. Raises :class:`UsageError` on an unknown method, mismatched shapes, a
    missing gamma / p for "smpo", or p outside [0, 1].
    """
    preds = (model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l)
    if method == "smpo":
        if gamma is None or p is None:
            missing = " and ".join(name for name, v in (("gamma", gamma), ("p", p)) if v is None)
            raise UsageError(f"the smpo loss needs {missing}")
        return smpo_loss(*preds, beta=beta, gamma=gamma, p=p)
    if method == "dpo":
        out = diffusion_dpo_loss(*preds, beta=beta)
        if p is not None:
            _check_p(p, model_pred_w.shape[0], model_pred_w.device)
        return out
    raise UsageError(
        f"unknown preference loss {method!r}", hint="use one of: " + ", ".join(PREFERENCE_METHODS)
    )
