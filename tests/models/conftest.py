"""Fixtures for the model tests: tiny pipelines materialised once per session in a temp cache."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # helpers (ldm_convert) also under --import-mode=importlib
    sys.path.insert(0, str(HERE))

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    OpenMP threads made a 2-step SD1.5 generation 10x slower (13 s instead of 0.9 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(smpo_cache):
    """Every test here writes under the session's SMPO_CACHE, never ~/.cache."""
    return smpo_cache


@pytest.fixture(scope="session")
def tiny_dirs(_tiny_cache) -> dict[str, Path]:
    from smpo_cli.models.tiny import materialize_tiny

    return {"sd15": materialize_tiny("tiny-sd15"), "sdxl": materialize_tiny("tiny-sdxl")}


@pytest.fixture(scope="session")
def loaded(tiny_dirs):
    """Components loaded from the materialised folders (shared: treat as read-only)."""
    from smpo_cli.models.loading import load_components

    return {fam: load_components(str(path), device="cpu") for fam, path in tiny_dirs.items()}


@pytest.fixture
def copy_of(tiny_dirs, tmp_path):
    """``copy_of("sd15")`` → a private copy of the tiny folder that a test may break."""

    def _copy(family: str) -> Path:
        dest = tmp_path / f"tiny-{family}-copy"
        shutil.copytree(tiny_dirs[family], dest)
        return dest

    return _copy


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache for this test; ``put(repo_id, folder)`` caches a snapshot.

    The layout is the real one (``models--org--name/refs/main`` + ``snapshots/<commit>/``), so
    hub ids resolve offline through huggingface_hub exactly as after a download.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def put(repo_id: str, folder: Path) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(FAKE_COMMIT)
        snapshot = repo / "snapshots" / FAKE_COMMIT
        shutil.copytree(folder, snapshot)
        return snapshot

    put.cache = cache  # type: ignore[attr-defined]
    return put
