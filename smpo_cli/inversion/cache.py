"""The SmPO training cache written by ``smpo invert`` on a scored pair dataset, read with random access.

Each shard ``cache/part-K.safetensors`` holds, for its N pairs (in input order)::

    latents        (N, 2, C, h, w)     clean VAE latents of image_0 and image_1 (UNet scale)
    inverted       (N, 2, L, C, h, w)  their inversions to each cached level
    rows           (N,)                the pair's row in the scored dataset (its smpo_row when present)
    original_size  (N, 2, 2)           (height, width) of each image before resizing (SDXL time ids)
    crop_top_left  (N, 2, 2)           (top, left) of each centre crop

and its metadata (``__metadata__["smpo"]``) the levels and the settings. Reads go through
``safe_open``, which memory-maps the file: one pair costs one slice of each tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from smpo_cli.errors import AssetNotFoundError, DataError

CACHE_DIR = "cache"


class InversionCache:
    """Random access by row to an inversion cache folder."""

    def __init__(self, root: str | Path) -> None:
        from safetensors import safe_open

        self.root = Path(root)
        folder = self.root / CACHE_DIR
        files = sorted(folder.glob("part-*.safetensors")) if folder.is_dir() else []
        if not files:
            raise AssetNotFoundError(
                f"{self.root} holds no inversion cache ({CACHE_DIR}/part-*.safetensors)",
                hint="write one with `smpo invert` on a scored dataset",
            )
        self._files = files
        self._index: dict[int, tuple[int, int]] = {}
        self.meta: dict[str, Any] | None = None
        for fi, path in enumerate(files):
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("smpo", "{}"))
                rows = f.get_tensor("rows").tolist()
            if self.meta is None:
                self.meta = meta
            elif meta.get("levels") != self.meta.get("levels"):
                raise DataError(f"{path}: made with other levels than {files[0].name}; rebuild the cache")
            for i, row in enumerate(rows):
                self._index[int(row)] = (fi, i)
        self._handles: dict[int, Any] = {}

    @property
    def levels(self) -> list[int]:
        return list(self.meta["levels"]) if self.meta else []

    @property
    def rows(self) -> list[int]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, row: int) -> bool:
        return int(row) in self._index

    def _handle(self, fi: int):
        from safetensors import safe_open

        if fi not in self._handles:  # opened lazily, so a DataLoader worker opens its own
            self._handles[fi] = safe_open(str(self._files[fi]), "pt")
        return self._handles[fi]

    def get(self, row: int) -> dict[str, torch.Tensor]:
        """The cached tensors of one pair (by its row in the scored dataset)."""
        try:
            fi, i = self._index[int(row)]
        except KeyError:
            raise DataError(f"row {row} is not in the inversion cache {self.root}") from None
        f = self._handle(fi)
        return {
            name: f.get_slice(name)[i] for name in ("latents", "inverted", "original_size", "crop_top_left")
        }

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
