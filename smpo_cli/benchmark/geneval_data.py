"""GenEval's files: the prompt metadata and the image folder layout (evaluation.md sections 1.4-1.5).

* ``evaluation_metadata.jsonl``: one JSON object per prompt with ``tag`` (one of the six tasks), ``include``
  (a list of ``{class, count, color?, position: [relation, group]?}``), optional ``exclude`` (``{class,
  count}``) and ``prompt``. smpo never ships it: it comes from a path or from the hub
  (``hf://datasets/OWNER/NAME/PATH``, or ``hf://OWNER/NAME/PATH`` for a model repository).
* image folder: ``<root>/<NNNNN>/metadata.jsonl`` (that prompt's metadata line) and
  ``<root>/<NNNNN>/samples/<k>.png``; folder names are all digits, sample names match ``\\d+\\.png``
  (``grid.png`` and anything else is ignored, as the official evaluator does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smpo_cli.benchmark.geneval_rules import COLOURS, TASKS
from smpo_cli.errors import AssetNotFoundError, DataError

RELATIONS = ("left of", "right of", "above", "below")
SAMPLE_NAME = re.compile(r"^\d+\.png$")


@dataclass(frozen=True)
class GenevalImage:
    prompt_index: int
    sample_index: int
    path: Path
    metadata: dict[str, Any]


def resolve_metadata(ref: str) -> Path:
    """A local path as is; ``hf://[datasets/]OWNER/NAME/PATH`` downloaded (and cached) from the hub."""
    if not ref.startswith("hf://"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise AssetNotFoundError(
                f"metadata {path} does not exist",
                hint="download evaluation_metadata.jsonl from github.com/djghosh13/geneval (prompts/) and pass its path",
            )
        return path
    parts = ref[len("hf://"):].split("/")
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces"):
        repo_type, parts = parts[0][:-1], parts[1:]
    if len(parts) < 3:
        raise DataError(f"metadata {ref}: expected hf://datasets/OWNER/NAME/PATH/TO/evaluation_metadata.jsonl")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), repo_type=repo_type))
    except Exception as exc:  # offline, missing repo or file: one line, not the hub's traceback
        raise AssetNotFoundError(f"metadata {ref}: could not fetch it from the hub ({type(exc).__name__})",
                                 hint="check the repository and file name, or download the file and pass its path") from exc  # fmt: skip


def check_metadata(entry: Any, where: str) -> dict[str, Any]:
    """``entry`` if it is a valid GenEval metadata object, else a DataError naming ``where`` and the key."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if entry.get("tag") not in TASKS:
        raise DataError(f"{where}: tag {entry.get('tag')!r} is not a GenEval task ({', '.join(TASKS)})")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise DataError(f"{where}: missing or empty 'prompt'")
    includes = entry.get("include")
    if not isinstance(includes, list) or not includes:
        raise DataError(f"{where}: 'include' must be a non-empty list of {{class, count}} objects")
    for j, clause in enumerate(includes + entry.get("exclude", [])):
        kind = "include" if j < len(includes) else "exclude"
        at = f"{where}: {kind}[{j if kind == 'include' else j - len(includes)}]"
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
            raise DataError(f"{at} needs a 'class' name")
        if not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise DataError(f"{at}.count must be a positive integer, got {clause.get('count')!r}")
        if "color" in clause and clause["color"] not in COLOURS:
            raise DataError(f"{at}.color {clause['color']!r} is not one of GenEval's colours ({', '.join(COLOURS)})")
        if clause.get("position"):
            pos = clause["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < j):  # fmt: skip
                raise DataError(f"{at}.position must be [relation, earlier include index] with relation in "
                                f"{', '.join(RELATIONS)}; got {pos!r}")  # fmt: skip
    return entry


def load_metadata(path: Path) -> list[dict[str, Any]]:
    """Every line of an ``evaluation_metadata.jsonl``, validated."""
    from smpo_cli.generation.prompts import read_jsonl

    entries = [check_metadata(entry, f"{path}:{n}") for n, entry in read_jsonl(path)]
    if not entries:
        raise DataError(f"{path}: no prompts", hint="pass GenEval's evaluation_metadata.jsonl")
    return entries


def scan_image_folder(root: Path) -> list[GenevalImage]:
    """The images of a GenEval folder with their prompt's metadata, in (prompt, sample) order."""
    if not root.is_dir():
        raise AssetNotFoundError(f"images folder {root} does not exist", hint="pass a GenEval image folder (NNNNN/samples/*.png)")
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            raise DataError(f"{folder}: no metadata.jsonl", hint="each NNNNN folder needs its prompt's metadata line")
        text = meta_file.read_text(encoding="utf-8").strip()
        try:
            meta = json.loads(text.splitlines()[0]) if text else None
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_file}: not JSON ({exc.msg})") from None
        meta = check_metadata(meta, str(meta_file))
        samples = folder / "samples"
        names = sorted((p for p in samples.glob("*.png") if SAMPLE_NAME.match(p.name)), key=lambda p: int(p.stem)) if samples.is_dir() else []
        found += [GenevalImage(int(folder.name), int(p.stem), p, meta) for p in names]
    if not found:
        raise DataError(f"{root}: no GenEval images (expected NNNNN/metadata.jsonl and NNNNN/samples/<k>.png)",
                        hint="generate them with `smpo bench geneval --model M --metadata evaluation_metadata.jsonl`")  # fmt: skip
    return found
