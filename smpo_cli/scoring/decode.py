"""Decoding pair images safely: a bad image skips the whole pair with a reason, never one side."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

DEFAULT_MAX_PIXELS = 50_000_000


class SkipPair(Exception):
    """The pair cannot be scored; the message is the reason written to skipped.jsonl."""


def open_image(value: Any, base_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode JPEG/PNG bytes, an HF Image struct ({bytes, path}) or a file path into an RGB image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise SkipPair("missing image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        source: Any = io.BytesIO(bytes(value))
        label = "image bytes"
    elif isinstance(value, str):
        path = Path(value).expanduser()
        source = path if path.is_absolute() else base_dir / path
        label = str(value)
        if not source.is_file():
            raise SkipPair(f"file not found: {source}")
    else:
        raise SkipPair(f"unsupported image value of type {type(value).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            w, h = img.size
            if w * h > max_pixels:
                raise SkipPair(f"oversized image {w}x{h} ({w * h} pixels > data.max_image_pixels={max_pixels})")
            img.load()
    except SkipPair:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipPair(f"refused as a decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as exc:
        raise SkipPair(f"cannot decode {label}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if img.mode != "RGB":
        from smpo_cli.rewards.base import to_rgb

        img = to_rgb(img)
    return img


@dataclass
class DecodedPair:
    row: int  # index inside the shard
    image_0: Image.Image | None
    image_1: Image.Image | None
    prompt: str
    skip_reason: str | None = None


class PairDecoder:
    """Map-style dataset over one shard: row -> DecodedPair (runs in DataLoader workers)."""

    def __init__(self, images_0: list, images_1: list, prompts: list, base_dir: Path, max_pixels: int) -> None:
        self.images_0, self.images_1, self.prompts = images_0, images_1, prompts
        self.base_dir, self.max_pixels = base_dir, max_pixels

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> DecodedPair:
        prompt = self.prompts[i]
        if not isinstance(prompt, str):
            return DecodedPair(i, None, None, "", "missing prompt")
        try:
            img0 = open_image(self.images_0[i], self.base_dir, self.max_pixels)
        except SkipPair as exc:
            return DecodedPair(i, None, None, prompt, f"image_0: {exc}")
        try:
            img1 = open_image(self.images_1[i], self.base_dir, self.max_pixels)
        except SkipPair as exc:
            return DecodedPair(i, None, None, prompt, f"image_1: {exc}")
        return DecodedPair(i, img0, img1, prompt)


def collate(items: list[DecodedPair]) -> list[DecodedPair]:
    return items
