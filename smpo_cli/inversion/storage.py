"""Disk space of an inversion cache, computed from configs only (no torch: used by --dry-run)."""

from __future__ import annotations

import json
from pathlib import Path

from smpo_cli.config.schema import InvertRecipe


def latent_geometry(recipe: InvertRecipe) -> tuple[int, int, str]:
    """(latent channels, VAE downsampling factor, where that came from) without loading weights."""
    ref = recipe.model.vae or recipe.model.pretrained
    candidates: list[Path] = []
    from smpo_cli.models.tiny import ALL_TINY_MODELS, tiny_model_dir

    if ref in ALL_TINY_MODELS:  # SD3 / FLUX.1 too: 16-channel latents
        candidates.append(tiny_model_dir(ref) / "vae" / "config.json")
    path = Path(ref).expanduser()
    candidates += [path / "vae" / "config.json", path / "config.json"]
    if ref.count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            for name in ("vae/config.json", "config.json"):
                cached = try_to_load_from_cache(ref, name)
                if isinstance(cached, str):
                    candidates.append(Path(cached))
        except Exception:  # noqa: BLE001 - a cache probe never breaks a dry run
            pass
    for cfg_path in candidates:
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if "latent_channels" in cfg:
                return int(cfg["latent_channels"]), 2 ** (len(cfg["block_out_channels"]) - 1), str(cfg_path)
    return 4, 8, "assumed (SD VAE: 4 channels, 8x downsampling)"


def storage_per_pair(recipe: InvertRecipe) -> tuple[int, str]:
    channels, factor, where = latent_geometry(recipe)
    side = recipe.data.resolution // factor
    bytes_per = {"float16": 2, "bfloat16": 2, "float32": 4}[recipe.inversion.cache_dtype]
    per_pair = 2 * (1 + len(recipe.inversion.levels)) * channels * side * side * bytes_per
    return per_pair, where
