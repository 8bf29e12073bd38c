"""Shared pieces: image conversion, dtype/device, asset lookup, the registry, import hygiene, tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from smpo_cli.errors import AssetNotFoundError, DataError, UsageError
from smpo_cli.rewards import REWARDS, available_rewards, get_spec, load_reward
from smpo_cli.rewards.base import looks_like_hub_id, resolve_dtype, resolve_file, to_rgb
from smpo_cli.rewards.tiny import TINY_NAMES, build_tiny_reward, tiny_reward_path

# ------------------------------------------------------------------------------------- to_rgb


def test_rgb_is_returned_as_is():
    im = Image.new("RGB", (4, 3), (1, 2, 3))
    assert to_rgb(im) is im


def test_rgba_drops_alpha():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    out = to_rgb(Image.fromarray(arr, "RGBA"))
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), arr[..., :3])


def test_grayscale_is_replicated():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = np.asarray(to_rgb(Image.fromarray(arr, "L")))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_palette_uses_palette_colours():
    im = Image.new("P", (3, 2))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.info["transparency"] = 0
    out = np.asarray(to_rgb(im))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)


def test_cmyk_and_16_bit():
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    im16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert im16.mode.startswith("I;16")
    assert to_rgb(im16).getpixel((0, 0)) == (255, 255, 255)


def test_non_image_is_a_data_error():
    with pytest.raises(DataError, match="PIL"):
        to_rgb(np.zeros((2, 2, 3)))


# ---------------------------------------------------------------------------------- dtype etc.


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("fp16", torch.float16),
        ("bf16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(given, expected):
    assert resolve_dtype(given) == expected


def test_bad_dtype_and_device_are_usage_errors(tiny_dirs):
    with pytest.raises(UsageError):
        resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            load_reward("pickscore", tiny_dirs("pickscore"), device="cuda")
    with pytest.raises(UsageError):
        load_reward("pickscore", tiny_dirs("pickscore"), batch_size=0)


def test_hub_id_detection(tmp_path):
    assert looks_like_hub_id("yuvalkirstain/PickScore_v1")
    assert looks_like_hub_id("bert-base-uncased")
    assert not looks_like_hub_id("/abs/path/model")
    assert not looks_like_hub_id("../up/model")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id(str(tmp_path))


def test_resolve_file(tmp_path):
    f = tmp_path / "b.pt"
    f.write_bytes(b"x")
    assert resolve_file(f, ["a.pt"], what="w") == f
    assert resolve_file(tmp_path, ["a.pt", "b.pt"], what="w") == f
    with pytest.raises(AssetNotFoundError, match="holds none"):
        resolve_file(tmp_path, ["c.pt"], what="w")
    with pytest.raises(AssetNotFoundError, match="no such"):
        resolve_file(tmp_path / "x" / "y" / "z.pt", ["c.pt"], what="w")


# ------------------------------------------------------------------------------------ registry


def test_registry_names_and_official_sources():
    assert available_rewards() == (
        "pickscore",
        "hpsv2",
        "hpsv3",
        "imagereward",
        "aesthetic",
        "clip",
        "shapes-judge",
    )
    assert set(TINY_NAMES) == set(REWARDS) - {"shapes-judge"}  # the judge has no weights to make tiny
    assert REWARDS["pickscore"].default_source == "yuvalkirstain/PickScore_v1"
    assert REWARDS["hpsv2"].default_source == "xswu/HPSv2"
    assert REWARDS["imagereward"].default_source == "THUDM/ImageReward"
    assert REWARDS["clip"].default_source == "openai/clip-vit-large-patch14"
    assert get_spec(" PickScore ").name == "pickscore"


def test_unknown_reward_name_suggests():
    with pytest.raises(UsageError) as info:
        load_reward("pikscore")
    assert "pickscore" in info.value.hint


def test_unknown_option_lists_the_known_ones(tiny_dirs):
    with pytest.raises(UsageError) as info:
        load_reward("hpsv2", tiny_dirs("hpsv2"), antialiasing=True)
    assert "antialias" in info.value.hint and "variant" in info.value.hint


def test_default_source_offline_uncached_is_asset_not_found(monkeypatch, tmp_path):
    """With nothing cached and HF_HUB_OFFLINE, the official hub ids fail with a one-line hint."""
    from huggingface_hub import try_to_load_from_cache

    if try_to_load_from_cache("xswu/HPSv2", "HPS_v2.1_compressed.pt") is not None:
        pytest.skip("the real HPSv2 checkpoint is cached on this machine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetNotFoundError) as info:
        load_reward("hpsv2")
    assert "xswu/HPSv2" in info.value.hint and "HPS_v2.1_compressed.pt" in info.value.hint


def test_importing_the_package_stays_light():
    code = (
        "import sys, smpo_cli.rewards as r; r.REWARDS; r.available_rewards();"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'torchvision') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_models_are_small_fast_and_deterministic(name, tmp_path):
    build_tiny_reward(name, tmp_path / "warm")  # first build pays the imports
    t0 = time.perf_counter()
    folder = build_tiny_reward(name, tmp_path / "a", seed=3)
    rm = load_reward(name, folder)
    elapsed = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 4_000_000, size
    assert elapsed < 3.0, elapsed  # typically 0.1-0.3 s; generous for loaded CI machines
    assert json.loads((folder / "smpo_tiny.json").read_text())["name"] == name
    again = load_reward(name, build_tiny_reward(name, tmp_path / "b", seed=3))
    other = load_reward(name, build_tiny_reward(name, tmp_path / "c", seed=4))
    images = [Image.new("RGB", (32, 40), (30, 60, 90))]
    s, s_again, s_other = (m.score(images, ["a cat"])[m.default_output] for m in (rm, again, other))
    torch.testing.assert_close(s, s_again, atol=0, rtol=0)
    assert not torch.equal(s, s_other)


def test_tiny_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_reward("clip", tmp_path / "clip")
    torch.testing.assert_close(torch.rand(3), expected)


def test_tiny_reward_path_builds_into_the_cache(smpo_cache):
    path = tiny_reward_path("clip", build=True)
    assert path.is_relative_to(smpo_cache) and (path / "config.json").is_file()
    mtime = (path / "smpo_tiny.json").stat().st_mtime
    assert tiny_reward_path("clip", build=True) == path
    assert (path / "smpo_tiny.json").stat().st_mtime == mtime  # not rebuilt


def test_tiny_unknown_name():
    with pytest.raises(UsageError):
        build_tiny_reward("nope", "/tmp/never-written")


def test_every_registered_reward_has_a_report_output():
    """smpo bench rewards reports each reward in its papers' units: a new reward without one would crash it."""
    from smpo_cli.benchmark.metrics import REPORT_OUTPUT
    from smpo_cli.rewards import REWARDS

    assert set(REWARDS) <= set(REPORT_OUTPUT)
    for name, (output, units) in REPORT_OUTPUT.items():
        assert output in REWARDS[name].outputs and units
