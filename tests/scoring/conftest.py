"""Pair datasets in each real on-disk format, with the awkward images users actually have."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image


def jpeg(color, size=(40, 32), mode="RGB", fmt="JPEG") -> bytes:
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pickapic_rows(n: int, seed: int = 0) -> dict:
    """Pick-a-Pic v2 columns; label_0 cycles 1, 0, 0.5 (tie) so every case appears."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid", "model_0")}
    for i in range(n):
        c0, c1 = (tuple(int(x) for x in rng.integers(0, 255, 3)) for _ in range(2))
        cols["caption"].append(["a red cat", "a photo of a dog", "blue painting"][i % 3])
        cols["jpg_0"].append(jpeg(c0))
        cols["jpg_1"].append(jpeg(c1, size=(32, 48)))
        label = [1.0, 0.0, 0.5][i % 3]
        cols["label_0"].append(label)
        cols["label_1"].append(1.0 - label)
        cols["image_0_uid"].append(f"u{i}a")
        cols["image_1_uid"].append(f"u{i}b")
        cols["model_0"].append("sdxl")
    return cols


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory):
    from smpo_cli.rewards.tiny import build_tiny_reward

    return build_tiny_reward("pickscore", tmp_path_factory.mktemp("rewards") / "pickscore")


@pytest.fixture
def pickapic_parquet(tmp_path):
    """Two parquet files (like the hub repo's shards) with corrupt, odd-mode and oversized images."""
    cols = pickapic_rows(12)
    cols["jpg_1"][3] = b"not a jpeg at all"  # corrupt -> the whole pair is skipped
    cols["jpg_0"][4] = jpeg((10, 200, 30), mode="L", fmt="PNG")  # grayscale
    cols["jpg_1"][6] = jpeg((10, 200, 30), mode="RGBA", fmt="PNG")  # RGBA
    cols["jpg_0"][7] = jpeg((10, 200, 30), mode="CMYK")  # CMYK JPEG
    cols["jpg_1"][9] = jpeg((10, 200, 30), mode="P", fmt="PNG")  # palette
    cols["jpg_0"][10] = jpeg((1, 2, 3), size=(400, 300))  # oversized with data.max_image_pixels=100000
    root = tmp_path / "pickapic" / "data"
    root.mkdir(parents=True)
    table = pa.table(cols)
    pq.write_table(table.slice(0, 7), root / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(table.slice(7), root / "train-00001-of-00002.parquet", row_group_size=3)
    return tmp_path / "pickapic"


@pytest.fixture
def pairs_jsonl(tmp_path):
    folder = tmp_path / "pairs"
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(5):
        for side, color in ((0, (200, 10 * i, 0)), (1, (0, 10 * i, 200))):
            Image.new("RGB", (24, 24), color).save(folder / "img" / f"{i}_{side}.png")
        lines.append({"image_0": f"img/{i}_0.png", "image_1": f"img/{i}_1.png", "prompt": "a red cat", "id": i})
    lines[2]["image_1"] = "img/missing.png"
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path
