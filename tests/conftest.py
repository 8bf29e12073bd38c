"""Test-suite setup: offline by default, markers, deterministic seeds."""

from __future__ import annotations

import os
import socket

import pytest

# Nothing in the default tier may touch the network: the hub libraries run offline and any
# socket connection to a non-loopback address fails loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # pragma: no cover - only fires on a bug
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise OSError(f"network access attempted in the test suite: {address!r}")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    if os.environ.get("SMPO_ALLOW_NETWORK") != "1":
        socket.socket.connect = _guarded_connect
    # Tiny models run fastest on one thread, and several OpenMP threads thrash badly (10x and
    # more) when anything else runs on a 2-core box. SMPO_TEST_THREADS=N to change it.
    import torch

    torch.set_num_threads(int(os.environ.get("SMPO_TEST_THREADS", "1")))
    # Tiny models are materialised into one folder per test session, never into the user's cache.
    import tempfile

    os.environ["SMPO_CACHE"] = tempfile.mkdtemp(prefix="smpo-test-cache-")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("SMPO_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    has_cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Each test starts from the same RNG state and default dtype, and leaves them so."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def smpo_cache():
    """The session's cache folder (tiny models are materialised here once)."""
    from pathlib import Path

    return Path(os.environ["SMPO_CACHE"])


@pytest.fixture(scope="session")
def scored(tmp_path_factory):
    """16 toy pairs scored with the embedded tiny PickScore-architecture model (read-only; shared by the
    training, FSDP, flow and plan-cache tests)."""
    from smpo_cli.config import load_recipe
    from smpo_cli.data.toy_pairs import write_toy_pairs
    from smpo_cli.runs import execute
    from smpo_cli.scoring.runner import run_scoring

    root = tmp_path_factory.mktemp("toy")
    pairs = write_toy_pairs(root / "pairs", n=16)
    execute("score", load_recipe("tiny_score_cpu", "score", [f"data.path={pairs}", f"output_dir={root / 'scored'}"]),
            run_scoring)  # fmt: skip
    return root / "scored"
