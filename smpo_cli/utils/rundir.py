"""Run folders: refuse to clobber, record exactly what ran.

Every real run writes ``recipe.resolved.yaml`` (re-running it reproduces the run) and ``run.json``
(smpo version, argv, package versions, device, start/end, exit status) into its output folder.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from smpo_cli import __version__
from smpo_cli.errors import OutputDirError
from smpo_cli.utils.atomic import write_json, write_text
from smpo_cli.utils.envinfo import device_info, git_sha, now, package_versions

MANIFEST = "run.json"
SIDECAR = ".smpo"  # settings fingerprints (utils.shards)
RESOLVED_RECIPE = "recipe.resolved.yaml"
def is_empty_dir(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


class RunDir:
    """An output folder for one run of one stage."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def prepare(self, *, overwrite: bool = False, resume: bool = False) -> None:
        """Create the folder; refuse a non-empty one unless resuming or told to overwrite.

        ``overwrite`` deletes an earlier smpo run folder (one that holds run.json) but never a
        folder smpo did not create.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"output_dir {path} is a file, not a folder", hint="choose another output_dir")
        if not is_empty_dir(path) and not resume:
            if not overwrite:
                raise OutputDirError(
                    f"output_dir {path} is not empty",
                    hint="pass --overwrite to replace it, resume the run if the stage supports it, "
                    "or set output_dir=... to a new folder",
                )
            if not (path / MANIFEST).exists():
                raise OutputDirError(
                    f"output_dir {path} is not empty and is not an smpo run folder (no {MANIFEST}); "
                    "refusing to delete it",
                    hint="choose another output_dir or empty it yourself",
                )
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputDirError(f"cannot create output_dir {path}: {exc.strerror or exc}") from None

    def write_recipe(self, resolved_yaml: str) -> None:
        write_text(self.path / RESOLVED_RECIPE, resolved_yaml)

    def start(self, *, stage: str, recipe_source: str, argv: list[str] | None = None) -> dict[str, Any]:
        manifest = {
            "smpo_version": __version__,
            "git_sha": git_sha(),
            "stage": stage,
            "recipe": recipe_source,
            "argv": list(sys.argv if argv is None else argv),
            "cwd": os.getcwd(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": package_versions(),
            "device": device_info(),
            "started_at": now(),
            "ended_at": None,
            "status": "running",
        }
        previous = self.read_manifest()
        if previous is not None:  # a resumed run keeps the history of its earlier attempts
            manifest["previous_attempts"] = [
                *previous.pop("previous_attempts", []),
                {k: previous.get(k) for k in ("started_at", "ended_at", "status", "error", "argv")},
            ]
        write_json(self.path / MANIFEST, manifest)
        return manifest

    def finish(self, status: str, *, error: str | None = None, result: dict[str, Any] | None = None) -> None:
        manifest = self.read_manifest() or {}
        manifest.update(ended_at=now(), status=status)
        if error is not None:
            manifest["error"] = error
        if result is not None:
            manifest["result"] = result
        write_json(self.path / MANIFEST, manifest)

    def finished_result(self) -> dict[str, Any] | None:
        """The recorded result of a run that finished successfully; None for any other folder."""
        manifest = self.read_manifest() or {}
        return manifest.get("result") if manifest.get("status") == "success" else None

    def holds_no_results(self) -> bool:
        """An unfinished smpo run folder with nothing in it but its records (run.json, the resolved recipe, the
        settings sidecar, temporaries): what a run that failed on bad input, or was killed at once, leaves.
        Reusing it cannot lose work, so a corrected rerun needs neither --overwrite nor a new folder."""
        path = self.path
        if not (path / MANIFEST).is_file() or (self.read_manifest() or {}).get("status") == "success":
            return False
        for item in path.rglob("*"):
            rel = item.relative_to(path)
            records = rel.parts[0] == SIDECAR or item.name == "fingerprint.json" or str(rel) in (MANIFEST, RESOLVED_RECIPE)
            if item.is_dir() or records or _temporary(item):
                continue
            return False
        return True

    def clear(self) -> None:
        shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def remove_temporaries(self) -> int:
        """Delete what killed atomic writes left (``.name.*.tmp`` files and folders, ``.name.old`` folders)."""
        found = [p for p in self.path.rglob(".*") if _temporary(p)]
        for item in sorted(found, key=lambda p: len(p.parts)):
            if not item.exists():
                continue  # inside a temporary folder removed already
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        return len(found)

    def read_manifest(self) -> dict[str, Any] | None:
        import json

        try:
            return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def _temporary(path: Path) -> bool:
    """A temporary of ``utils.atomic.atomic_path``: ``.<name>.<random><suffix>.tmp`` or ``.<name>.old``."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.endswith(".old"))
