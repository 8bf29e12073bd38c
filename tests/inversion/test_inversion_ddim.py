"""Plain DDIM inversion on the tiny SD1.5 UNet: diffusers parity, exact t, batching, below mode."""

from __future__ import annotations

import copy

import pytest
import torch

from smpo_cli.errors import UsageError
from smpo_cli.inversion import (
    CLEAN,
    NoiseSchedule,
    ddim_invert,
    ddim_sample,
    forward_noise,
    inverse_ddim_step,
    renoise_invert,
)
from smpo_cli.models.conditioning import encode_prompts
from tests.inversion.conftest import vae_latents

PROMPTS = ["a photo of a cat", "a red car on a street", "an oil painting of a forest", "a blue bird"]


@pytest.fixture(scope="module")
def setup(sd15):
    cond = encode_prompts(sd15, PROMPTS)
    x0 = vae_latents(sd15, 4)
    return sd15.unet, x0, cond, NoiseSchedule.from_scheduler(sd15.scheduler)


def _diffusers_inversion(unet, x0, cond, config, *, num_steps, levels, first_prediction):
    """An inversion loop driven by diffusers' DDIMInverseScheduler, configured to smpo's levels."""
    from diffusers import DDIMInverseScheduler

    inv = DDIMInverseScheduler.from_config(
        config, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, clip_sample=False
    )
    inv.set_timesteps(num_steps)
    ratio = inv.config.num_train_timesteps // num_steps
    x = x0.clone()
    with torch.no_grad():
        for t in inv.timesteps[:levels]:
            label = t if first_prediction == "target" else max(int(t) - ratio, 0)
            out = unet(x, torch.tensor([label] * x.shape[0]), **cond.unet_kwargs()).sample
            x = inv.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("first_prediction", ["target", "source"])
