"""A tiny model first materialised by a torch.distributed rank other than 0 is complete.

transformers' ``save_pretrained`` writes nothing on a rank other than 0, which once left the text encoder's
folder empty (and marked complete) when rank 1 of a torchrun launch took the build lock first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import torch.distributed as dist
dist.init_process_group("gloo")
from smpo_cli.models.tiny import is_materialized, materialize_tiny
if dist.get_rank() == 1:
    path = materialize_tiny("tiny-sd15")  # rank 1 builds first, under the process group
dist.barrier()
path = materialize_tiny("tiny-sd15")
assert is_materialized(path), path
assert (path / "text_encoder" / "config.json").is_file(), sorted(p.name for p in (path / "text_encoder").iterdir())
print("ok", dist.get_rank())
dist.destroy_process_group()
"""


def test_rank_one_builds_a_complete_tiny_model(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SMPO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2
