"""All noise-schedule arithmetic of smpo's inversion, in one place.

Nothing here depends on how a diffusers scheduler version rolls or offsets its timesteps: the
cumulative products ``abar_t`` are recomputed from the scheduler *config* (``beta_start``,
``beta_end``, ``beta_schedule``, ``num_train_timesteps``, ``trained_betas``,
``rescale_betas_zero_snr``) in float64, and the inversion levels come from :func:`inversion_grid`.

Conventions
-----------
* A *level* is a training timestep ``t`` in ``[0, T)`` with ``abar_t = alphas_cumprod[t]``.
  The clean latent is the extra level :data:`CLEAN` (``-1``) with ``abar = 1``.
* ``abar`` arguments may be Python floats, 0-d tensors or per-sample tensors of shape ``(B,)``;
  they broadcast over the remaining dimensions of ``x`` (``(B, C, H, W)``).
* Coefficients (square roots, ratios) are computed in float64 (float32 on MPS, which has no
  float64) and only then cast to the compute dtype: ``promote(x.dtype, float32)``. A float16 or
  bfloat16 input therefore gives a float32 result; alphas are never cast to half before a sqrt
  (the official SmPO code does, which loses about 3 significant digits near ``abar = 1``).

The DDIM relations used (method.md sections 1 and 3), for ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``:

* inverse step ``s -> u`` (``u`` noisier): ``x_u = sqrt(abar_u) (x_s - sqrt(1-abar_s) e) / sqrt(abar_s) + sqrt(1-abar_u) e``
* denoising step ``u -> s``: the same formula with the roles of ``s`` and ``u`` swapped;
* implied noise: ``tau_t = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``;
* v-prediction: ``v = sqrt(abar) eps - sqrt(1-abar) x0``, hence ``eps = sqrt(abar) v + sqrt(1-abar) x_t``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smpo_cli.errors import UsageError

CLEAN = -1
"""The level of the clean latent (``abar = 1``); not a UNet timestep."""

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MODES = ("exact", "grid", "below")
SPACINGS = ("trailing", "leading")

# --------------------------------------------------------------------------------------------
# alphas_cumprod
# --------------------------------------------------------------------------------------------


def _config_of(scheduler_or_config: Any) -> Mapping[str, Any]:
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise UsageError(
            f"cannot read a noise schedule from {type(scheduler_or_config).__name__}",
            hint="pass a diffusers scheduler, its .config, or a dict with beta_start/beta_end/beta_schedule",
        )
    return config


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """betas of the ``squaredcos_cap_v2`` schedule (Nichol & Dhariwal 2021), in float64."""

    def abar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]


def _rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, applied to ``abar`` directly (same result as on betas)."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def alphas_cumprod(scheduler_or_config: Any) -> torch.Tensor:
    """``abar_t`` for ``t = 0..T-1`` as a float64 CPU tensor, from a scheduler or its config.

    Supports ``beta_schedule`` ``linear`` (betas linear in ``[beta_start, beta_end]``),
    ``scaled_linear`` (square roots of the betas linear; SD1.5 / SDXL) and ``squaredcos_cap_v2``
    (cosine, betas capped at 0.999), plus ``trained_betas`` and ``rescale_betas_zero_snr``.
    diffusers computes the same quantities in float32; these agree with it to float32 precision
    and with the float64 closed forms to about 1e-15.
    """
    config = _config_of(scheduler_or_config)
    n = int(config.get("num_train_timesteps", 1000))
    if n < 1:
        raise UsageError(f"num_train_timesteps must be >= 1, got {n}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(list(trained), dtype=torch.float64)
        if betas.numel() != n:
            raise UsageError(f"trained_betas has {betas.numel()} values but num_train_timesteps is {n}")
    else:
        schedule = str(config.get("beta_schedule", "linear"))
        start = float(config.get("beta_start", 0.0001))
        end = float(config.get("beta_end", 0.02))
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = torch.tensor(_cosine_betas(n), dtype=torch.float64)
        else:
            raise UsageError(
                f"unsupported beta_schedule {schedule!r}", hint=f"use one of {', '.join(BETA_SCHEDULES)}"
            )
    abar = torch.cumprod(1.0 - betas, dim=0)
    if config.get("rescale_betas_zero_snr", False):
        abar = _rescale_zero_terminal_snr(abar)
    return abar


@dataclass(frozen=True)
class NoiseSchedule:
    """What inversion needs from a scheduler: ``abar`` (float64, CPU) and the prediction type."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(
                f"unsupported prediction_type {self.prediction_type!r}",
                hint=f"use one of {', '.join(PREDICTION_TYPES)}",
            )

    @classmethod
    def from_scheduler(cls, scheduler_or_config: Any, prediction_type: str | None = None) -> NoiseSchedule:
        """From a diffusers scheduler or config (``prediction_type`` overrides the config's)."""
        config = _config_of(scheduler_or_config)
        kind = prediction_type or str(config.get("prediction_type", "epsilon"))
        return cls(alphas_cumprod(config), kind)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def abar(self, levels: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """``abar`` at ``levels`` (float64, CPU); level :data:`CLEAN` gives 1."""
        idx = torch.as_tensor(levels, dtype=torch.long).cpu()
        if bool(((idx < CLEAN) | (idx >= self.num_train_timesteps)).any()):
            raise UsageError(f"levels must lie in [-1, {self.num_train_timesteps}); got {idx.tolist()}")
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return table[idx + 1]


def as_schedule(schedule: Any, prediction_type: str | None = None) -> NoiseSchedule:
    """A :class:`NoiseSchedule` from itself, a diffusers scheduler or a scheduler config."""
    if isinstance(schedule, NoiseSchedule):
        if prediction_type is not None and prediction_type != schedule.prediction_type:
            return NoiseSchedule(schedule.alphas_cumprod, prediction_type)
        return schedule
    return NoiseSchedule.from_scheduler(schedule, prediction_type)


# --------------------------------------------------------------------------------------------
# Grid and per-sample paths
# --------------------------------------------------------------------------------------------


def inversion_grid(
    num_steps: int, num_train_timesteps: int = 1000, *, spacing: str = "trailing", offset: int = 0
) -> list[int]:
    """The ``num_steps`` grid levels of an inversion over ``[0, T)``, increasing.

    ``spacing="trailing"`` (default): ``level_i = round((i + 1) * T / num_steps) - 1`` for
    ``i = 0..num_steps-1`` (round half up, exact integer arithmetic). The grid ends on ``T - 1``
    and its steps all have the same length, the first one starting from the clean latent
    (5 steps of 1000: 199, 399, 599, 799, 999). It is diffusers' "trailing" spacing for the
    divisible cases (Lin et al. 2023), so every ``t`` in ``[0, T)`` lies at or below the top level.

    ``spacing="leading"``: ``level_i = floor(i * T / num_steps) + offset`` (diffusers' "leading"
    spacing; with ``offset=1`` the grid of the official SmPO code's ``DDIMInverseScheduler``: 1, 201,
    401, 601, 801; how the official loop walks it is in :mod:`smpo_cli.inversion.official`).
    """
    n, total = int(num_steps), int(num_train_timesteps)
    if n < 1 or n > total:
        raise UsageError(f"num_steps must be in [1, {total}], got {num_steps}")
    if spacing == "trailing":
        levels = [(2 * (i + 1) * total + n) // (2 * n) - 1 for i in range(n)]
    elif spacing == "leading":
        levels = [i * total // n + int(offset) for i in range(n)]
    else:
        raise UsageError(f"unknown grid spacing {spacing!r}", hint=f"use one of {', '.join(SPACINGS)}")
    check_grid(levels, total)
    return levels


def check_grid(grid: Sequence[int], num_train_timesteps: int) -> list[int]:
    """``grid`` as a list of ints after checking it is strictly increasing inside ``[0, T)``."""
    levels = [int(g) for g in grid]
    if not levels:
        raise UsageError("the inversion grid is empty")
    if levels[0] < 0 or levels[-1] >= num_train_timesteps:
        raise UsageError(f"grid levels must lie in [0, {num_train_timesteps}); got {levels}")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise UsageError(f"grid levels must be strictly increasing; got {levels}")
    return levels


def inversion_path(t: int, grid: Sequence[int], mode: str = "exact") -> list[int]:
    """Levels visited by the inversion of one sample to timestep ``t``, from :data:`CLEAN`.

    * ``"exact"``: the grid levels strictly below ``t``, then ``t`` itself (a partial step when
      ``t`` is not a grid level, none needed when it is). Ends exactly on ``t``.
    * ``"grid"``: as ``"exact"``, but ``t`` must be a grid level.
    * ``"below"``: the grid levels strictly below ``t`` only; the path ends on the last grid level
      below ``t`` (:data:`CLEAN` if there is none), so the latent is *not* at ``t``. (The official
      SmPO loop, on its own grid and labels, is :mod:`smpo_cli.inversion.official`.)

    The number of inversion steps of the sample is ``len(path) - 1``.
    """
    if mode not in MODES:
        raise UsageError(f"unknown inversion mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    t = int(t)
    below = [g for g in grid if g < t]
    if mode == "below":
        return [CLEAN, *below]
    if mode == "grid" and t not in grid:
        raise UsageError(
            f"t={t} is not a level of the inversion grid {list(grid)}",
            hint="sample t on the grid, or use mode='exact'",
        )
    return [CLEAN, *below, t]


# --------------------------------------------------------------------------------------------
# Tensor formulas
# --------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _wide(abar: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``abar`` as a float64 tensor on ``device`` (float32 on MPS)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.as_tensor(abar, dtype=dtype, device=device)


def _any_cpu(abar: float | torch.Tensor, predicate) -> bool:
    """``predicate`` on ``abar`` when that needs no device sync (a float or a CPU tensor), else False."""
    if isinstance(abar, torch.Tensor):
        return abar.device.type == "cpu" and bool(predicate(abar).any())
    return bool(predicate(float(abar)))


def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or ``(B,)`` coefficient, cast to the compute dtype and shaped to broadcast over ``x``."""
    coef = coef.to(_compute_dtype(x))
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
        raise UsageError(f"per-sample abar must have shape ({x.shape[0]},), got {tuple(coef.shape)}")
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x))


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (the forward process)."""
    a = _wide(abar, x0.device)
    return _bcast(a.sqrt(), x0) * _f(x0) + _bcast((1 - a).sqrt(), x0) * _f(eps)


def inverse_ddim_step(
    x_s: torch.Tensor, eps: torch.Tensor, abar_s: float | torch.Tensor, abar_u: float | torch.Tensor
) -> torch.Tensor:
    """DDIM step from level ``s`` to a noisier level ``u`` with noise estimate ``eps``.

    ``x_u = sqrt(abar_u) (x_s - sqrt(1-abar_s) eps) / sqrt(abar_s) + sqrt(1-abar_u) eps``, computed as
    ``r x_s + (sqrt(1-abar_u) - r sqrt(1-abar_s)) eps`` with ``r = sqrt(abar_u / abar_s)``.
    """
    return _ddim_transfer(x_s, eps, abar_s, abar_u)


def ddim_step(
    x_u: torch.Tensor, eps: torch.Tensor, abar_u: float | torch.Tensor, abar_s: float | torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM denoising step (eta = 0) from level ``u`` to a cleaner level ``s``.

    ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps`` with ``x0_hat = (x_u - sqrt(1-abar_u) eps) / sqrt(abar_u)``;
    ``abar_s = 1`` returns ``x0_hat``. Same formula as :func:`inverse_ddim_step`, other direction.
    """
    return _ddim_transfer(x_u, eps, abar_u, abar_s)


def _ddim_transfer(x: torch.Tensor, eps: torch.Tensor, abar_from, abar_to) -> torch.Tensor:
    if _any_cpu(abar_from, lambda a: a <= 0):
        raise UsageError("a DDIM step cannot start from a level with abar = 0 (zero terminal SNR)")
    a_from = _wide(abar_from, x.device)
    a_to = _wide(abar_to, x.device)
    ratio = (a_to / a_from).sqrt()
    c_eps = (1 - a_to).sqrt() - ratio * (1 - a_from).sqrt()
    return _bcast(ratio, x) * _f(x) + _bcast(c_eps, x) * _f(eps)


def implied_noise(x_t: torch.Tensor, x0: torch.Tensor, abar_t: float | torch.Tensor) -> torch.Tensor:
    """``tau_t = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``: the noise that ``x_t`` implies (method.md 3)."""
    if _any_cpu(abar_t, lambda a: a >= 1):
        raise UsageError("implied_noise needs abar_t < 1 (a noisy level, not the clean latent)")
    a = _wide(abar_t, x_t.device)
    inv = 1 / (1 - a).sqrt()
    return _bcast(inv, x_t) * _f(x_t) - _bcast(a.sqrt() * inv, x_t) * _f(x0)


def eps_from_model_output(
    output: torch.Tensor, x: torch.Tensor, abar: float | torch.Tensor, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """The noise estimate from a UNet output at a latent ``x`` whose level has ``abar``.

    ``epsilon``: the output itself; ``v_prediction``: ``sqrt(abar) v + sqrt(1-abar) x``;
    ``sample``: ``(x - sqrt(abar) x0_hat) / sqrt(1-abar)``. Result in the compute dtype.
    """
    if prediction_type == "epsilon":
        return output.to(_compute_dtype(x))
    a = _wide(abar, x.device)
    if prediction_type == "v_prediction":
        return _bcast(a.sqrt(), x) * _f(output) + _bcast((1 - a).sqrt(), x) * _f(x)
    if prediction_type == "sample":
        return implied_noise(x, output, abar)
    raise UsageError(
        f"unsupported prediction_type {prediction_type!r}", hint=f"use one of {', '.join(PREDICTION_TYPES)}"
    )
