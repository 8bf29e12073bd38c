"""`train.sharding=zero2/zero3` (DeepSpeed ZeRO, run by smpo itself) on 2 CPU processes (gloo): really
partitioned, the same training as DDP, a checkpoint that survives SIGKILL and resumes on another sharding."""

from __future__ import annotations

import json

import pytest

from tests.train.test_train_fsdp import distance, finished, kill_after_step_2, launch
from tests.train.test_train_stage import base_unet_state, unet_state

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra: pip install -e '.[dev]'")


def losses(folder) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_zero2_and_zero3_partition_train_like_ddp_and_resume_after_sigkill(scored, tmp_path):
    from smpo_cli.models.tiny import materialize_tiny

    materialize_tiny("tiny-sd15")  # once, before the processes start
    ddp = finished(launch(tmp_path / "ddp", scored))
    zero2 = finished(launch(tmp_path / "zero2", scored, "train.sharding=zero2"))
    zero3 = finished(launch(tmp_path / "zero3", scored, "train.sharding=zero3"))
    assert ddp["local_param_fraction"] == 1.0 and ddp["reference_param_fraction"] == 1.0
    # ZeRO-2: each process holds half of the optimiser state, the whole UNet and reference
    assert zero2["sharding"] == "zero2" and 0.45 < zero2["local_param_fraction"] < 0.55
    assert zero2["reference_param_fraction"] == 1.0
    # ZeRO-3: half of the trained weights and half of the frozen reference's
    assert zero3["sharding"] == "zero3" and 0.45 < zero3["local_param_fraction"] < 0.55
    assert 0.45 < zero3["reference_param_fraction"] < 0.55
    # the same optimisation as DDP (the first Adam step too: DeepSpeed's state-creating step is not counted);
    # only the order of the gradient sums differs, as with FSDP (tests/train/test_train_fsdp.py)
    base = base_unet_state()
    b = unet_state(tmp_path / "ddp" / "pipeline")
    for mode in ("zero2", "zero3"):
        a = unet_state(tmp_path / mode / "pipeline")
        assert distance(a, b) < 0.01 * distance(b, base), (mode, distance(a, b), distance(b, base))
        assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "ddp"), abs=1e-3)
    # a ZeRO-3 run killed after its step-2 checkpoint and resumed ends where the uninterrupted one ends
    out = tmp_path / "killed"
    kill_after_step_2(launch(out, scored, "train.sharding=zero3"), out)
    resumed = finished(launch(out, scored, "train.sharding=zero3", "train.resume=auto"))
    assert resumed["resumed_from"] >= 2 and resumed["steps"] == 6
    z3 = unet_state(tmp_path / "zero3" / "pipeline")
    assert distance(unet_state(out / "pipeline"), z3) <= 1e-6 * distance(z3, base)
    # its checkpoint is an ordinary one: ZeRO-2 resumes it (weights and the full AdamW state by name)
    other = tmp_path / "zero2-from-zero3"
    other.mkdir()
    import shutil

    shutil.copytree(tmp_path / "zero3" / "checkpoints" / "step-000004", other / "checkpoints" / "step-000004")
    crossed = finished(launch(other, scored, "train.sharding=zero2", "train.resume=auto"))
    assert crossed["resumed_from"] == 4
    c = unet_state(other / "pipeline")
    assert distance(c, z3) < 0.01 * distance(z3, base), (distance(c, z3), distance(z3, base))


