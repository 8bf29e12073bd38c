"""Images <-> VAE latents, with the preprocessing training uses (resize, centre crop, [-1, 1]).

SDXL conditions on each image's original size and crop offset, so ``preprocess`` returns them.
Latents are scaled (and shifted, where the VAE has a shift) as the UNet sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class Preprocessed:
    pixels: torch.Tensor  # (3, R, R) float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def preprocess(image: Image.Image, resolution: int, rng: np.random.Generator | None = None) -> Preprocessed:
    """Resize the shorter side to ``resolution`` (bilinear, as the Diffusion-DPO scripts) and crop.

    The crop is centred, or drawn from ``rng`` (a random crop) when one is given.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    if rng is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = int(rng.integers(0, new_h - resolution + 1)), int(rng.integers(0, new_w - resolution + 1))
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return Preprocessed(arr, (h, w), (top, left))


def posterior_seeds(seed: int, rows, sides=(0, 1)) -> list[int]:
    """One posterior-noise seed per (row, side), in row-major order: the cache's latent of an image depends on
    (seed, row id, side) only, so batching, sharding and resuming cannot change it."""
    return [
        int(np.random.SeedSequence([seed, int(row), side]).generate_state(1, dtype=np.uint64)[0] % 2**63)
        for row in rows
        for side in sides
    ]


def _scale_shift(vae) -> tuple[float, float]:
    cfg = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode(
    vae,
    pixels: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> UNet-scale latents (float32).

    The posterior mean, or with ``sample`` a posterior sample mean + std * noise, which is what a latent
    diffusion model is pretrained on (diffusers' and Diffusion-DPO's training scripts use
    ``latent_dist.sample()``). Fine-tuning on the mean instead shifts the data distribution at low noise
    levels: on the shapes model, whose posterior std is 0.24 of the latent std, that shift alone dominated
    the fine-tuning gradient. The noise comes from ``generator`` (CPU; one draw for the batch) or from one
    generator per image seeded by ``seeds`` (the same latent for an image whatever the batching).
    """
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    latents = dist.mean.float()
    if sample:
        shape = tuple(dist.mean.shape[1:])
        if seeds is not None:
            if len(seeds) != len(pixels):
                raise ValueError(f"{len(seeds)} seeds for {len(pixels)} images")
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        else:
            noise = torch.randn((len(pixels), *shape), generator=generator)
        latents = latents + dist.std.float() * noise.to(latents.device)
    scale, shift = _scale_shift(vae)
    return ((latents - shift) * scale).contiguous()


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """UNet-scale latents -> pixels (B, 3, H, W) in [-1, 1] (float32, clamped)."""
    param = next(vae.parameters())
    scale, shift = _scale_shift(vae)
    pixels = vae.decode((latents / scale + shift).to(param.device, param.dtype)).sample
    return pixels.float().clamp(-1, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale)."""
    mse = (((a.float() - b.float()) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
