"""Fixtures for the inversion tests: the tiny SD1.5 / SDXL components, loaded once per session.

Latents are 16x16 (32x32 images through the tiny VAE, which downsamples by 2): the tiny SD1.5 UNet
runs self-attention at full latent resolution, so 16x16 keeps every UNet call a few milliseconds.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def sd15(smpo_cache):
    from smpo_cli.models.loading import load_components

    return load_components("tiny-sd15", device="cpu")


@pytest.fixture(scope="session")
def sdxl(smpo_cache):
    from smpo_cli.models.loading import load_components

    return load_components("tiny-sdxl", device="cpu")


def smooth_images(batch: int, size: int = 32) -> torch.Tensor:
    """Smooth, distinct RGB images in [-1, 1] (sines and products of coordinates)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for b in range(batch):
        f = 1.0 + 0.5 * b
        img = torch.stack([torch.sin(2 * f * xx), torch.cos(3 * yy + b), xx * yy * f], 0)
        out.append(0.8 * img.clamp(-1, 1))
    return torch.stack(out)


def vae_latents(components, batch: int, size: int = 32) -> torch.Tensor:
    """Latents of smooth images through the tiny VAE, standardised per sample to mean 0, std 1.

    Real SD latents are scaled to about unit variance (that is what ``scaling_factor`` is for);
    the random tiny VAE gives latents of std ~0.05, which a random UNet (GroupNorm makes it
    nearly scale-invariant in its input) treats as extremely noisy. Standardising gives it a
    realistic scale.
    """
    with torch.no_grad():
        x0 = components.vae.encode(smooth_images(batch, size)).latent_dist.mean
    mean = x0.mean(dim=(1, 2, 3), keepdim=True)
    std = x0.std(dim=(1, 2, 3), keepdim=True)
    return (x0 - mean) / std


class RowCounter:
    """Forward pre-hook on a real UNet: records the batch size of every call."""

    def __init__(self, unet):
        self.rows: list[int] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows.append(int(sample.shape[0]))

    def close(self):
        self.handle.remove()


@pytest.fixture
def count_rows():
    counters = []

    def make(unet) -> RowCounter:
        counter = RowCounter(unet)
        counters.append(counter)
        return counter

    yield make
    for counter in counters:
        counter.close()