def test_zero_settings_are_checked_before_any_weight_loads(scored, tmp_path, capsys):
    from smpo_cli.cli.main import run
    from smpo_cli.config import load_recipe
    from smpo_cli.errors import UsageError
    from smpo_cli.training.sharding import check_sharding

    plain = load_recipe("tiny_dpo_cpu", "train", []).recipe
    z3 = load_recipe("tiny_dpo_cpu", "train", ["train.sharding=zero3"]).recipe
    # an accelerate DeepSpeed config decides the stage; smpo refuses what it does not run
    assert check_sharding(plain, 8, "DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == "zero3"
    assert check_sharding(plain, 8, "DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == "zero2"
    assert check_sharding(z3, 8, "MULTI_GPU") == "zero3" and check_sharding(z3, 1, "NO") == "none"
    with pytest.raises(UsageError, match="zero_stage 1"):
        check_sharding(plain, 8, "DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    with pytest.raises(UsageError, match="does not offload"):
        check_sharding(plain, 8, "DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                               "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})  # fmt: skip
    with pytest.raises(UsageError, match="train.sharding=zero3 under an accelerate DeepSpeed config"):
        check_sharding(z3, 8, "DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    code = run(["-q", "train", "--recipe", "tiny_dpo_cpu", f"data.path={scored}", "-o", str(tmp_path / "o"),
                "train.sharding=zero2", "train.lora_rank=4", "train.max_steps=1"])  # fmt: skip
    assert code == 2 and "train.sharding=zero2 shards full fine-tuning" in capsys.readouterr().err


def test_deepspeed_logs_never_reach_stdout(capsys):
    """DeepSpeed's logger writes to stdout, and accelerate imports it whenever it is installed: the CLI moves the
    handler to stderr as it is added, so `--json` output stays parseable."""
    import logging
    import sys

    from smpo_cli.cli._console import setup_logging

    setup_logging(logging.WARNING)
    logger = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler(stream=sys.stdout)  # what deepspeed.utils.logging does
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU")
        captured = capsys.readouterr()
        assert "Setting accelerator" not in captured.out and "Setting accelerator" in captured.err
    finally:
        logger.removeHandler(handler)



def _engine_steps_like_adamw(stage: int, device: str, backend: str) -> None:
    """Run in a fresh process (DeepSpeed keeps its process groups for the life of the process)."""
    import os
    import socket

    import torch
    import torch.distributed as dist

    from smpo_cli.training import zero

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})  # fmt: skip
    dist.init_process_group(backend, rank=0, world_size=1)
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 3)).to(device)  # noqa: E731
    plain, sharded = make(), make()
    sharded.load_state_dict(plain.state_dict())
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    engine = zero.init_engine(sharded, torch.optim.AdamW(sharded.parameters(), lr=1e-2, weight_decay=0.0),
                              stage, micro_batch=8, grad_accum=1, max_grad_norm=None, world=1)  # fmt: skip
    for _ in range(3):
        x = torch.randn(8, 16, device=device)
        plain(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        engine.backward(engine(x).pow(2).mean(), scale_wrt_gas=False)
        engine.step()
    weights = zero.full_model_state(engine, main=True)
    state = zero.full_optimizer_state(engine, main=True)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(weights[name], p.detach().cpu(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state["state"][name]["exp_avg"], opt.state[p]["exp_avg"].cpu(), atol=1e-6, rtol=1e-4)
    assert float(state["state"]["0.weight"]["step"]) == 3.0  # DeepSpeed's state-creating step not counted
    dist.destroy_process_group()


def _in_fresh_process(stage: int, device: str, backend: str) -> None:
    import os
    import subprocess
    import sys

    from tests.train.test_train_stage import ROOT

    code = f"from tests.train.test_train_zero import _engine_steps_like_adamw; _engine_steps_like_adamw({stage}, {device!r}, {backend!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engine_steps_like_adamw(stage):
    """smpo's ZeRO engine (one process) takes the same AdamW steps as torch's own optimiser, and the full weights
    and AdamW state it gathers for checkpoints are the same tensors."""
    _in_fresh_process(stage, "cpu", "gloo")


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engine_steps_like_adamw_on_cuda(stage):
    """The same on a GPU (NCCL; DeepSpeed's CUDA accelerator)."""
    _in_fresh_process(stage, "cuda", "nccl")
