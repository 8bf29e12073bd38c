"""Facts about the installation and the machine, for run.json and ``smpo env``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from smpo_cli import __version__

TRACKED_PACKAGES = (
    "torch", "diffusers", "transformers", "accelerate", "peft", "datasets",
    "safetensors", "open-clip-torch", "typer", "pydantic", "numpy", "pillow",
)  # fmt: skip


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions, read from metadata (imports nothing)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    """The commit of the smpo source tree, when it runs from a git checkout."""
    src = Path(__file__).resolve().parents[2]
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_info() -> dict[str, Any]:
    """CUDA devices as torch sees them (imports torch; only called for real runs)."""
    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return info


def collect_env() -> dict[str, Any]:
    """Everything ``smpo env`` reports (imports torch to ask it about devices)."""
    info: dict[str, Any] = {
        "smpo": __version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
    }
    try:
        import torch

        info["torch_build"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
            "threads": torch.get_num_threads(),
        }
        info["device"] = device_info()
    except ImportError:
        info["torch_build"] = None
        info["device"] = None
    return info
