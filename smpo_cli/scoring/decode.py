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
class DecodedRow:
    row: int  # index inside the shard
    images: list[Image.Image] | None  # one per image column, None when skipped
    prompt: str
    skip_reason: str | None = None


class RowDecoder:
    """Map-style dataset over one shard: row -> DecodedRow (runs in DataLoader workers).

    ``columns`` holds one list of image values per image column (two for a pair); a bad image in
    any column skips the whole row, with the column's name in the reason.
    """

    def __init__(self, columns: list[list], names: list[str], prompts: list, base_dir: Path, max_pixels: int) -> None:
        self.columns, self.names, self.prompts = columns, names, prompts
        self.base_dir, self.max_pixels = base_dir, max_pixels

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> DecodedRow:
        prompt = self.prompts[i]
        if not isinstance(prompt, str):
            return DecodedRow(i, None, "", "missing prompt")
        images = []
        for name, column in zip(self.names, self.columns, strict=True):
            try:
                images.append(open_image(column[i], self.base_dir, self.max_pixels))
            except SkipPair as exc:
                return DecodedRow(i, None, prompt, f"{name}: {exc}")
        return DecodedRow(i, images, prompt)


def collate(items: list[DecodedRow]) -> list[DecodedRow]:
    return items
