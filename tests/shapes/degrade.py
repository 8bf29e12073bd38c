"""Image degradations that imitate a small diffusion model's output, for testing the judge's robustness."""

from __future__ import annotations

import numpy as np
from PIL import Image

from smpo_cli.shapes import BACKGROUND


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W, 3) images, edge padding; float32 in 0..255."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    n, h, w, _ = images.shape
    padded = np.pad(
        images.astype(np.float32), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge"
    )
    rows = sum(k * padded[:, :, i : i + w] for i, k in enumerate(taps))
    return sum(k * rows[:, i : i + h] for i, k in enumerate(taps))


def resample_noise(images: np.ndarray, low: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Bilinear down-sample to low x low and back up, then add Gaussian pixel noise; float32 in 0..255."""
    size = images.shape[1:3][::-1]
    out = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((low, low), Image.BILINEAR).resize(size, Image.BILINEAR))
            for im in images
        ]
    ).astype(np.float32)
    return np.clip(out + rng.normal(0.0, noise_std, out.shape), 0, 255)


def washed_out(images: np.ndarray, rng: np.random.Generator, contrast: float = 0.8) -> np.ndarray:
    """Blur (sigma 0.8), shrink contrast towards the background, shift colours per image (+-10), add noise (std 10)."""
    bg = np.array(BACKGROUND, np.float32)
    out = bg + contrast * (gaussian_blur(images, 0.8) - bg)
    out += rng.uniform(-10, 10, (len(images), 1, 1, 3)) + rng.normal(0.0, 10.0, out.shape)
    return np.clip(out, 0, 255)
