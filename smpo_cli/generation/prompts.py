"""Prompt sets as the benchmarks publish them, read from paths the user gives (nothing is shipped).

* plain text: one prompt per line;
* JSONL: objects with a ``prompt`` key (or ``prompt_column``), or GenEval's ``evaluation_metadata.jsonl``
  (``tag``, ``include``, ``exclude``, ``prompt``: the whole line is kept as the prompt's metadata);
* JSON: a list of strings (the HPDv2 benchmark files, one per style), a list of objects with ``prompt``
  (ImageReward's ``benchmark-prompts.json``), or an ``{id: prompt}`` mapping; a folder of such JSON files
  (HPDv2's four styles) is read file by file with ``style`` = the file name;
* TSV/CSV: PartiPrompts (``Prompt``, ``Category``, ``Challenge``, ``Note``) or any table with a prompt column;
* parquet file/folder or a ``save_to_disk`` folder: the Pick-a-Pic ``caption`` column, unique captions in
  order of first appearance (the ``*_unique`` splits have one row per prompt already);
* ``shapes-train`` / ``shapes-heldout``: the shapes testbed's GenEval-form captions, built from code.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smpo_cli.errors import AssetNotFoundError, DataError

PROMPT_KEYS = ("prompt", "Prompt", "caption", "Prompts", "text")


@dataclass
class PromptRecord:
    index: int
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _records(items: list[tuple[str, dict]], source: Path) -> list[PromptRecord]:
    out = []
    for i, (prompt, meta) in enumerate(items):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source}: prompt {i} is empty or not text", hint="remove the row or fix the file")
        out.append(PromptRecord(i, prompt, meta))
    return out


def _pick(row: dict, column: str | None, where: str) -> str:
    keys = (column,) if column else PROMPT_KEYS
    for key in keys:
        if key in row:
            return row[key]
    raise DataError(f"{where}: no prompt field (looked for {', '.join(keys)}); fields: {', '.join(map(str, row))}",
                    hint="name it with prompts.column=...")  # fmt: skip


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a bad line is a DataError naming ``path:line``."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None


SHAPES_PROMPT_SETS = {
    "shapes-train": "the shapes world's GenEval-form training captions (split seed 0), with their skill",
    "shapes-heldout": "the shapes world's GenEval-form held-out captions (split seed 0), with their skill",
}


def _shapes_prompts(name: str) -> list[tuple[str, dict]]:
    from smpo_cli.shapes.world import split_captions

    train, heldout = split_captions(0)
    return [(c.text, {"skill": c.skill}) for c in (train if name == "shapes-train" else heldout) if c.geneval_form]


def load_prompts(path_str: str, *, fmt: str = "auto", column: str | None = None, limit: int | None = None) -> list[PromptRecord]:
    if path_str in SHAPES_PROMPT_SETS:  # built from code, not shipped: the testbed's own caption sets
        records = _records(_shapes_prompts(path_str), Path(path_str))
        return records[:limit] if limit else records
    path = Path(path_str).expanduser()
    if not path.exists():
        raise AssetNotFoundError(f"prompts.path {path} does not exist",
                                 hint="download the prompt set (e.g. GenEval's evaluation_metadata.jsonl, PartiPrompts.tsv, "
                                      "HPDv2 benchmark/*.json) and point prompts.path at it")  # fmt: skip
    items = _read(path, fmt, column)
    records = _records(items, path)
    if not records:
        raise DataError(f"prompts.path {path} holds no prompts", hint="check the file (one prompt per line for .txt)")
    return records[:limit] if limit else records


def _read(path: Path, fmt: str, column: str | None) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        if any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")) or any(
            path.rglob("*.parquet")
        ):
            return _captions(path, column)
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path}: no prompt files (expected *.json per style, parquet, or a datasets folder)")
        out = []
        for f in files:
            out += [(p, {**m, "style": f.stem}) for p, m in _read(f, fmt, column)]
        return out
    if fmt == "text" or suffix == ".txt":
        return [(line.strip(), {}) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        out = []
        for n, row in read_jsonl(path):
            if isinstance(row, str):
                out.append((row, {}))
            else:
                out.append((_pick(row, column, f"{path}:{n}"), row))
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict):
            return [(v, {"id": k}) for k, v in data.items()]
        return [(x, {}) if isinstance(x, str) else (_pick(x, column, str(path)), x) for x in data]
    if suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        return [(_pick(r, column, f"{path}:{i + 2}"), r) for i, r in enumerate(rows)]
    if suffix == ".parquet":
        return _captions(path, column)
    raise DataError(f"{path}: unknown prompt file type {suffix!r}", hint="use .txt, .jsonl, .json, .tsv, .csv or parquet")


def _captions(path: Path, column: str | None) -> list[tuple[str, dict]]:
    from smpo_cli.scoring.sources import open_source

    source = open_source(str(path))
    col = column or next((c for c in ("caption", *PROMPT_KEYS) if c in source.column_names), None)
    if col is None:
        raise DataError(f"{path}: no caption/prompt column; columns: {', '.join(source.column_names)}",
                        hint="name it with prompts.column=...")  # fmt: skip
    seen: dict[str, None] = {}
    step = 10_000
    for start in range(0, source.num_rows, step):
        table = source.read(start, min(start + step, source.num_rows)).select([col])
        for value in table.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                seen.setdefault(value, None)
    return [(p, {}) for p in seen]
