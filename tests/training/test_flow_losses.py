"""Flow-matching forward process, SD3's timestep density and the velocity losses, in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smpo_cli.errors import UsageError
from smpo_cli.training.flow_losses import (
    flow_diffusion_dpo_loss,
    flow_matching_noisy,
    flow_matching_target,
    flow_preference_loss,
    flow_sft_loss,
    flow_smpo_loss,
    implied_velocity,
    logit_normal_quantile,
    sample_flow_sigmas,
    shift_sigmas,
    sigmas_to_timesteps,
)

LOG2 = math.log(2.0)


def _pairs(seed: int = 0, p: int = 3, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x0_w, x0_l, eps = (torch.randn(p, *shape, generator=g) for _ in range(3))
    sigmas = torch.rand(p, generator=g)
    return x0_w, x0_l, eps, sigmas


# --- forward process and velocity target ----------------------------------------------------


def test_velocity_target_on_a_constructed_example():
    x0 = torch.full((2, 1, 2, 2), 1.0)
    eps = torch.full((2, 1, 2, 2), 3.0)
    sigmas = torch.tensor([0.25, 1.0])
    x_s = flow_matching_noisy(x0, eps, sigmas)
    assert torch.equal(x_s[0], torch.full((1, 2, 2), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert torch.equal(x_s[1], eps[1])  # s = 1: pure noise
    assert torch.equal(flow_matching_noisy(x0, eps, 0.0), x0)  # s = 0: the image
    assert torch.equal(flow_matching_target(x0, eps), torch.full((2, 1, 2, 2), 2.0))
    assert torch.equal(implied_velocity(x_s, x0, sigmas), torch.full((2, 1, 2, 2), 2.0))


def test_velocity_is_the_derivative_of_the_path():
    x0, _, eps, sigmas = _pairs()
    s = sigmas.clone().double().requires_grad_(True)
    x_s = flow_matching_noisy(x0.double(), eps.double(), s)
    (grad,) = torch.autograd.grad(x_s.sum(), s)
    expected = flow_matching_target(x0.double(), eps.double()).flatten(1).sum(1)
    torch.testing.assert_close(grad, expected)
    # an x_s on the path implies exactly v = eps - x0
    torch.testing.assert_close(
        implied_velocity(x_s.detach(), x0.double(), s.detach()),
        flow_matching_target(x0.double(), eps.double()),
    )


def test_dtypes_and_input_checks():
    x0 = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    eps = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    assert flow_matching_noisy(x0, eps, torch.tensor([0.1, 0.9])).dtype == torch.bfloat16
    assert flow_matching_target(x0, eps).dtype == torch.float32
    with pytest.raises(UsageError, match="shape"):
        flow_matching_noisy(x0, eps, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        flow_matching_noisy(x0, eps, torch.tensor([0.1, 1.5]))
    with pytest.raises(UsageError, match="share one shape"):
        flow_matching_target(x0, eps[:1])
    with pytest.raises(UsageError, match="> 0"):
        implied_velocity(x0, x0, torch.tensor([0.0, 0.5]))


# --- timestep density -----------------------------------------------------------------------


def test_shift_matches_the_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000  # the scheduler's training grid
    torch.testing.assert_close(shift_sigmas(unshifted, 3.0), sched.sigmas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sigmas_to_timesteps(sched.sigmas), sched.timesteps, atol=1e-3, rtol=0)
    # the inference grid: linear from sigma_max = 1 to sigma_min (the shifted 1/1000), shifted, then a final 0
    sched.set_timesteps(28)
    grid = torch.linspace(1.0, shift_sigmas(1 / 1000, 3.0).item(), 28, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), shift_sigmas(grid, 3.0), atol=1e-6, rtol=0)
    assert sched.sigmas[-1] == 0
    # fixed points, monotone, and shift 1 is the identity
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = shift_sigmas(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
    assert bool((shifted[1:-1] > s[1:-1]).all())
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)
    assert shift_sigmas(0.5, 3.0).item() == pytest.approx(0.75)


@pytest.mark.parametrize(("mean", "std", "shift"), [(0.0, 1.0, 1.0), (0.0, 1.0, 3.0), (0.5, 0.8, 3.0)])
def test_logit_normal_sampler_quantiles_match_the_analytic_distribution(mean, std, shift):
    n = 200_000
    g = torch.Generator().manual_seed(0)
    s = sample_flow_sigmas(n, mean=mean, std=std, shift=shift, generator=g, dtype=torch.float64)
    assert s.shape == (n,) and bool(((s > 0) & (s < 1)).all())
    qs = torch.tensor([0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99], dtype=torch.float64)
    empirical = torch.quantile(s, qs)
    analytic = logit_normal_quantile(qs, mean=mean, std=std, shift=shift)
    # standard error of a quantile is sqrt(q(1-q)/n)/density, well under 3e-3 here
    torch.testing.assert_close(empirical, analytic, atol=3e-3, rtol=0)
    # the median of the unshifted logit-normal is sigmoid(mean)
    assert logit_normal_quantile(0.5, mean=mean, std=std, shift=1.0).item() == pytest.approx(
        1 / (1 + math.exp(-mean))
    )


def test_sampler_is_reproducible_and_matches_the_diffusers_density():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    a = sample_flow_sigmas(8, generator=torch.Generator().manual_seed(3))
    b = sample_flow_sigmas(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    # same distribution as diffusers' logit_normal weighting scheme (before its discretisation)
    u = compute_density_for_timestep_sampling("logit_normal", 100_000, logit_mean=0.0, logit_std=1.0)
    ours = sample_flow_sigmas(100_000, generator=torch.Generator().manual_seed(1))
    qs = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(torch.quantile(u.float(), qs), torch.quantile(ours, qs), atol=6e-3, rtol=0)
    with pytest.raises(UsageError):
        sample_flow_sigmas(0)
    with pytest.raises(UsageError):
        sample_flow_sigmas(4, std=0.0)
    with pytest.raises(UsageError):
        shift_sigmas(0.5, 0.0)


# --- losses ---------------------------------------------------------------------------------


def _velocity_setup(seed: int = 0):
    x0_w, x0_l, eps, sigmas = _pairs(seed)
    v_w, v_l = flow_matching_target(x0_w, eps), flow_matching_target(x0_l, eps)
    g = torch.Generator().manual_seed(seed + 100)
    ref_w = v_w + 0.5 * torch.randn(v_w.shape, generator=g)
    ref_l = v_l + 0.5 * torch.randn(v_l.shape, generator=g)
    model_w = (ref_w + 0.1 * torch.randn(v_w.shape, generator=g)).requires_grad_(True)
    model_l = (ref_l + 0.1 * torch.randn(v_l.shape, generator=g)).requires_grad_(True)
    return model_w, model_l, ref_w, ref_l, v_w, v_l


def test_smpo_with_p_one_half_has_zero_gradient():
    model_w, model_l, ref_w, ref_l, v_w, v_l = _velocity_setup()
    out = flow_smpo_loss(
        model_w, model_l, ref_w, ref_l, v_w, v_l, beta=5000.0, gamma=10.0, p=torch.full((3,), 0.5)
    )
    out.loss.backward()
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert torch.count_nonzero(model_w.grad) == 0 and torch.count_nonzero(model_l.grad) == 0
    assert torch.equal(out.coef, torch.zeros(3)) and out.implicit_acc.item() == 0.0


def test_dpo_with_policy_equal_to_reference_is_log2_with_zero_margin():
    _, _, ref_w, ref_l, v_w, v_l = _velocity_setup(1)
    out = flow_diffusion_dpo_loss(ref_w.clone(), ref_l.clone(), ref_w, ref_l, v_w, v_l, beta=5000.0)
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-7)
    np.testing.assert_array_equal(out.reward_margin.numpy(), np.zeros(3))
    np.testing.assert_allclose(out.per_pair_loss.detach().numpy(), np.full(3, LOG2), atol=1e-7)
    # SmPO as well, whatever p
    smpo = flow_smpo_loss(
        ref_w, ref_l, ref_w, ref_l, v_w, v_l, beta=5000.0, gamma=10.0, p=torch.tensor([0.1, 0.6, 0.9])
    )
    assert smpo.loss.item() == pytest.approx(LOG2, abs=1e-7)


def test_losses_use_the_velocity_mse_and_prefer_the_winner():
    model_w, model_l, ref_w, ref_l, v_w, v_l = _velocity_setup(2)
    # a policy closer to the winner's velocity than the reference is, and farther from the loser's
    better_w, worse_l = (ref_w + v_w) / 2, 2 * ref_l - v_l
    out = flow_diffusion_dpo_loss(better_w, worse_l, ref_w, ref_l, v_w, v_l, beta=1.0)
    assert out.loss.item() < LOG2 and out.implicit_acc.item() == 1.0
    mse = lambda a, b: (a - b).pow(2).flatten(1).mean(1)  # noqa: E731
    d = (mse(better_w, v_w) - mse(ref_w, v_w)) - (mse(worse_l, v_l) - mse(ref_l, v_l))
    torch.testing.assert_close(out.inside, -0.5 * d)
    torch.testing.assert_close(out.model_mse_w, mse(better_w, v_w))
    # SmPO: p = 1 with gamma = 1 is Diffusion-DPO; p < 0.5 turns the preference around
    smpo = flow_smpo_loss(better_w, worse_l, ref_w, ref_l, v_w, v_l, beta=1.0, gamma=1.0, p=torch.ones(3))
    torch.testing.assert_close(smpo.loss, out.loss)
    flipped = flow_smpo_loss(better_w, worse_l, ref_w, ref_l, v_w, v_l, beta=1.0, gamma=1.0, p=torch.zeros(3))
    assert flipped.loss.item() > LOG2
    via = flow_preference_loss(
        "smpo", better_w, worse_l, ref_w, ref_l, v_w, v_l, beta=1.0, gamma=1.0, p=torch.ones(3)
    )
    torch.testing.assert_close(via.loss, out.loss)


def test_sft_is_the_mean_velocity_mse():
    model_w, _, _, _, v_w, _ = _velocity_setup(3)
    loss = flow_sft_loss(model_w, v_w)
    torch.testing.assert_close(loss, (model_w - v_w).pow(2).mean())
    assert loss.dtype == torch.float32 and flow_sft_loss(v_w, v_w).item() == 0.0
