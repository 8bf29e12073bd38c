"""What every reward model promises, checked on each tiny model loaded through ``load_reward``."""

from __future__ import annotations

import json

import pytest
import torch

from smpo_cli.errors import AssetNotFoundError, DataError
from smpo_cli.rewards import REWARDS, load_reward
from smpo_cli.rewards.tiny import TINY_NAMES

ATOL = 1e-5


def assert_same(got, expected):
    """fp32 agreement: atol 1e-5, relative to the size of outputs scaled by 100 (PickScore, x100)."""
    atol = ATOL * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_outputs_are_float32_cpu_vectors(name, tiny_reward, images, prompts):
    rm = tiny_reward(name)
    out = rm.score(images, prompts)
    assert tuple(out) == rm.output_names == REWARDS[name].outputs
    assert rm.default_output == rm.output_names[0]
    assert rm.name == name and rm.higher_is_better is True and rm.version
    for key, value in out.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", key
        assert value.shape == (len(images),), key
        assert torch.isfinite(value).all(), key
    # Random weights, but different images must still get different scores.
    assert out[rm.default_output].std() > 1e-4


@pytest.mark.parametrize("name", TINY_NAMES)
def test_batched_equals_one_at_a_time(name, tiny_reward, images, prompts):
    rm = tiny_reward(name)
    batched = rm.score(images, prompts, batch_size=len(images))
    uneven = rm.score(images, prompts, batch_size=3)
    singles = [rm.score([im], [p], batch_size=1) for im, p in zip(images, prompts, strict=True)]
    for key in rm.output_names:
        one_by_one = torch.cat([s[key] for s in singles])
        assert_same(batched[key], one_by_one)
        assert_same(uneven[key], one_by_one)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_score_pairs_equals_two_score_calls(name, tiny_reward, images, prompts):
    rm = tiny_reward(name)
    a, b = images, images[::-1]
    pa, pb = rm.score_pairs(a, b, prompts, batch_size=4)  # 2 pairs per batch, last batch partial
    sa, sb = rm.score(a, prompts), rm.score(b, prompts)
    assert set(pa) == set(pb) == set(rm.output_names)
    for key in rm.output_names:
        assert_same(pa[key], sa[key])
        assert_same(pb[key], sb[key])


def test_clip_like_pairs_encode_each_prompt_once(tiny_reward, images, prompts, monkeypatch):
    rm = tiny_reward("pickscore")
    seen: list[int] = []
    original = rm._encode_texts

    def counting(batch):
        seen.append(len(batch))
        return original(batch)

    monkeypatch.setattr(rm, "_encode_texts", counting)
    rm.score_pairs(images, images, prompts, batch_size=64)
    assert sum(seen) == len(prompts)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_one_prompt_string_is_broadcast(name, tiny_reward, images):
    rm = tiny_reward(name)
    one = rm.score(images[:3], "a cat")
    many = rm.score(images[:3], ["a cat"] * 3)
    for key in rm.output_names:
        assert_same(one[key], many[key])


@pytest.mark.parametrize("name", TINY_NAMES)
def test_empty_input_gives_empty_outputs(name, tiny_reward):
    out = tiny_reward(name).score([], [])
    assert all(v.shape == (0,) and v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("name", ["pickscore", "imagereward"])
def test_prompt_count_must_match(name, tiny_reward, images):
    rm = tiny_reward(name)
    with pytest.raises(DataError, match="prompts"):
        rm.score(images[:3], ["a", "b"])
    with pytest.raises(DataError, match="length"):
        rm.score_pairs(images[:3], images[:2], ["a", "b", "c"])
    with pytest.raises(DataError):
        rm.score(images[:1], None)


def test_prompt_free_model_accepts_no_prompts(tiny_reward, images):
    rm = tiny_reward("aesthetic")
    assert rm.uses_prompt is False
    torch.testing.assert_close(rm.score(images)["score"], rm.score(images, ["x"] * len(images))["score"])


@pytest.mark.parametrize("name", TINY_NAMES)
def test_metadata_is_json(name, tiny_reward):
    meta = tiny_reward(name).metadata
    assert meta["name"] == name and meta["outputs"] == list(REWARDS[name].outputs)
    json.dumps(meta)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_bfloat16_on_cpu_runs_close_to_float32(name, tiny_dirs, tiny_reward, images, prompts):
    rm16 = load_reward(name, tiny_dirs(name), dtype="bfloat16")
    assert rm16.dtype == torch.bfloat16
    out16 = rm16.score(images[:3], prompts[:3])
    out32 = tiny_reward(name).score(images[:3], prompts[:3])
    for key in rm16.output_names:
        assert out16[key].dtype == torch.float32
        scale = out32[key].abs().max().item() + 1.0
        torch.testing.assert_close(out16[key], out32[key], atol=0.1 * scale, rtol=0)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_hub_id_missing_offline_is_asset_not_found(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetNotFoundError) as info:
        load_reward(name, f"smpo-tests/no-such-{name}")
    err = info.value
    assert "no-such" in err.message and "\n" not in err.message
    assert err.hint and "download" in err.hint and "\n" not in err.hint


@pytest.mark.parametrize("name", TINY_NAMES)
def test_missing_local_path_is_asset_not_found(name, tmp_path):
    with pytest.raises(AssetNotFoundError):
        load_reward(name, tmp_path / "nowhere" / "model")


@pytest.mark.parametrize("name", ["hpsv2", "imagereward", "aesthetic"])
def test_folder_without_the_checkpoint_is_asset_not_found(name, tmp_path):
    with pytest.raises(AssetNotFoundError, match="holds none of"):
        load_reward(name, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_matches_cpu(name, dtype, tiny_dirs, tiny_reward, images, prompts):
    rm = load_reward(name, tiny_dirs(name), device="cuda", dtype=dtype)
    out = rm.score(images, prompts)
    ref = tiny_reward(name).score(images, prompts)
    if name == "hpsv2":  # the reference's precision: fp32 weights under autocast on CUDA
        assert rm.metadata["precision"].startswith("amp-")
    for key in rm.output_names:
        assert out[key].device.type == "cpu" and out[key].dtype == torch.float32
        scale = ref[key].abs().max().item() + 1.0
        tol = 1e-4 if dtype == "float32" and name != "hpsv2" else 0.05
        torch.testing.assert_close(out[key], ref[key], atol=tol * scale, rtol=0)
