"""The official SmPO inversion loop (inversion.timestep_mode=official / official_0_22) against the loop itself.

The reference is the official ``train.py`` loop, written out below, driven by diffusers 0.20.0's
``DDIMInverseScheduler`` (transcribed in ``_diffusers020.py``; the authors pin 0.20.0) or by the installed
diffusers' own class (>= 0.22 semantics), one t at a time, on the tiny SD1.5 and SDXL UNets.
"""

from __future__ import annotations

import json

import pytest
import torch

from smpo_cli.errors import UsageError
from smpo_cli.inversion import CLEAN, NoiseSchedule, renoise_invert
from smpo_cli.inversion.official import (
    InverseSchedulerConfig,
    official_invert,
    official_steps,
    official_timesteps,
)
from smpo_cli.models.conditioning import encode_prompts
from tests.inversion._diffusers020 import DDIMInverseScheduler020
from tests.inversion.conftest import vae_latents

# float32 rounding of two operation orders over 5-10 UNet steps: 1.1e-4 was seen on an AMD EPYC host (a wrong
# timestep or abar moves latents by 1e-2 and more)
ROUNDING = 3e-4

# the scheduler configs the paper's models ship (stable-diffusion-v1-5 and sdxl-base-1.0), the keys that matter
SD15_FILE = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None, "clip_sample": False}  # fmt: skip
SDXL_FILE = {**SD15_FILE, "timestep_spacing": "leading", "prediction_type": "epsilon"}
TS = [0, 1, 2, 50, 200, 201, 202, 601, 700, 801, 802, 999]  # below the first grid level, on it, between, above the last


def file_config(components) -> dict:
    """The scheduler_config.json of a tiny model, as DDIMInverseScheduler.from_pretrained reads it."""
    from smpo_cli.models.tiny import materialize_tiny

    name = "tiny-sdxl" if components.family == "sdxl" else "tiny-sd15"
    return json.loads((materialize_tiny(name) / "scheduler" / "scheduler_config.json").read_text())


def reference_loop(unet, x0, cond, t: int, scheduler, num_steps: int, *, after_022: bool) -> torch.Tensor:
    """The official train.py inversion of one batch to one t (its ReNoise: 1 iteration, mean of 2)."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long()
    noisy = x0.clone()
    with torch.no_grad():
        for tk in timesteps[timesteps < t]:
            labels = tk.repeat([x0.shape[0]])
            e0 = unet(noisy, labels, **cond.unet_kwargs()).sample
            x1 = scheduler.step(e0, tk, noisy).prev_sample if after_022 else scheduler.step(e0, tk, noisy)
            e1 = unet(x1, labels, **cond.unet_kwargs()).sample
            mean = (e0 + e1) / 2
            noisy = scheduler.step(mean, tk, noisy).prev_sample if after_022 else scheduler.step(mean, tk, noisy)
    return noisy


def tau_at(x, x0, t: int, abar_float32: torch.Tensor) -> torch.Tensor:
    a = abar_float32[t]
    return (x - x0 * a**0.5) / (1 - a) ** 0.5


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model(request):
    components = request.getfixturevalue(request.param)
    prompts = ["a red cube", "two dogs", "a blue bird on a branch"]
    return components, encode_prompts(components, prompts), vae_latents(components, 3)


def test_grids_labels_and_levels_of_both_semantics():
    sd15 = InverseSchedulerConfig.from_scheduler(SD15_FILE)
    assert (sd15.set_alpha_to_one, sd15.clip_sample, sd15.steps_offset, sd15.timestep_spacing) == (False, False, 1, "leading")
    assert official_timesteps(sd15, 5) == [-199, 1, 201, 401, 601]  # 0.20.0 rolls the leading grid
    assert official_timesteps(sd15, 10) == [-99, 1, 101, 201, 301, 401, 501, 601, 701, 801]
    assert official_timesteps(sd15, 5, "0.22") == [1, 201, 401, 601, 801]
    steps = official_steps(sd15, 5)
    assert [(s.label, s.src, s.dst) for s in steps[:2]] == [(-199, -1, 1), (1, 1, 201)]  # -1: initial_alpha_cumprod
    assert [(s.label, s.src, s.dst) for s in official_steps(sd15, 5, "0.22")[:2]] == [(1, -1, 1), (201, 1, 201)]
    # keys the file leaves out take DDIMInverseScheduler's defaults, not the loaded class's
    loaded = {**SD15_FILE, "timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}
    assert InverseSchedulerConfig.from_scheduler(loaded).timestep_spacing == "leading"
    bare = InverseSchedulerConfig.from_scheduler({"beta_schedule": "scaled_linear"})
    assert bare.set_alpha_to_one and bare.clip_sample and bare.steps_offset == 0
    with pytest.raises(UsageError, match="linspace"):
        official_timesteps(InverseSchedulerConfig(timestep_spacing="linspace"), 5)


@pytest.mark.parametrize("configured", ["model file", "paper model"])
def test_official_mode_is_the_official_loop_under_diffusers_020(model, configured):
    """<= 1e-4 in x (absolute) and tau (relative), every t in one batch, 5 steps (SD1.5) / 10 (SDXL); with the tiny model's own
    scheduler file (no clip_sample key: clipped; tiny SDXL: no set_alpha_to_one key, so abar = 1) and with
    the paper models' files (abar[0] = 0.99915, no clipping)."""
    components, cond, x0 = model
    n = 10 if components.family == "sdxl" else 5
    cfg = file_config(components) if configured == "model file" else (SDXL_FILE if n == 10 else SD15_FILE)
    schedule = NoiseSchedule.from_scheduler(components.scheduler)
    b = len(TS)
    xb, cb = x0.repeat(4, 1, 1, 1)[:b], cond.index(torch.arange(b) % 3)
    out = official_invert(components.unet, xb, cb, torch.tensor(TS), schedule=schedule,
                          config=InverseSchedulerConfig.from_scheduler(cfg), num_steps=n)  # fmt: skip
    if n == 5:  # the grid level at or above t; 801 for every t above 601
        assert out.timesteps.tolist() == [1, 1, 201, 201, 201, 201, 401, 601, 801, 801, 801, 801]
    else:
        assert out.timesteps.tolist() == [1, 1, 101, 101, 201, 201, 301, 601, 701, 801, 901, 901]
    ref_sched = DDIMInverseScheduler020(cfg)
    abar32 = ref_sched.alphas_cumprod
    for i, t in enumerate(TS):  # tau: abar at t (the official target), not at the level reached
        ref = reference_loop(components.unet, xb[i : i + 1], cb.index(i), t, ref_sched, n, after_022=False)
        torch.testing.assert_close(out.latents[i : i + 1], ref, rtol=0, atol=ROUNDING)
        ours_tau = tau_at(out.latents[i : i + 1].double(), xb[i : i + 1].double(), t, schedule.alphas_cumprod)
        # tau relative: at t = 0 it divides by sqrt(1 - abar_0) = 0.029, which scales the reference's float32
        # rounding of x up to ~1e-3 absolute where |tau| ~ 80 (1.4e-5 relative)
        torch.testing.assert_close(ours_tau.float(), tau_at(ref, xb[i : i + 1], t, abar32), rtol=1e-4, atol=1e-4)


