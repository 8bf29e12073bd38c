"""encode_prompts against diffusers' own pipelines, and the Conditioning container."""

from __future__ import annotations

import pytest
import torch

from smpo_cli.errors import UsageError
from smpo_cli.models.conditioning import Conditioning, encode_prompts

PROMPTS = ["a photo of a cat", "an oil painting of a red dragon over the sea", ""]


def test_sd15_equals_stable_diffusion_pipeline(sd15):
    cond = encode_prompts(sd15, PROMPTS)
    pipe = sd15.pipeline()
    expected, _ = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)
    assert cond.pooled is None and cond.time_ids is None and not cond.is_sdxl
    assert cond.prompt_embeds.dtype == sd15.text_encoder.dtype
    torch.testing.assert_close(cond.prompt_embeds, expected, rtol=0, atol=0)
    assert cond.unet_kwargs() == {"encoder_hidden_states": cond.prompt_embeds, "added_cond_kwargs": None}


def test_sdxl_equals_stable_diffusion_xl_pipeline(sdxl):
    pipe = sdxl.pipeline()
    original = [(512, 768), (1024, 1024), (300, 200)]
    crops = [(0, 0), (16, 32), (5, 7)]
    target = (64, 64)
    cond = encode_prompts(sdxl, PROMPTS, original_sizes=original, crop_coords=crops, target_size=target)
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.prompt_embeds.shape == (3, 77, 32 + 64) and cond.pooled.shape == (3, 64)
    proj = sdxl.text_encoder_2.config.projection_dim
    for b in range(3):
        ids = pipe._get_add_time_ids(
            original[b], crops[b], target, embeds.dtype, text_encoder_projection_dim=proj
        )
        torch.testing.assert_close(cond.time_ids[b : b + 1], ids, rtol=0, atol=0)
    kwargs = cond.unet_kwargs()
    assert kwargs["added_cond_kwargs"]["text_embeds"] is cond.pooled
    assert kwargs["added_cond_kwargs"]["time_ids"] is cond.time_ids


def test_sdxl_default_time_ids_are_the_pipeline_defaults(sdxl):
    pipe = sdxl.pipeline()
    size = pipe.default_sample_size * pipe.vae_scale_factor  # 32 * 2 for the tiny model, never a hard-coded 8
    cond = encode_prompts(sdxl, ["a cat", "a dog"])
    expected = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=cond.prompt_embeds.dtype)
    torch.testing.assert_close(cond.time_ids, expected, rtol=0, atol=0)
    # one pair for the whole batch, a (B, 2) tensor per sample
    cond = encode_prompts(
        sdxl, ["a cat", "a dog"], original_sizes=torch.tensor([[10, 20], [30, 40]]), crop_coords=(1, 2)
    )
    assert cond.time_ids.tolist() == [[10, 20, 1, 2, size, size], [30, 40, 1, 2, size, size]]


def test_no_grad_by_default(sd15):
    assert not encode_prompts(sd15, ["a cat"]).prompt_embeds.requires_grad
    assert encode_prompts(sd15, ["a cat"], grad=True).prompt_embeds.requires_grad


def test_bad_arguments(sd15, sdxl):
    with pytest.raises(UsageError, match="SDXL"):
        encode_prompts(sd15, ["a cat"], original_sizes=(64, 64))
    with pytest.raises(UsageError, match="entries"):
        encode_prompts(sdxl, ["a", "b", "c"], original_sizes=[(1, 2), (3, 4)])
    with pytest.raises(UsageError):
        encode_prompts(sd15, [])


def test_conditioning_index_cat_expand_to(sdxl):
    cond = encode_prompts(sdxl, PROMPTS)
    sub = cond.index(torch.tensor([2, 0]))
    assert len(sub) == 2
    torch.testing.assert_close(sub.prompt_embeds[0], cond.prompt_embeds[2])
    torch.testing.assert_close(sub.time_ids[1], cond.time_ids[0])
    assert len(cond.index(1)) == 1 and len(cond.index(slice(0, 2))) == 2
    both = cond.cat(sub)
    assert len(both) == 5 and torch.equal(both.pooled[3], cond.pooled[2])
    one = cond.index(0)
    wide = one.expand(4)
    assert len(wide) == 4 and torch.equal(wide.prompt_embeds[3], one.prompt_embeds[0])
    assert cond.expand(3) is cond
    with pytest.raises(UsageError):
        cond.expand(4)
    half = cond.to(dtype=torch.bfloat16)
    assert half.prompt_embeds.dtype == half.pooled.dtype == half.time_ids.dtype == torch.bfloat16
    zeros = cond.zeros_like()
    assert not zeros.prompt_embeds.any() and torch.equal(zeros.time_ids, cond.time_ids)
    sd = Conditioning(torch.zeros(3, 77, 32))
    with pytest.raises(UsageError):
        cond.cat(sd)
    with pytest.raises(UsageError):
        Conditioning(torch.zeros(2, 77, 32), pooled=torch.zeros(2, 64))
