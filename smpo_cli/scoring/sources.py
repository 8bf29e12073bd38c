"""Preference-pair datasets as users have them, read as row ranges of Arrow tables.

* Pick-a-Pic v2 as an HF ``save_to_disk`` folder (``load_from_disk``, memory-mapped) or as the
  parquet shards of the hub repo (read row group by row group with pyarrow: nothing is copied into
  a cache, which matters at 335 GB).
* A scored dataset written by ``smpo score`` (parquet under ``data/``), so a second reward model can
  be added to the first one's output.
* Generic pairs: JSONL / JSON / CSV with two image paths (relative to the file) and a prompt, and
  optionally a human label (``label_0`` semantics: 1, 0, or 0.5 for a tie).
* An image folder with ``metadata.jsonl`` / ``metadata.csv`` (the HF imagefolder layout: paths in
  ``file_name``, relative to the folder).

Every source exposes ``num_rows``, ``column_names`` and ``read(start, stop) -> pyarrow.Table``.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from smpo_cli.errors import AssetNotFoundError, DataError

# column roles -> the names each known layout uses
LAYOUTS = {
    "pickapic": {"image_0": "jpg_0", "image_1": "jpg_1", "prompt": "caption", "label": "label_0"},
    "pairs": {"image_0": "image_0", "image_1": "image_1", "prompt": "prompt", "label": "label"},
}


@dataclass(frozen=True)
class Columns:
    image_0: str
    image_1: str
    prompt: str
    label: str | None  # None: no human labels in this dataset


class PairSource:
    """A table of pairs with random access by row range."""

    path: Path
    base_dir: Path  # image paths in the table are relative to this folder

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    @property
    def column_names(self) -> list[str]:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> pa.Table:
        raise NotImplementedError


class TableSource(PairSource):
    def __init__(self, table: pa.Table, path: Path, base_dir: Path) -> None:
        self.table, self.path, self.base_dir = table, path, base_dir

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def read(self, start: int, stop: int) -> pa.Table:
        return self.table.slice(start, max(0, stop - start))


class ParquetSource(PairSource):
    """Many parquet files read as one table, one row group at a time."""

    def __init__(self, files: list[Path], path: Path) -> None:
        self.path, self.base_dir, self.files = path, path if path.is_dir() else path.parent, files
        self._groups: list[tuple[int, int, int, int]] = []  # (file index, row group, first row, rows)
        self._schema: pa.Schema | None = None
        first = 0
        for i, f in enumerate(files):
            try:
                meta = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"{f}: not a readable parquet file ({exc})") from None
            if self._schema is None:
                self._schema = pq.read_schema(f)
                # an smpo score output records where its relative image paths point
                smpo_meta = (self._schema.metadata or {}).get(b"smpo")
                if smpo_meta:
                    import json

                    base = json.loads(smpo_meta).get("base_dir")
                    if base:
                        self.base_dir = Path(base)
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self._groups.append((i, g, first, rows))
                first += rows
        self._rows = first

    @property
    def num_rows(self) -> int:
        return self._rows

    @property
    def column_names(self) -> list[str]:
        return list(self._schema.names) if self._schema is not None else []

    def read(self, start: int, stop: int) -> pa.Table:
        parts = []
        for fi, g, first, rows in self._groups:
            if first + rows <= start or first >= stop:
                continue
            table = pq.ParquetFile(self.files[fi]).read_row_group(g)
            lo, hi = max(start, first) - first, min(stop, first + rows) - first
            parts.append(table.slice(lo, hi - lo))
        if not parts:
            return self._schema.empty_table() if self._schema is not None else pa.table({})
        return pa.concat_tables(parts, promote_options="default")


SIGNATURE_BYTES = 1 << 20  # hashed from each end of every table file


def dataset_files(path_str: str, split: str | None = None) -> list[Path]:
    """The files ``open_source`` reads the table from (not the images it points to)."""
    path = Path(path_str).expanduser()
    if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        root = path / split if split and (path / split).is_dir() else path
        return sorted(p for p in root.rglob("*") if p.suffix in (".arrow", ".json") and p.is_file())
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        return [path]
    for name in ("metadata.jsonl", "metadata.csv"):
        if path.is_dir() and (path / name).is_file():
            return [path / name]
    files = _parquet_files(path)
    if split and not path.is_file() and not any(ch in path_str for ch in "*?["):
        files = [f for f in files if split in f.relative_to(path).parts or f.name.startswith(f"{split}-")] or files
    return files


def data_signature(path_str: str, split: str | None = None) -> str:
    """A fingerprint of a dataset's table: each table file's name (relative to the dataset), size, and a hash of
    its first and last MiB (a parquet footer holds every row group's statistics). Cheap on terabyte datasets; a
    regenerated or edited table changes it, a copied or moved dataset keeps it."""
    import hashlib

    path = Path(path_str).expanduser()
    root = (path if path.is_dir() else path.parent).resolve()
    digest = hashlib.sha256()
    for f in sorted(dataset_files(path_str, split)):
        size = f.stat().st_size
        resolved = f.resolve()
        name = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else f.name
        digest.update(f"{name}\0{size}\0".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(SIGNATURE_BYTES))
            if size > SIGNATURE_BYTES:
                fh.seek(max(SIGNATURE_BYTES, size - SIGNATURE_BYTES))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def _parquet_files(path: Path) -> list[Path]:
    if any(ch in str(path) for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if path.is_file():
        return [path]
    data = path / "data"  # an smpo score output folder, or the hub repo's layout
    root = data if data.is_dir() and any(data.rglob("*.parquet")) else path
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


def open_source(path_str: str, split: str | None = None) -> PairSource:
    """Open a pair dataset, detecting its on-disk format."""
    path = Path(path_str).expanduser()
    is_glob = any(ch in path_str for ch in "*?[")
    if not is_glob and not path.exists():
        raise AssetNotFoundError(
            f"data.path {path} does not exist",
            hint="point data.path (or --data) at a save_to_disk folder, parquet file(s) or a JSONL/CSV pairs file",
        )
    if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _open_hf_folder(path, split)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        return TableSource(_read_pairs_file(path), path, path.parent)
    for name in ("metadata.jsonl", "metadata.csv"):  # an image folder (HF imagefolder layout)
        if path.is_dir() and (path / name).is_file():
            return TableSource(_read_pairs_file(path / name), path, path)
    files = _parquet_files(path)
    if split and not path.is_file() and not is_glob:
        in_split = [f for f in files if split in f.relative_to(path).parts or f.name.startswith(f"{split}-")]
        files = in_split or files
    if files:
        return ParquetSource(files, path)
    raise DataError(
        f"data.path {path}: no dataset found",
        hint="expected an HF save_to_disk folder, parquet file(s), or a .jsonl/.csv pairs file",
    )


def _open_hf_folder(path: Path, split: str | None) -> PairSource:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a readable datasets folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise DataError(
                    f"{path} holds several splits ({', '.join(ds)})", hint="choose one with data.split=NAME"
                )
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path} has no split {split!r}", hint="splits: " + ", ".join(ds))
        ds = ds[split]
    table = ds.with_format("arrow")[:] if ds._indices is not None else ds.data.table
    return TableSource(table, path, path)


def _read_pairs_file(path: Path) -> pa.Table:
    import pandas as pd

    try:
        if path.suffix.lower() == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif path.suffix.lower() == ".json":
            frame = pd.read_json(path, dtype=False)
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
            for col in ("label", "label_0"):
                if col in frame:
                    frame[col] = pd.to_numeric(frame[col].replace("", None), errors="raise")
    except ValueError as exc:
        raise DataError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    return pa.Table.from_pandas(frame, preserve_index=False)


def resolve_columns(
    source: PairSource,
    layout: str = "auto",
    image_0: str | None = None,
    image_1: str | None = None,
    prompt: str | None = None,
    label: str | None = None,
) -> Columns:
    """Pick the image, prompt and label columns; one clear line when they are not there."""
    names = source.column_names
    if layout == "auto":
        layout = next((k for k, v in LAYOUTS.items() if v["image_0"] in names and v["image_1"] in names), "pairs")
    defaults = LAYOUTS[layout]
    cols = Columns(
        image_0=image_0 or defaults["image_0"],
        image_1=image_1 or defaults["image_1"],
        prompt=prompt or defaults["prompt"],
        label=label or (defaults["label"] if defaults["label"] in names else None),
    )
    missing = [c for c in (cols.image_0, cols.image_1, cols.prompt, label) if c and c not in names]
    if missing:
        raise DataError(
            f"{source.path}: missing column(s) {', '.join(missing)}; columns found: {', '.join(names) or '(none)'}",
            hint="Pick-a-Pic needs jpg_0, jpg_1, caption (label_0 optional); pairs files need image_0, image_1, "
            "prompt (label optional); or name yours with data.image_0_column=... data.prompt_column=...",
        )
    return cols
