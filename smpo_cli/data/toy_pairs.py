"""A tiny preference-pair dataset drawn with PIL: coloured shapes and captions, as a pairs JSONL.

Each pair shows the captioned shape and colour in one image and a distractor (wrong colour or shape)
in the other, in random order. It exists so ``smpo score`` and ``smpo train`` can run end to end on
the embedded tiny models anywhere, offline, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: str, size: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), (20, 20, 20))
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(rng.integers(r, size - r)) for _ in range(2))
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_toy_pairs(dest: str | Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` pairs (PNG files + ``pairs.jsonl`` with image_0, image_1, prompt, label) into ``dest``."""
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    lines = []
    for i in range(n):
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], colors[int(rng.integers(len(colors)))]
        if rng.random() < 0.5:
            wrong_shape, wrong_color = shape, colors[(colors.index(color) + 1 + int(rng.integers(3))) % 4]
        else:
            wrong_shape, wrong_color = SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(2))) % 3], color
        good, bad = draw(shape, color, size, rng), draw(wrong_shape, wrong_color, size, rng)
        first_good = bool(rng.random() < 0.5)
        pair = (good, bad) if first_good else (bad, good)
        names = [f"images/{i:04d}_{k}.png" for k in (0, 1)]
        for img, name in zip(pair, names, strict=True):
            img.save(dest / name)
        article = "an" if color[0] in "aeiou" else "a"
        lines.append({"image_0": names[0], "image_1": names[1], "prompt": f"{article} {color} {shape}",
                      "label": 1.0 if first_good else 0.0})  # fmt: skip
    path = dest / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path
