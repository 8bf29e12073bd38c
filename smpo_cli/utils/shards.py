"""Sharded, resumable, multi-process stages (``smpo score``, ``smpo invert``).

A stage splits its input rows into fixed-size shards. Each shard writes a JSON sidecar (counts and
skipped rows) and then its payload file, both atomically: the payload (or a sidecar saying the shard
kept nothing) marks the shard done, so a process killed at any point loses at most the shard in
flight and a rerun skips the rest. ``fingerprint.json`` records the settings the shards were made
with; a rerun with other settings is refused with the keys that differ. Under ``accelerate launch``
process i takes shards i, i+N, ...
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smpo_cli.errors import OutputDirError
from smpo_cli.utils.atomic import write_json, write_text


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first input row
    stop: int  # one past the last input row


class ShardStore:
    """Shard bookkeeping under ``root``: ``<payload_dir>/part-K<suffix>`` + ``<sidecar_dir>/part-K.json``."""

    def __init__(self, root: Path, payload_dir: str, suffix: str, sidecar_dir: str = "shards") -> None:
        self.root, self.payload_dir, self.suffix, self.sidecar_dir = Path(root), payload_dir, suffix, sidecar_dir

    # -- layout ---------------------------------------------------------------------------------
    def payload(self, k: int) -> Path:
        return self.root / self.payload_dir / f"part-{k:05d}{self.suffix}"

    def sidecar(self, k: int) -> Path:
        return self.root / self.sidecar_dir / f"part-{k:05d}.json"

    @property
    def fingerprint_path(self) -> Path:
        return self.root / self.sidecar_dir / "fingerprint.json"

    @staticmethod
    def plan(num_rows: int, rows_per_shard: int) -> list[Shard]:
        return [Shard(k, s, min(s + rows_per_shard, num_rows)) for k, s in enumerate(range(0, num_rows, rows_per_shard))]

    # -- state ----------------------------------------------------------------------------------
    def read_sidecar(self, k: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.sidecar(k).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def is_done(self, k: int) -> bool:
        """Done: its payload exists (written last), or its sidecar says it kept no row."""
        sidecar = self.read_sidecar(k)
        if sidecar is None:
            return False
        return self.payload(k).exists() or sidecar.get("kept") == 0

    def has_payload(self, k: int) -> bool:
        return self.payload(k).exists()

    @staticmethod
    def mine(shards: Iterable[Shard], process_index: int, num_processes: int) -> list[Shard]:
        return [s for s in shards if s.index % num_processes == process_index]

    def write_sidecar(self, k: int, data: dict[str, Any]) -> None:
        write_json(self.sidecar(k), data)

    # -- settings -------------------------------------------------------------------------------
    def write_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        write_json(self.fingerprint_path, fingerprint)

    def check_fingerprint(self, fingerprint: dict[str, Any], where: str) -> bool:
        """True when shards made with ``fingerprint`` exist; OutputDirError when made with others."""
        if not self.fingerprint_path.exists():
            return False
        old = json.loads(self.fingerprint_path.read_text(encoding="utf-8"))
        if old == fingerprint:
            return True
        diff = sorted(_diff_keys(old, fingerprint))
        if not diff:  # only settings added since, at their null defaults (what the folder was made without)
            return True
        raise OutputDirError(
            f"output_dir {where} holds shards made with other settings ({', '.join(diff)})",
            hint="pass --overwrite to start again, or choose another output_dir",
        )

    # -- skipped rows ---------------------------------------------------------------------------
    def merge_skipped(self, shards: Iterable[Shard]) -> list[dict[str, Any]]:
        """All shards' skipped rows, in shard order, also written to ``skipped.jsonl``."""
        skipped: list[dict[str, Any]] = []
        for shard in shards:
            skipped.extend((self.read_sidecar(shard.index) or {}).get("skipped", []))
        write_text(self.root / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
        return skipped


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in set(old) | set(new):
            out.extend(_diff_keys(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return [] if old == new else [prefix.rstrip(".")]


REASON_KINDS = ("file not found", "cannot decode", "oversized", "decompression bomb", "missing image", "missing prompt")


def reason_kind(reason: str) -> str:
    """Group a skip reason ("image_1: cannot decode image bytes: ...") into a short kind."""
    text = reason.split(": ", 1)[1] if reason.startswith(("image_0: ", "image_1: ", "image: ")) else reason
    for kind in REASON_KINDS:
        if kind in text:
            return kind
    return text.split(":")[0]


def count_reasons(skipped: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        kind = reason_kind(s["reason"])
        counts[kind] = counts.get(kind, 0) + 1
    return counts
