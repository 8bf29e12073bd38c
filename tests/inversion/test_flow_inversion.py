"""Flow-model conditioning and ReNoise inversion (smpo_cli.models.conditioning, smpo_cli.inversion.flow) on the
tiny SD3 / FLUX.1 models, checked against the stock diffusers pipelines."""

from __future__ import annotations

import pytest
import torch

from smpo_cli.inversion.flow import flow_euler_sample, flow_invert, flow_velocity, inversion_levels
from smpo_cli.models.conditioning import encode_prompts, latent_image_ids, pack_latents, unpack_latents

PROMPTS = ["a red circle", "two blue squares on a green background", ""]


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def comps(request, smpo_cache):
    from smpo_cli.models import load_components

    return load_components(request.param, device="cpu")


def test_conditioning_equals_the_pipelines_encode_prompt(comps):
    pipe = comps.pipeline()
    cond = encode_prompts(comps, PROMPTS)
    with torch.no_grad():  # as the pipeline's __call__
        if comps.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False
            )
        else:
            embeds, pooled, txt_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
            assert torch.equal(cond.txt_ids, txt_ids)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.prompt_embeds.shape[1] == (77 + 256 if comps.family == "sd3" else 512)
    assert torch.equal(cond.index([2, 0]).pooled, cond.pooled[[2, 0]]) and len(cond.index(1).cat(cond)) == 4


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 12), x)
    assert torch.equal(
        latent_image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    )


def test_euler_sampling_with_flow_velocity_equals_the_stock_pipeline(comps):
    """Timestep scaling (SD3: 1000 s; FLUX.1: s), packing, ids and guidance as the pipeline feeds the transformer."""
    pipe = comps.pipeline()
    x1 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = {"guidance_scale": 1.0} if comps.family == "sd3" else {"guidance_scale": 3.5}  # SD3 without CFG
    latents = x1 if comps.family == "sd3" else pack_latents(x1)
    out = pipe(
        PROMPTS[0], num_inference_steps=3, height=32, width=32, latents=latents, output_type="latent", **kw
    ).images
    if comps.family == "flux":
        out = unpack_latents(out, 16, 16)
    levels = [pipe.scheduler.sigmas.double().flip(0).tolist()]  # 0, then the pipeline's levels up to ~1
    with torch.no_grad():
        ours = flow_euler_sample(
            comps.transformer, x1, encode_prompts(comps, PROMPTS[:1]), levels, guidance_scale=3.5
        )
    torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-4)


def test_levels_end_exactly_at_the_target_with_steps_in_proportion():
    levels = inversion_levels(torch.tensor([1.0, 0.5, 0.05], dtype=torch.float64), num_steps=10, shift=3.0)
    assert [lv[-1] for lv in levels] == pytest.approx([1.0, 0.5, 0.05], abs=0) and all(
        lv[0] == 0 for lv in levels
    )
    assert [len(lv) - 1 for lv in levels] == [10, 3, 1]  # u = 1, 0.25, 0.017 of the shifted 10-step grid
    assert all(a < b for lv in levels for a, b in zip(lv, lv[1:], strict=False))


def _invert_and_sample(comps, k: int, window: int = 1):
    x0 = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = encode_prompts(comps, PROMPTS)
    sigmas = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        inv = flow_invert(comps.transformer, x0, cond, sigmas, num_steps=10, shift=3.0, renoise_iterations=k,
                          average_window=window)  # fmt: skip
        rec = flow_euler_sample(comps.transformer, inv.latents, cond, inv.levels)
    return inv, (rec - x0).pow(2).mean(dim=(1, 2, 3)).sqrt(), x0, cond, sigmas


def test_inversion_then_euler_sampling_reconstructs_and_renoise_iterations_reduce_the_error(comps):
    """Per-sample RMS reconstruction error (latents of unit variance), K = 0..3 re-noise iterations; on tiny-sd3:
    about 3.5e-2, 2.6e-3, 2.5e-4, 2.6e-5 at s = 0.9 (each iteration contracts the fixed-point residual ~10x)."""
    errors = []
    for k in range(4):
        inv, err, *_ = _invert_and_sample(comps, k)
        assert inv.calls == 8 * (1 + k) and [len(lv) - 1 for lv in inv.levels] == [8, 3, 1]
        errors.append(err)
    for fewer, more in zip(errors, errors[1:], strict=False):
        assert bool((more < 0.3 * fewer).all()), (fewer, more)
    assert float(errors[0].max()) < 0.1 and float(errors[3].max()) < 1e-3
    _, err_avg, *_ = _invert_and_sample(
        comps, 1, window=2
    )  # SmPO's default K = 1, W = 2 (ReNoise's averaging)
    assert float(err_avg.max()) < float(errors[0].max())


def test_a_batch_inverts_as_its_samples_one_at_a_time(comps):
    inv, _, x0, cond, sigmas = _invert_and_sample(comps, 1, window=2)
    for i in range(3):
        with torch.no_grad():
            one = flow_invert(comps.transformer, x0[i : i + 1], cond.index(i), sigmas[i : i + 1], num_steps=10,
                              shift=3.0, renoise_iterations=1, average_window=2)  # fmt: skip
        torch.testing.assert_close(one.latents, inv.latents[i : i + 1], rtol=1e-5, atol=1e-5)


def test_flow_velocity_is_float32_and_matches_the_transformer_dtype(comps):
    x = torch.randn(2, 16, 16, 16)
    cond = encode_prompts(comps, PROMPTS[:1])
    with torch.no_grad():
        v = flow_velocity(comps.transformer, x, torch.tensor([0.3, 0.7]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