def test_ddim_inversion_equals_diffusers_ddim_inverse_scheduler(
    setup, sd15, prediction_type, first_prediction
):
    unet, x0, cond, _ = setup
    config = {**sd15.scheduler.config, "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_scheduler(config)
    for t, levels in ((999, 5), (599, 3)):
        ours = ddim_invert(
            unet, x0[:2], cond.index([0, 1]), t, schedule=schedule, first_prediction=first_prediction
        )
        theirs = _diffusers_inversion(
            unet,
            x0[:2],
            cond.index([0, 1]),
            config,
            num_steps=5,
            levels=levels,
            first_prediction=first_prediction,
        )
        assert ours.timesteps.tolist() == [t, t] and ours.unet_calls == levels
        torch.testing.assert_close(ours.latents, theirs, rtol=1e-4, atol=5e-5)  # diffusers: float32 alphas


def test_exact_t_between_grid_points_is_reached_exactly(setup):
    unet, x0, cond, schedule = setup
    res = ddim_invert(unet, x0[:1], cond.index(0), 300, schedule=schedule, return_trajectory=True)
    assert res.timesteps.tolist() == [300] and res.abar.tolist() == [schedule.alphas_cumprod[300].item()]
    assert res.trajectory[0].levels == [CLEAN, 199, 300] and res.unet_calls == 2
    # by hand: clean -> 199 (label 0, the clean level's label under "source"), then 199 -> 300 (label 199)
    with torch.no_grad():
        x = x0[:1]
        e = unet(x, torch.tensor([0]), **cond.index(0).unet_kwargs()).sample
        x = inverse_ddim_step(x, e, 1.0, schedule.abar(199))
        e = unet(x, torch.tensor([199]), **cond.index(0).unet_kwargs()).sample
        x = inverse_ddim_step(x, e, schedule.abar(199), schedule.abar(300))
    torch.testing.assert_close(res.latents, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.trajectory[0].latents[0], x0[0])
    torch.testing.assert_close(res.trajectory[0].latents[-1], res.latents[0])
    # the same levels as an explicit grid
    explicit = ddim_invert(unet, x0[:1], cond.index(0), 300, schedule=schedule, grid=[199, 300], mode="grid")
    torch.testing.assert_close(explicit.latents, res.latents, rtol=0, atol=0)
    # implied noise at exactly t
    tau = res.implied_noise(x0[:1])
    torch.testing.assert_close(
        forward_noise(x0[:1], tau, schedule.abar([300])), res.latents, rtol=1e-5, atol=1e-5
    )


def test_per_sample_t_in_one_batch_equals_one_at_a_time(setup, count_rows):
    unet, x0, cond, schedule = setup
    t = torch.tensor([300, 999, 150, 599])  # between grid points, the top, below the first level, on the grid
    counter = count_rows(unet)
    batched = ddim_invert(unet, x0, cond, t, schedule=schedule)
    steps = [2, 5, 1, 3]
    assert batched.timesteps.tolist() == t.tolist()
    assert batched.nfe.tolist() == steps and batched.unet_calls == 5
    # finished samples cost nothing: the UNet saw 4, 3, 2, 1, 1 latents
    assert counter.rows == [4, 3, 2, 1, 1] and batched.unet_rows == sum(steps)
    for b in range(4):
        single = ddim_invert(unet, x0[b : b + 1], cond.index(b), int(t[b]), schedule=schedule)
        torch.testing.assert_close(batched.latents[b : b + 1], single.latents, rtol=1e-4, atol=1e-5)


def test_below_mode_lands_on_the_grid_level_below_t(setup):
    unet, x0, cond, schedule = setup
    t = torch.tensor([300, 150, 999, 400])
    res = ddim_invert(unet, x0, cond, t, schedule=schedule, mode="below")
    assert res.timesteps.tolist() == [199, CLEAN, 799, 399]
    assert res.abar[1].item() == 1.0
    torch.testing.assert_close(res.latents[1], x0[1])  # no grid level below 150: still clean
    exact = ddim_invert(unet, x0, cond, torch.tensor([199, 0, 799, 399]), schedule=schedule)
    torch.testing.assert_close(res.latents[[0, 2, 3]], exact.latents[[0, 2, 3]], rtol=1e-4, atol=1e-5)
    assert res.nfe.tolist() == [1, 0, 4, 2]


def test_grid_mode_and_argument_errors(setup):
    unet, x0, cond, schedule = setup
    with pytest.raises(UsageError, match="not a level"):
        ddim_invert(unet, x0[:1], cond.index(0), 300, schedule=schedule, mode="grid")
    with pytest.raises(UsageError, match="timesteps"):
        ddim_invert(unet, x0[:1], cond.index(0), 1000, schedule=schedule)
    with pytest.raises(UsageError, match="values for a batch"):
        ddim_invert(unet, x0[:2], cond.index([0, 1]), [1, 2, 3], schedule=schedule)
    with pytest.raises(UsageError, match="first_prediction"):
        ddim_invert(unet, x0[:1], cond.index(0), 1, schedule=schedule, first_prediction="middle")
    with pytest.raises(UsageError, match="uncond"):
        ddim_invert(unet, x0[:1], cond.index(0), 1, schedule=schedule, guidance_scale=7.5)
    with pytest.raises(UsageError, match="mode"):
        ddim_invert(unet, x0[:1], cond.index(0), 1, schedule=schedule, mode="nearest")


def test_invert_then_sample_back(setup):
    unet, x0, cond, schedule = setup
    res = ddim_invert(unet, x0[:2], cond.index([0, 1]), torch.tensor([120, 300]), schedule=schedule)
    back = ddim_sample(
        unet, res.latents, cond.index([0, 1]), res.timesteps, schedule=schedule, return_trajectory=True
    )
    assert back.trajectory[1].levels == [300, 199, CLEAN] and back.nfe.tolist() == [1, 2]
    err = (back.latents - x0[:2]).pow(2).mean().item()
    assert err < 0.05  # DDIM inversion is approximate; ReNoise tightens it (test_inversion_renoise)
    # a clean start takes no step
    same = ddim_sample(unet, x0[:1], cond.index(0), CLEAN, schedule=schedule)
    assert same.unet_calls == 0 and torch.equal(same.latents, x0[:1])


def test_guidance_scale_one_equals_no_guidance_and_doubles_rows(setup, sd15):
    unet, x0, cond, schedule = setup
    uncond = encode_prompts(sd15, [""])  # batch 1, broadcast
    plain = ddim_invert(unet, x0[:2], cond.index([0, 1]), 399, schedule=schedule)
    guided = ddim_invert(
        unet, x0[:2], cond.index([0, 1]), 399, schedule=schedule, guidance_scale=1.0, uncond=uncond
    )
    torch.testing.assert_close(guided.latents, plain.latents, rtol=1e-4, atol=1e-5)
    assert guided.unet_calls == plain.unet_calls == 2 and guided.unet_rows == 2 * plain.unet_rows == 8
    strong = ddim_invert(
        unet, x0[:2], cond.index([0, 1]), 399, schedule=schedule, guidance_scale=5.0, uncond=uncond
    )
    assert (strong.latents - plain.latents).abs().max() > 1e-3


def test_low_precision_unet_gives_float32_latents(setup):
    unet, x0, cond, schedule = setup
    half = copy.deepcopy(unet).to(torch.bfloat16)
    ref = ddim_invert(unet, x0[:1], cond.index(0), 300, schedule=schedule)
    res = ddim_invert(half, x0[:1], cond.index(0), 300, schedule=schedule)
    assert res.latents.dtype == torch.float32
    assert (res.latents - ref.latents).abs().max() < 0.1


def test_sdxl_conditioning_path(sdxl):
    cond = encode_prompts(sdxl, ["a cat", "a dog", "a bird"], original_sizes=[(32, 32), (64, 48), (40, 40)])
    x0 = vae_latents(sdxl, 3)
    schedule = NoiseSchedule.from_scheduler(sdxl.scheduler)
    t = torch.tensor([250, 99, 999])
    res = renoise_invert(sdxl.unet, x0, cond, t, schedule=schedule, num_steps=10, renoise_iterations=1)
    assert res.timesteps.tolist() == [250, 99, 999] and res.nfe.tolist() == [6, 2, 20]
    assert torch.isfinite(res.latents).all()
    single = renoise_invert(sdxl.unet, x0[1:2], cond.index(1), 99, schedule=schedule, num_steps=10)
    torch.testing.assert_close(res.latents[1:2], single.latents, rtol=1e-4, atol=1e-5)
    back = ddim_sample(
        sdxl.unet, res.latents[:2], cond.index([0, 1]), res.timesteps[:2], schedule=schedule, num_steps=10
    )
    assert (back.latents - x0[:2]).pow(2).mean() < 0.05
