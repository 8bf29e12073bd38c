"""Fixtures for the reward-model tests: tiny models built once per session, and test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

PROMPTS = [
    "a cat",
    "a photo of the red dog",
    "a painting of a blue cat on the sofa",
    "",
    "Ünïcode, punctuation & numbers: 42!",
    "a dog",
    "the cat of the dog",
]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """name -> folder of a tiny model, built on first use."""
    from smpo_cli.rewards.tiny import build_tiny_reward

    root = tmp_path_factory.mktemp("tiny-rewards")
    built: dict[str, object] = {}

    def get(name: str, **options):
        key = name + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        if key not in built:
            built[key] = build_tiny_reward(name, root / key, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_reward(tiny_dirs):
    """name -> the reward model loaded from its tiny folder with ``load_reward`` (cached)."""
    from smpo_cli.rewards import load_reward

    loaded: dict[str, object] = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_reward(name, tiny_dirs(name))
        return loaded[name]

    return get


def make_images() -> list[Image.Image]:
    """Small images of different sizes and modes (RGB, RGBA, L, P, CMYK, non-square)."""
    rng = np.random.default_rng(1234)

    def noise(h, w, c):
        return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)

    yy, xx = np.mgrid[0:50, 0:50]
    gray = ((xx * 5 + yy * 2) % 256).astype(np.uint8)
    return [
        Image.fromarray(noise(48, 64, 3), "RGB"),  # landscape
        Image.fromarray(noise(72, 40, 4), "RGBA"),  # portrait with alpha
        Image.fromarray(gray, "L"),  # grayscale, square
        Image.fromarray(noise(65, 33, 3), "RGB").quantize(colors=16),  # palette, odd sizes
        Image.fromarray(noise(20, 30, 4), "CMYK"),
        Image.fromarray(noise(200, 300, 3), "RGB"),  # larger than 224: downscaled
        Image.fromarray(noise(224, 224, 3), "RGB"),  # exactly the model size
    ]


@pytest.fixture
def images():
    return make_images()


@pytest.fixture
def prompts():
    return list(PROMPTS)
