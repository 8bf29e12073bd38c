"""Schedule arithmetic against closed forms (hand-computed numbers) and diffusers' own tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smpo_cli.errors import UsageError
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

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


# --- alphas_cumprod ---------------------------------------------------------------------------


def _numpy_abar(schedule: str, start: float, end: float, n: int) -> np.ndarray:
    if schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    else:
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        betas = np.minimum(1 - np.array(f[1:]) / np.array(f[:-1]), 0.999)
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_float64_closed_form_and_diffusers(schedule):
    from diffusers import DDIMScheduler

    config = {**SD_BETAS, "beta_schedule": schedule}
    ours = alphas_cumprod(config)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    expected = _numpy_abar(schedule, SD_BETAS["beta_start"], SD_BETAS["beta_end"], 1000)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-15)
    # diffusers builds the same table in float32: equal to float32 precision.
    theirs = DDIMScheduler(**config).alphas_cumprod.double()
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)
    # from a scheduler instance (its .config) as well
    assert torch.equal(alphas_cumprod(DDIMScheduler(**config)), ours)


def test_alphas_cumprod_hand_values():
    # linear betas 0.1, 0.3 -> abar = 0.9, 0.9 * 0.7
    abar = alphas_cumprod(
        {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.3, "num_train_timesteps": 2}
    )
    assert abar.tolist() == pytest.approx([0.9, 0.63], abs=1e-15)
    # scaled_linear: sqrt(beta) linear from 0.1 to 0.3 over 3 steps -> betas 0.01, 0.04, 0.09
    abar = alphas_cumprod(
        {"beta_schedule": "scaled_linear", "beta_start": 0.01, "beta_end": 0.09, "num_train_timesteps": 3}
    )
    assert abar.tolist() == pytest.approx([0.99, 0.99 * 0.96, 0.99 * 0.96 * 0.91], abs=1e-15)
    # trained betas
    abar = alphas_cumprod({"trained_betas": [0.5, 0.5], "num_train_timesteps": 2})
    assert abar.tolist() == [0.5, 0.25]


def test_zero_terminal_snr_matches_diffusers():
    from diffusers import DDIMScheduler

    config = {**SD_BETAS, "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True}
    ours = alphas_cumprod(config)
    assert ours[-1].item() == pytest.approx(0.0, abs=1e-15)
    assert ours[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    torch.testing.assert_close(ours, DDIMScheduler(**config).alphas_cumprod.double(), rtol=1e-4, atol=1e-7)


def test_alphas_cumprod_rejects_unknown_schedule():
    with pytest.raises(UsageError, match="beta_schedule"):
        alphas_cumprod({"beta_schedule": "sigmoid"})
    with pytest.raises(UsageError):
        alphas_cumprod(42)


def test_noise_schedule_levels():
    sched = NoiseSchedule.from_scheduler(
        {**SD_BETAS, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
    )
    assert sched.prediction_type == "v_prediction" and sched.num_train_timesteps == 1000
    abar = sched.abar([CLEAN, 0, 999])
    assert abar[0].item() == 1.0
    assert abar[1].item() == pytest.approx(1 - 0.00085, abs=1e-15)
    assert abar[2].item() == sched.alphas_cumprod[999].item()
    with pytest.raises(UsageError):
        sched.abar([1000])
    with pytest.raises(UsageError):
        NoiseSchedule(sched.alphas_cumprod, "flow")


# --- grid and paths -----------------------------------------------------------------------------


def test_inversion_grid_rule():
    assert inversion_grid(5) == [199, 399, 599, 799, 999]
    assert inversion_grid(10) == list(range(99, 1000, 100))
    assert inversion_grid(3) == [332, 666, 999]  # round(333.3)-1, round(666.7)-1, 1000-1
    assert inversion_grid(1) == [999]
    assert inversion_grid(4, 10) == [2, 4, 7, 9]  # round(2.5) = 3 (half up) - 1, 5-1, round(7.5)-1, 9
    assert inversion_grid(5, spacing="leading", offset=1) == [1, 201, 401, 601, 801]  # the official grid
    with pytest.raises(UsageError):
        inversion_grid(0)
    with pytest.raises(UsageError):
        inversion_grid(5, spacing="middle")


@pytest.mark.parametrize("n", [1, 3, 5, 7, 10, 50])
def test_trailing_grid_equals_diffusers_trailing_spacing(n):
    from diffusers import DDIMInverseScheduler

    sched = DDIMInverseScheduler(**SD_BETAS, timestep_spacing="trailing", steps_offset=0)
    sched.set_timesteps(n)
    assert inversion_grid(n) == sched.timesteps.tolist()


def test_inversion_paths():
    grid = [199, 399, 599, 799, 999]
    assert inversion_path(300, grid) == [CLEAN, 199, 300]  # partial last step
    assert inversion_path(399, grid) == [CLEAN, 199, 399]  # on the grid: no partial step
    assert inversion_path(150, grid) == [CLEAN, 150]
    assert inversion_path(0, grid) == [CLEAN, 0]
    assert inversion_path(999, grid) == [CLEAN, *grid]
    assert inversion_path(399, grid, "grid") == [CLEAN, 199, 399]
    with pytest.raises(UsageError, match="not a level"):
        inversion_path(300, grid, "grid")
    # below: the last grid level strictly below t
    assert inversion_path(300, grid, "below") == [CLEAN, 199]
    assert inversion_path(399, grid, "below") == [CLEAN, 199]
    assert inversion_path(400, grid, "below") == [CLEAN, 199, 399]
    assert inversion_path(150, grid, "below") == [CLEAN]
    with pytest.raises(UsageError):
        inversion_path(300, grid, "nearest")


# --- step formulas --------------------------------------------------------------------------------


def test_inverse_ddim_step_hand_value():
    # abar_s = 0.81, abar_u = 0.36, x_s = 1, e = 0.5:
    # x0_hat = (1 - sqrt(0.19) * 0.5) / 0.9 = 0.868950059...; x_u = 0.6 * x0_hat + 0.8 * 0.5
    x = torch.tensor([1.0], dtype=torch.float64)
    e = torch.tensor([0.5], dtype=torch.float64)
    x_u = inverse_ddim_step(x, e, 0.81, 0.36)
    assert x_u.item() == pytest.approx(0.6 * (1 - math.sqrt(0.19) * 0.5) / 0.9 + 0.4, abs=1e-14)
    assert x_u.item() == pytest.approx(0.9213700352, abs=1e-9)
    # and back: the denoising step with the same e returns x_s
    assert ddim_step(x_u, e, 0.36, 0.81).item() == pytest.approx(1.0, abs=1e-14)


def test_inverse_step_from_clean_is_the_forward_process():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    e = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    abar = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    expected = abar.sqrt().view(3, 1, 1, 1) * x0 + (1 - abar).sqrt().view(3, 1, 1, 1) * e
    torch.testing.assert_close(inverse_ddim_step(x0, e, 1.0, abar), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(forward_noise(x0, e, abar), expected, rtol=0, atol=1e-14)
    # ddim_step to the clean level returns x0_hat = x0
    torch.testing.assert_close(ddim_step(expected, e, abar, 1.0), x0, rtol=0, atol=1e-12)


def test_step_then_inverse_step_is_identity_per_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    e = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    abar_s = torch.tensor([1.0, 0.99, 0.7, 0.3], dtype=torch.float64)
    abar_u = torch.tensor([0.9, 0.5, 0.2, 0.0047], dtype=torch.float64)
    x_u = inverse_ddim_step(x, e, abar_s, abar_u)
    torch.testing.assert_close(ddim_step(x_u, e, abar_u, abar_s), x, rtol=0, atol=1e-12)
    # sample 2 alone equals sample 2 of the batch
    torch.testing.assert_close(inverse_ddim_step(x[2:3], e[2:3], 0.7, 0.2), x_u[2:3], rtol=0, atol=1e-15)


def test_implied_noise_recovers_the_forward_noise():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    abar = torch.tensor([0.999, 0.5, 0.0047], dtype=torch.float64)
    x_t = forward_noise(x0, eps, abar)
    torch.testing.assert_close(implied_noise(x_t, x0, abar), eps, rtol=0, atol=1e-11)
    # hand value: x_t = 1, x0 = 1, abar = 0.64 -> tau = (1 - 0.8) / 0.6
    one = torch.ones(1, dtype=torch.float64)
    assert implied_noise(one, one, 0.64).item() == pytest.approx(1 / 3, abs=1e-15)
    with pytest.raises(UsageError):
        implied_noise(one, one, 1.0)


def test_eps_from_model_output_v_and_sample():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    abar = torch.tensor([0.8, 0.1], dtype=torch.float64)
    a = abar.view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(eps_from_model_output(v, x_t, abar, "v_prediction"), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_from_model_output(x0, x_t, abar, "sample"), eps, rtol=0, atol=1e-12)
    assert eps_from_model_output(eps, x_t, abar, "epsilon") is not None
    torch.testing.assert_close(eps_from_model_output(eps, x_t, abar, "epsilon"), eps)
    # hand value, v-prediction: abar = 0.36, v = 1, x = 2 -> eps = 0.6 + 0.8 * 2
    assert eps_from_model_output(
        torch.ones(1), torch.full((1,), 2.0), 0.36, "v_prediction"
    ).item() == pytest.approx(2.2, abs=1e-6)
    with pytest.raises(UsageError):
        eps_from_model_output(eps, x_t, abar, "flow")


def test_half_inputs_compute_in_float32_without_half_alphas():
    # abar at t = 0 of SD: 0.99915. In float16 it rounds to 0.99902, and sqrt(1 - abar) becomes
    # 0.03125 instead of 0.02915 (7% off): the official code's bug. Here the result is float32
    # and the coefficient comes from the float64 value.
    abar0 = alphas_cumprod({**SD_BETAS, "beta_schedule": "scaled_linear"})[0]
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float16)
    e = torch.ones(1, 1, 2, 2, dtype=torch.float16)
    out = inverse_ddim_step(x, e, 1.0, abar0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), math.sqrt(1 - 0.99915)), rtol=1e-6, atol=0)
    assert implied_noise(x.bfloat16(), x.bfloat16(), 0.5).dtype == torch.float32


def test_per_sample_abar_must_match_the_batch():
    x = torch.zeros(3, 4, 2, 2)
    with pytest.raises(UsageError, match="shape"):
        inverse_ddim_step(x, x, 1.0, torch.tensor([0.5, 0.4], dtype=torch.float64))
    with pytest.raises(UsageError, match="abar = 0"):
        ddim_step(x, x, 0.0, 1.0)