def test_official_0_22_is_the_loop_under_the_installed_diffusers(model):
    from diffusers import DDIMInverseScheduler

    components, cond, x0 = model
    n = 10 if components.family == "sdxl" else 5
    cfg = file_config(components)
    schedule = NoiseSchedule.from_scheduler(components.scheduler)
    b = len(TS)
    xb, cb = x0.repeat(4, 1, 1, 1)[:b], cond.index(torch.arange(b) % 3)
    out = official_invert(components.unet, xb, cb, torch.tensor(TS), schedule=schedule,
                          config=InverseSchedulerConfig.from_scheduler(cfg), num_steps=n, semantics="0.22")  # fmt: skip
    if n == 5:  # the last grid level below t; nothing below t <= 1: still clean
        assert out.timesteps.tolist() == [CLEAN, CLEAN, 1, 1, 1, 1, 201, 401, 601, 601, 801, 801]
    ref_sched = DDIMInverseScheduler.from_config(cfg)
    for i, t in enumerate(TS):
        ref = reference_loop(components.unet, xb[i : i + 1], cb.index(i), t, ref_sched, n, after_022=True)
        torch.testing.assert_close(out.latents[i : i + 1], ref, rtol=0, atol=ROUNDING)


class ConstantNoise(torch.nn.Module):
    """A 'UNet' that predicts the same noise whatever it is given."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = torch.nn.Parameter(eps, requires_grad=False)

    def forward(self, x, t, return_dict=False, **kwargs):
        return (self.eps.expand_as(x),)


@pytest.mark.parametrize("set_alpha_to_one, coefs", [(False, (-0.4901, 2.1475)), (True, (-0.4918, 2.2624))])
def test_t50_target_in_closed_form(sd15, set_alpha_to_one, coefs):
    """At t = 50 the 0.20.0 loop inverts to level 201 (steps -199 -> 1 -> 201); with a noise predictor that
    always says eps, tau_50 = c_x x0 + c_e eps. From abar[0] = 0.99915 (the paper's SD1.5 config) that is
    -0.4901 x0 + 2.1475 eps; from abar = 1 (a config without set_alpha_to_one, which then defaults to true)
    -0.4918 x0 + 2.2624 eps, the numbers issue 14 quotes."""
    gen = torch.Generator().manual_seed(0)
    eps, x0 = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    cfg = InverseSchedulerConfig.from_scheduler({**SD15_FILE, "set_alpha_to_one": set_alpha_to_one})
    schedule = NoiseSchedule.from_scheduler(SD15_FILE)
    cond = encode_prompts(sd15, ["x"])
    out = official_invert(ConstantNoise(eps), x0, cond, 50, schedule=schedule, config=cfg, num_steps=5)
    assert out.timesteps.tolist() == [201] and out.nfe.tolist() == [4]
    a50 = schedule.abar(50).item()  # the official target uses abar at t, not at the level reached (201)
    tau = (out.latents - a50**0.5 * x0) / (1 - a50) ** 0.5
    torch.testing.assert_close(tau, coefs[0] * x0 + coefs[1] * eps, rtol=0, atol=2e-4 * (x0.abs() + eps.abs()).max().item())


def test_official_mode_differs_from_exact_mode(model):
    """What the default exact mode changes (README, "Inversion"): the official latent sits at a grid level and
    its target mixes in image content; exact inverts to t itself."""
    components, cond, x0 = model
    if components.family == "sdxl":
        pytest.skip("one model is enough")
    schedule = NoiseSchedule.from_scheduler(components.scheduler)
    t = torch.tensor([50, 350, 650])
    official = official_invert(components.unet, x0, cond, t, schedule=schedule,
                               config=InverseSchedulerConfig.from_scheduler(SD15_FILE), num_steps=5)  # fmt: skip
    exact = renoise_invert(components.unet, x0, cond, t, schedule=schedule, num_steps=5)
    assert official.timesteps.tolist() == [201, 401, 801] and exact.timesteps.tolist() == [50, 350, 650]
    assert (official.latents - exact.latents).abs().max() > 0.1
